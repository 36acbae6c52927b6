"""The judges: GPT-4o's place in the MIS loop. One interface (`Judge`, protocol.py) and its implementations: the
VLM judge on any engine (vlm.py), the lite judge on a CPU (lite/), and the cascade of the two (cascade.py). A judge
is a folder (spec.py); `load_judge` loads whichever kind a folder holds, importing the heavy code only then."""
from __future__ import annotations

import importlib
from pathlib import Path

from misguard.calibration import Calibration
from misguard.engines.base import EngineOptions
from misguard.judges.protocol import Assessment, Case, Judge
from misguard.judges.spec import JUDGE_FILE, JudgeCard, JudgeSpec, read_judge_spec

KINDS: dict[str, str] = {
    # judge.json kind: the class that judges with it (imported when a folder of that kind is loaded)
    "vlm": "misguard.judges.vlm:VLMJudge",
    "lite": "misguard.judges.lite.judge:LiteJudge",
}


def load_judge(folder: str | Path, engine: str = "transformers", options: EngineOptions | None = None, *,
               served_model: str | None = None, calibration: Calibration | None = None) -> Judge:
    """The judge in a folder, whatever its kind: a VLM judge on `engine` (with `options`; `served_model` names it
    on an OpenAI-compatible server), or a lite judge (CPU; the engine settings do not apply). `calibration`
    replaces the one in judge.json. Raises DataError for a bad judge.json, MisguardError for a folder that is not
    a judge or a model, and MissingExtraError when the kind's optional dependency is missing."""
    spec = read_judge_spec(folder)
    module_name, class_name = KINDS[spec.kind].split(":")
    judge_class = getattr(importlib.import_module(module_name), class_name)
    if spec.kind == "lite":
        return judge_class(folder, calibration=calibration)
    return judge_class(folder, engine, options, served_model=served_model, calibration=calibration)


__all__ = ["JUDGE_FILE", "KINDS", "Assessment", "Case", "Judge", "JudgeCard", "JudgeSpec", "load_judge",
           "read_judge_spec"]
