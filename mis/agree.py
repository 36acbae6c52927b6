"""`misguard agree`: a judge's labels against a reference's (and humans'): agreement.json, agreement.md and PNG
plots; with `escalate`, the least confident responses listed for review and the agreement-vs-coverage curve.
`review_list` is the same list for `misguard score --escalate`, where there is no reference.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from misguard.calibration.agreement import agreement_markdown, agreement_report
from misguard.calibration.escalation import escalation_curve, select_for_review
from misguard.calibration.plots import confusion_heatmaps, escalation_plot, reliability_diagram
from misguard.core.join import Joined, join_labels
from misguard.core.jsonl import write_jsonl_atomic, write_text_atomic
from misguard.core.labels import LabelRecord, LabelSource, read_labels, read_sources, source_paths
from misguard.core.records import id_value
from misguard.core.rows import BadRows
from misguard.core.settings import check_number

ESCALATE_FILE = "escalate.jsonl"


@dataclass
class AgreeConfig:
    """One `misguard agree` run. Each field is one CLI option."""

    judgments: LabelSource
    reference: LabelSource | Sequence[LabelSource]
    """One reference file, or several read as one set (GPT-4o's verdicts come one file per target model: give
    each its model name, so rows join by model and id, or by model and content)."""
    out: Path
    human: LabelSource | None = None
    """Human labels for the same responses: the judge and the reference are both compared with them."""
    escalate: float | None = None
    """Share of responses (0-1] to list for GPT-4o or human review, least confident first."""
    n_bootstrap: int = 1000
    max_unmatched_share: float = 0.02
    """Most share of the reference's (and the human) labels allowed to match no judgment. Judgments without a
    label are expected (the reference labels a sample, or some target models only) and reported by reason."""
    plots: bool = True
    skip_bad: bool = False

    def __post_init__(self):
        check_number("AgreeConfig.escalate", self.escalate, above=0.0, at_most=1.0)
        check_number("AgreeConfig.n_bootstrap", self.n_bootstrap, at_least=0)
        check_number("AgreeConfig.max_unmatched_share", self.max_unmatched_share, at_least=0.0, at_most=1.0)


@dataclass
class AgreeResult:
    report_path: Path
    markdown_path: Path
    plots: list[Path]
    escalation_path: Path | None
    report: dict


def run_agree(config: AgreeConfig) -> AgreeResult:
    """Agreement of the judge with the reference (and with humans, when given): agreement.json, agreement.md,
    PNG plots, and with `escalate` the review list and the agreement-vs-coverage curve. The report's
    judge_vs_reference.join says how many rows of each side matched and why the others did not. Raises DataError
    for bad rows, or for more than `max_unmatched_share` of the labels matching no judgment (with why and
    examples)."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    bad = BadRows(skip=config.skip_bad)
    judge = config.judgments.read(bad=bad)
    reference = read_sources(config.reference, bad=bad)

    def join(left: list[LabelRecord], right: list[LabelRecord]) -> Joined:
        # As in calibrate: the labels may cover a sample of the judged rows, or some target models only.
        return join_labels(left, right, max_unmatched_share=config.max_unmatched_share,
                           max_unmatched_judge_share=1.0, bad=bad)

    joined = join(judge, reference)
    report = {"judge_vs_reference": agreement_report(joined, n_bootstrap=config.n_bootstrap),
              "files": {"judgments": str(config.judgments.path), "reference": source_paths(config.reference)}}
    sections = [("Judge vs reference", report["judge_vs_reference"])]
    if config.human is not None:
        human = config.human.read(bad=bad)
        report["files"]["human"] = str(config.human.path)
        report["judge_vs_human"] = agreement_report(join(judge, human), n_bootstrap=config.n_bootstrap)
        report["reference_vs_human"] = agreement_report(join(reference, human), n_bootstrap=config.n_bootstrap)
        sections += [("Judge vs human", report["judge_vs_human"]),
                     ("Reference vs human", report["reference_vs_human"])]

    plots: list[Path] = []
    escalation_path = None
    if config.escalate is not None:
        escalation_path, escalated = write_review_list([j for j, _ in joined.pairs], config.escalate, out)
        report["escalation"] = {"share": config.escalate, "escalated": escalated,
                                "file": str(escalation_path), "curve": escalation_curve(joined.pairs)}
    report["skipped_rows"] = bad.report()
    if config.plots:
        plots.append(confusion_heatmaps(out / "confusion.png", report["judge_vs_reference"]))
        scored = [(j, r) for j, r in joined.pairs if j.p_unsafe is not None and j.safety and r.safety]
        if scored:
            raw = {(j.model, j.split, j.key): j.p_unsafe for j in config.judgments.read(raw_probabilities=True,
                                                                                       bad=BadRows(skip=True))}
            before = [raw.get((j.model, j.split, j.key), j.p_unsafe) for j, _ in scored]
            after = [j.p_unsafe for j, _ in scored]
            plots.append(reliability_diagram(out / "reliability.png", after, [r.safety == "Unsafe" for _, r in scored],
                                             before=before if before != after else None))
        if "escalation" in report:
            plots.append(escalation_plot(out / "escalation.png", report["escalation"]["curve"]))

    report_path, markdown_path = out / "agreement.json", out / "agreement.md"
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    markdown = "\n\n".join(agreement_markdown(section, title) for title, section in sections)
    if "escalation" in report:
        markdown += "\n\n" + _escalation_markdown(report["escalation"])
    write_text_atomic(markdown_path, markdown + "\n")
    return AgreeResult(report_path, markdown_path, plots, escalation_path, report)


def write_review_list(records: list[LabelRecord], share: float, out: Path) -> tuple[Path, int]:
    """The least confident `share` of a judge's labelled rows, least confident first, written to
    OUT/escalate.jsonl for GPT-4o or human review. Returns (its path, how many rows it lists)."""
    review = select_for_review(records, share)
    path = Path(out) / ESCALATE_FILE
    return path, write_jsonl_atomic(path, [_review_row(record, confidence) for record, confidence in review])


def score_escalation(judgments_path: Path, share: float, out: Path) -> Path:
    """`misguard score --escalate`: the review list of a judgments file (no reference needed). Returns its path."""
    return write_review_list(read_labels(judgments_path), share, out)[0]


def _review_row(record: LabelRecord, confidence: float | None) -> dict:
    """One response to send for review: where it is and what the judge said, least confident first."""
    return {"id": id_value(record.id), "model": record.model, "split": record.split, "category": record.category,
            "question": record.question, "response": record.response, "image_path1": record.image_path1,
            "image_path2": record.image_path2, "judge_label_str": record.safety,
            "judge_label_perception": record.perception, "p_unsafe": record.p_unsafe, "confidence": confidence,
            "source": record.where}


def _escalation_markdown(escalation: dict) -> str:
    def number(value):
        return "–" if value is None else f"{value:.3f}"

    lines = ["# Escalation", "",
             f"{escalation['escalated']} least confident responses listed for review in {escalation['file']}. "
             "Agreement on the responses the judge keeps, as more are escalated:", "",
             "| Coverage | Kept | Escalated | Safety accuracy | Safety kappa | Outcome accuracy |",
             "| --- | --- | --- | --- | --- | --- |"]
    for point in escalation["curve"]:
        lines.append(f"| {point['coverage']:.0%} | {point['kept']} | {point['escalated']} | "
                     f"{number(point['safety_accuracy'])} | {number(point['safety_kappa'])} | "
                     f"{number(point['outcome_accuracy'])} |")
    return "\n".join(lines)
