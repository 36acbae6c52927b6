"""PNG figures for a calibration run: reliability diagram, confusion matrices, escalation curve.

Each figure has a function that builds and returns it (`reliability_figure`, `confusion_figure`,
`escalation_figure`: what a notebook shows, or a test inspects) and one that draws it with matplotlib's Agg
renderer, writes it as a PNG atomically (write_bytes_atomic, so a crash never leaves half a file) and
returns the path. Figures are built as `matplotlib.figure.Figure` objects on an Agg canvas rather than through
pyplot: no window ever opens, nothing stays in pyplot's global figure registry, and the backend of a caller's
interactive session (a notebook) is left alone. matplotlib is imported inside the functions, so
`import calibration` stays light.
"""
from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from misguard.calibration.scores import ece
from misguard.core.jsonl import write_bytes_atomic

_DPI = 120
_HEAD_TITLES = {"safety": "Safety", "perception": "Perception level", "outcome": "MIS outcome"}
_COLOURS = {"after": "tab:blue", "before": "tab:orange"}


def _figure(width: float, height: float) -> Figure:
    """A Figure with its own Agg canvas (no pyplot, so no window and no global state)."""
    figure = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    path = Path(path)
    write_bytes_atomic(path, buffer.getvalue())
    return path


def _reliability_bins(p_unsafe: np.ndarray, y_unsafe: np.ndarray,
                      n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean p_unsafe, fraction Unsafe, count) per equal-width bin, as calibration.scores.ece bins them
    (the last bin includes 1.0); NaN for an empty bin's means."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], p_unsafe, side="right")
    counts = np.bincount(bins, minlength=n_bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_p = np.bincount(bins, weights=p_unsafe, minlength=n_bins) / counts
        fraction = np.bincount(bins, weights=y_unsafe, minlength=n_bins) / counts
    return mean_p, fraction, counts


def reliability_diagram(path: str | Path, p_unsafe, y_unsafe, *, before=None, n_bins: int = 10,
                        title: str = "Reliability of p_unsafe") -> Path:
    """Draw `reliability_figure(p_unsafe, y_unsafe, before=before, n_bins=n_bins, title=title)` as a PNG at
    `path`. Returns the path of the PNG written.
    Raises ValueError as reliability_figure (nothing is written then); OSError when the file cannot be written.
    """
    return _save(reliability_figure(p_unsafe, y_unsafe, before=before, n_bins=n_bins, title=title), path)


def reliability_figure(p_unsafe, y_unsafe, *, before=None, n_bins: int = 10,
                       title: str = "Reliability of p_unsafe") -> Figure:
    """The fraction of reference-Unsafe responses against the mean predicted p_unsafe in each of `n_bins`
    equal-width bins, with the diagonal (perfect calibration) and, below, how many responses fall in each bin.

    `p_unsafe` is the judge's (calibrated) P(Unsafe) per response, `y_unsafe` the reference labels (1 or True
    = Unsafe). `before`, when given, is the uncalibrated p_unsafe of the same responses, drawn as a second
    curve. Each curve's uniform-bin ECE (calibration.scores.ece with the same n_bins) is in the legend.
    Returns the Figure: two axes, the curves above (the diagonal first, then "before calibration" when given,
    then the judge's curve, empty bins left out) and the per-bin counts below (one set of bars per curve).
    Raises ValueError for malformed probabilities or labels, arrays of different lengths, or n_bins < 1.
    """
    labels = np.asarray(y_unsafe)
    if labels.dtype == bool:
        labels = labels.astype(np.int64)
    curves = [("calibrated" if before is not None else "judge", p_unsafe, _COLOURS["after"])]
    if before is not None:
        curves.insert(0, ("before calibration", before, _COLOURS["before"]))
    prepared = []
    for name, probs, colour in curves:
        # ece validates probabilities, labels, lengths and n_bins, and is what the legend reports.
        score = ece(probs, labels, n_bins=n_bins, strategy="uniform")
        prepared.append((name, np.asarray(probs, dtype=np.float64), colour, score))
    outcome = labels.astype(np.float64)

    figure = _figure(6.0, 6.5)
    curve_axes, count_axes = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    curve_axes.plot([0.0, 1.0], [0.0, 1.0], linestyle=":", color="grey", label="perfect calibration")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    width = 1.0 / n_bins
    for index, (name, probs, colour, score) in enumerate(prepared):
        mean_p, fraction, counts = _reliability_bins(probs, outcome, n_bins)
        filled = counts > 0
        curve_axes.plot(mean_p[filled], fraction[filled], marker="o", color=colour,
                        linestyle="--" if name.startswith("before") else "-", label=f"{name} (ECE {score:.3f})")
        # Side-by-side bars when two curves share the bins.
        offset = (index - (len(prepared) - 1) / 2.0) * width / len(prepared)
        count_axes.bar(edges[:-1] + width / 2.0 + offset, counts, width=width / len(prepared), color=colour,
                       alpha=0.8, label=name)
    curve_axes.set(xlim=(0.0, 1.0), ylim=(0.0, 1.0), ylabel="fraction Unsafe (reference)",
                   title=f"{title} (n = {outcome.size})")
    curve_axes.grid(alpha=0.3)
    curve_axes.legend(loc="upper left", fontsize="small")
    count_axes.set(xlabel="mean predicted p_unsafe", ylabel="responses per bin")
    count_axes.grid(alpha=0.3, axis="y")
    return figure


def confusion_heatmaps(path: str | Path, report: dict[str, Any]) -> Path:
    """Draw `confusion_figure(report)` as a PNG at `path`. Returns the path of the PNG written.
    Raises ValueError as confusion_figure (nothing is written then); OSError when the file cannot be written.
    """
    return _save(confusion_figure(report), path)


def confusion_figure(report: dict[str, Any]) -> Figure:
    """The overall safety (2x2), perception (3x3) and MIS-outcome (4x4) confusion matrices of an
    `agreement_report` side by side, counts written in the cells, rows = reference labels, columns = judge
    labels. A head that is None or absent (binary-only labels, or no pairs) is left out.
    Returns the Figure: one axes per head drawn, in that order, each with its matrix as an image.
    Raises ValueError when the report has no "overall" section or no head with a confusion matrix.
    """
    overall = report.get("overall") if isinstance(report, dict) else None
    if not isinstance(overall, dict):
        raise ValueError("expected an agreement_report dict with an 'overall' section")  # noqa: TRY004 -- bad input
    heads = [(name, overall[name]) for name in _HEAD_TITLES
             if isinstance(overall.get(name), dict) and overall[name].get("confusion_matrix") is not None]
    if not heads:
        raise ValueError("the report's overall section has no confusion matrix to draw (no scored pairs)")

    figure = _figure(4.2 * len(heads), 4.4)
    axes_list = np.atleast_1d(figure.subplots(1, len(heads)))
    for axes, (name, head) in zip(axes_list, heads):
        matrix = np.asarray(head["confusion_matrix"], dtype=np.int64)
        labels = list(head["labels"])
        axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
        ticks = np.arange(len(labels))
        axes.set_xticks(ticks, labels)
        axes.set_yticks(ticks, labels)
        axes.set(xlabel="judge", ylabel="reference")
        kappa = head.get("kappa")
        kappa_text = "–" if kappa is None else f"{kappa:.3f}"
        axes.set_title(f"{_HEAD_TITLES[name]}\nn = {head['n']}, κ = {kappa_text}", fontsize="medium")
        # Dark cells get white text so the count stays readable.
        dark = matrix.max() * 0.6
        for row in range(matrix.shape[0]):
            for column in range(matrix.shape[1]):
                count = int(matrix[row, column])
                axes.text(column, row, str(count), ha="center", va="center",
                          color="white" if count > dark and count > 0 else "black")
    return figure


def escalation_plot(path: str | Path, curve: Sequence[dict[str, Any]]) -> Path:
    """Draw `escalation_figure(curve)` as a PNG at `path`. Returns the path of the PNG written.
    Raises ValueError as escalation_figure (nothing is written then); OSError when the file cannot be written.
    """
    return _save(escalation_figure(curve), path)


def escalation_figure(curve: Sequence[dict[str, Any]]) -> Figure:
    """An `escalation_curve`: safety kappa and accuracy, and outcome accuracy where the curve has it, against
    the share of items escalated in %, the x axis from 0 to 50% (further when the curve goes further). The
    share is escalated / (kept + escalated) where a point has those counts -- the same as 1 - coverage up to
    rounding, except that judgments without probabilities are escalated at every coverage -- else
    1 - coverage. Undefined points (None) are left out.
    Returns the Figure: one axes, one line per series with any defined point (in the order above), points in
    order of falling coverage.
    Raises ValueError for an empty curve or a point without a coverage.
    """
    curve = list(curve)
    if not curve:
        raise ValueError("the escalation curve has no points")
    try:
        points = sorted(curve, key=lambda point: -float(point["coverage"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError("every point of an escalation curve needs a numeric 'coverage'") from None
    escalated = np.array([100.0 * _escalated_share(point) for point in points])

    def series(key: str) -> np.ndarray:
        return np.array([np.nan if point.get(key) is None else float(point[key]) for point in points])

    figure = _figure(6.5, 4.5)
    axes = figure.subplots()
    for key, label, style in (("safety_kappa", "safety κ", "-o"), ("safety_accuracy", "safety accuracy", "-s"),
                              ("outcome_accuracy", "outcome accuracy (4-way)", "-^")):
        values = series(key)
        shown = ~np.isnan(values)
        if shown.any():
            axes.plot(escalated[shown], values[shown], style, label=label)
    axes.set(xlim=(0.0, max(50.0, float(escalated.max()))), xlabel="items escalated to review (%)",
             ylabel="agreement with the reference on the items kept",
             title="Agreement bought with a review budget")
    axes.grid(alpha=0.3)
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize="small")
    return figure


def _escalated_share(point: dict[str, Any]) -> float:
    kept, escalated = point.get("kept"), point.get("escalated")
    if isinstance(kept, int) and isinstance(escalated, int) and kept + escalated > 0:
        return escalated / (kept + escalated)
    return 1.0 - float(point["coverage"])
