"""The local VLM judge: GPT-4o's place in the MIS loop, taken by an open VLM on local hardware."""
from misguard.judges.judge import JUDGE_FILE, Case, Judge, JudgeSpec, load_judge, read_judge_spec, write_judge_spec

__all__ = ["JUDGE_FILE", "Case", "Judge", "JudgeSpec", "load_judge", "read_judge_spec", "write_judge_spec"]
