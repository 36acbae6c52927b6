"""ECE (equal-width and equal-mass bins), Brier score, log-loss and the calibration report."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from misguard.calibration import brier, calibration_report, ece, log_loss
from tests.calibration.synthetic import calibrated_binary, power_distorted, tempered_binary, tempered_multiclass

STRATEGIES = ["uniform", "quantile"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ece_is_near_zero_for_a_perfectly_calibrated_large_sample(strategy):
    probs, labels = calibrated_binary(200_000, seed=0)
    assert ece(probs, labels, strategy=strategy) < 0.01


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_ece_is_large_for_a_miscalibrated_sample(strategy):
    probs, labels = power_distorted(20_000, seed=1)
    assert ece(probs, labels, strategy=strategy) > 0.2
    overconfident, labels = tempered_binary(20_000, seed=1, temperature=4.0)
    assert ece(overconfident, labels, strategy=strategy) > 0.1


def test_ece_hand_computed_with_two_uniform_bins():
    # Bin [0, 0.5): confidence 0.2, frequency 0.5; bin [0.5, 1]: confidence 0.8, frequency 1; each half the data.
    probs, labels = [0.2, 0.2, 0.8, 0.8], [0, 1, 1, 1]
    assert ece(probs, labels, n_bins=2) == pytest.approx(0.5 * 0.3 + 0.5 * 0.2)


def test_uniform_bins_put_a_probability_of_one_in_the_last_bin():
    assert ece([1.0, 1.0, 0.0, 0.0], [1, 1, 0, 0], n_bins=15) == 0.0
    assert ece([1.0, 0.0], [0, 1], n_bins=15) == 1.0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_one_bin_is_the_gap_between_mean_probability_and_frequency(strategy):
    probs, labels = power_distorted(1000, seed=2)
    assert ece(probs, labels, n_bins=1, strategy=strategy) == pytest.approx(abs(probs.mean() - labels.mean()))


def test_quantile_bins_hold_equal_mass():
    # With as many equal-mass bins as samples every sample is its own bin: ECE = mean |p - y|.
    probs, labels = power_distorted(300, seed=3)
    assert ece(probs, labels, n_bins=300, strategy="quantile") == pytest.approx(np.mean(np.abs(probs - labels)))
    # Equal-width bins cannot split scores crowded into one narrow range; equal-mass bins can.
    rng = np.random.default_rng(3)
    crowded = rng.uniform(0.50, 0.52, 4000)
    labels = (np.argsort(np.argsort(crowded)) >= 2000).astype(int)  # the upper half of the range is Unsafe
    assert ece(crowded, labels, n_bins=10, strategy="uniform") < 0.05
    assert ece(crowded, labels, n_bins=10, strategy="quantile") > 0.4


def test_ece_of_binary_matrix_equals_ece_of_the_unsafe_column():
    probs, labels = power_distorted(1000, seed=4)
    for strategy in STRATEGIES:
        assert ece(np.column_stack([1 - probs, probs]), labels, strategy=strategy) == ece(probs, labels,
                                                                                           strategy=strategy)


def test_multiclass_ece_is_top_label():
    labels = np.array([0, 1, 2] * 100)
    assert ece(np.eye(3)[labels], labels) == 0.0  # confident and right
    assert ece(np.eye(3)[(labels + 1) % 3], labels) == 1.0  # confident and wrong
    # Always predicting class 0 with confidence 1/3 on balanced labels is right a third of the time.
    assert ece(np.full((300, 3), 1 / 3), labels) == pytest.approx(0.0, abs=1e-12)
    overconfident, labels = tempered_multiclass(20_000, seed=5, temperature=3.0)
    assert ece(overconfident, labels) > 0.1


def test_brier_matches_sklearn_for_binary_and_hand_values_for_multiclass():
    probs, labels = power_distorted(1000, seed=6)
    assert brier(probs, labels) == pytest.approx(brier_score_loss(labels, probs))
    assert brier(np.column_stack([1 - probs, probs]), labels) == pytest.approx(brier(probs, labels))
    labels = np.array([0, 1, 2, 2])
    assert brier(np.eye(3)[labels], labels) == 0.0
    assert brier(np.full((4, 3), 1 / 3), labels) == pytest.approx((2 / 3) ** 2 + 2 * (1 / 3) ** 2)
    assert brier(np.eye(3)[(labels + 1) % 3], labels) == 2.0


def test_log_loss_counts_classes_missing_from_the_labels():
    probs = np.array([[0.7, 0.2, 0.1], [0.5, 0.25, 0.25]])
    assert log_loss(probs, [0, 0]) == pytest.approx(-np.mean(np.log([0.7, 0.5])))
    assert log_loss(np.array([0.9, 0.2]), [1, 0]) == pytest.approx(-np.mean(np.log([0.9, 0.8])))


def test_calibration_report():
    probs, labels = power_distorted(500, seed=7)
    report = calibration_report(probs, labels)
    assert set(report) == {"ece_uniform", "ece_adaptive", "brier", "log_loss", "n"}
    assert report["n"] == 500
    assert report["ece_uniform"] == ece(probs, labels) and report["ece_adaptive"] == ece(probs, labels,
                                                                                          strategy="quantile")
    assert all(isinstance(value, float) for key, value in report.items() if key != "n")


@pytest.mark.parametrize("kwargs,message", [
    ({"n_bins": 0}, r"n_bins must be an integer >= 1, got 0"),
    ({"n_bins": 2.5}, r"n_bins must be an integer >= 1, got 2.5"),
    ({"strategy": "equal"}, r"unknown binning strategy 'equal'; expected one of: uniform, quantile"),
])
def test_ece_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ece([0.2, 0.8], [0, 1], **kwargs)


@pytest.mark.parametrize("score", [ece, brier, log_loss, calibration_report])
def test_scores_refuse_bad_input(score):
    with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\]; found 1.2 at row 1"):
        score([0.5, 1.2], [0, 1])
    with pytest.raises(ValueError, match=r"y has 3 labels but the scores have 2 rows"):
        score([0.5, 0.2], [0, 1, 1])
    with pytest.raises(ValueError, match=r"labels not in the classes \[0, 1, 2\]: \[3\]"):
        score(np.full((2, 3), 1 / 3), [0, 3])


def test_log_loss_takes_float32_softmax_rows_without_a_warning():
    rows = np.array([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], dtype=np.float64) + np.array([[9e-8, 0, 0], [0, 0, -9e-8]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert log_loss(rows, [2, 2]) == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2, abs=1e-6)
