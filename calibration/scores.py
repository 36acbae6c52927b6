"""How well probabilities agree with reference labels: expected calibration error, Brier score, log-loss.

`probs` is what a calibrator's predict_proba returns or what a judge reports: a 1-D array of the positive
class's probability (p_unsafe; label 1 = Unsafe), or [n, k] class probabilities whose rows sum to 1.
`y` holds class indices (0 = Safe, 1 = Unsafe; 0, 1, 2 = Level1, Level2, Level3).

Which ECE: for a binary problem (1-D input or [n, 2]) the ECE compares the Unsafe probability with the
Unsafe outcome (so p_unsafe = 0.1 on a Safe response is well calibrated, not "90 % confident"); for k >= 3
classes it is the top-label ECE: the confidence of the most probable class against whether that class is
the reference label (Guo et al., 2017).
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss as sklearn_log_loss

from misguard.calibration._checks import as_class_matrix, check_labels, check_probabilities

BIN_STRATEGIES: tuple[str, ...] = ("uniform", "quantile")


def _checked(probs, y) -> tuple[np.ndarray, np.ndarray]:
    matrix = as_class_matrix(check_probabilities(probs, "probs"))
    return matrix, check_labels(y, matrix.shape[0], matrix.shape[1], "y")


def ece(probs, y, n_bins: int = 15, strategy: str = "uniform") -> float:
    """Return the expected calibration error: sum over bins of (bin size / n) * |mean confidence - frequency|.

    Binary input: confidence = P(positive class), outcome = y == 1. Three or more classes: confidence =
    the largest probability, outcome = its class is y (top-label ECE). Bins: "uniform" splits [0, 1] into
    n_bins equal widths (the last bin includes 1.0); "quantile" (adaptive, equal mass) sorts the confidences
    and splits them into n_bins groups of (nearly) equal size, so every bin carries the same weight.

    Raises ValueError for malformed probs or labels, n_bins < 1 or an unknown strategy.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    if strategy not in BIN_STRATEGIES:
        raise ValueError(f"unknown binning strategy {strategy!r}; expected one of: {', '.join(BIN_STRATEGIES)}")
    matrix, labels = _checked(probs, y)
    if matrix.shape[1] == 2:
        confidence, outcome = matrix[:, 1], (labels == 1).astype(np.float64)
    else:
        predicted = np.argmax(matrix, axis=1)
        confidence, outcome = matrix[np.arange(labels.size), predicted], (predicted == labels).astype(np.float64)
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        bins = np.searchsorted(edges[1:-1], confidence, side="right")
    else:
        order = np.argsort(confidence, kind="stable")
        bins = np.empty(labels.size, dtype=np.int64)
        bins[order] = np.arange(labels.size) * n_bins // labels.size
    confidence_sums = np.bincount(bins, weights=confidence, minlength=n_bins)
    outcome_sums = np.bincount(bins, weights=outcome, minlength=n_bins)
    return float(np.abs(confidence_sums - outcome_sums).sum() / labels.size)


def brier(probs, y) -> float:
    """Return the Brier score (lower is better).

    Binary input: mean (P(positive) - [y == 1])^2, in [0, 1], as sklearn's brier_score_loss. Three or more
    classes: mean over rows of the sum over classes of (p_k - [y == k])^2, in [0, 2].
    Raises ValueError for malformed probs or labels.
    """
    matrix, labels = _checked(probs, y)
    if matrix.shape[1] == 2:
        return float(np.mean((matrix[:, 1] - (labels == 1)) ** 2))
    one_hot = np.eye(matrix.shape[1])[labels]
    return float(np.mean(np.sum((matrix - one_hot) ** 2, axis=1)))


def log_loss(probs, y) -> float:
    """Return the mean negative log-likelihood of the reference labels (sklearn's log_loss over all classes,
    labels given explicitly so a class missing from `y` still counts). Rows that sum to 1 only within float32
    precision (a judge's softmax) are renormalised first, as sklearn would warn about them. Raises ValueError for
    malformed input."""
    matrix, labels = _checked(probs, y)
    matrix = matrix / matrix.sum(axis=1, keepdims=True)
    return float(sklearn_log_loss(labels, matrix, labels=np.arange(matrix.shape[1])))


def calibration_report(probs, y, n_bins: int = 15) -> dict[str, float | int]:
    """Return {"ece_uniform", "ece_adaptive", "brier", "log_loss", "n"} for probs against labels y.

    ece_adaptive uses equal-mass ("quantile") bins. Raises ValueError for malformed input.
    """
    return {
        "ece_uniform": ece(probs, y, n_bins=n_bins, strategy="uniform"),
        "ece_adaptive": ece(probs, y, n_bins=n_bins, strategy="quantile"),
        "brier": brier(probs, y),
        "log_loss": log_loss(probs, y),
        "n": int(np.shape(probs)[0]),
    }
