"""Conformal trust: how usual a verdict is among a judge's own in-domain verdicts, and the threshold under which it
is flagged out of domain.

A judge measures some signals per verdict, each oriented so that larger is more unusual (a verdict too close to
call, a model that did not answer in the judge's format, a representation far from the training data). Against a
reference sample of in-domain rows, each signal becomes a conformal p-value: the share of reference rows at least as
unusual, counting the row itself; beyond the most unusual reference row, an exponential tail in units of the
reference's spread, so that farther is less trusted even where the reference is small. The trust score is the
smallest of them (unusual in any way is enough), in [0, 1]. The threshold is the `flag_share` quantile of the
trust scores of other in-domain rows, so that about that share of in-domain verdicts is flagged.

The lite judge keeps its reference in trust.safetensors (judges/lite/trust.py); a VLM judge's is fitted by
`misguard calibrate` on its calibration set and kept in the calibration file (`ConformalTrust`, plain JSON).

    trust = ConformalTrust.fit(reference_signals, calibration_signals, names=VLM_SIGNALS, flag_share=0.05)
    scores = trust.score(signals)            # [n] in [0, 1]
    flagged = trust.flagged(scores)          # out of domain
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from misguard.calibration._checks import CalibrationFormatError

DEFAULT_FLAG_SHARE = 0.05
"""The share of in-domain verdicts flagged out of domain unless told otherwise."""
MIN_ROWS = 20
"""Fewer in-domain rows than this fit no trust score: the threshold would be a guess."""
VLM_SIGNALS = ("margin", "label_mass", "perception_entropy")
"""What a VLM judge's trust reads off each verdict (see `vlm_signals`)."""
_EPS = 1e-6


def logit(p) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(p) - np.log1p(-p)


def margin_signal(p_unsafe, threshold: float) -> np.ndarray:
    """Minus the verdict's distance from the Unsafe threshold, in logits: larger = closer to the other label."""
    return -np.abs(logit(p_unsafe) - float(logit(np.array([threshold]))[0]))


def p_values(reference_sorted: np.ndarray, signals: np.ndarray) -> np.ndarray:
    """[n, k] in-domain p-values of `signals` [n, k] against a reference [m, k] sorted along each column."""
    reference_sorted = np.asarray(reference_sorted, dtype=np.float64)
    signals = np.asarray(signals, dtype=np.float64)
    n = reference_sorted.shape[0]
    out = np.empty_like(signals)
    for column in range(signals.shape[1]):
        reference = reference_sorted[:, column]
        at_least = n - np.searchsorted(reference, signals[:, column], side="left")
        out[:, column] = (at_least + 1) / (n + 1)
        beyond = signals[:, column] > reference[-1]
        scale = max(float(reference.std()), 1e-9)
        out[beyond, column] = np.exp(-(signals[beyond, column] - reference[-1]) / scale) / (n + 1)
    return out


def trust_scores(reference_sorted: np.ndarray, signals: np.ndarray) -> np.ndarray:
    """[n] trust scores: each row's smallest in-domain p-value (1: nothing unusual)."""
    return p_values(reference_sorted, signals).min(axis=1)


def flag_threshold(calibration_trust: np.ndarray, flag_share: float) -> float:
    """The trust threshold that flags about `flag_share` of these in-domain rows."""
    return float(np.quantile(np.asarray(calibration_trust, dtype=np.float64), flag_share, method="higher"))


def check_flag_share(flag_share: float) -> float:
    """`flag_share` if it is in (0, 0.5]; else ValueError."""
    if not (isinstance(flag_share, (int, float)) and 0.0 < flag_share <= 0.5):
        raise ValueError(f"flag_share must be in (0, 0.5], got {flag_share!r}")
    return float(flag_share)


def vlm_signals(p_unsafe, threshold: float, label_mass, p_perception=None) -> np.ndarray:
    """[n, 2 or 3] (VLM_SIGNALS order) for a VLM judge's verdicts, larger = more unusual: minus the margin of
    p_unsafe from the threshold in logits; minus the log of the answer codes' share of the next-token
    distribution (a model that wanted to say something else); the entropy of the perception levels (in bits, when
    the judge gives them)."""
    columns = [margin_signal(p_unsafe, threshold),
               -np.log(np.clip(np.asarray(label_mass, dtype=np.float64), 1e-12, 1.0))]
    if p_perception is not None:
        probs = np.clip(np.asarray(p_perception, dtype=np.float64), 1e-12, 1.0)
        columns.append(-(probs * np.log2(probs)).sum(axis=1))
    return np.stack(columns, axis=1)


@dataclass(frozen=True)
class ConformalTrust:
    """A fitted trust score small enough for JSON: the signals' names, the sorted reference and the threshold."""

    signals: tuple[str, ...]
    reference: np.ndarray
    """[m, len(signals)], each column sorted."""
    threshold: float
    flag_share: float
    fitted_on: int
    """How many in-domain rows it was fitted on (reference and threshold halves together)."""

    @classmethod
    def fit(cls, signals: np.ndarray, *, names: tuple[str, ...], flag_share: float = DEFAULT_FLAG_SHARE,
            seed: int = 0) -> ConformalTrust:
        """Fit on in-domain rows' signals [n, k]: a random half is the reference, the other half sets the
        threshold. Raises ValueError for fewer than MIN_ROWS rows, a bad flag_share, or names that do not match."""
        signals = np.asarray(signals, dtype=np.float64)
        check_flag_share(flag_share)
        if signals.ndim != 2 or signals.shape[1] != len(names):
            raise ValueError(f"signals of shape {signals.shape} for {len(names)} names")
        if len(signals) < MIN_ROWS:
            raise ValueError(f"a trust score needs at least {MIN_ROWS} in-domain rows, got {len(signals)}")
        if not np.isfinite(signals).all():
            raise ValueError("the signals hold values that are not finite numbers")
        order = np.random.default_rng(seed).permutation(len(signals))
        reference, calibration = signals[order[: len(order) // 2]], signals[order[len(order) // 2:]]
        reference = np.sort(reference, axis=0)
        threshold = flag_threshold(trust_scores(reference, calibration), flag_share)
        return cls(tuple(names), reference, threshold, float(flag_share), len(signals))

    def score(self, signals: np.ndarray) -> np.ndarray:
        """[n] trust scores of rows' signals [n, len(self.signals)]."""
        signals = np.asarray(signals, dtype=np.float64)
        if signals.ndim != 2 or signals.shape[1] != len(self.signals):
            raise ValueError(f"signals of shape {signals.shape}; this trust score reads {list(self.signals)}")
        return trust_scores(self.reference, signals)

    def flagged(self, trust) -> np.ndarray:
        return np.asarray(trust) < self.threshold

    def to_dict(self) -> dict[str, Any]:
        return {"signals": list(self.signals), "flag_share": self.flag_share, "threshold": self.threshold,
                "fitted_on": self.fitted_on, "reference": self.reference.tolist()}

    @classmethod
    def from_dict(cls, data: Any) -> ConformalTrust:
        """Rebuild from `to_dict`. Raises CalibrationFormatError naming the field."""
        if not isinstance(data, dict):
            raise CalibrationFormatError("<root>", "expected an object")
        try:
            names = data["signals"]
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise CalibrationFormatError("signals", "expected a list of signal names")
            reference = np.asarray(data["reference"], dtype=np.float64)
            threshold, flag_share = float(data["threshold"]), float(data["flag_share"])
            fitted_on = int(data.get("fitted_on", 0))
        except KeyError as error:
            raise CalibrationFormatError(str(error.args[0]), "missing") from None
        except (TypeError, ValueError) as error:
            raise CalibrationFormatError("reference", f"not numbers ({error})") from None
        if reference.ndim != 2 or reference.shape[1] != len(names) or len(reference) < 1:
            raise CalibrationFormatError("reference", f"expected [rows, {len(names)}], got shape {reference.shape}")
        if not np.isfinite(reference).all() or (np.diff(reference, axis=0) < 0).any():
            raise CalibrationFormatError("reference", "expected finite numbers sorted along each column")
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise CalibrationFormatError("threshold", f"expected a number in [0, 1], got {threshold}")
        return cls(tuple(names), reference, threshold, flag_share, fitted_on)
