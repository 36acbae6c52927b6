"""Unsafe decision thresholds: maximum agreement (Cohen's kappa) and matching the reference's Unsafe rate."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score

from misguard.calibration import (
    CalibrationFormatError,
    Threshold,
    fit_threshold,
    threshold_match_rate,
    threshold_max_kappa,
)
from misguard.calibration.thresholds import NEVER_UNSAFE
from tests.calibration.synthetic import power_distorted


def test_max_kappa_finds_a_planted_separating_threshold():
    rng = np.random.default_rng(0)
    safe, unsafe = rng.uniform(0.0, 0.3, 400), rng.uniform(0.35, 1.0, 100)
    p_unsafe = np.concatenate([safe, unsafe])
    labels = np.concatenate([np.zeros(400, int), np.ones(100, int)])
    threshold = threshold_max_kappa(p_unsafe, labels)
    assert isinstance(threshold, float)
    assert safe.max() < threshold <= unsafe.min()
    assert np.array_equal(p_unsafe >= threshold, labels == 1)


def test_max_kappa_equals_brute_force_sklearn_kappa():
    p_unsafe, labels = power_distorted(400, seed=1)
    p_unsafe = np.round(p_unsafe, 2)  # ties between scores, so cut points fall between groups
    threshold = threshold_max_kappa(p_unsafe, labels)
    values = np.unique(p_unsafe)
    candidates = (values[:-1] + values[1:]) / 2
    kappas = np.array([cohen_kappa_score(labels, (p_unsafe >= cut).astype(int)) for cut in candidates])
    assert cohen_kappa_score(labels, (p_unsafe >= threshold).astype(int)) == pytest.approx(kappas.max(), abs=1e-12)
    assert threshold in candidates


@pytest.mark.parametrize("p_unsafe,expected", [
    ([0.1, 0.3, 0.6, 0.8], 0.7),  # kappa 0.5 at cuts 0.7 and 0.2: 0.7 is closer to 0.5
    ([0.05, 0.55, 0.85, 0.95], 0.3),  # kappa 0.5 at cuts 0.9 and 0.3: 0.3 is closer to 0.5
])
def test_max_kappa_ties_go_to_the_threshold_closest_to_one_half(p_unsafe, expected):
    assert threshold_max_kappa(p_unsafe, [0, 1, 0, 1]) == pytest.approx(expected)


def test_max_kappa_with_adjacent_floats_keeps_the_cut_between_them():
    low = 0.4
    high = float(np.nextafter(low, 1.0))
    p_unsafe = np.array([low] * 5 + [high] * 5)
    labels = np.array([0] * 5 + [1] * 5)
    threshold = threshold_max_kappa(p_unsafe, labels)
    assert np.array_equal(p_unsafe >= threshold, labels == 1)


@pytest.mark.parametrize("target_rate", [0.0, 0.05, 0.237, 0.5, 0.9, 1.0])
def test_match_rate_reproduces_the_target_rate(target_rate):
    p_unsafe = np.random.default_rng(2).uniform(size=1000)
    threshold = threshold_match_rate(p_unsafe, target_rate)
    assert isinstance(threshold, float)
    assert np.mean(p_unsafe >= threshold) == pytest.approx(target_rate, abs=1e-12)


def test_match_rate_with_tied_scores_gets_the_nearest_reachable_rate():
    p_unsafe = np.array([0.2] * 6 + [0.7] * 4)  # reachable rates: 0, 0.4, 1
    assert np.mean(p_unsafe >= threshold_match_rate(p_unsafe, 0.35)) == 0.4
    assert np.mean(p_unsafe >= threshold_match_rate(p_unsafe, 0.75)) == 1.0
    assert np.mean(p_unsafe >= threshold_match_rate(p_unsafe, 0.1)) == 0.0


def test_fit_threshold_records_the_rule():
    p_unsafe, labels = power_distorted(500, seed=3)
    assert fit_threshold(p_unsafe, labels, "fixed") == Threshold(0.5, "fixed")
    kappa = fit_threshold(p_unsafe, labels, "max_kappa")
    assert kappa == Threshold(threshold_max_kappa(p_unsafe, labels), "max_kappa")
    rate = fit_threshold(p_unsafe, labels, "match_rate")
    assert rate.rule == "match_rate"
    assert np.mean(rate.is_unsafe(p_unsafe)) == pytest.approx(labels.mean())
    assert Threshold.from_dict(rate.to_dict()) == rate


@pytest.mark.parametrize("call,message", [
    (lambda: threshold_max_kappa([0.2, 0.8], [1, 1]), r"y has a single class \(1\)"),
    (lambda: threshold_max_kappa([0.3, 0.3], [0, 1]), r"single distinct value \(0.3\)"),
    (lambda: threshold_max_kappa([[0.3, 0.7]], [0]), r"p_unsafe must be a 1-D array .* shape \(1, 2\)"),
    (lambda: threshold_max_kappa([0.3, 0.7], [0, 2]), r"labels not in the classes \[0, 1\]: \[2\]"),
    (lambda: threshold_match_rate([0.3, np.nan], 0.5), r"p_unsafe contains NaN in 1 row\(s\), the first at row 1"),
    (lambda: threshold_match_rate([0.3, 0.7], 1.5), r"target_rate must be a number in \[0, 1\], got 1.5"),
    (lambda: fit_threshold([0.3, 0.7], [0, 1], "youden"), r"unknown threshold rule 'youden'"),
    (lambda: Threshold(0.5, "median"), r"unknown threshold rule 'median'"),
    (lambda: Threshold(float("nan")), r"threshold value must be a finite number"),
])
def test_bad_threshold_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_threshold_from_dict_names_the_field():
    with pytest.raises(CalibrationFormatError, match="unknown rule 'x'") as caught:
        Threshold.from_dict({"value": 0.5, "rule": "x"})
    assert caught.value.field == "rule"
    with pytest.raises(CalibrationFormatError) as caught:
        Threshold.from_dict({"rule": "fixed"})
    assert caught.value.field == "value"


@pytest.mark.parametrize("value", [2.0, 1.5, -0.1, -1e-12, float("inf"), float("nan")])
def test_a_threshold_outside_zero_to_one_is_refused(value):
    # 2.0 would never block again, a negative value always would: neither is a threshold a fit gives.
    with pytest.raises(ValueError, match="threshold value must be"):
        Threshold(value, "max_kappa")
    with pytest.raises(CalibrationFormatError) as caught:
        Threshold.from_dict({"value": value, "rule": "max_kappa"})
    assert caught.value.field == "value"


def test_the_never_unsafe_threshold_match_rate_fits_is_kept():
    # A reference that calls nothing Unsafe, and a judge at p = 1.0: the fitted threshold is the float above 1.
    p_unsafe = np.array([0.2, 0.6, 1.0, 1.0])
    rate = fit_threshold(p_unsafe, [0, 0, 0, 0], "match_rate")
    assert rate.value == NEVER_UNSAFE > 1.0 and not rate.is_unsafe(p_unsafe).any()
    assert Threshold.from_dict(rate.to_dict()) == rate
    assert Threshold(0.0).is_unsafe(p_unsafe).all() and Threshold(1.0).is_unsafe(p_unsafe).sum() == 2
