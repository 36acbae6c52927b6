"""The lite judge's per-item latency at batch 1 (p50/p99) and its items/s scoring MSTS, on the CPU.

Times `LiteJudge.judge(cases)` (the Judge protocol, as the guard's output rail and `misguard score` call it): the
fine-tuned cross-encoder over every window of the response (each window carries the question; nothing is cut),
the heads and the trust score. The judge is --judge (a folder `misguard train --kind lite` wrote, e.g. a run of
bench/lite_validity.py); without one, a judge is fine-tuned here for one short epoch on --train-rows rows of the
shared Safe-RLHF mini file: only speed is measured, and the cost of a forward pass does not depend on the weights.

- Batch 1: MOSSBench's real questions and recorded responses (../shared/data/mossbench/
  mossbench_benign_responses.jsonl: 2,700 responses of 9 VLMs), --warmup untimed calls, then one call per item
  for --items items; p50/p90/p99/max of the per-call wall time, overall and by the number of windows the
  response needs. Issue 16's goal: p50 <= 20 ms, p99 <= 80 ms on 2 cores.
- Throughput: MSTS's 4,000 rows (question + image description + recorded response, ../shared/data/msts/), judged
  in chunks of the judge's chunk_size as `misguard score` does, after one untimed chunk. Goal: >= 30 items/s.

    .venv-test/bin/python bench/lite_latency.py --judge bench-results/lite-validity/pooled-seed0/judge

Prints a setup line (hardware, versions, date, command, text lengths), then one JSON line per measurement, each
with the 1-minute load average before and after it (other processes on a shared machine show up there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardware import cpu_name  # noqa: E402
from misguard.judge_training.data import TextSource, read_text_examples  # noqa: E402
from misguard.judge_training.lite import LiteTrainConfig, train_lite_judge  # noqa: E402
from misguard.judges import Case  # noqa: E402
from misguard.judges.lite.judge import LiteJudge  # noqa: E402
from misguard.judges.lite.model import encode_items  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MOSSBENCH = SHARED / "mossbench" / "mossbench_benign_responses.jsonl"
MSTS = SHARED / "msts" / "msts_english_multimodal_normalized.jsonl"
SAFE_RLHF = SHARED / "text_safety" / "safe_rlhf_mini.jsonl"
GOALS = {"p50_ms": 20.0, "p99_ms": 80.0, "msts_items_per_s": 30.0}


def mossbench_cases(path: Path, n: int, seed: int) -> list[Case]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    rows = (rows * (n // len(rows) + 1))[:n]
    return [Case(id=str(i), images=(), question=row["question"], response=row["response"] or "")
            for i, row in enumerate(rows)]


def msts_cases(path: Path) -> list[Case]:
    examples = read_text_examples(TextSource(path=path, label_field="auto_eval.gpt-4o-2024-05-13", source="msts",
                                             image_description_field="unsafe_image_description",
                                             group_field="case_id"))
    return [Case(id=e.id, images=(), question=e.question, response=e.response,
                 image_description=e.image_description) for e in examples]


def quick_judge(folder: Path, rows: int, seed: int) -> Path:
    """A lite judge fine-tuned for one epoch on `rows` Safe-RLHF mini rows (the speed of its pass is what counts)."""
    examples = read_text_examples(TextSource(path=SAFE_RLHF, source="safe_rlhf"))
    random.Random(seed).shuffle(examples)
    train, val = examples[:rows], examples[rows:rows + max(40, rows // 4)]
    train_lite_judge(LiteTrainConfig(out=folder, epochs=1, seed=seed, judge_id="bench-lite"), train, val,
                     progress=False)
    return folder


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2), "max": round(float(ms.max()), 2),
            "mean": round(float(ms.mean()), 2)}


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({"bench": "lite_latency", **record}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--judge", type=Path, default=None, help="a lite judge folder (default: fine-tune a quick one)")
    ap.add_argument("--items", type=int, default=500, help="timed MOSSBench items at batch 1")
    ap.add_argument("--warmup", type=int, default=20, help="untimed batch-1 calls before the timings")
    ap.add_argument("--msts-items", type=int, default=None, help="MSTS rows in the throughput pass (default: all)")
    ap.add_argument("--train-rows", type=int, default=200, help="rows the quick judge is fine-tuned on")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for path in (MOSSBENCH, MSTS):
        if not path.is_file():
            raise SystemExit(f"{path}: not found (the shared data this benchmark reads)")
    with tempfile.TemporaryDirectory(prefix="misguard-bench-lite-") as work:
        t = time.perf_counter()
        folder = args.judge or quick_judge(Path(work) / "judge", args.train_rows, args.seed)
        judge = LiteJudge(folder)
        setup_s = time.perf_counter() - t
        cases = mossbench_cases(MOSSBENCH, args.warmup + args.items, args.seed)
        warmup, items = cases[:args.warmup], cases[args.warmup:]
        encoded = encode_items(judge.tokenizer, [c.question for c in items], [c.response for c in items], None,
                               judge.windows)
        windows = [len(e.windows) for e in encoded]
        tokens = [len(ids) for ids in judge.tokenizer([c.response for c in items], add_special_tokens=False,
                                                      verbose=False)["input_ids"]]
        emit({"setup": True, "judge": str(folder) if args.judge else f"quick ({args.train_rows} Safe-RLHF rows)",
              "windows": judge.windows.to_dict(), "items": len(items),
              "response_tokens": {"p50": float(np.percentile(tokens, 50)), "p99": float(np.percentile(tokens, 99)),
                                  "max": max(tokens), "share_windowed": round(sum(w > 1 for w in windows)
                                                                              / len(windows), 3)},
              "setup_s": round(setup_s, 1), "cpu": cpu_name(), "cores": os.cpu_count(),
              "cores_usable": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"),
              "command": " ".join([Path(sys.executable).name, *sys.argv])})

        for case in warmup:
            judge.judge([case])
        before = load_1m()
        seconds = []
        for case in items:
            t = time.perf_counter()
            judge.judge([case])
            seconds.append(time.perf_counter() - t)
        by_windows = {}
        for count in sorted(set(windows)):
            chosen = [s for s, w in zip(seconds, windows) if w == count]
            by_windows[str(count)] = {"items": len(chosen), **percentiles_ms(chosen)}
        latency = percentiles_ms(seconds)
        emit({"batch_size": 1, "texts": "mossbench", "items": len(items), "latency_ms": latency,
              "latency_ms_by_response_windows": by_windows, "goals": {k: GOALS[k] for k in ("p50_ms", "p99_ms")},
              "goal_met": latency["p50"] <= GOALS["p50_ms"] and latency["p99"] <= GOALS["p99_ms"],
              "load_1m": [before, load_1m()]})

        msts = msts_cases(MSTS)[:args.msts_items]
        size = judge.chunk_size
        judge.judge(msts[:size])  # warm-up
        before = load_1m()
        t = time.perf_counter()
        for start in range(0, len(msts), size):
            judge.judge(msts[start:start + size])
        elapsed = time.perf_counter() - t
        emit({"texts": "msts", "items": len(msts), "chunk": size, "seconds": round(elapsed, 1),
              "items_per_s": round(len(msts) / elapsed, 2), "goal_items_per_s": GOALS["msts_items_per_s"],
              "goal_met": len(msts) / elapsed >= GOALS["msts_items_per_s"], "load_1m": [before, load_1m()]})


if __name__ == "__main__":
    main()
