"""The calibration figures: what each one draws (plotted values, bars, heatmap cells, labels, titles, panels),
checked against values computed here from the inputs, and that each is written as a readable PNG."""
from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from misguard.calibration.agreement import agreement_report
from misguard.calibration.escalation import escalation_curve
from misguard.calibration.plots import (
    confusion_figure,
    confusion_heatmaps,
    escalation_figure,
    escalation_plot,
    reliability_diagram,
    reliability_figure,
)
from misguard.core.labels import LabelRecord
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


def binned(p_unsafe, y_unsafe, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean p, fraction Unsafe, count) per equal-width bin, the last bin closed; NaN means for an empty bin.
    Continuous inputs only: a value exactly on an inner edge may land either side here."""
    p, y = np.asarray(p_unsafe, dtype=float), np.asarray(y_unsafe, dtype=float)
    bins = np.minimum((p * n_bins).astype(int), n_bins - 1)
    counts = np.array([(bins == k).sum() for k in range(n_bins)])
    means = np.array([p[bins == k].mean() if counts[k] else np.nan for k in range(n_bins)])
    fractions = np.array([y[bins == k].mean() if counts[k] else np.nan for k in range(n_bins)])
    return means, fractions, counts


def legend_ece(text: str) -> float:
    return float(re.fullmatch(r".* \(ECE ([0-9.]+)\)", text).group(1))


def bars(container) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centres, heights, widths) of a bar container's bars."""
    patches = container.patches
    return (np.array([b.get_x() + b.get_width() / 2 for b in patches]), np.array([b.get_height() for b in patches]),
            np.array([b.get_width() for b in patches]))


# ---------------------------------------------------------------------------------------------------- reliability


def test_reliability_figure_plots_each_filled_bins_mean_against_its_fraction_unsafe():
    # Bins 0, 1, 8 and 9 of ten hold responses: means 0.05, 0.16, 0.85, 0.95; fractions Unsafe 0, 1/2, 1, 1/2.
    p_unsafe, y_unsafe = [0.05, 0.15, 0.17, 0.85, 0.93, 0.97], [0, 0, 1, 1, 1, 0]
    figure = reliability_figure(p_unsafe, y_unsafe)
    assert len(figure.axes) == 2
    curve_axes, count_axes = figure.axes
    diagonal, judge = curve_axes.lines
    np.testing.assert_allclose((diagonal.get_xdata(), diagonal.get_ydata()), [[0, 1], [0, 1]])
    np.testing.assert_allclose(judge.get_xdata(), [0.05, 0.16, 0.85, 0.95])
    np.testing.assert_allclose(judge.get_ydata(), [0.0, 0.5, 1.0, 0.5])
    # ECE = (1 * 0.05 + 2 * 0.34 + 1 * 0.15 + 2 * 0.45) / 6 = 0.29667
    assert [t.get_text() for t in curve_axes.get_legend().get_texts()] == ["perfect calibration",
                                                                            "judge (ECE 0.297)"]
    assert curve_axes.get_title() == "Reliability of p_unsafe (n = 6)"
    assert curve_axes.get_ylabel() == "fraction Unsafe (reference)"
    assert curve_axes.get_xlim() == (0.0, 1.0) and curve_axes.get_ylim() == (0.0, 1.0)
    assert (count_axes.get_xlabel(), count_axes.get_ylabel()) == ("mean predicted p_unsafe", "responses per bin")
    [container] = count_axes.containers
    centres, heights, widths = bars(container)
    np.testing.assert_allclose(centres, np.arange(10) / 10 + 0.05)
    np.testing.assert_allclose(heights, [1, 2, 0, 0, 0, 0, 0, 0, 1, 2])
    np.testing.assert_allclose(widths, 0.1)


def test_reliability_figure_with_the_uncalibrated_curve_draws_both_side_by_side():
    before, labels = power_distorted(400, seed=1)
    after = np.clip(before ** (1 / 3), 0.0, 1.0)  # the true probabilities: calibrated
    figure = reliability_figure(after, labels.astype(bool), before=before, n_bins=5, title="Temperature scaling")
    curve_axes, count_axes = figure.axes
    assert curve_axes.get_title() == "Temperature scaling (n = 400)"
    diagonal, before_line, after_line = curve_axes.lines
    assert (before_line.get_linestyle(), after_line.get_linestyle()) == ("--", "-")
    legend = [t.get_text() for t in curve_axes.get_legend().get_texts()]
    assert legend[0] == "perfect calibration"
    assert legend[1].startswith("before calibration (ECE ") and legend[2].startswith("calibrated (ECE ")
    eces = []
    for line, container, probs, offset in ((before_line, count_axes.containers[0], before, -0.05),
                                           (after_line, count_axes.containers[1], after, 0.05)):
        means, fractions, counts = binned(probs, labels, 5)
        filled = counts > 0
        np.testing.assert_allclose(line.get_xdata(), means[filled])
        np.testing.assert_allclose(line.get_ydata(), fractions[filled])
        centres, heights, widths = bars(container)
        np.testing.assert_allclose(centres, np.arange(5) / 5 + 0.1 + offset)  # two half-width bars a bin
        np.testing.assert_allclose(widths, 0.1)
        np.testing.assert_array_equal(heights, counts)
        assert heights.sum() == 400
        eces.append(np.sum(counts[filled] * np.abs(means[filled] - fractions[filled])) / 400)
    assert legend_ece(legend[1]) == pytest.approx(eces[0], abs=5e-4)
    assert legend_ece(legend[2]) == pytest.approx(eces[1], abs=5e-4)
    assert eces[0] > 3 * eces[1]  # p ** 3 is far too low everywhere; p itself is calibrated


def test_reliability_diagram_writes_the_figure_as_a_png(tmp_path):
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


# ---------------------------------------------------------------------------------------------------- confusion


def confusion(scored: list[tuple[LabelRecord, LabelRecord]], field: str, labels: tuple[str, ...]) -> np.ndarray:
    """Counts of (reference label, judge label) over the pairs: rows reference, columns judge, in `labels` order."""
    matrix = np.zeros((len(labels), len(labels)), dtype=int)
    for judge, reference in scored:
        matrix[labels.index(getattr(reference, field)), labels.index(getattr(judge, field))] += 1
    return matrix


def assert_heatmap(axes, matrix: np.ndarray, labels, title: str) -> None:
    """The axes shows `matrix` as an image with its counts in the cells, labelled and titled as given."""
    np.testing.assert_array_equal(axes.images[0].get_array(), matrix)
    assert axes.images[0].get_clim() == (0, max(int(matrix.max()), 1))
    cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t for t in axes.texts}
    assert {cell: t.get_text() for cell, t in cells.items()} == {
        (row, column): str(matrix[row, column]) for row in range(len(labels)) for column in range(len(labels))}
    # Counts above 60 % of the largest are white on the dark cells, the others black.
    for (row, column), text in cells.items():
        dark = matrix[row, column] > 0.6 * matrix.max()
        assert text.get_color() == ("white" if dark else "black")
    assert [t.get_text() for t in axes.get_xticklabels()] == list(labels)
    assert [t.get_text() for t in axes.get_yticklabels()] == list(labels)
    assert (axes.get_xlabel(), axes.get_ylabel()) == ("judge", "reference")
    assert axes.get_title() == title


def test_confusion_figure_draws_each_heads_matrix_with_its_counts():
    scored = pairs()
    report = agreement_report(scored, n_bootstrap=0)
    figure = confusion_figure(report)
    assert len(figure.axes) == 3
    safety, perception, outcome = figure.axes
    overall = report["overall"]
    assert_heatmap(safety, confusion(scored, "safety", ("Safe", "Unsafe")), ("Safe", "Unsafe"),
                   f"Safety\nn = 60, κ = {overall['safety']['kappa']:.3f}")
    levels = ("Level1", "Level2", "Level3")
    assert_heatmap(perception, confusion(scored, "perception", levels), levels,
                   f"Perception level\nn = 60, κ = {overall['perception']['kappa']:.3f}")
    # The MIS outcome is derived from both heads (the report's business): its matrix is drawn as reported.
    assert_heatmap(outcome, np.array(overall["outcome"]["confusion_matrix"]), overall["outcome"]["labels"],
                   f"MIS outcome\nn = 60, κ = {overall['outcome']['kappa']:.3f}")


def test_confusion_figure_leaves_out_missing_heads():
    binary_scored = pairs(with_perception=False)
    binary_report = agreement_report(binary_scored, n_bootstrap=0)
    assert binary_report["overall"]["perception"] is None and binary_report["overall"]["outcome"] is None
    [safety] = confusion_figure(binary_report).axes
    np.testing.assert_array_equal(safety.images[0].get_array(), confusion(binary_scored, "safety", ("Safe", "Unsafe")))
    assert safety.get_title().startswith("Safety\n")
    absent = agreement_report(pairs(), n_bootstrap=0)
    del absent["overall"]["perception"]
    assert [axes.get_title().split("\n")[0] for axes in confusion_figure(absent).axes] == ["Safety", "MIS outcome"]
    absent["overall"]["safety"]["kappa"] = None  # undefined (one class only) is written as a dash
    assert confusion_figure(absent).axes[0].get_title() == "Safety\nn = 60, κ = –"


def test_confusion_heatmaps_write_the_figure_as_a_png(tmp_path):
    full = assert_png(confusion_heatmaps(tmp_path / "full.png", agreement_report(pairs(), n_bootstrap=0)),
                      tmp_path / "full.png")
    binary_report = agreement_report(pairs(with_perception=False), n_bootstrap=0)
    binary = assert_png(confusion_heatmaps(tmp_path / "binary.png", binary_report), tmp_path / "binary.png")
    assert binary[0] < full[0]  # one panel is narrower than three


def test_confusion_heatmaps_reject_a_report_with_nothing_to_draw(tmp_path):
    with pytest.raises(ValueError, match="overall"):
        confusion_heatmaps(tmp_path / "x.png", {})
    empty = agreement_report([(LabelRecord(key="1", id="1", safety=None, perception=None),
                               LabelRecord(key="1", id="1", safety="Safe", perception=None))], n_bootstrap=0)
    with pytest.raises(ValueError, match="confusion"):
        confusion_heatmaps(tmp_path / "x.png", empty)
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------------- escalation


SERIES = (("safety_kappa", "safety κ"), ("safety_accuracy", "safety accuracy"),
          ("outcome_accuracy", "outcome accuracy (4-way)"))


def assert_series(axes, expected: dict[str, tuple[list[float], list[float]]]) -> None:
    """The axes has one line per label in `expected`, in that order, with those (x, y) points."""
    assert [line.get_label() for line in axes.lines] == list(expected)
    for line, (xs, ys) in zip(axes.lines, expected.values()):
        np.testing.assert_allclose(line.get_xdata(), xs)
        np.testing.assert_allclose(line.get_ydata(), ys)


def test_escalation_figure_plots_each_series_against_the_share_escalated():
    curve = escalation_curve(pairs())
    figure = escalation_figure(list(reversed(curve)))  # drawn in order of falling coverage, whatever the input's
    [axes] = figure.axes
    points = sorted(curve, key=lambda point: -point["coverage"])
    shares = [100 * point["escalated"] / (point["kept"] + point["escalated"]) for point in points]
    assert shares[0] == 0 and shares[-1] == 50
    assert_series(axes, {label: (shares, [point[key] for point in points]) for key, label in SERIES})
    assert axes.get_xlim() == (0.0, 50.0)
    assert axes.get_xlabel() == "items escalated to review (%)"
    assert axes.get_ylabel() == "agreement with the reference on the items kept"
    assert axes.get_title() == "Agreement bought with a review budget"
    assert [t.get_text() for t in axes.get_legend().get_texts()] == [label for _, label in SERIES]


def test_escalation_figure_without_outcome_accuracy_and_past_half_escalated():
    binary = escalation_curve(pairs(with_perception=False), coverages=[1.0, 0.9, 0.8, 0.5, 0.3])
    assert all(point["outcome_accuracy"] is None for point in binary)
    [axes] = escalation_figure(binary).axes
    shares = [100 * point["escalated"] / 60 for point in binary]
    np.testing.assert_allclose(shares, [0, 10, 20, 50, 70])
    assert_series(axes, {label: (shares, [point[key] for point in binary]) for key, label in SERIES[:2]})
    assert axes.get_xlim() == (0.0, 70.0)  # the axis goes as far as the curve


def test_escalation_figure_takes_the_share_from_counts_else_one_minus_coverage():
    # Without counts the share is 1 - coverage; undefined points are left out of their series.
    bare = [{"coverage": 1.0, "safety_kappa": None, "safety_accuracy": 0.8},
            {"coverage": 0.6, "safety_kappa": 0.7, "safety_accuracy": 0.95, "outcome_accuracy": None}]
    [axes] = escalation_figure(bare).axes
    assert_series(axes, {"safety κ": ([40], [0.7]), "safety accuracy": ([0, 40], [0.8, 0.95])})
    # With counts, judgments without probabilities count as escalated even at full coverage.
    counted = [{"coverage": 1.0, "kept": 50, "escalated": 10, "safety_accuracy": 0.9},
               {"coverage": 0.8, "kept": 40, "escalated": 20, "safety_accuracy": 0.95}]
    [axes] = escalation_figure(counted).axes
    assert_series(axes, {"safety accuracy": ([100 / 6, 100 / 3], [0.9, 0.95])})
    # Nothing defined: no lines and no legend.
    [axes] = escalation_figure([{"coverage": 1.0, "safety_kappa": None}]).axes
    assert len(axes.lines) == 0 and axes.get_legend() is None


def test_escalation_plot_writes_the_figure_as_a_png(tmp_path):
    assert_png(escalation_plot(tmp_path / "curve.png", escalation_curve(pairs())), tmp_path / "curve.png")
    bare = [{"coverage": 1.0, "safety_kappa": None, "safety_accuracy": 0.8}]
    assert_png(escalation_plot(tmp_path / "bare.png", bare), tmp_path / "bare.png")


def test_escalation_plot_rejects_a_curve_it_cannot_draw(tmp_path):
    with pytest.raises(ValueError, match="no points"):
        escalation_plot(tmp_path / "x.png", [])
    with pytest.raises(ValueError, match="coverage"):
        escalation_plot(tmp_path / "x.png", [{"safety_accuracy": 0.9}])
    assert not (tmp_path / "x.png").exists()
