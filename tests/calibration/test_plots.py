"""PNG figures: each is written, is a readable PNG of a sensible size, and copes with missing heads."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from misguard.calibration.agreement import agreement_report
from misguard.calibration.escalation import escalation_curve
from misguard.core.labels import LabelRecord
from misguard.calibration.plots import confusion_heatmaps, escalation_plot, reliability_diagram
from tests.calibration.synthetic import power_distorted


def assert_png(path, expected) -> tuple[int, int]:
    assert path == expected and path.is_file()
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 200 <= width <= 4000 and 200 <= height <= 4000
    # The atomic write leaves no temporary file beside the figure.
    assert [entry.name for entry in path.parent.iterdir() if entry.name.endswith(".tmp")] == []
    return width, height


def pairs(with_perception: bool = True, n: int = 60) -> list[tuple[LabelRecord, LabelRecord]]:
    rng = np.random.default_rng(0)
    levels = ("Level1", "Level2", "Level3")
    result = []
    for i in range(n):
        p_unsafe = float(rng.uniform())
        judge_safety = "Unsafe" if p_unsafe >= 0.5 else "Safe"
        reference_safety = judge_safety if rng.uniform() < 0.8 else ("Safe" if judge_safety == "Unsafe" else "Unsafe")
        judge_level, reference_level = levels[i % 3], levels[(i + (i % 5 == 0)) % 3]
        result.append((
            LabelRecord(key=str(i), id=str(i), safety=judge_safety, p_unsafe=p_unsafe, p_perception=(0.6, 0.3, 0.1),
                        perception=judge_level if with_perception else None, category="Violent", model="m"),
            LabelRecord(key=str(i), id=str(i), safety=reference_safety,
                        perception=reference_level if with_perception else None, category="Violent", model="m")))
    return result


def test_reliability_diagram_with_and_without_the_uncalibrated_curve(tmp_path):
    before, labels = power_distorted(400, seed=1)
    after = np.clip(before ** (1 / 3), 0.0, 1.0)
    assert_png(reliability_diagram(tmp_path / "after.png", after, labels), tmp_path / "after.png")
    target = tmp_path / "nested" / "both.png"
    assert_png(reliability_diagram(str(target), after, labels.astype(bool), before=before, n_bins=5,
                                   title="Temperature scaling"), target)


def test_reliability_diagram_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError):
        reliability_diagram(tmp_path / "x.png", [0.1, 0.2], [0, 1, 1])
    with pytest.raises(ValueError):
        reliability_diagram(tmp_path / "x.png", [0.1, 1.2], [0, 1])
    with pytest.raises(ValueError):
        reliability_diagram(tmp_path / "x.png", [0.1, 0.2], [0, 1], before=[0.1], n_bins=5)
    with pytest.raises(ValueError):
        reliability_diagram(tmp_path / "x.png", [0.1, 0.2], [0, 1], n_bins=0)
    assert not (tmp_path / "x.png").exists()


def test_confusion_heatmaps_draw_every_head_present_and_skip_the_missing_ones(tmp_path):
    full = assert_png(confusion_heatmaps(tmp_path / "full.png", agreement_report(pairs(), n_bootstrap=0)),
                      tmp_path / "full.png")
    binary_report = agreement_report(pairs(with_perception=False), n_bootstrap=0)
    assert binary_report["overall"]["perception"] is None and binary_report["overall"]["outcome"] is None
    binary = assert_png(confusion_heatmaps(tmp_path / "binary.png", binary_report), tmp_path / "binary.png")
    assert binary[0] < full[0]  # one panel is narrower than three
    absent = agreement_report(pairs(), n_bootstrap=0)
    del absent["overall"]["perception"]
    assert_png(confusion_heatmaps(tmp_path / "absent.png", absent), tmp_path / "absent.png")


def test_confusion_heatmaps_reject_a_report_with_nothing_to_draw(tmp_path):
    with pytest.raises(ValueError, match="overall"):
        confusion_heatmaps(tmp_path / "x.png", {})
    empty = agreement_report([(LabelRecord(key="1", id="1", safety=None, perception=None),
                               LabelRecord(key="1", id="1", safety="Safe", perception=None))], n_bootstrap=0)
    with pytest.raises(ValueError, match="confusion"):
        confusion_heatmaps(tmp_path / "x.png", empty)


def test_escalation_plot_with_and_without_outcome_accuracy(tmp_path):
    assert_png(escalation_plot(tmp_path / "curve.png", escalation_curve(pairs())), tmp_path / "curve.png")
    binary = escalation_curve(pairs(with_perception=False), coverages=[1.0, 0.9, 0.8, 0.5, 0.3])
    assert all(point["outcome_accuracy"] is None for point in binary)
    assert_png(escalation_plot(tmp_path / "binary.png", binary), tmp_path / "binary.png")
    with pytest.raises(ValueError):
        escalation_plot(tmp_path / "x.png", [])


def test_escalation_plot_without_counts_uses_one_minus_coverage(tmp_path):
    curve = [{"coverage": 1.0, "safety_kappa": None, "safety_accuracy": 0.8},
             {"coverage": 0.6, "safety_kappa": 0.7, "safety_accuracy": 0.95, "outcome_accuracy": None}]
    assert_png(escalation_plot(tmp_path / "bare.png", curve), tmp_path / "bare.png")
