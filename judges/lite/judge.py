"""A lite judge folder: judge.json (kind "lite", the encoder, the heads' settings, optional calibration) and
heads.safetensors. It reads the question, the response and, when the data has one, an image description; it
never sees the images themselves (no registry package ships real image-encoder weights), as its card says.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from misguard.judges.judge import (
    JUDGE_FILE,
    Case,
    JudgeSpec,
    calibration_id,
    judgments_from_probabilities,
    read_judge_spec,
    spec_calibration,
)
from misguard.judges.lite.encoder import ENCODER_NAME, ENCODER_PACKAGE, MAX_TOKENS, TextEncoder
from misguard.judges.lite.heads import LiteHeads
from misguard.core.errors import DataError, MisguardError
from misguard.core.io import write_text_atomic
from misguard.core.records import Judgment

if TYPE_CHECKING:
    from misguard.calibration import Calibration

LITE_TEMPLATE = "lite-minilm-v1"
"""Judgments by a lite judge carry this as their template id."""
CARD_FILE = "judge_card.json"


@dataclass(frozen=True)
class LiteTemplate:
    id: str = LITE_TEMPLATE
    mode: str = "lite"


class LiteJudge:
    """A lite judge folder, ready to judge. The same surface as the VLM Judge: judge(cases) -> Judgments,
    plus probabilities(...) for the guard. Raises DataError for a malformed folder and MissingExtraError when
    the encoder's package is not installed."""

    kind = "lite"

    def __init__(self, folder: str | Path, *, calibration: Calibration | None = None,
                 encoder: TextEncoder | None = None):
        self.folder = Path(folder)
        self.spec: JudgeSpec = read_judge_spec(self.folder)
        if self.spec.kind != "lite":
            raise MisguardError(f"{self.folder}: not a lite judge (judge.json kind is {self.spec.kind!r})")
        self.template = LiteTemplate()
        self.heads = LiteHeads.load(self.folder, self.spec.heads or {})
        self.calibration = calibration if calibration is not None else spec_calibration(self.spec, self.folder)
        self.calibration_id = calibration_id(self.calibration)
        self.unsafe_threshold = (self.calibration.threshold.value if self.calibration is not None
                                 else self.spec.unsafe_threshold)
        max_tokens = int((self.spec.encoder or {}).get("max_tokens", MAX_TOKENS))
        self.encoder = encoder or TextEncoder(max_tokens=max_tokens)
        features = 4 * self.encoder.dim + 1
        if self.heads.safety_coef_.shape[0] != features:
            raise DataError(f"the heads take {self.heads.safety_coef_.shape[0]} features; this encoder's layout has "
                            f"{features}", path=self.folder / JUDGE_FILE, field="heads.dim")

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def chunk_size(self) -> int:
        return 256

    @property
    def has_perception(self) -> bool:
        return self.heads.perception_coef_ is not None

    def probabilities(self, questions: Sequence[str], responses: Sequence[str],
                      image_texts: Sequence[str | None] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw (uncalibrated) p_unsafe [n] and p_perception [n, 3] (None without a perception head)."""
        from misguard.judges.lite.heads import build_features

        return self.heads.predict(build_features(self.encoder, questions, responses, image_texts))

    def judge(self, cases: Sequence[Case]) -> list[Judgment]:
        """One Judgment per case, in order (MIS items have no image description: question and response only).
        Raises MisguardError when the judge has no perception head (MIS metrics need the level)."""
        if not self.has_perception:
            raise MisguardError(f"{self.folder}: this lite judge was trained without perception labels; MIS "
                                "scoring needs its perception head")
        if not cases:
            return []
        raw_unsafe, raw_perception = self.probabilities([c.response.question for c in cases],
                                                        [c.response.response for c in cases])
        return judgments_from_probabilities(self, cases, list(range(len(cases))), raw_unsafe, raw_perception, "")

    def describe(self) -> dict[str, Any]:
        return {"judge": self.spec.model_dump(), "engine": {"engine": "lite", "encoder": self.encoder.describe()},
                "calibration": self.calibration_id, "unsafe_threshold": self.unsafe_threshold}

    @property
    def engine(self):
        """What score's manifest records as the engine."""
        return self

    def close(self) -> None:
        self.encoder = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_lite_judge(folder: str | Path, heads: LiteHeads, *, judge_id: str,
                     card: dict[str, Any] | None = None, unsafe_threshold: float = 0.5) -> JudgeSpec:
    """Save a lite judge folder: heads.safetensors, judge.json and (when given) judge_card.json. Returns the
    spec. The folder is created; files in it are replaced whole (atomic writes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = heads.save(folder)
    spec = JudgeSpec(id=judge_id, template=LITE_TEMPLATE, kind="lite", unsafe_threshold=unsafe_threshold,
                     encoder={"name": ENCODER_NAME, "package": ENCODER_PACKAGE, "max_tokens": MAX_TOKENS},
                     heads=settings, base_model=ENCODER_NAME)
    write_text_atomic(folder / JUDGE_FILE, json.dumps(spec.model_dump(), indent=2) + "\n")
    if card is not None:
        write_text_atomic(folder / CARD_FILE, json.dumps(card, indent=2) + "\n")
    return spec
