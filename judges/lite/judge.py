"""A lite judge folder: judge.json (kind "lite", the encoder, the heads' settings, optional calibration) and
heads.safetensors. It reads the question, the response and, when the data has one, an image description; it
never sees the images themselves (no registry package ships real image-encoder weights), as its card says.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from misguard.calibration import Calibration
from misguard.core.errors import DataError, MisguardError
from misguard.judges.lite.encoder import ENCODER_NAME, ENCODER_PACKAGE, MAX_TOKENS, TextEncoder
from misguard.judges.lite.heads import LiteHeads, build_features
from misguard.judges.protocol import Assessment, Case, assessments
from misguard.judges.spec import JUDGE_FILE, FolderJudge, JudgeCard, JudgeSpec, write_spec

LITE_TEMPLATE = "lite-minilm-v1"
"""Judgments by a lite judge carry this as their template id."""
READS_RESPONSES_ONLY = "the lite judge reads responses only: it does not judge a request alone"


class LiteJudge(FolderJudge):
    """A lite judge folder, ready to judge responses (a request case, with no response, is unscored: the lite
    judge has no request head). Raises DataError for a malformed folder and MissingExtraError when the
    encoder's package is not installed."""

    reads_requests = False
    chunk_size = 256

    def __init__(self, folder: str | Path, *, calibration: Calibration | None = None,
                 encoder: TextEncoder | None = None):
        super().__init__(folder, calibration=calibration)
        if self.spec.kind != "lite":
            raise MisguardError(f"{self.folder}: not a lite judge (judge.json kind is {self.spec.kind!r})")
        self.heads = LiteHeads.load(self.folder, self.spec.heads or {})
        max_tokens = int((self.spec.encoder or {}).get("max_tokens", MAX_TOKENS))
        self.encoder = encoder or TextEncoder(max_tokens=max_tokens)
        features = 4 * self.encoder.dim + 1
        if self.heads.safety_coef_.shape[0] != features:
            raise DataError(f"the heads take {self.heads.safety_coef_.shape[0]} features; this encoder's layout has "
                            f"{features}", path=self.folder / JUDGE_FILE, field="heads.dim")

    @property
    def has_perception(self) -> bool:
        return self.heads.perception_coef_ is not None

    def judge(self, cases: Sequence[Case]) -> list[Assessment]:
        """One Assessment per case, in order, from the question, the response and the image description."""
        responses = [i for i, case in enumerate(cases) if not case.is_request]
        out: list[Any] = [Assessment.unscored(self.id, self.template, READS_RESPONSES_ONLY)] * len(cases)
        if not responses:
            return out
        chosen = [cases[i] for i in responses]
        raw_unsafe, raw_perception = self.heads.predict(build_features(
            self.encoder, [c.question for c in chosen], [c.response for c in chosen],
            [c.image_description for c in chosen]))
        for i, assessment in zip(responses, assessments(
                self.id, self.template, raw_unsafe, raw_perception, calibration=self.calibration,
                calibration_id=self.calibration_id, threshold=self.unsafe_threshold)):
            out[i] = assessment
        return out

    def describe(self) -> dict[str, Any]:
        return {"judge": self.spec.model_dump(), "engine": {"engine": "lite", "encoder": self.encoder.describe()},
                "calibration": self.calibration_id, "unsafe_threshold": self.unsafe_threshold}

    def close(self) -> None:
        self.encoder = None


def write_lite_judge(folder: str | Path, heads: LiteHeads, *, judge_id: str, card: JudgeCard | None = None,
                     unsafe_threshold: float = 0.5) -> JudgeSpec:
    """Save a lite judge folder: heads.safetensors, judge.json and (when given) judge_card.json. Returns the
    spec. The folder is created; files in it are replaced whole (atomic writes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = heads.save(folder)
    spec = JudgeSpec(id=judge_id, template=LITE_TEMPLATE, kind="lite", unsafe_threshold=unsafe_threshold,
                     encoder={"name": ENCODER_NAME, "package": ENCODER_PACKAGE, "max_tokens": MAX_TOKENS},
                     heads=settings, base_model=ENCODER_NAME)
    write_spec(folder, spec)
    if card is not None:
        card.save(folder)
    return spec
