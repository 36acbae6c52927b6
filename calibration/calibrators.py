"""Calibrators that map a judge's probabilities to probabilities that agree with the reference (GPT-4o) labels.

They follow scikit-learn's estimator contract (as in `sklearn/calibration.py`): `__init__` stores settings
only, `fit(scores, y)` returns self, learned state ends in `_`, `predict_proba(scores)` returns rows that sum
to 1, and bad input raises a ValueError that says what is wrong and where.

One calibrator serves either head of a judge, chosen by the shape of `scores`:
- the binary safety head: a 1-D array [n] of p_unsafe; `y` holds 0 = Safe, 1 = Unsafe;
  `predict_proba` returns [n, 2] with columns [Safe, Unsafe];
- the perception head: a 2-D array [n, k] (k = 3: Level1, Level2, Level3) whose rows sum to 1; `y` holds
  0..k-1; `predict_proba` returns [n, k].

A fitted calibrator is saved as a plain dict (`to_dict`, JSON-ready) and rebuilt with `calibrator_from_dict`;
predictions after a round trip through JSON text are bit-identical. Nothing is ever pickled.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit, logsumexp, softmax
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression
from sklearn.model_selection import StratifiedKFold

from misguard.calibration._checks import CalibrationFormatError, check_labels, check_probabilities
from misguard.calibration.scores import calibration_report
from misguard.core.jsonl import json_type

MIN_FIT_SAMPLES = 10
"""Fewer reference labels than this cannot calibrate anything; `fit` refuses them."""

DEFAULT_EPS = 1e-6
"""Probabilities are clipped to [eps, 1 - eps] before taking logits or logs: judges computing in float32 or
bf16 return exact 0s and 1s, whose logits are infinite."""


# --------------------------------------------------------------------------------------------------------
# The common contract
# --------------------------------------------------------------------------------------------------------

class BaseCalibrator(BaseEstimator):
    """What every calibrator shares: input checks, the head it was fitted on, and (de)serialisation.

    Fitted attributes (all calibrators): `head_` ("binary" or "multiclass"), `n_classes_` (2 for binary),
    `classes_` (np.arange(n_classes_)), `n_samples_fit_`.
    """

    method: ClassVar[str] = ""
    """The name this method is saved and selected under."""
    supports_multiclass: ClassVar[bool] = True

    # ---- the estimator contract ----

    def fit(self, scores, y) -> BaseCalibrator:
        """Fit on a judge's probabilities `scores` and reference labels `y` (class indices); return self.

        Raises ValueError for malformed scores or labels, fewer than MIN_FIT_SAMPLES rows, a single class in
        `y`, or a head this method does not calibrate.
        """
        probs = check_probabilities(scores, "scores")
        name = type(self).__name__
        if probs.ndim == 2 and not self.supports_multiclass:
            raise ValueError(f"{name} calibrates the binary safety head only (a 1-D array of p_unsafe); "
                             f"got scores of shape {probs.shape}")
        n_classes = 2 if probs.ndim == 1 else probs.shape[1]
        labels = check_labels(y, probs.shape[0], n_classes, "y")
        if probs.shape[0] < MIN_FIT_SAMPLES:
            raise ValueError(f"{name} needs at least {MIN_FIT_SAMPLES} samples to fit, got {probs.shape[0]}")
        present = np.unique(labels)
        if present.size < 2:
            raise ValueError(f"y has a single class ({int(present[0])}); fitting {name} needs at least two "
                             f"classes among the reference labels")
        self._fit(probs, labels)
        self.head_ = "binary" if probs.ndim == 1 else "multiclass"
        self.n_classes_ = n_classes
        self.classes_ = np.arange(n_classes)
        self.n_samples_fit_ = int(probs.shape[0])
        return self

    def predict_proba(self, scores) -> np.ndarray:
        """Return calibrated class probabilities: [n, 2] (columns Safe, Unsafe) for 1-D p_unsafe, [n, k] for
        [n, k] scores; every row sums to 1.

        Raises NotFittedError (a ValueError) before `fit`, and ValueError for malformed scores or scores of
        another head than the one fitted.
        """
        self._check_fitted()
        probs = check_probabilities(scores, "scores")
        if self.head_ == "binary" and probs.ndim != 1:
            raise ValueError(f"{type(self).__name__} was fitted on the binary head (1-D p_unsafe) but got scores "
                             f"of shape {probs.shape}")
        if self.head_ == "multiclass" and (probs.ndim != 2 or probs.shape[1] != self.n_classes_):
            raise ValueError(f"{type(self).__name__} was fitted on {self.n_classes_}-class scores [n, "
                             f"{self.n_classes_}] but got scores of shape {probs.shape}")
        return self._predict(probs)

    def predict(self, scores) -> np.ndarray:
        """Return the most probable class index per row (ties go to the lower index). Raises as predict_proba."""
        return np.argmax(self.predict_proba(scores), axis=1)

    # ---- saving ----

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: method, settings, head and learned state. Raises NotFittedError before fit."""
        self._check_fitted()
        return {"method": self.method, "params": self.get_params(deep=False), "head": self.head_,
                "n_classes": int(self.n_classes_), "n_samples_fit": int(self.n_samples_fit_),
                "state": self._state()}

    @classmethod
    def from_dict(cls, data: Any) -> BaseCalibrator:
        """Rebuild a fitted calibrator from `to_dict`'s output (or its JSON text, parsed).

        Raises CalibrationFormatError (a ValueError naming the field) for anything malformed.
        """
        if not isinstance(data, dict):
            raise CalibrationFormatError("<calibrator>", f"expected an object, got {json_type(data)}")
        method = data.get("method")
        if method != cls.method:
            raise CalibrationFormatError("method", f"expected {cls.method!r} for {cls.__name__}, got {method!r}")
        params = data.get("params", {})
        if not isinstance(params, dict):
            raise CalibrationFormatError("params", f"expected an object, got {json_type(params)}")
        known = set(cls._get_param_names())
        unknown = sorted(set(params) - known)
        if unknown:
            raise CalibrationFormatError(f"params.{unknown[0]}", f"unknown setting for method {method!r}; "
                                         f"known: {sorted(known) or 'none'}")
        params = {key: _check_saved_param(key, value) for key, value in params.items()}
        head = data.get("head")
        if head not in ("binary", "multiclass"):
            raise CalibrationFormatError("head", f"expected 'binary' or 'multiclass', got {head!r}")
        if head == "multiclass" and not cls.supports_multiclass:
            raise CalibrationFormatError("head", f"method {method!r} calibrates the binary head only")
        n_classes = data.get("n_classes")
        if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 2:
            raise CalibrationFormatError("n_classes", f"expected an integer >= 2, got {n_classes!r}")
        if head == "binary" and n_classes != 2:
            raise CalibrationFormatError("n_classes", f"the binary head has 2 classes, got {n_classes}")
        n_samples_fit = data.get("n_samples_fit", 0)
        if isinstance(n_samples_fit, bool) or not isinstance(n_samples_fit, int) or n_samples_fit < 0:
            raise CalibrationFormatError("n_samples_fit", f"expected a non-negative integer, got {n_samples_fit!r}")
        calibrator = cls(**params)
        calibrator.head_ = head
        calibrator.n_classes_ = n_classes
        calibrator.classes_ = np.arange(n_classes)
        calibrator.n_samples_fit_ = n_samples_fit
        calibrator._load_state(data.get("state"))
        return calibrator

    # ---- what each method provides ----

    def _fit(self, probs: np.ndarray, labels: np.ndarray) -> None:
        raise NotImplementedError

    def _predict(self, probs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_state(self, state: Any) -> None:
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "head_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit(scores, y) first")


# --------------------------------------------------------------------------------------------------------
# The methods
# --------------------------------------------------------------------------------------------------------

class IdentityCalibration(BaseCalibrator):
    """Method "none": returns the judge's probabilities unchanged (multiclass rows renormalised to sum to 1).

    The baseline every other method must beat, and what an uncalibrated judge's file holds.
    """

    method = "none"

    def __init__(self):
        pass

    def _fit(self, probs, labels):
        pass

    def _predict(self, probs):
        if probs.ndim == 1:
            return np.column_stack([1.0 - probs, probs])
        return probs / probs.sum(axis=1, keepdims=True)

    def _state(self):
        return {}

    def _load_state(self, state):
        if state not in (None, {}):
            raise CalibrationFormatError("state", "method 'none' has no state; expected {}")


class TemperatureScaling(BaseCalibrator):
    """One temperature T for the judge's logits: binary sigmoid(logit(p) / T), multiclass softmax(log p / T).

    T > 1 softens an overconfident judge, T < 1 sharpens an underconfident one; the ranking of responses never
    changes. T minimises the negative log-likelihood of the reference labels (a bounded 1-D search over
    log T in [log(1e-2), log(1e2)]). Probabilities are clipped to [eps, 1 - eps] first.

    Fitted attribute: `temperature_`.
    """

    method = "temperature"
    LOG_T_BOUNDS: ClassVar[tuple[float, float]] = (math.log(1e-2), math.log(1e2))

    def __init__(self, eps: float = DEFAULT_EPS):
        self.eps = eps

    def _logits(self, probs: np.ndarray) -> np.ndarray:
        clipped = np.clip(probs, self.eps, 1.0 - self.eps)
        if probs.ndim == 1:
            return np.log(clipped) - np.log1p(-clipped)
        return np.log(clipped)

    def _fit(self, probs, labels):
        _check_eps(self.eps)
        logits = self._logits(probs)
        if probs.ndim == 1:
            positive = labels.astype(np.float64)

            def nll(log_t: float) -> float:
                scaled = logits / math.exp(log_t)
                return float(np.mean(positive * np.logaddexp(0.0, -scaled)
                                     + (1 - positive) * np.logaddexp(0.0, scaled)))
        else:
            rows = np.arange(probs.shape[0])

            def nll(log_t: float) -> float:
                scaled = logits / math.exp(log_t)
                return float(np.mean(logsumexp(scaled, axis=1) - scaled[rows, labels]))

        result = minimize_scalar(nll, bounds=self.LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-9})
        self.temperature_ = float(math.exp(result.x))

    def _predict(self, probs):
        scaled = self._logits(probs) / self.temperature_
        if probs.ndim == 1:
            # expit(-s) rather than 1 - expit(s): keeps the Safe probability accurate when Unsafe is near 1.
            return np.column_stack([expit(-scaled), expit(scaled)])
        return softmax(scaled, axis=1)

    def _state(self):
        return {"temperature": self.temperature_}

    def _load_state(self, state):
        state = _state_object(state, ("temperature",))
        self.temperature_ = _number(state["temperature"], "state.temperature", low=0.0, low_open=True)


class PlattScaling(BaseCalibrator):
    """Binary head only: sigmoid(a * logit(p) + b), two parameters fitted by minimising the log-loss.

    The fit is unregularised, like LogisticRegression with a very large C, but on Platt's smoothed targets
    (N+ + 1) / (N+ + 2) for Unsafe and 1 / (N- + 2) for Safe, as sklearn's `_sigmoid_calibration` does: they
    keep a and b finite when the judge separates the labels perfectly. `target_smoothing=False` fits the raw
    0/1 labels. Probabilities are clipped to [eps, 1 - eps] before the logit.

    Fitted attributes: `slope_` (a) and `intercept_` (b).
    """

    method = "platt"
    supports_multiclass = False

    def __init__(self, eps: float = DEFAULT_EPS, target_smoothing: bool = True):
        self.eps = eps
        self.target_smoothing = target_smoothing

    def _feature(self, probs: np.ndarray) -> np.ndarray:
        clipped = np.clip(probs, self.eps, 1.0 - self.eps)
        return np.log(clipped) - np.log1p(-clipped)

    def _fit(self, probs, labels):
        _check_eps(self.eps)
        feature = self._feature(probs)
        targets = labels.astype(np.float64)
        if self.target_smoothing:
            n_positive = float(targets.sum())
            n_negative = float(targets.size - n_positive)
            targets = np.where(labels == 1, (n_positive + 1.0) / (n_positive + 2.0), 1.0 / (n_negative + 2.0))

        def loss_and_gradient(params: np.ndarray) -> tuple[float, np.ndarray]:
            scaled = params[0] * feature + params[1]
            loss = float(np.mean(np.logaddexp(0.0, scaled) - targets * scaled))
            residual = expit(scaled) - targets
            return loss, np.array([np.mean(residual * feature), np.mean(residual)])

        # Start at the identity map (a = 1, b = 0): an already calibrated judge needs no steps.
        result = minimize(loss_and_gradient, x0=np.array([1.0, 0.0]), jac=True, method="L-BFGS-B",
                          options={"maxiter": 1000, "gtol": 1e-10, "ftol": 1e-14})
        self.slope_ = float(result.x[0])
        self.intercept_ = float(result.x[1])

    def _predict(self, probs):
        scaled = self.slope_ * self._feature(probs) + self.intercept_
        return np.column_stack([expit(-scaled), expit(scaled)])

    def _state(self):
        return {"slope": self.slope_, "intercept": self.intercept_}

    def _load_state(self, state):
        state = _state_object(state, ("slope", "intercept"))
        self.slope_ = _number(state["slope"], "state.slope")
        self.intercept_ = _number(state["intercept"], "state.intercept")


class IsotonicCalibration(BaseCalibrator):
    """A non-decreasing step-and-ramp map fitted by isotonic regression (sklearn IsotonicRegression with
    out_of_bounds="clip", y_min=0, y_max=1) on the judge's probability itself.

    Binary head: one map p_unsafe -> P(Unsafe). Perception head: one map per class, one-vs-rest, then rows are
    renormalised to sum to 1, as sklearn's CalibratedClassifierCV does; a row where every map gives 0 becomes
    uniform. The learned maps are the thresholds (`thresholds_`, a list of (x, y) arrays, one per binary map)
    and predictions interpolate them with np.interp, which clips outside the fitted range exactly like
    out_of_bounds="clip" and gives the same numbers after a JSON round trip.

    Isotonic regression can fix any monotone distortion but needs more data than a 1- or 2-parameter map and
    can output exact 0s and 1s at the ends of the range.
    """

    method = "isotonic"

    def __init__(self):
        pass

    def _fit(self, probs, labels):
        if probs.ndim == 1:
            columns, targets = [probs], [labels == 1]
        else:
            columns = [probs[:, k] for k in range(probs.shape[1])]
            targets = [labels == k for k in range(probs.shape[1])]
        self.thresholds_ = []
        for column, target in zip(columns, targets):
            regression = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0, increasing=True)
            regression.fit(column, target.astype(np.float64))
            self.thresholds_.append((np.asarray(regression.X_thresholds_, dtype=np.float64),
                                     np.asarray(regression.y_thresholds_, dtype=np.float64)))

    def _predict(self, probs):
        if probs.ndim == 1:
            x, y = self.thresholds_[0]
            unsafe = np.interp(probs, x, y)
            return np.column_stack([1.0 - unsafe, unsafe])
        mapped = np.column_stack([np.interp(probs[:, k], x, y) for k, (x, y) in enumerate(self.thresholds_)])
        sums = mapped.sum(axis=1, keepdims=True)
        all_zero = sums[:, 0] == 0.0
        calibrated = mapped / np.where(all_zero[:, None], 1.0, sums)
        calibrated[all_zero] = 1.0 / mapped.shape[1]
        return calibrated

    def _state(self):
        return {"maps": [{"x": x.tolist(), "y": y.tolist()} for x, y in self.thresholds_]}

    def _load_state(self, state):
        state = _state_object(state, ("maps",))
        maps = state["maps"]
        expected = 1 if self.head_ == "binary" else self.n_classes_
        if not isinstance(maps, list) or len(maps) != expected:
            raise CalibrationFormatError("state.maps", f"expected a list of {expected} map(s) for the {self.head_} "
                                         f"head, got {json_type(maps) if not isinstance(maps, list) else len(maps)}")
        self.thresholds_ = []
        for index, one_map in enumerate(maps):
            where = f"state.maps[{index}]"
            one_map = _state_object(one_map, ("x", "y"), where)
            x = _number_list(one_map["x"], f"{where}.x", 0.0, 1.0)
            y = _number_list(one_map["y"], f"{where}.y", 0.0, 1.0)
            if x.size != y.size:
                raise CalibrationFormatError(f"{where}.y", f"has {y.size} values but x has {x.size}")
            if np.any(np.diff(x) <= 0):
                raise CalibrationFormatError(f"{where}.x", "must be strictly increasing")
            if np.any(np.diff(y) < 0):
                raise CalibrationFormatError(f"{where}.y", "must be non-decreasing")
            self.thresholds_.append((x, y))


METHODS: dict[str, type[BaseCalibrator]] = {
    cls.method: cls for cls in (IdentityCalibration, TemperatureScaling, PlattScaling, IsotonicCalibration)
}
"""Every calibration method by the name it is saved and selected under."""


def make_calibrator(method: str) -> BaseCalibrator:
    """Return a new, unfitted calibrator for `method` ("none", "temperature", "platt", "isotonic") with its
    default settings. Raises ValueError for an unknown method, listing the known ones."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of: {', '.join(METHODS)}")
    return METHODS[method]()


def calibrator_from_dict(data: Any) -> BaseCalibrator:
    """Rebuild a fitted calibrator from `to_dict`'s output, dispatching on its "method" key.

    Raises CalibrationFormatError (a ValueError naming the field) for an unknown method or malformed data.
    """
    if not isinstance(data, dict):
        raise CalibrationFormatError("<calibrator>", f"expected an object, got {json_type(data)}")
    method = data.get("method")
    if method not in METHODS:
        raise CalibrationFormatError("method", f"unknown calibration method {method!r}; expected one of: "
                                     f"{', '.join(METHODS)}")
    return METHODS[method].from_dict(data)


# --------------------------------------------------------------------------------------------------------
# Choosing a method
# --------------------------------------------------------------------------------------------------------

AUTO_METHODS: tuple[str, ...] = ("none", "temperature", "platt", "isotonic")
"""What "auto" chooses among, the identity first: a calibration is kept only when it beats the judge's own
probabilities on held-out rows, so choosing one never makes them worse there."""


def compare_methods(scores, y, methods: tuple[str, ...] | list[str] = AUTO_METHODS, cv: int = 5,
                    seed: int = 0) -> dict[str, dict[str, float | int]]:
    """How well each method's calibrated probabilities agree with the labels on rows it was not fitted on.

    Every row is predicted by the method fitted on the other folds of a StratifiedKFold(cv, shuffle=True,
    random_state=seed) (the folds of cross_val_proba); "none" is the judge's own probabilities, so its figures
    are the uncalibrated ones. A method that does not apply to the head ("platt" for the perception head) is
    skipped.

    Returns {method: calibration_report of its out-of-fold probabilities (n, log_loss, brier, ece_uniform, ...)},
    in `methods` order. Raises ValueError for malformed input, an unknown method, cv < 2, a single class, a
    class with fewer than cv samples, or when no listed method applies to the head.
    """
    probs = check_probabilities(scores, "scores")
    n_classes = 2 if probs.ndim == 1 else probs.shape[1]
    labels = check_labels(y, probs.shape[0], n_classes, "y")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        raise ValueError(f"unknown calibration method(s) {unknown}; expected some of: {', '.join(METHODS)}")
    if isinstance(cv, bool) or not isinstance(cv, (int, np.integer)) or cv < 2:
        raise ValueError(f"cv must be an integer >= 2, got {cv!r}")
    present, counts = np.unique(labels, return_counts=True)
    if present.size < 2:
        raise ValueError(f"y has a single class ({int(present[0])}); choosing a method needs at least two classes")
    if counts.min() < cv:
        rare = int(present[np.argmin(counts)])
        raise ValueError(f"class {rare} has {int(counts.min())} sample(s), fewer than cv={cv} folds; "
                         f"lower cv or add reference labels")
    candidates = [method for method in methods if probs.ndim == 1 or METHODS[method].supports_multiclass]
    if not candidates:
        raise ValueError(f"none of the methods {list(methods)} calibrates {n_classes}-class scores")
    folds = _folds(labels, cv, seed)
    comparison = {}
    for method in candidates:
        held_out = _out_of_fold(method, probs, labels, folds)
        comparison[method] = calibration_report(held_out if probs.ndim == 2 else held_out[:, 1], labels)
    return comparison


def select_method(scores, y, methods: tuple[str, ...] | list[str] = ("temperature", "platt", "isotonic"),
                  cv: int = 5, seed: int = 0) -> tuple[str, dict[str, float]]:
    """Pick the calibration method with the lowest held-out log-loss on (scores, y) (`compare_methods`).

    Ties go to the method listed first. With `methods=AUTO_METHODS` (what fit_calibration's "auto" compares),
    "none", the judge's own probabilities, is kept unless another method beats it on rows it was not fitted on.

    Returns (best method name, {method: held-out log-loss} for every method scored).
    Raises ValueError as compare_methods.
    """
    losses = {method: float(report["log_loss"]) for method, report in
              compare_methods(scores, y, methods=methods, cv=cv, seed=seed).items()}
    return min(losses, key=losses.__getitem__), losses


def _folds(labels: np.ndarray, cv: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return list(StratifiedKFold(n_splits=cv, shuffle=True, random_state=seed).split(np.zeros(labels.size), labels))


def _out_of_fold(method: str, probs: np.ndarray, labels: np.ndarray,
                 folds: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    n_classes = 2 if probs.ndim == 1 else probs.shape[1]
    out = np.zeros((labels.size, n_classes))
    for train, test in folds:
        out[test] = clone(make_calibrator(method)).fit(probs[train], labels[train]).predict_proba(probs[test])
    return out


def cross_val_proba(method: str, scores, y, cv: int = 5, seed: int = 0) -> np.ndarray | None:
    """Out-of-fold calibrated probabilities: each row predicted by `method` fitted on the other folds (the
    same StratifiedKFold as compare_methods), for an honest after-calibration report. Returns an array shaped
    like predict_proba's, or None when a class has fewer than `cv` samples. Raises ValueError like fit."""
    probs = check_probabilities(scores, "scores")
    n_classes = 2 if probs.ndim == 1 else probs.shape[1]
    labels = check_labels(y, probs.shape[0], n_classes, "y")
    _, counts = np.unique(labels, return_counts=True)
    if counts.size < 2 or counts.min() < cv:
        return None
    return _out_of_fold(method, probs, labels, _folds(labels, cv, seed))


# --------------------------------------------------------------------------------------------------------
# Reading saved state
# --------------------------------------------------------------------------------------------------------

def _state_object(state: Any, keys: tuple[str, ...], where: str = "state") -> dict[str, Any]:
    if not isinstance(state, dict):
        raise CalibrationFormatError(where, f"expected an object, got {json_type(state)}")
    for key in keys:
        if key not in state:
            raise CalibrationFormatError(f"{where}.{key}", "missing")
    extra = sorted(set(state) - set(keys))
    if extra:
        raise CalibrationFormatError(f"{where}.{extra[0]}", f"unknown field; expected only {list(keys)}")
    return state


def _number(value: Any, field: str, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CalibrationFormatError(field, f"expected a finite number, got {value!r}")
    value = float(value)
    if low is not None and (value < low or (low_open and value == low)):
        raise CalibrationFormatError(field, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (value > high or (high_open and value == high)):
        raise CalibrationFormatError(field, f"must be {'<' if high_open else '<='} {high}, got {value!r}")
    return value


def _number_list(values: Any, field: str, low: float, high: float) -> np.ndarray:
    if not isinstance(values, list) or not values:
        raise CalibrationFormatError(field, f"expected a non-empty list of numbers, got {values!r}")
    for index, value in enumerate(values):
        _number(value, f"{field}[{index}]", low=low, high=high)
    return np.asarray(values, dtype=np.float64)


def _check_saved_param(key: str, value: Any) -> Any:
    # The settings any method has; from_dict has already refused keys the method does not know.
    if key == "eps":
        return _number(value, "params.eps", low=0.0, low_open=True, high=0.5, high_open=True)
    if key == "target_smoothing":
        if not isinstance(value, bool):
            raise CalibrationFormatError("params.target_smoothing", f"expected true or false, got {value!r}")
        return value
    raise CalibrationFormatError(f"params.{key}", "no check is defined for this setting")


def _check_eps(eps: Any) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be a number in (0, 0.5), got {eps!r}")

