"""calibration.trust: conformal trust scores and the threshold that flags a stated share of in-domain verdicts,
shared by the lite judge and the VLM judge (whose trust `misguard calibrate` fits and the calibration file keeps)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from misguard.calibration import Calibration, CalibrationFormatError, TemperatureScaling
from misguard.calibration.trust import MIN_ROWS, VLM_SIGNALS, ConformalTrust, margin_signal, trust_scores, vlm_signals
from tests.calibration.synthetic import power_distorted


def in_domain(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3))


def test_about_the_stated_share_of_new_in_domain_rows_is_flagged_and_shifted_rows_far_more():
    trust = ConformalTrust.fit(in_domain(2000, 0), names=("a", "b", "c"), flag_share=0.05)
    fresh = trust.flagged(trust.score(in_domain(4000, 1))).mean()
    assert 0.03 <= fresh <= 0.08, fresh
    shifted = in_domain(1000, 2)
    shifted[:, 1] += 3.0  # unusual in one signal is enough
    assert trust.flagged(trust.score(shifted)).mean() > 0.6
    assert ConformalTrust.fit(in_domain(2000, 0), names=("a", "b", "c"), flag_share=0.2).threshold > trust.threshold


def test_more_unusual_is_less_trusted_also_beyond_the_most_unusual_reference_row():
    reference = np.sort(in_domain(200, 3), axis=0)
    row = np.zeros((60, 3))
    row[:, 0] = np.linspace(-3, 12, 60)  # runs past the reference's largest value
    scores = trust_scores(reference, row)
    assert (np.diff(scores) <= 0).all() and scores[-1] < scores[-10] < 1 / 201 and 0 < scores[-1]
    assert trust_scores(reference, np.full((1, 3), -10.0))[0] == pytest.approx(1.0)


def test_fit_refuses_too_few_rows_a_bad_share_and_mismatched_names():
    with pytest.raises(ValueError, match=f"at least {MIN_ROWS}"):
        ConformalTrust.fit(in_domain(MIN_ROWS - 1, 0), names=("a", "b", "c"))
    with pytest.raises(ValueError, match="flag_share"):
        ConformalTrust.fit(in_domain(100, 0), names=("a", "b", "c"), flag_share=0.7)
    with pytest.raises(ValueError, match="3 names"):
        ConformalTrust.fit(in_domain(100, 0)[:, :2], names=("a", "b", "c"))
    nan = in_domain(100, 0)
    nan[5, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        ConformalTrust.fit(nan, names=("a", "b", "c"))


def test_vlm_signals_point_the_right_way():
    # A verdict near the threshold, answer codes the model barely wanted, an undecided perception: more unusual.
    sure, unsure = vlm_signals([0.99, 0.52], 0.5, [0.95, 0.95], [[0.9, 0.05, 0.05], [0.9, 0.05, 0.05]])
    assert unsure[0] > sure[0] and unsure[1] == sure[1] and unsure[2] == sure[2]
    formatted, off_format = vlm_signals([0.9, 0.9], 0.5, [0.99, 0.01])
    assert off_format[1] > formatted[1] and formatted.shape == (2,)
    levels = vlm_signals([0.9, 0.9], 0.5, [1, 1], [[1, 0, 0], [1 / 3, 1 / 3, 1 / 3]])
    assert levels[1, 2] == pytest.approx(np.log2(3)) and levels[0, 2] == pytest.approx(0.0, abs=1e-9)
    assert margin_signal([0.3], 0.3)[0] == pytest.approx(0.0)


def test_a_trust_score_survives_the_calibration_file(tmp_path):
    rng = np.random.default_rng(4)
    signals = vlm_signals(rng.uniform(0.01, 0.99, 300), 0.4, rng.uniform(0.5, 1.0, 300),
                          rng.dirichlet(np.ones(3), 300))
    trust = ConformalTrust.fit(signals, names=VLM_SIGNALS)
    calibration = Calibration(TemperatureScaling().fit(*power_distorted(100, seed=5)), trust=trust)
    calibration.save(tmp_path / "c.json")
    loaded = Calibration.load(tmp_path / "c.json")
    np.testing.assert_array_equal(loaded.trust.score(signals), trust.score(signals))
    assert (loaded.trust.signals, loaded.trust.threshold, loaded.trust.fitted_on) == (VLM_SIGNALS, trust.threshold,
                                                                                       300)
    with pytest.raises(ValueError, match="reads"):
        loaded.trust.score(signals[:, :2])
    # A version-1 file (written before trust scores) reads as it is, without one.
    old = {**json.loads((tmp_path / "c.json").read_text()), "version": 1}
    del old["trust"]
    assert Calibration.from_dict(old).trust is None
    with pytest.raises(CalibrationFormatError, match="signals"):
        ConformalTrust.from_dict({**trust.to_dict(), "signals": []})
