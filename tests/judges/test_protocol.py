"""The Judge protocol's shared parts: chunked streaming that keeps an item's responses together, and assessments
from raw probabilities (calibrated, labelled, never Safe by accident)."""
from __future__ import annotations

import numpy as np
import pytest

from misguard.calibration import fit_calibration
from misguard.judges import Case
from misguard.judges.protocol import JudgeBase, assessments
from misguard.judges.spec import calibration_id


class Recording(JudgeBase):
    """A judge that only records the chunks it is handed."""

    chunk_size = 4

    def __init__(self):
        self.chunks: list[list[str]] = []

    def judge(self, cases):
        self.chunks.append([c.id for c in cases])
        return assessments("rec", "t", [0.5] * len(cases), None, calibration=None, calibration_id=None,
                           threshold=0.5)


def cases_on(images: list[str]) -> list[Case]:
    return [Case(id=f"{n}", images=(image, "other.png"), question="q", response="r") for n, image in enumerate(images)]


def test_a_chunk_never_splits_the_cases_on_one_items_images():
    judge = Recording()
    cases = cases_on(["a"] * 3 + ["b"] * 3 + ["c"] * 3 + ["d"])
    streamed = list(judge.judge_stream(cases))
    assert [len(chunk) for chunk in judge.chunks] == [6, 4]  # the second item's responses join the first chunk
    assert [index for index, _ in streamed] == list(range(len(cases)))
    assert [case_id for chunk in judge.chunks for case_id in chunk] == [c.id for c in cases]


def test_probabilities_that_are_not_numbers_are_errors_and_the_rest_scored():
    out = assessments("j", "t", [0.2, float("nan"), 0.9], np.array([[0.5, 0.3, 0.2], [0.3, 0.3, 0.4],
                                                                    [0.1, 0.1, float("nan")]]),
                      calibration=None, calibration_id=None, threshold=0.5)
    assert [a.status for a in out] == ["scored", "error", "error"]
    assert out[0].label == "Safe" and out[0].perception == "Level1"
    assert all(a.label is None and a.p_unsafe is None and "not a finite number" in a.reason for a in out[1:])


def test_a_calibration_is_applied_and_the_raw_values_kept():
    rng = np.random.default_rng(0)
    raw = rng.uniform(0, 1, 400)
    labels = ["Unsafe" if r < p ** 3 else "Safe" for p, r in zip(raw, rng.uniform(0, 1, 400))]
    calibration = fit_calibration(raw, labels, method="platt", threshold_rule="fixed")
    out = assessments("j", "t", raw[:5], None, calibration=calibration, calibration_id=calibration_id(calibration),
                      threshold=calibration.threshold.value)
    expected = calibration.apply(raw[:5])[0]
    assert [a.p_unsafe for a in out] == pytest.approx(list(expected))
    assert [a.p_unsafe_raw for a in out] == pytest.approx(list(raw[:5]))
    assert {a.calibration for a in out} == {calibration_id(calibration)}
    assert [a.label for a in out] == ["Unsafe" if p >= calibration.threshold.value else "Safe" for p in expected]
