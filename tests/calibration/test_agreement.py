"""Agreement statistics: properties, hand-computed cases, bootstrap coverage, and the published MSTS figures."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from misguard.calibration.agreement import (
    agreement_markdown,
    agreement_report,
    head_agreement,
    outcome_of,
    paired_bootstrap_delta,
)
from misguard.core.join import join_labels
from misguard.core.labels import LabelRecord, read_labels

MSTS = (Path(__file__).resolve().parents[2].parent / "shared" / "data" / "msts"
        / "msts_english_multimodal_normalized.jsonl")
SAFETY = ("Safe", "Unsafe")


def cells(table: dict[tuple[str, str], int]) -> tuple[list[str], list[str]]:
    """(reference labels, judge labels) holding `table[(reference, judge)]` pairs of each combination."""
    reference, judge = [], []
    for (ref, jud), count in table.items():
        reference += [ref] * count
        judge += [jud] * count
    return reference, judge


def pair(n: int, judge: tuple, reference: tuple, *, model="m1", category="Violent") -> tuple[LabelRecord, LabelRecord]:
    """A (judge, reference) pair; each side is (safety, perception)."""
    def side(labels, line):
        return LabelRecord(key=str(n), safety=labels[0], perception=labels[1], model=model, category=category,
                           line=line, id=str(n))
    return side(judge, n + 1), side(reference, n + 1)


# --------------------------------------------------------------------------------------------------------
# One head
# --------------------------------------------------------------------------------------------------------

def test_identical_labels_agree_perfectly():
    labels = ["Safe", "Unsafe", "Safe", "Safe", "Unsafe"]
    stats = head_agreement(labels, labels, SAFETY, positive="Unsafe")
    assert (stats["accuracy"], stats["kappa"], stats["f1"], stats["macro_f1"]) == (1.0, 1.0, 1.0, 1.0)
    levels = ["Level1", "Level2", "Level3", "Level1"]
    assert head_agreement(levels, levels, ("Level1", "Level2", "Level3"))["kappa"] == 1.0


def test_kappa_is_zero_when_the_judge_is_independent_of_the_reference():
    reference, judge = cells({("Safe", "Safe"): 25, ("Safe", "Unsafe"): 25, ("Unsafe", "Safe"): 25,
                              ("Unsafe", "Unsafe"): 25})
    stats = head_agreement(reference, judge, SAFETY, positive="Unsafe")
    assert stats["accuracy"] == 0.5
    assert stats["kappa"] == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_kappa_f1_and_confusion_matrix():
    # Reference Safe 25 / Unsafe 25; judge Safe 30 / Unsafe 20.
    reference, judge = cells({("Safe", "Safe"): 20, ("Safe", "Unsafe"): 5, ("Unsafe", "Safe"): 10,
                              ("Unsafe", "Unsafe"): 15})
    stats = head_agreement(reference, judge, SAFETY, positive="Unsafe")
    # p_o = 35/50 = 0.7; p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5; kappa = (0.7 - 0.5) / (1 - 0.5) = 0.4
    assert stats["accuracy"] == pytest.approx(0.7)
    assert stats["kappa"] == pytest.approx(0.4)
    assert stats["confusion_matrix"] == [[20, 5], [10, 15]]  # rows = reference, columns = judge
    unsafe, safe = stats["per_class"]["Unsafe"], stats["per_class"]["Safe"]
    # Unsafe: precision 15/20, recall 15/25, F1 = 2 * 0.75 * 0.6 / 1.35
    assert (unsafe["precision"], unsafe["recall"], unsafe["support"]) == (pytest.approx(0.75), pytest.approx(0.6), 25)
    assert unsafe["f1"] == pytest.approx(2 / 3) and stats["f1"] == pytest.approx(2 / 3)
    # Safe: precision 20/30, recall 20/25, F1 = 2 * (2/3) * 0.8 / (2/3 + 0.8) = 8/11
    assert safe["f1"] == pytest.approx(8 / 11)
    assert stats["macro_f1"] == pytest.approx((2 / 3 + 8 / 11) / 2)


def test_hand_computed_three_class_kappa():
    reference, judge = cells({("Level1", "Level1"): 4, ("Level1", "Level2"): 1, ("Level2", "Level2"): 3,
                              ("Level3", "Level1"): 1, ("Level3", "Level3"): 1})
    stats = head_agreement(reference, judge, ("Level1", "Level2", "Level3"))
    # p_o = 8/10; reference marginals 5/3/2, judge 5/4/1: p_e = (25 + 12 + 2) / 100 = 0.39
    assert stats["kappa"] == pytest.approx((0.8 - 0.39) / (1 - 0.39))
    assert stats["confusion_matrix"] == [[4, 1, 0], [0, 3, 0], [1, 0, 1]]


def test_confusion_matrix_rows_are_the_reference():
    stats = head_agreement(["Unsafe"] * 3, ["Safe"] * 3, SAFETY, positive="Unsafe")
    assert stats["confusion_matrix"] == [[0, 0], [3, 0]]
    assert stats["per_class"]["Unsafe"]["support"] == 3 and stats["per_class"]["Safe"]["support"] == 0


def test_undefined_figures_are_none_not_zero():
    stats = head_agreement(["Safe"] * 4, ["Safe"] * 4, SAFETY, positive="Unsafe")
    assert stats["kappa"] is None and stats["f1"] is None
    assert stats["per_class"]["Unsafe"] == {"precision": None, "recall": None, "f1": None, "support": 0}
    missed = head_agreement(["Safe", "Unsafe"], ["Safe", "Safe"], SAFETY, positive="Unsafe")
    assert missed["per_class"]["Unsafe"]["precision"] is None  # the judge never says Unsafe
    assert missed["per_class"]["Unsafe"]["f1"] == 0.0 and missed["f1"] == 0.0  # but it missed one: F1 is 0
    empty = head_agreement([], [], SAFETY)
    assert empty["n"] == 0 and empty["kappa"] is None


def test_bad_head_input_is_refused():
    with pytest.raises(ValueError, match="not among"):
        head_agreement(["Safe"], ["safe"], SAFETY)
    with pytest.raises(ValueError, match="2 judge labels"):
        head_agreement(["Safe"], ["Safe", "Safe"], SAFETY)


def test_outcome_follows_the_mis_metrics():
    assert outcome_of("Unsafe", "Level1") == outcome_of("Unsafe", None) == "ASR"
    assert [outcome_of("Safe", level) for level in ("Level1", "Level2", "Level3")] == ["RSR", "RR", "HR"]
    assert outcome_of(None, "Level1") is None and outcome_of("Safe", None) is None


# --------------------------------------------------------------------------------------------------------
# Deltas and their paired bootstrap
# --------------------------------------------------------------------------------------------------------

def test_delta_is_local_minus_reference_in_points():
    judge = ["ASR", "ASR", "RR", "HR", "RSR"]
    reference = ["ASR", "RR", "RR", "RSR", "RSR"]
    deltas = paired_bootstrap_delta(judge, reference, ("ASR", "HR", "RSR", "RR"), 200, np.random.default_rng(0))
    assert deltas["ASR"]["local"] == 40.0 and deltas["ASR"]["reference"] == 20.0 and deltas["ASR"]["delta"] == 20.0
    assert deltas["RSR"]["delta"] == pytest.approx(-20.0) and deltas["HR"]["delta"] == pytest.approx(20.0)
    assert sum(d["delta"] for d in deltas.values()) == pytest.approx(0.0)
    for d in deltas.values():
        assert d["ci95"][0] <= d["delta"] <= d["ci95"][1]
    same = paired_bootstrap_delta(reference, reference, ("ASR",), 200, np.random.default_rng(0))
    assert same["ASR"]["ci95"] == [0.0, 0.0]  # identical raters: every resample's delta is 0 (pairing kept)
    assert paired_bootstrap_delta(judge, reference, ("ASR",), 0, np.random.default_rng(0))["ASR"]["ci95"] is None


def test_paired_bootstrap_ci_covers_the_true_asr_difference_at_its_nominal_rate():
    rng = np.random.default_rng(12345)
    # Population cells (judge Unsafe?, reference Unsafe?): correlated raters, the judge says Unsafe more often.
    probabilities = {("ASR", "ASR"): 0.10, ("ASR", "Safe"): 0.08, ("Safe", "ASR"): 0.03, ("Safe", "Safe"): 0.79}
    outcomes = list(probabilities)
    true_delta = 100.0 * (0.10 + 0.08 - (0.10 + 0.03))
    n, simulations, covered = 300, 200, 0
    samples = rng.choice(len(outcomes), size=(simulations, n), p=list(probabilities.values()))
    for sample in samples:
        judge = [outcomes[i][0] for i in sample]
        reference = [outcomes[i][1] for i in sample]
        low, high = paired_bootstrap_delta(judge, reference, ("ASR",), 1000, rng)["ASR"]["ci95"]
        covered += low <= true_delta <= high
    assert 0.88 <= covered / simulations <= 0.99


# --------------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------------

def four_way_pairs() -> list:
    pairs = []
    combos = [(("Unsafe", "Level1"), ("Unsafe", "Level1"), "m1", "Violent"),
              (("Safe", "Level1"), ("Safe", "Level1"), "m1", "Violent"),
              (("Safe", "Level2"), ("Safe", "Level3"), "m1", "Hate"),
              (("Unsafe", "Level2"), ("Safe", "Level2"), "m2", "Hate"),
              (("Safe", "Level3"), ("Safe", "Level3"), "m2", "Violent"),
              ((None, None), ("Safe", "Level1"), "m2", "Violent")]  # unscored by the judge
    for n, (judge, reference, model, category) in enumerate(combos * 3):
        pairs.append(pair(n, judge, reference, model=model, category=category))
    return pairs


def test_report_has_every_head_overall_per_model_and_per_category():
    report = agreement_report(four_way_pairs(), n_bootstrap=200, seed=1)
    json.dumps(report, allow_nan=False)  # JSON-ready, no NaN
    overall = report["overall"]
    assert overall["n_pairs"] == 18 and overall["unscored"] == {"judge": 3, "reference": 0}
    assert overall["safety"]["n"] == overall["perception"]["n"] == overall["outcome"]["n"] == 15
    assert overall["outcome"]["labels"] == ["ASR", "HR", "RSR", "RR"]
    # rows = reference, columns = judge: the reference's HR row holds the judge's RR (index 3) 3 times.
    assert overall["outcome"]["confusion_matrix"][1] == [0, 3, 0, 3]
    assert "rows = reference" in report["orientation"]
    assert list(report["by_model"]) == ["m1", "m2"] and list(report["by_category"]) == ["Violent", "Hate"]
    assert report["by_model"]["m2"]["unscored"]["judge"] == 3
    assert set(overall["deltas"]) == {"ASR", "HR", "RSR", "RR"}
    # judge ASR 6/15, reference 3/15
    assert overall["deltas"]["ASR"]["delta"] == pytest.approx(20.0)
    # Seeded per group from counts alone: the same report whatever the pairs' order.
    assert report == agreement_report(list(reversed(four_way_pairs())), n_bootstrap=200, seed=1)
    assert report != agreement_report(four_way_pairs(), n_bootstrap=200, seed=2)


def test_binary_only_reference_gives_only_the_safety_head_and_asr_delta():
    pairs = [pair(n, ("Unsafe" if n % 3 == 0 else "Safe", "Level1"), ("Unsafe" if n % 4 == 0 else "Safe", None))
             for n in range(24)]
    report = agreement_report(pairs, n_bootstrap=100)
    overall = report["overall"]
    assert overall["perception"] is None and overall["outcome"] is None
    assert list(overall["deltas"]) == ["ASR"]
    assert overall["deltas"]["ASR"]["delta"] == pytest.approx(100 * (8 - 6) / 24)
    markdown = agreement_markdown(report)
    assert "Not compared: one side has no perception labels." in markdown


def test_markdown_reads_as_tables_and_says_the_orientation():
    report = agreement_report(four_way_pairs(), n_bootstrap=50)
    markdown = agreement_markdown(report)
    assert "rows = reference, columns = judge" in markdown
    assert "| Group | N | Accuracy | Kappa | Macro-F1 | F1 (Unsafe) |" in markdown
    assert "| model: m1 |" in markdown and "| category: Hate |" in markdown
    assert "| reference \\ judge | ASR | HR | RSR | RR |" in markdown
    assert "| Group | N | ΔASR | ΔHR | ΔRSR | ΔRR |" in markdown
    assert "3 judge rows, 0 reference rows" in markdown
    assert "[" not in agreement_markdown(agreement_report(four_way_pairs(), n_bootstrap=0)).split("Metric deltas")[1]


def test_negative_bootstrap_is_refused():
    with pytest.raises(ValueError, match="n_bootstrap"):
        agreement_report(four_way_pairs(), n_bootstrap=-1)


# --------------------------------------------------------------------------------------------------------
# Published figures on real data (MSTS, the dataset authors' own analysis)
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def msts_human():
    if not MSTS.is_file():
        pytest.skip(f"MSTS data not found at {MSTS} (shared data is not part of a fresh clone)")
    return read_labels(MSTS, safety_field="human_label_str", category_field="hazard_category")


def msts_safety(judge_field: str, reference) -> dict:
    judge = read_labels(MSTS, safety_field=judge_field, category_field="hazard_category")
    return agreement_report(join_labels(judge, reference), n_bootstrap=0)["overall"]["safety"]


def test_msts_gpt4o_agreement_with_humans_matches_the_published_figures(msts_human):
    stats = msts_safety("auto_eval.gpt-4o-2024-05-13", msts_human)
    assert stats["n"] == 4000
    assert (round(stats["accuracy"], 3), round(stats["kappa"], 3), round(stats["f1"], 3)) == (0.820, 0.257, 0.312)


def test_msts_gemini_agreement_with_humans_matches_the_published_figures(msts_human):
    stats = msts_safety("auto_eval.gemini-1.5-pro", msts_human)
    assert (round(stats["accuracy"], 3), round(stats["kappa"], 3)) == (0.958, 0.571)
