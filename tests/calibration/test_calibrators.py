"""Calibrators: the scikit-learn estimator contract, calibration that helps on miscalibrated scores, exact
JSON round trips, precise errors, and choosing a method by cross-validation."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.isotonic import IsotonicRegression

from misguard.calibration import (
    METHODS,
    CalibrationFormatError,
    IsotonicCalibration,
    PlattScaling,
    TemperatureScaling,
    calibrator_from_dict,
    ece,
    log_loss,
    make_calibrator,
    select_method,
)
from tests.calibration.synthetic import power_distorted, step_distorted, tempered_binary, tempered_multiclass

BINARY_METHODS = ["none", "temperature", "platt", "isotonic"]
MULTICLASS_METHODS = ["none", "temperature", "isotonic"]
HEADS = [(method, "binary") for method in BINARY_METHODS] + [(method, "multiclass") for method in MULTICLASS_METHODS]


def training_data(head: str, n: int = 2000, seed: int = 0):
    if head == "binary":
        return power_distorted(n, seed)
    return tempered_multiclass(n, seed, temperature=2.5)


def unseen_scores(head: str, seed: int = 99) -> np.ndarray:
    """Scores a calibrator never saw, including exact 0s and 1s and, for the perception head, one-hot rows."""
    rng = np.random.default_rng(seed)
    if head == "binary":
        return np.concatenate([[0.0, 1.0, 0.5, 1e-300, 1.0 - 1e-16], rng.uniform(size=300), rng.uniform(size=50) ** 8])
    rows = rng.dirichlet([0.3, 0.3, 0.3], size=300)
    return np.vstack([np.eye(3), [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]], rows])


# --------------------------------------------------------------------------------------------------------
# The estimator contract
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,head", HEADS)
def test_predict_proba_rows_are_probabilities_that_sum_to_one(method, head):
    scores, labels = training_data(head)
    calibrator = make_calibrator(method).fit(scores, labels)
    for probs in (unseen_scores(head), scores):
        proba = calibrator.predict_proba(probs)
        assert proba.shape == (len(probs), 2 if head == "binary" else 3)
        assert np.all(np.isfinite(proba)) and np.all(proba >= 0) and np.all(proba <= 1)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=0, atol=1e-12)


def test_binary_columns_are_safe_then_unsafe():
    scores, labels = power_distorted(500, seed=1)
    proba = make_calibrator("none").fit(scores, labels).predict_proba(scores)
    np.testing.assert_array_equal(proba[:, 1], scores)
    np.testing.assert_array_equal(proba[:, 0], 1.0 - scores)
    # Every fitted method keeps the order of p_unsafe (all maps are non-decreasing).
    for method in ("temperature", "platt", "isotonic"):
        unsafe = make_calibrator(method).fit(scores, labels).predict_proba(np.sort(scores))[:, 1]
        assert np.all(np.diff(unsafe) >= 0), method


@pytest.mark.parametrize("method,head", HEADS)
def test_estimator_contract(method, head):
    scores, labels = training_data(head, n=300)
    calibrator = make_calibrator(method)
    assert vars(calibrator) == calibrator.get_params(deep=False), "__init__ must store settings only"
    with pytest.raises(NotFittedError, match="not fitted yet"):
        calibrator.predict_proba(scores)
    settings = dict(vars(calibrator))
    assert calibrator.fit(scores, labels) is calibrator
    learned = set(vars(calibrator)) - set(settings)
    assert learned and all(name.endswith("_") and not name.startswith("_") for name in learned), learned
    assert clone(calibrator).get_params() == calibrator.get_params()
    assert not hasattr(clone(calibrator), "head_")
    assert calibrator.head_ == head and list(calibrator.classes_) == list(range(calibrator.n_classes_))
    np.testing.assert_array_equal(calibrator.predict(scores), calibrator.predict_proba(scores).argmax(axis=1))


# --------------------------------------------------------------------------------------------------------
# Calibration helps where the scores are miscalibrated
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,head", [(m, h) for m, h in HEADS if m != "none"])
def test_fitted_methods_lower_log_loss_and_ece_on_held_out_data(method, head):
    train_scores, train_labels = training_data(head, n=4000, seed=1)
    test_scores, test_labels = training_data(head, n=4000, seed=2)
    before = make_calibrator("none").fit(train_scores, train_labels).predict_proba(test_scores)
    after = make_calibrator(method).fit(train_scores, train_labels).predict_proba(test_scores)
    assert log_loss(after, test_labels) < log_loss(before, test_labels) - 0.02
    assert ece(after, test_labels) < ece(before, test_labels) - 0.02
    assert ece(after, test_labels, strategy="quantile") < ece(before, test_labels, strategy="quantile") - 0.02


@pytest.mark.parametrize("true_temperature", [0.5, 2.5])
@pytest.mark.parametrize("head", ["binary", "multiclass"])
def test_temperature_scaling_recovers_a_known_temperature(true_temperature, head):
    # The judge reports softmax(z * T0); dividing its logits by T = T0 restores the true probabilities.
    maker = tempered_binary if head == "binary" else tempered_multiclass
    scores, labels = maker(20_000, seed=3, temperature=true_temperature)
    fitted = TemperatureScaling().fit(scores, labels).temperature_
    assert fitted == pytest.approx(true_temperature, rel=0.08)


def test_temperature_scaling_on_calibrated_scores_stays_near_one():
    scores, labels = tempered_binary(20_000, seed=4, temperature=1.0)
    assert TemperatureScaling().fit(scores, labels).temperature_ == pytest.approx(1.0, abs=0.08)


def test_platt_scaling_recovers_a_known_slope_and_intercept():
    # True logit = 0.6 * logit(reported) + 0.8.
    rng = np.random.default_rng(5)
    reported_logit = rng.normal(0.0, 2.5, 20_000)
    labels = (rng.uniform(size=reported_logit.size) < 1 / (1 + np.exp(-(0.6 * reported_logit + 0.8)))).astype(int)
    platt = PlattScaling().fit(1 / (1 + np.exp(-reported_logit)), labels)
    assert platt.slope_ == pytest.approx(0.6, abs=0.05)
    assert platt.intercept_ == pytest.approx(0.8, abs=0.08)


def test_platt_scaling_stays_finite_on_perfectly_separated_labels():
    scores = np.linspace(0.01, 0.99, 40)
    labels = (scores > 0.5).astype(int)
    platt = PlattScaling().fit(scores, labels)
    assert np.isfinite(platt.slope_) and np.isfinite(platt.intercept_)
    assert platt.predict_proba(scores)[:, 1].max() < 1.0


def test_isotonic_predictions_equal_sklearn_isotonic_regression():
    scores, labels = power_distorted(3000, seed=6)
    inside = (scores > 0.1) & (scores < 0.8)  # fit on part of the range so that clipping at both ends is tested
    calibrator = IsotonicCalibration().fit(scores[inside], labels[inside])
    reference = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(scores[inside], labels[inside])
    probe = np.concatenate([unseen_scores("binary"), scores])
    np.testing.assert_array_equal(calibrator.predict_proba(probe)[:, 1], reference.predict(probe))


def test_isotonic_multiclass_rows_where_every_map_is_zero_become_uniform():
    # Class 0 is only ever the label at high p0, so low p0 maps to 0; classes 1 and 2 never occur (maps 0).
    scores = np.column_stack([np.linspace(0.0, 1.0, 20), np.zeros(20), np.zeros(20)])
    scores[:, 1] = 1.0 - scores[:, 0]
    labels = np.where(scores[:, 0] > 0.5, 0, 1)
    calibrator = IsotonicCalibration().fit(scores, labels)
    proba = calibrator.predict_proba(np.array([[0.0, 0.0, 1.0]]))
    np.testing.assert_array_equal(proba, [[1 / 3, 1 / 3, 1 / 3]])


# --------------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,head", HEADS)
def test_json_round_trip_gives_bit_identical_predictions(method, head):
    scores, labels = training_data(head, n=1500, seed=7)
    calibrator = make_calibrator(method).fit(scores, labels)
    text = json.dumps(calibrator.to_dict())
    loaded = calibrator_from_dict(json.loads(text))
    assert type(loaded) is type(calibrator)
    assert loaded.get_params() == calibrator.get_params()
    for probs in (scores, unseen_scores(head)):
        np.testing.assert_array_equal(loaded.predict_proba(probs), calibrator.predict_proba(probs))
    assert json.dumps(loaded.to_dict()) == text


def test_non_default_settings_survive_the_round_trip():
    scores, labels = power_distorted(500, seed=8)
    platt = PlattScaling(eps=1e-4, target_smoothing=False).fit(scores, labels)
    loaded = calibrator_from_dict(json.loads(json.dumps(platt.to_dict())))
    assert loaded.get_params() == {"eps": 1e-4, "target_smoothing": False}
    np.testing.assert_array_equal(loaded.predict_proba(scores), platt.predict_proba(scores))


def _saved(method: str, head: str = "binary") -> dict:
    scores, labels = training_data(head, n=300)
    return json.loads(json.dumps(make_calibrator(method).fit(scores, labels).to_dict()))


@pytest.mark.parametrize("method,edit,field,reason", [
    ("temperature", lambda d: d.update(method="softmax"), "method", "unknown calibration method 'softmax'"),
    ("temperature", lambda d: d["state"].update(temperature=-1.0), "state.temperature", "must be > 0.0"),
    ("temperature", lambda d: d["state"].update(temperature="hot"), "state.temperature", "finite number"),
    ("temperature", lambda d: d["state"].pop("temperature"), "state.temperature", "missing"),
    ("temperature", lambda d: d["params"].update(eps=2.0), "params.eps", "must be < 0.5"),
    ("temperature", lambda d: d["params"].update(alpha=1), "params.alpha", "unknown setting"),
    ("platt", lambda d: d["params"].update(target_smoothing="yes"), "params.target_smoothing", "true or false"),
    ("platt", lambda d: d.update(head="multiclass", n_classes=3), "head", "binary head only"),
    ("platt", lambda d: d["state"].update(extra=1), "state.extra", "unknown field"),
    ("none", lambda d: d.update(head="both"), "head", "expected 'binary' or 'multiclass'"),
    ("none", lambda d: d.update(n_classes=3), "n_classes", "binary head has 2 classes"),
    ("isotonic", lambda d: d["state"]["maps"][0]["x"].reverse(), "state.maps[0].x", "strictly increasing"),
    ("isotonic", lambda d: d["state"]["maps"][0]["y"].pop(), "state.maps[0].y", "values but x has"),
    ("isotonic", lambda d: d["state"]["maps"][0]["y"].__setitem__(0, 1.5), "state.maps[0].y[0]", "<= 1.0"),
    ("isotonic", lambda d: d["state"]["maps"].append({"x": [0.5], "y": [0.5]}), "state.maps", "list of 1 map"),
])
def test_malformed_saved_calibrators_raise_a_value_error_naming_the_field(method, edit, field, reason):
    data = _saved(method)
    edit(data)
    with pytest.raises(ValueError, match=reason) as caught:
        calibrator_from_dict(data)
    assert isinstance(caught.value, CalibrationFormatError)
    assert caught.value.field == field


def test_from_dict_refuses_a_non_object():
    with pytest.raises(ValueError, match="expected an object, got an array"):
        calibrator_from_dict([1, 2])


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------

def _binary(n=20):
    return np.linspace(0.05, 0.95, n), np.arange(n) % 2


@pytest.mark.parametrize("scores,labels,message", [
    (np.zeros((4, 3, 2)), np.zeros(4), r"1-D array \[n\] .* got shape \(4, 3, 2\)"),
    (np.full((20, 1), 0.5), np.arange(20) % 2, r"at least 2 class columns; got shape \(20, 1\)"),
    (np.array([]), np.array([]), r"scores is empty"),
    (np.where(np.arange(20) == 3, np.nan, 0.5), np.arange(20) % 2, r"NaN in 1 row\(s\), the first at row 3"),
    (np.where(np.arange(20) == 2, 1.5, 0.5), np.arange(20) % 2, r"probabilities in \[0, 1\]; found 1.5 at row 2"),
    (np.where(np.arange(20) == 4, -0.1, 0.5), np.arange(20) % 2, r"found -0.1 at row 4"),
    (np.full((20, 3), 0.5), np.arange(20) % 3, r"rows must sum to 1 .* row 0 sums to 1.5 \(20 such row"),
    (np.tile([2.0, -1.0, 0.0], (20, 1)), np.arange(20) % 3, r"found 2.0 at row 0, column 0"),
    (_binary()[0], np.arange(19) % 2, r"y has 19 labels but the scores have 20 rows"),
    (_binary()[0], np.arange(20) % 3, r"labels not in the classes \[0, 1\]: \[2\]"),
    (_binary()[0], -(np.arange(20) % 2), r"labels not in the classes \[0, 1\]: \[-1\]"),
    (_binary()[0], np.array(["Safe", "Unsafe"] * 10), r"not strings such as .Safe.; map labels with .*encode_safety"),
    (_binary()[0], np.full(20, 0.5), r"integer class indices; found 0.5 at row 0"),
    (_binary()[0], np.zeros((20, 1)), r"1-D array of class indices; got shape \(20, 1\)"),
    (_binary(5)[0], _binary(5)[1], r"needs at least 10 samples to fit, got 5"),
    (_binary()[0], np.ones(20, dtype=int), r"y has a single class \(1\)"),
    ("high", np.zeros(1), r"scores must be numbers"),
])
@pytest.mark.parametrize("method", ["temperature", "isotonic"])
def test_bad_fit_input_raises_a_precise_value_error(method, scores, labels, message):
    with pytest.raises(ValueError, match=message):
        make_calibrator(method).fit(scores, labels)


def test_boolean_and_integral_float_labels_are_accepted():
    scores, labels = _binary()
    expected = TemperatureScaling().fit(scores, labels).temperature_
    assert TemperatureScaling().fit(scores, labels.astype(bool)).temperature_ == expected
    assert TemperatureScaling().fit(scores, labels.astype(float)).temperature_ == expected


def test_platt_refuses_the_perception_head():
    scores, labels = tempered_multiclass(200, seed=0, temperature=1.0)
    with pytest.raises(ValueError, match=r"binary safety head only .* shape \(200, 3\)"):
        PlattScaling().fit(scores, labels)


def test_predicting_on_the_other_head_raises():
    scores, labels = _binary()
    binary = TemperatureScaling().fit(scores, labels)
    with pytest.raises(ValueError, match=r"fitted on the binary head .* shape \(2, 3\)"):
        binary.predict_proba(np.full((2, 3), 1 / 3))
    perception = TemperatureScaling().fit(*tempered_multiclass(100, seed=0, temperature=1.0))
    with pytest.raises(ValueError, match=r"fitted on 3-class scores .* shape \(2,\)"):
        perception.predict_proba(np.array([0.2, 0.3]))
    with pytest.raises(ValueError, match=r"fitted on 3-class scores .* shape \(1, 2\)"):
        perception.predict_proba(np.array([[0.2, 0.8]]))


def test_bad_settings_raise_at_fit():
    with pytest.raises(ValueError, match=r"eps must be a number in \(0, 0.5\), got 0"):
        TemperatureScaling(eps=0).fit(*_binary())


def test_unknown_method_name():
    with pytest.raises(ValueError, match="unknown calibration method 'beta'; expected one of: none, temperature"):
        make_calibrator("beta")


# --------------------------------------------------------------------------------------------------------
# Choosing a method
# --------------------------------------------------------------------------------------------------------

def test_select_method_picks_isotonic_for_a_jump_no_sigmoid_can_follow():
    scores, labels = step_distorted(3000, seed=10)
    best, losses = select_method(scores, labels, methods=("none", "temperature", "platt", "isotonic"))
    assert best == "isotonic"
    assert set(losses) == {"none", "temperature", "platt", "isotonic"}
    assert losses["isotonic"] < losses["platt"] < losses["none"]


def test_select_method_prefers_a_sigmoid_map_for_a_pure_temperature_distortion():
    scores, labels = tempered_binary(3000, seed=11, temperature=2.5)
    best, losses = select_method(scores, labels)
    assert best in ("temperature", "platt")
    assert losses["temperature"] < losses["isotonic"]


def test_select_method_skips_platt_on_the_perception_head():
    scores, labels = tempered_multiclass(3000, seed=12, temperature=2.5)
    best, losses = select_method(scores, labels)
    assert set(losses) == {"temperature", "isotonic"}
    assert best == "temperature"


def test_select_method_is_deterministic_for_a_seed():
    scores, labels = power_distorted(600, seed=13)
    assert select_method(scores, labels, seed=4) == select_method(scores, labels, seed=4)


@pytest.mark.parametrize("kwargs,message", [
    ({"methods": ("temperature", "beta")}, r"unknown calibration method\(s\) \['beta'\]"),
    ({"cv": 1}, r"cv must be an integer >= 2, got 1"),
    ({"cv": 30}, r"class \d has \d+ sample\(s\), fewer than cv=30 folds"),
])
def test_select_method_bad_arguments(kwargs, message):
    scores, labels = _binary(40)
    with pytest.raises(ValueError, match=message):
        select_method(scores, labels, **kwargs)


def test_select_method_with_no_method_for_the_head():
    scores, labels = tempered_multiclass(100, seed=0, temperature=1.0)
    with pytest.raises(ValueError, match=r"none of the methods \['platt'\] calibrates 3-class scores"):
        select_method(scores, labels, methods=("platt",))


def test_every_method_is_registered_under_its_name():
    assert sorted(METHODS) == ["isotonic", "none", "platt", "temperature"]
    assert all(cls.method == name for name, cls in METHODS.items())
