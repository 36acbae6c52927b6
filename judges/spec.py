"""A judge is a folder: a model saved with save_pretrained (or a lite judge's heads) plus `judge.json`, the typed
`JudgeSpec` (kind, template id, label tokens, threshold, optional calibration), and `judge_card.json`, the typed
`JudgeCard` (what it was trained on and how well it did). A plain instruct VLM folder with no judge.json is a
zero-shot judge that answers JSON the way GPT-4o did.

Both files carry a version; reading one validates it, and a bad file gets one line naming the file and the field.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from misguard.calibration import Calibration, CalibrationFormatError
from misguard.core.errors import DataError, MisguardError
from misguard.core.jsonl import read_json_record, write_text_atomic
from misguard.engines.messages import LabelSet
from misguard.judges.protocol import JudgeBase
from misguard.judges.templates import CODES, DEFAULT_JSON_TEMPLATE, get_template

JUDGE_FILE = "judge.json"
CARD_FILE = "judge_card.json"
JUDGE_FORMAT_VERSION = 1
CARD_VERSION = 1


class JudgeSpec(BaseModel):
    """The contents of judge.json."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = JUDGE_FORMAT_VERSION
    id: str
    template: str
    label_tokens: dict[str, int] | None = None
    """Codes mode: answer code ("1".."6") -> its single token id in the judge's tokenizer."""
    unsafe_threshold: float = 0.5
    """A response is labelled Unsafe when p_unsafe >= this."""
    calibration: dict | None = None
    base_model: str | None = None
    kind: Literal["vlm", "lite"] = "vlm"
    """vlm: a VLM read through a prompt template; lite: frozen text encoder + logistic heads (judges/lite)."""
    encoder: dict | None = None
    """lite: the text encoder (name, package, max_tokens)."""
    heads: dict | None = None
    """lite: the heads' settings (file, features, C, dim, perception_levels)."""

    def label_set(self) -> LabelSet:
        """The answer codes as label tokens, in CODES order (codes templates only)."""
        tokens = self.label_tokens or {}
        return LabelSet(ids=tuple(tokens[c] for c in CODES), texts=tuple(CODES))


class JudgeCard(BaseModel):
    """The contents of judge_card.json: what a trained judge is, what it saw and how well it agreed with the
    held-out labels. Sections that apply to one kind of judge only are None for the other."""

    model_config = ConfigDict(extra="forbid")

    card_version: int = CARD_VERSION
    kind: Literal["vlm", "lite"]
    judge_id: str
    template: str
    misguard_version: str
    created: str
    """UTC, ISO 8601."""
    reads: str | None = None
    """What the judge reads (a lite judge never sees the images)."""
    base_model: str | None = None
    """vlm: the base VLM folder."""
    base_encoder: dict[str, Any] | None = None
    """lite: the text encoder (name, package and its version, window, frozen)."""
    features: dict[str, Any] | None = None
    heads: dict[str, Any] | None = None
    training: dict[str, Any]
    """The settings it was trained with, the device and the seconds it took."""
    split_sizes: dict[str, Any]
    label_counts: dict[str, Any]
    data_hashes: dict[str, str]
    model_selection: dict[str, Any] | None = None
    """lite: the C search."""
    validation: dict[str, Any] | None = None
    """Agreement with the held-out labels (vlm: per epoch, and the best epoch's)."""
    unsafe_threshold: float = 0.5

    def save(self, folder: str | Path) -> Path:
        """Write judge_card.json into `folder` (atomically); returns its path."""
        path = Path(folder) / CARD_FILE
        write_text_atomic(path, self.model_dump_json(indent=2) + "\n")
        return path


def read_judge_spec(folder: str | Path) -> JudgeSpec:
    """The judge folder's judge.json, or a zero-shot JSON spec for a plain model folder. Raises DataError for
    an invalid judge.json (naming the field) and MisguardError for a folder that is not a model."""
    folder = Path(folder)
    path = folder / JUDGE_FILE
    if not path.exists():
        if not (folder / "config.json").exists():
            raise MisguardError(f"{folder}: not a judge folder (no {JUDGE_FILE}) nor a model folder (no config.json)")
        return JudgeSpec(id=f"zero-shot:{folder.name}", template=DEFAULT_JSON_TEMPLATE)
    spec = read_json_record(path, JudgeSpec, version_field="format_version", supported=JUDGE_FORMAT_VERSION)
    if spec.kind == "lite":
        if spec.heads is None:
            raise DataError("a lite judge needs its heads' settings", path=path, field="heads")
        return spec
    template = get_template(spec.template)
    if template.mode == "codes" and set(spec.label_tokens or {}) != set(CODES):
        raise DataError(f"codes templates need a token id for each of {sorted(CODES)}", path=path,
                        field="label_tokens")
    return spec


def write_spec(folder: str | Path, spec: JudgeSpec) -> Path:
    """Write judge.json into `folder` (atomically); returns its path."""
    path = Path(folder) / JUDGE_FILE
    write_text_atomic(path, spec.model_dump_json(indent=2) + "\n")
    return path


def read_judge_card(folder: str | Path) -> JudgeCard:
    """The folder's judge_card.json. Raises DataError naming the file (and the field) when it is missing or bad."""
    path = Path(folder) / CARD_FILE
    return read_json_record(path, JudgeCard, version_field="card_version", supported=CARD_VERSION)


def embed_calibration(folder: str | Path, calibration: Calibration) -> Path:
    """Put `calibration` into the judge folder's judge.json, so the judge applies it by default. Returns the path.
    Raises MisguardError for a folder without judge.json."""
    folder = Path(folder)
    if not (folder / JUDGE_FILE).exists():
        raise MisguardError(f"{folder}: no {JUDGE_FILE} to embed the calibration in (make it a judge folder first "
                            "with `misguard make-judge`)")
    spec = read_judge_spec(folder)
    spec.calibration = calibration.to_dict()
    return write_spec(folder, spec)


def spec_calibration(spec: JudgeSpec, folder: str | Path) -> Calibration | None:
    """The calibration embedded in judge.json, or None. Raises DataError naming judge.json and the field."""
    if spec.calibration is None:
        return None
    try:
        return Calibration.from_dict(spec.calibration)
    except CalibrationFormatError as error:
        raise DataError(error.reason, path=Path(folder) / JUDGE_FILE, field=f"calibration.{error.field}") from None


def calibration_id(calibration: Calibration | None) -> str | None:
    """A calibration's id: "sha256:" and the first 16 hex digits of its canonical JSON (None for no calibration).
    Judgments carry it, so judgments made with different calibrations are never mixed."""
    if calibration is None:
        return None
    canonical = json.dumps(calibration.to_dict(), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


class FolderJudge(JudgeBase):
    """What every judge read from a folder shares: its judge.json, its calibration (judge.json's, or `calibration`
    in its place) and the Unsafe threshold that follows from them (the calibration's, else judge.json's)."""

    def __init__(self, folder: str | Path, *, calibration: Calibration | None = None):
        self.folder = Path(folder)
        self.spec = read_judge_spec(self.folder)
        self.calibration = calibration if calibration is not None else spec_calibration(self.spec, self.folder)
        self._calibration_id = calibration_id(self.calibration)
        self._threshold = (self.calibration.threshold.value if self.calibration is not None
                           else self.spec.unsafe_threshold)

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def template(self) -> str:
        return self.spec.template

    @property
    def calibration_id(self) -> str | None:
        return self._calibration_id

    @property
    def unsafe_threshold(self) -> float:
        return self._threshold
