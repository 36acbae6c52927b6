"""A judge's calibration as one versioned JSON file: the safety-head calibrator, the optional perception-head
calibrator, the Unsafe decision threshold, what it was fitted on, and a before/after report.

    calibration = fit_calibration(p_unsafe, safety_labels, p_perception, perception_labels)
    calibration.save("calibration.json")
    p_unsafe_cal, p_perception_cal = Calibration.load("calibration.json").apply(p_unsafe, p_perception)
    unsafe = calibration.threshold.is_unsafe(p_unsafe_cal)

A VLM judge's calibration may also hold its trust score (`trust`, calibration/trust.py: fitted by `misguard
calibrate` on the same rows), under which a verdict is flagged out of domain.

The file ({"format": "misguard-calibration", "version": 2, ...}) is plain JSON, never a pickle; loading it
gives bit-identical predictions. Version 1 files (no trust) are read as they are.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from misguard.calibration._checks import CalibrationFormatError, check_labels, check_probabilities
from misguard.calibration.calibrators import (
    AUTO_METHODS,
    BaseCalibrator,
    calibrator_from_dict,
    compare_methods,
    cross_val_proba,
    make_calibrator,
)
from misguard.calibration.scores import calibration_report
from misguard.calibration.thresholds import DEFAULT_THRESHOLD, Threshold, fit_threshold
from misguard.calibration.trust import ConformalTrust
from misguard.core.errors import DataError
from misguard.core.jsonl import unreadable_json, write_text_atomic
from misguard.core.records import PERCEPTION_LEVELS, SAFETY_LABELS

FORMAT = "misguard-calibration"
VERSION = 2
_FIELDS = ("format", "version", "safety", "perception", "threshold", "trust", "fitted_on", "report")
MISSING_LABEL = -1
"""What encode_perception returns for a reference without a perception label (a binary-only reference)."""


class CalibrationFileError(DataError, ValueError):
    """A calibration file that cannot be read or is malformed: its message names the file and the field.

    Both a DataError (the CLI prints it as one line) and a ValueError.
    """


# --------------------------------------------------------------------------------------------------------
# Reference labels -> class indices
# --------------------------------------------------------------------------------------------------------

def encode_safety(labels: Iterable[str]) -> np.ndarray:
    """Return class indices for reference safety labels: "Safe" -> 0, "Unsafe" -> 1.

    Raises ValueError naming the first row whose label is neither.
    """
    indices = []
    for row, label in enumerate(labels):
        if label not in SAFETY_LABELS:
            raise ValueError(f"safety label at row {row} is {label!r}; expected one of: {', '.join(SAFETY_LABELS)}")
        indices.append(SAFETY_LABELS.index(label))
    return np.asarray(indices, dtype=np.int64)


def encode_perception(labels: Iterable[str | None], allow_missing: bool = False) -> np.ndarray:
    """Return class indices for reference perception labels: "Level1"/"Perception Level1" -> 0, ... Level3 -> 2.

    With allow_missing, None (a binary-only reference) becomes MISSING_LABEL (-1).
    Raises ValueError naming the first row whose label is not a perception level.
    """
    indices = []
    for row, label in enumerate(labels):
        if label is None and allow_missing:
            indices.append(MISSING_LABEL)
            continue
        level = label.removeprefix("Perception ") if isinstance(label, str) else label
        if level not in PERCEPTION_LEVELS:
            raise ValueError(f"perception label at row {row} is {label!r}; expected one of: "
                             f"{', '.join(PERCEPTION_LEVELS)} (optionally prefixed 'Perception ')"
                             + ("" if allow_missing else ", or pass allow_missing=True for binary-only references"))
        indices.append(PERCEPTION_LEVELS.index(level))
    return np.asarray(indices, dtype=np.int64)


# --------------------------------------------------------------------------------------------------------
# The calibration file
# --------------------------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """Everything needed to turn a judge's raw probabilities into calibrated ones and an Unsafe decision."""

    safety: BaseCalibrator
    """Fitted on the binary safety head (1-D p_unsafe)."""
    perception: BaseCalibrator | None = None
    """Fitted on the perception head ([n, 3]), or None: perception probabilities pass through unchanged."""
    threshold: Threshold = field(default_factory=lambda: Threshold(DEFAULT_THRESHOLD, "fixed"))
    """Applies to the calibrated p_unsafe."""
    trust: ConformalTrust | None = None
    """A VLM judge's trust score (on the calibrated probabilities and the answer codes' mass), or None."""
    fitted_on: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON metadata: the judge, reference files, sample counts."""
    report: dict[str, Any] = field(default_factory=dict)
    """Free-form JSON: calibration_report before / after per head, CV log-losses."""

    def __post_init__(self):
        self.safety._check_fitted()
        if self.safety.head_ != "binary":
            raise ValueError(f"the safety calibrator must be fitted on the binary head, not {self.safety.head_}")
        if self.perception is not None:
            self.perception._check_fitted()
            if self.perception.head_ != "multiclass":
                raise ValueError("the perception calibrator must be fitted on the multiclass perception head")

    def apply(self, p_unsafe, p_perception=None) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (calibrated p_unsafe [n], calibrated p_perception [n, k] or None).

        p_perception is None -> None; with no perception calibrator it is returned checked but unchanged.
        Raises ValueError for malformed arrays (shape, NaN, outside [0, 1]) or row counts that differ.
        """
        unsafe = check_probabilities(p_unsafe, "p_unsafe")
        if unsafe.ndim != 1:
            raise ValueError(f"p_unsafe must be a 1-D array of P(Unsafe), got shape {unsafe.shape}")
        calibrated_unsafe = self.safety.predict_proba(unsafe)[:, 1]
        if p_perception is None:
            return calibrated_unsafe, None
        perception = check_probabilities(p_perception, "p_perception")
        if perception.ndim != 2:
            raise ValueError(f"p_perception must be a 2-D array [n, k] of level probabilities, got shape "
                             f"{perception.shape}")
        if perception.shape[0] != unsafe.shape[0]:
            raise ValueError(f"p_perception has {perception.shape[0]} rows but p_unsafe has {unsafe.shape[0]}")
        if self.perception is None:
            return calibrated_unsafe, perception
        return calibrated_unsafe, self.perception.predict_proba(perception)

    # ---- JSON ----

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON-ready dict that `save` writes."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "safety": self.safety.to_dict(),
            "perception": None if self.perception is None else self.perception.to_dict(),
            "threshold": self.threshold.to_dict(),
            "trust": None if self.trust is None else self.trust.to_dict(),
            "fitted_on": self.fitted_on,
            "report": self.report,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Calibration:
        """Rebuild from `to_dict`'s output. Raises CalibrationFormatError (a ValueError naming the field) for
        another format, a newer or unknown version, or any malformed field."""
        if not isinstance(data, dict):
            raise CalibrationFormatError("<root>", "expected a JSON object")
        if data.get("format") != FORMAT:
            raise CalibrationFormatError("format", f"expected {FORMAT!r}, got {data.get('format')!r}: "
                                         "not a misguard calibration file")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise CalibrationFormatError("version", f"expected an integer, got {version!r}")
        if version > VERSION:
            raise CalibrationFormatError("version", f"version {version} was written by a newer misguard; this one "
                                         f"reads version {VERSION} (upgrade misguard)")
        if version < 1:
            raise CalibrationFormatError("version", f"unknown version {version}; expected {VERSION}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise CalibrationFormatError(unknown[0], f"unknown field; expected only {list(_FIELDS)}")
        if "safety" not in data:
            raise CalibrationFormatError("safety", "missing")
        safety = _nested(calibrator_from_dict, data["safety"], "safety")
        if safety.head_ != "binary":
            raise CalibrationFormatError("safety.head", f"the safety calibrator must be 'binary', got {safety.head_!r}")
        perception = None
        if data.get("perception") is not None:
            perception = _nested(calibrator_from_dict, data["perception"], "perception")
            if perception.head_ != "multiclass":
                raise CalibrationFormatError("perception.head", "the perception calibrator must be 'multiclass'")
        threshold = (_nested(Threshold.from_dict, data["threshold"], "threshold") if "threshold" in data
                     else Threshold(DEFAULT_THRESHOLD, "fixed"))
        trust = None if data.get("trust") is None else _nested(ConformalTrust.from_dict, data["trust"], "trust")
        metadata = {}
        for key in ("fitted_on", "report"):
            value = data.get(key, {})
            if not isinstance(value, dict):
                raise CalibrationFormatError(key, "expected an object")
            metadata[key] = value
        return cls(safety=safety, perception=perception, threshold=threshold, trust=trust, **metadata)

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON, atomically (a crash leaves the old file or the new one).

        Raises TypeError if fitted_on or report hold something JSON cannot represent, OSError on write failure.
        """
        text = json.dumps(self.to_dict(), indent=2, allow_nan=False, ensure_ascii=False) + "\n"
        write_text_atomic(path, text)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration file written by `save`.

        Raises CalibrationFileError (a ValueError and a DataError) naming the file, and the field where there is
        one, for a missing or unreadable file, invalid JSON, another format, a newer version, or a bad field.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise CalibrationFileError(f"cannot read calibration file: {error}", path=path) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise CalibrationFileError(f"not valid JSON: {error.msg} (column {error.colno})", path=path,
                                       line=error.lineno) from None
        except (ValueError, RecursionError) as error:
            raise CalibrationFileError(f"not valid JSON: {unreadable_json(error)}", path=path) from None
        try:
            return cls.from_dict(data)
        except CalibrationFormatError as error:
            raise CalibrationFileError(error.reason, path=path, field=error.field) from None


def _nested(load, data: Any, prefix: str):
    try:
        return load(data)
    except CalibrationFormatError as error:
        inner = "" if error.field.startswith("<") else "." + error.field
        raise CalibrationFormatError(prefix + inner, error.reason) from None


# --------------------------------------------------------------------------------------------------------
# Fitting a whole calibration
# --------------------------------------------------------------------------------------------------------

def fit_calibration(p_unsafe, y_safety, p_perception=None, y_perception=None, *, method: str = "auto",
                    perception_method: str = "auto", threshold_rule: str = "max_kappa",
                    methods: tuple[str, ...] = AUTO_METHODS, cv: int = 5, seed: int = 0,
                    fitted_on: dict[str, Any] | None = None) -> Calibration:
    """Fit a Calibration on a judge's probabilities and the reference labels of the same responses.

    y_safety: "Safe"/"Unsafe" or 0/1 per response. y_perception (optional): levels as strings or 0..2, with
    None or -1 for binary-only references; only rows with a perception label fit the perception head, and no
    perception calibrator is fitted when p_perception or y_perception is None. `method` / `perception_method`:
    a method name, or "auto": the lowest held-out log-loss among "none" and `methods` (compare_methods), so the
    judge's own probabilities are kept unless a method beats them on rows it was not fitted on, and kept too
    when a class has fewer than `cv` labels to compare on. The threshold (rule "fixed", "max_kappa" or
    "match_rate") is fitted on the calibrated p_unsafe. The report holds per head: calibration_report before,
    after on the fitting data itself (in-sample: optimistic), and `after_cross_validated`: each row predicted by
    the method fitted on the other folds (None when a class has fewer than `cv` labels); with "auto", `auto`
    {folds, held_out: {method: calibration_report on held-out rows}, chosen, why} (held_out None, and why said,
    when there were too few labels to compare) and `cv_log_loss` {method: held-out log-loss}.

    Returns the Calibration. Raises ValueError for malformed input, an unknown method or rule, or too few
    labels for the fit or the cross-validation.
    """
    unsafe = check_probabilities(p_unsafe, "p_unsafe")
    if unsafe.ndim != 1:
        raise ValueError(f"p_unsafe must be a 1-D array of P(Unsafe), got shape {unsafe.shape}")
    safety_labels = _as_indices(y_safety, encode_safety)
    check_labels(safety_labels, unsafe.size, 2, "y_safety")
    safety, safety_choice = _fit_head(unsafe, safety_labels, method, methods, cv, seed)
    calibrated_unsafe = safety.predict_proba(unsafe)[:, 1]
    report: dict[str, Any] = {"safety": {
        "method": safety.method, **safety_choice,
        "before": calibration_report(unsafe, safety_labels), "after": calibration_report(calibrated_unsafe,
                                                                                         safety_labels),
        "after_cross_validated": _cross_validated(safety.method, unsafe, safety_labels, cv, seed, safety_choice)}}
    threshold = fit_threshold(calibrated_unsafe, safety_labels, threshold_rule)
    report["threshold"] = threshold.to_dict()
    metadata = {"n_safety": int(unsafe.size), "n_perception": 0}

    perception = None
    if p_perception is not None and y_perception is not None and _any_perception_label(y_perception):
        probs = check_probabilities(p_perception, "p_perception")
        if probs.ndim != 2:
            raise ValueError(f"p_perception must be a 2-D array [n, k], got shape {probs.shape}")
        if probs.shape[0] != unsafe.size:
            raise ValueError(f"p_perception has {probs.shape[0]} rows but p_unsafe has {unsafe.size}")
        levels = np.asarray(_as_indices(y_perception, lambda labels: encode_perception(labels, allow_missing=True)))
        if levels.shape != (probs.shape[0],):
            raise ValueError(f"y_perception has shape {levels.shape} but p_perception has {probs.shape[0]} rows")
        labelled = levels != MISSING_LABEL
        levels = check_labels(levels[labelled], int(labelled.sum()), probs.shape[1], "y_perception")
        probs = probs[labelled]
        perception, perception_choice = _fit_head(probs, levels, perception_method, methods, cv, seed)
        report["perception"] = {
            "method": perception.method, **perception_choice,
            "before": calibration_report(probs, levels),
            "after": calibration_report(perception.predict_proba(probs), levels),
            "after_cross_validated": _cross_validated(perception.method, probs, levels, cv, seed,
                                                      perception_choice)}
        metadata["n_perception"] = int(probs.shape[0])
    return Calibration(safety=safety, perception=perception, threshold=threshold,
                       fitted_on={**metadata, **(fitted_on or {})}, report=report)


def _cross_validated(method: str, probs: np.ndarray, labels: np.ndarray, cv: int, seed: int,
                     choice: dict[str, Any]) -> dict | None:
    """calibration_report of out-of-fold predictions (None when a class is too rare for `cv` folds); the one
    "auto" chose it on, when it did (the same folds)."""
    compared = (choice.get("auto") or {}).get("held_out")
    if compared is not None:
        return compared[method]
    held_out = cross_val_proba(method, probs, labels, cv=cv, seed=seed)
    return None if held_out is None else calibration_report(held_out if probs.ndim == 2 else held_out[:, 1], labels)


def _as_indices(labels, encode) -> np.ndarray:
    values = list(labels)
    if any(isinstance(value, str) or value is None for value in values):
        return encode(values)
    return np.asarray(values)


def _fit_head(probs: np.ndarray, labels: np.ndarray, method: str, methods: tuple[str, ...], cv: int,
              seed: int) -> tuple[BaseCalibrator, dict[str, Any]]:
    """The head's fitted calibrator, and how "auto" chose it: {"cv_log_loss", "auto"} for the report (an empty
    cv_log_loss and auto None for a method given by name)."""
    if method != "auto":
        return make_calibrator(method).fit(probs, labels), {"cv_log_loss": {}, "auto": None}
    candidates = ("none", *(name for name in methods if name != "none"))
    present, counts = np.unique(labels, return_counts=True)
    if present.size >= 2 and counts.min() < cv:
        why = (f"class {int(present[np.argmin(counts)])} has {int(counts.min())} label(s), too few to compare "
               f"methods on {cv} held-out folds: the judge's probabilities are kept")
        auto = {"folds": cv, "held_out": None, "chosen": "none", "why": why}
        return make_calibrator("none").fit(probs, labels), {"cv_log_loss": {}, "auto": auto}
    held_out = compare_methods(probs, labels, methods=candidates, cv=cv, seed=seed)
    losses = {name: float(figures["log_loss"]) for name, figures in held_out.items()}
    chosen = min(losses, key=losses.__getitem__)  # ties keep the first listed: "none"
    why = (f"{chosen} has the lowest held-out log-loss" if chosen != "none"
           else "no method beats the judge's own probabilities on held-out log-loss")
    auto = {"folds": cv, "held_out": held_out, "chosen": chosen, "why": why}
    return make_calibrator(chosen).fit(probs, labels), {"cv_log_loss": losses, "auto": auto}


def _any_perception_label(labels) -> bool:
    return any(label is not None and not (isinstance(label, (int, np.integer)) and label == MISSING_LABEL)
               for label in labels)
