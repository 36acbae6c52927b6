"""Input checks shared by the calibrators, the scores and the thresholds.

Every check raises a ValueError that says which argument is wrong, how, and where (the first bad row), so a
caller can find the bad judgment without a debugger.
"""
from __future__ import annotations

import numpy as np

ROW_SUM_TOLERANCE = 1e-3
"""How far a row of a probability matrix may sum from 1 (judges renormalise label-token probabilities in
float32 or bf16; anything further off is most likely logits or a wrong column)."""


class CalibrationFormatError(ValueError):
    """A saved calibrator, threshold or calibration file is malformed; `field` is the offending field's dotted
    path (e.g. "state.temperature") and `reason` says what is wrong with it."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"field '{field}': {reason}")


def check_probabilities(values, name: str = "scores") -> np.ndarray:
    """Return `values` as a float64 array of probabilities: 1-D [n] (one class's probability, e.g. p_unsafe)
    or 2-D [n, k] with k >= 2 whose rows sum to 1.

    Raises ValueError for another shape, no rows, a NaN, a value outside [0, 1] or a row not summing to 1.
    """
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be numbers (probabilities): {error}") from None
    if array.ndim not in (1, 2):
        raise ValueError(f"{name} must be a 1-D array [n] of one class's probability or a 2-D array [n, k] of "
                         f"class probabilities; got shape {array.shape}")
    if array.ndim == 2 and array.shape[1] < 2:
        raise ValueError(f"{name} as a 2-D array needs at least 2 class columns; got shape {array.shape} "
                         f"(pass a 1-D array for a single probability per row)")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    nan_rows = np.flatnonzero(np.isnan(array).reshape(array.shape[0], -1).any(axis=1))
    if nan_rows.size:
        raise ValueError(f"{name} contains NaN in {nan_rows.size} row(s), the first at row {nan_rows[0]}")
    outside = (array < 0.0) | (array > 1.0)
    if outside.any():
        index = np.argwhere(outside)[0]
        raise ValueError(f"{name} must be probabilities in [0, 1]; found {float(array[tuple(index)])!r} at "
                         f"{'row ' + str(index[0]) if array.ndim == 1 else f'row {index[0]}, column {index[1]}'}")
    if array.ndim == 2:
        sums = array.sum(axis=1)
        off = np.flatnonzero(np.abs(sums - 1.0) > ROW_SUM_TOLERANCE)
        if off.size:
            raise ValueError(f"{name} rows must sum to 1 (within {ROW_SUM_TOLERANCE}); row {off[0]} sums to "
                             f"{float(sums[off[0]])!r} ({off.size} such row(s))")
    return array


def check_labels(y, n_samples: int, n_classes: int, name: str = "y") -> np.ndarray:
    """Return `y` as an int64 array of class indices 0..n_classes-1, one per sample.

    Binary heads: 0 = Safe, 1 = Unsafe (booleans are accepted). Perception: 0, 1, 2 = Level1, Level2, Level3.
    Raises ValueError for another shape or length, non-integer values, or labels not in the classes.
    """
    array = np.asarray(y)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of class indices; got shape {array.shape}")
    if array.shape[0] != n_samples:
        raise ValueError(f"{name} has {array.shape[0]} labels but the scores have {n_samples} rows")
    if array.dtype.kind in "US":
        raise ValueError(f"{name} must hold class indices 0..{n_classes - 1}, not strings such as {str(array[0])!r}; "
                         f"map labels with calibration.encode_safety / calibration.encode_perception")
    if array.dtype.kind == "b":
        array = array.astype(np.int64)
    elif array.dtype.kind == "f":
        if np.isnan(array).any():
            raise ValueError(f"{name} contains NaN at row {int(np.flatnonzero(np.isnan(array))[0])}")
        if not np.all(array == np.round(array)):
            bad = int(np.flatnonzero(array != np.round(array))[0])
            raise ValueError(f"{name} must hold integer class indices; found {float(array[bad])!r} at row {bad}")
        array = array.astype(np.int64)
    elif array.dtype.kind in "iu":
        array = array.astype(np.int64)
    else:
        raise ValueError(f"{name} must hold integer class indices; got dtype {array.dtype}")
    unknown = np.setdiff1d(np.unique(array), np.arange(n_classes))
    if unknown.size:
        raise ValueError(f"{name} contains labels not in the classes {list(range(n_classes))}: "
                         f"{[int(label) for label in unknown]}")
    return array


def as_class_matrix(probs: np.ndarray) -> np.ndarray:
    """Return [n, k] class probabilities: a 1-D positive-class probability becomes [1 - p, p]."""
    if probs.ndim == 1:
        return np.column_stack([1.0 - probs, probs])
    return probs
