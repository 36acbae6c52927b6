"""The lite judge distilled from GPT-4o's verdicts on real data (MSTS, ../shared/data/msts): bench/lite_msts.py's
main split, checked for properties (no leakage across the split, agreement well above chance, calibration that
helps where the heads are miscalibrated), never for its headline number. Skips when ../shared/data is absent."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from bench.lite_msts import (
    EXTRA_VARIANTS,
    LITE,
    MSTS_FILE,
    PUBLISHED_GPT4O_KAPPA_VS_HUMAN,
    EmbeddingCache,
    Features,
    agreement,
    load_msts,
    run_split,
    split_by_case,
)
from misguard.core.errors import DataError
from tests.conftest import SHARED_DATA

MSTS = SHARED_DATA / "msts"
# Class-weighted heads inflate p_unsafe on purpose: the case where calibration has work to do. One C keeps the
# test short (the bench chooses it by cross-validation).
BALANCED = dataclasses.replace(next(v for v in EXTRA_VARIANTS if v.name == "balanced"), grid=(1.0,))


@pytest.fixture(scope="module")
def msts():
    if not (MSTS / MSTS_FILE).is_file():
        pytest.skip(f"MSTS not found at {MSTS} (../shared/data is not part of a bare clone)")
    return load_msts(MSTS)


@pytest.fixture(scope="module")
def main_split(msts):
    """run_split on seed 0 with the real encoder: every distinct text embedded once (about 4,000; minutes on
    two CPU cores), the lite heads with C chosen by grouped CV, the balanced variant and the shuffled control."""
    return run_split(msts, Features(EmbeddingCache(), msts), seed=0, variants=(LITE, BALANCED))


def test_load_msts_names_the_missing_file(tmp_path):
    with pytest.raises(DataError, match=MSTS_FILE):
        load_msts(tmp_path)


def test_gpt4o_vs_humans_matches_the_published_check(msts):
    y_gpt4o = np.array([response.gpt4o_unsafe for response in msts])
    y_human = np.array([response.human_unsafe for response in msts])
    assert len(msts) == 4000 and y_gpt4o.sum() == 869 and y_human.sum() == 181
    published = agreement(y_human, y_gpt4o)
    assert published["kappa"] == pytest.approx(PUBLISHED_GPT4O_KAPPA_VS_HUMAN, abs=5e-4)
    assert published["accuracy"] == pytest.approx(0.820, abs=5e-4)
    assert published["f1"] == pytest.approx(0.312, abs=5e-4)


@pytest.mark.parametrize("seed", range(6))
def test_split_keeps_each_case_on_one_side(msts, seed):
    train, test = split_by_case(msts, seed)
    assert np.intersect1d(train, test).size == 0 and train.size + test.size == len(msts)
    cases = [{msts[i].case_id for i in side} for side in (train, test)]
    prompts = [{msts[i].prompt_id for i in side} for side in (train, test)]
    assert not cases[0] & cases[1] and not prompts[0] & prompts[1]
    assert 95 <= len(prompts[1]) <= 105 and len(prompts[0]) + len(prompts[1]) == 400
    assert split_by_case(msts, seed)[1].tolist() == test.tolist()  # the seed fixes the split


@pytest.mark.slow
def test_main_split_has_no_leak_and_the_usual_size(main_split):
    split = main_split["split"]
    assert split["shared_cases"] == 0 and split["shared_prompts"] == 0
    assert 95 <= split["test_prompts"] <= 105 and split["train_prompts"] + split["test_prompts"] == 400
    assert split["n_train"] + split["n_test"] == 4000


@pytest.mark.slow
def test_distilled_judge_agrees_with_gpt4o_far_above_chance(main_split):
    lite, control = main_split["lite"], main_split["shuffled_control"]
    assert lite["vs_gpt4o"]["n"] == main_split["split"]["n_test"]
    assert lite["vs_gpt4o"]["kappa"] > 0.45
    assert lite["vs_gpt4o"]["kappa"] > control["vs_gpt4o"]["kappa"] + 0.25
    # Distilling GPT-4o copies GPT-4o: the judge agrees with it better than with the humans.
    assert lite["vs_gpt4o"]["kappa"] > lite["vs_human"]["kappa"]
    assert lite["param"] in LITE.grid and 0.0 < lite["threshold"] < 1.0


@pytest.mark.slow
def test_calibration_fixes_miscalibrated_heads_and_does_not_harm_calibrated_ones(main_split):
    balanced, lite = main_split["balanced"], main_split["lite"]
    before, after = balanced["before_calibration"], balanced["after_calibration"]
    assert after["log_loss"] < before["log_loss"] - 0.02
    assert after["ece_uniform"] < before["ece_uniform"] / 2
    # Logistic heads fitted by log-loss on GPT-4o's labels are close to calibrated already: the calibration
    # fitted on out-of-fold train predictions may move them a little either way, never by much.
    assert lite["after_calibration"]["log_loss"] <= lite["before_calibration"]["log_loss"] + 0.01
    assert lite["after_calibration"]["ece_uniform"] < 0.06
