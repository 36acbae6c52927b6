"""Escalation to review: the judge's confidence, the agreement-vs-budget curve, and picking items for review."""
from __future__ import annotations

import itertools
import math

import pytest

from misguard.calibration.escalation import (
    DEFAULT_COVERAGES,
    confidence,
    escalation_curve,
    parse_share,
    record_confidence,
    select_for_review,
)
from misguard.core.labels import LabelRecord

SURE_SAFE = (0.999, 0.0005, 0.0005)


def record(key: str, safety: str | None, perception: str | None = "Level1", *, p_unsafe: float | None = None,
           p_perception: tuple[float, float, float] | None = None) -> LabelRecord:
    return LabelRecord(key=key, safety=safety, perception=perception, p_unsafe=p_unsafe, p_perception=p_perception,
                       id=key, line=int(key) + 1 if key.isdigit() else 0)


def planted_pairs() -> list[tuple[LabelRecord, LabelRecord]]:
    """20 pairs: 16 where the judge is confident (confidence 0.99 down to 0.84) and right, then 4 where it is
    unsure (confidence 0.60 down to 0.54) and wrong. Listed in a shuffled order."""
    pairs = []
    for i in range(16):
        p = 0.99 - 0.01 * i
        if i % 2:
            judge = record(str(i), "Unsafe", "Level2", p_unsafe=p, p_perception=(0.1, 0.8, 0.1))
            reference = record(str(i), "Unsafe", "Level2")
        else:
            # Safe: confidence (1 - p_unsafe) * 0.999 == p when p_unsafe = 1 - p / 0.999.
            judge = record(str(i), "Safe", "Level1", p_unsafe=1.0 - p / 0.999, p_perception=SURE_SAFE)
            reference = record(str(i), "Safe", "Level1")
        pairs.append((judge, reference))
    for j, p in enumerate((0.60, 0.58, 0.56, 0.54)):
        key = str(16 + j)
        if j % 2:
            pairs.append((record(key, "Unsafe", "Level3", p_unsafe=p), record(key, "Safe", "Level3")))
        else:
            pairs.append((record(key, "Safe", "Level3", p_unsafe=1.0 - p), record(key, "Unsafe", "Level3")))
    order = [7, 18, 0, 13, 3, 16, 11, 5, 19, 1, 9, 14, 2, 17, 8, 15, 4, 10, 6, 12]
    return [pairs[i] for i in order]


# ------------------------------------------------------------------------------------------------ confidence

def test_confidence_of_an_unsafe_judgment_is_p_unsafe_whatever_the_perception():
    assert confidence(0.8, None) == pytest.approx(0.8)
    assert confidence(0.8, (0.2, 0.3, 0.5)) == pytest.approx(0.8)
    assert confidence(0.5, None) == pytest.approx(0.5)  # p_unsafe >= threshold is Unsafe


def test_confidence_of_a_safe_judgment_is_safe_times_the_judged_level():
    assert confidence(0.2, None) == pytest.approx(0.8)
    assert confidence(0.2, (0.1, 0.7, 0.2)) == pytest.approx(0.8 * 0.7)
    assert confidence(0.2, {"Level1": 0.1, "Level2": 0.2, "Level3": 0.7}) == pytest.approx(0.8 * 0.7)
    # A Safe verdict unsure of its level is less confident of its outcome than one sure of it.
    assert confidence(0.1, (1 / 3, 1 / 3, 1 / 3)) < confidence(0.1, SURE_SAFE)


def test_confidence_follows_the_threshold():
    assert confidence(0.3, (0.5, 0.25, 0.25), threshold=0.25) == pytest.approx(0.3)  # Unsafe at 0.25
    assert confidence(0.3, (0.5, 0.25, 0.25), threshold=0.5) == pytest.approx(0.7 * 0.5)  # Safe at 0.5
    assert confidence(0.6, None, threshold=0.7) == pytest.approx(0.4)


def test_confidence_is_none_without_probabilities():
    assert confidence(None, None) is None
    assert confidence(None, (0.2, 0.3, 0.5)) is None
    assert record_confidence(record("1", None, None)) is None  # unscored
    assert record_confidence(record("1", "Safe", "Level1")) is None  # zero-shot JSON: labels, no probabilities


@pytest.mark.parametrize("p_unsafe, p_perception, threshold", [
    (1.5, None, 0.5), (-0.1, None, 0.5), (math.nan, None, 0.5), (True, None, 0.5),
    (0.2, (0.5, 0.5), 0.5), (0.2, {"Level1": 1.0}, 0.5), (0.2, (0.5, 0.5, 1.5), 0.5), (0.2, None, math.inf),
])
def test_confidence_rejects_malformed_input(p_unsafe, p_perception, threshold):
    with pytest.raises(ValueError):
        confidence(p_unsafe, p_perception, threshold=threshold)


# ------------------------------------------------------------------------------------------ escalation curve

def test_agreement_rises_as_the_unsure_items_are_escalated_and_reaches_one():
    curve = escalation_curve(planted_pairs(), coverages=[1.0, 0.95, 0.9, 0.85, 0.8, 0.75])
    assert [point["kept"] for point in curve] == [20, 19, 18, 17, 16, 15]
    assert [point["escalated"] for point in curve] == [0, 1, 2, 3, 4, 5]
    accuracy = [point["safety_accuracy"] for point in curve]
    kappa = [point["safety_kappa"] for point in curve]
    outcome = [point["outcome_accuracy"] for point in curve]
    assert accuracy[0] == pytest.approx(16 / 20)
    for series in (accuracy, kappa, outcome):
        assert all(later > earlier for earlier, later in itertools.pairwise(series[:5]))
        assert series[4] == pytest.approx(1.0) and series[5] == pytest.approx(1.0)
    assert all(point["outcome_n"] == point["kept"] == point["safety_n"] for point in curve)


def test_default_coverages_run_from_one_to_a_half():
    curve = escalation_curve(planted_pairs())
    assert [point["coverage"] for point in curve] == list(DEFAULT_COVERAGES)
    assert DEFAULT_COVERAGES[0] == 1.0 and DEFAULT_COVERAGES[-1] == 0.5 and len(DEFAULT_COVERAGES) == 11
    assert [point["kept"] for point in curve] == [20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10]


def test_escalated_is_the_ceiling_of_the_escalated_share_without_float_noise():
    pairs = planted_pairs()[:10]
    curve = escalation_curve(pairs, coverages=[0.7, 0.65, 0.01])
    assert [point["escalated"] for point in curve] == [3, 4, 10]  # 0.3 * 10 is 3.0000000000000004
    assert [point["kept"] for point in curve] == [7, 6, 0]


@pytest.mark.parametrize("n", [7, 10, 20, 72])
def test_the_curve_escalates_what_the_review_list_lists(n):
    pairs = (planted_pairs() * 4)[:n]
    for share in (0.05, 0.1, 0.25, 0.5):
        point = escalation_curve(pairs, coverages=[1.0 - share])[0]
        assert point["escalated"] == len(select_for_review([judge for judge, _ in pairs], share))


def test_pairs_without_probabilities_are_always_escalated():
    pairs = planted_pairs()
    # Two zero-shot judgments (labels, no probabilities) that agree with the reference, and one unscored row.
    pairs += [(record("30", "Safe"), record("30", "Safe")), (record("31", "Unsafe"), record("31", "Unsafe")),
              (record("32", None, None), record("32", "Safe"))]
    curve = escalation_curve(pairs, coverages=[1.0, 0.8])
    assert curve[0]["kept"] == 20 and curve[0]["escalated"] == 3 and curve[0]["no_probabilities"] == 3
    assert curve[0]["safety_accuracy"] == pytest.approx(16 / 20)  # the agreeing zero-shot rows are not counted
    assert curve[1]["escalated"] == math.ceil(0.2 * 23) == 5  # n counts the pairs without probabilities too
    assert curve[1]["kept"] == 18


def test_outcome_accuracy_is_none_for_binary_only_references():
    pairs = [(judge, LabelRecord(key=reference.key, safety=reference.safety, perception=None, id=reference.id))
             for judge, reference in planted_pairs()]
    curve = escalation_curve(pairs, coverages=[1.0, 0.8])
    assert all(point["outcome_accuracy"] is None and point["outcome_n"] == 0 for point in curve)
    assert curve[1]["safety_accuracy"] == pytest.approx(1.0)


def test_unscored_references_are_kept_but_not_compared():
    pairs = planted_pairs()
    judge, _ = pairs[0]
    pairs[0] = (judge, record(judge.key, None, None))
    point = escalation_curve(pairs, coverages=[1.0])[0]
    assert point["kept"] == 20 and point["safety_n"] == 19


def test_escalation_curve_rejects_bad_input():
    with pytest.raises(ValueError, match="probabilities"):
        escalation_curve([(record("1", "Safe"), record("1", "Safe")), (record("2", None, None), record("2", "Safe"))])
    with pytest.raises(ValueError):
        escalation_curve([])
    for coverages in ([0.0], [1.2], [], [math.nan]):
        with pytest.raises(ValueError):
            escalation_curve(planted_pairs(), coverages=coverages)


# ---------------------------------------------------------------------------------------------- review pick

def review_records() -> list[LabelRecord]:
    return [record("0", "Unsafe", p_unsafe=0.9), record("1", "Safe"),                  # 0.9, None
            record("2", "Unsafe", p_unsafe=0.6), record("3", "Safe", p_unsafe=0.01),   # 0.6, 0.99
            record("4", "Safe", p_unsafe=0.3), record("5", None, None)]                # 0.7, None


def test_select_for_review_takes_the_least_confident_first():
    chosen = select_for_review(review_records(), 0.5)
    assert [r.key for r, _ in chosen] == ["1", "5", "2"]
    assert [score for _, score in chosen][:2] == [None, None]
    assert chosen[2][1] == pytest.approx(0.6)
    every = select_for_review(review_records(), 1.0)
    assert [r.key for r, _ in every] == ["1", "5", "2", "4", "0", "3"]
    assert [r.key for r, _ in select_for_review(review_records(), 0.01)] == ["1"]
    assert len(select_for_review(review_records(), 0.34)) == 3  # ceil(0.34 * 6)


def test_the_judges_own_label_decides_the_outcome_scored():
    # A calibrated judge with threshold 0.25 labelled p_unsafe 0.3 Unsafe: its confidence is 0.3 (Unsafe), not
    # 0.7 (Safe at the default 0.5), so it is the least confident of the ranked records.
    records = review_records()
    records[4] = record("4", "Unsafe", p_unsafe=0.3)
    chosen = select_for_review(records, 0.5)
    assert [r.key for r, _ in chosen] == ["1", "5", "4"]
    assert chosen[2][1] == pytest.approx(0.3)


@pytest.mark.parametrize("share", [0.0, -0.1, 1.01, math.nan])
def test_select_for_review_rejects_a_bad_share(share):
    with pytest.raises(ValueError):
        select_for_review(review_records(), share)


@pytest.mark.parametrize("text, share", [("10%", 0.1), ("0.1", 0.1), ("100%", 1.0), (" 12.5 % ", 0.125),
                                         ("1", 1.0), ("0.5%", 0.005)])
def test_parse_share_reads_percentages_and_fractions(text, share):
    assert parse_share(text) == pytest.approx(share)


@pytest.mark.parametrize("text", ["0", "0%", "150%", "10", "-0.1", "abc", "nan", "inf", "", "%"])
def test_parse_share_rejects_anything_outside_zero_to_one(text):
    with pytest.raises(ValueError):
        parse_share(text)
