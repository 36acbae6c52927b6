"""The `misguard calibrate` and `misguard agree` stages: label files in, a calibration file or an agreement
report out. Each stage re-runs alone from the files of the previous one (judgments.jsonl from `misguard score`,
reference labels from GPT-4o's gpt_eval.py, human labels, or any JSON Lines label file through field maps).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from misguard.core.labels import Joined, LabelRecord, join_labels, read_labels
from misguard.core.errors import MisguardError
from misguard.core.io import write_jsonl_atomic, write_text_atomic


@dataclass
class LabelSource:
    """Where a set of labels comes from and how to read it. Defaults read misguard judgments and gpt_eval.py
    files; the fields let third-party files be read without converting them (dotted paths reach into nested
    objects, e.g. MSTS's `auto_eval.gpt-4o-2024-05-13`)."""

    path: Path
    safety_field: str = "label_str"
    perception_field: str | None = "label_perception"
    """None for binary-only labels (Safe/Unsafe with no perception level)."""
    id_field: str = "id"
    value_map: dict[str, str] = field(default_factory=dict)
    """Raw value -> label before normalising, e.g. {"1 - safe": "Safe"}."""
    model_name: str | None = None
    """The target model of rows that do not name one (gpt_eval.py writes one file per target model)."""

    def read(self, *, raw_probabilities: bool = False, skip_bad: bool = False) -> list[LabelRecord]:
        """The file's LabelRecords. Raises DataError (file, line, field) for bad rows unless skip_bad."""
        return read_labels(self.path, safety_field=self.safety_field, perception_field=self.perception_field,
                           id_field=self.id_field, value_map=self.value_map or None, model_name=self.model_name,
                           raw_probabilities=raw_probabilities, skip_bad=skip_bad)


@dataclass
class CalibrateConfig:
    """One `misguard calibrate` run. Each field is one CLI option."""

    judgments: LabelSource
    """The local judge's judgments.jsonl (raw probabilities are used when the judgments were calibrated)."""
    reference: LabelSource
    """GPT-4o's labels for the same responses."""
    out: Path
    """The calibration file to write (JSON)."""
    method: str = "auto"
    """temperature | platt | isotonic | none | auto (picked by cross-validated log-loss), for the safety head."""
    perception_method: str = "auto"
    threshold_rule: str = "max_kappa"
    """How the Unsafe threshold is chosen: max_kappa (against the reference), match_rate (the reference's Unsafe
    rate) or fixed (0.5)."""
    into_judge: Path | None = None
    """Also embed the calibration in this judge folder's judge.json, so `misguard score` applies it by default."""
    max_unmatched_share: float = 0.02
    """Most share of reference labels allowed to match no judgment (judgments without a label are fine)."""
    skip_bad: bool = False


def run_calibrate(config: CalibrateConfig):
    """Fit a calibration of the judge's probabilities against the reference labels and write it. Returns the
    Calibration. Raises DataError for bad or unmatched rows, MisguardError when the judgments carry no
    probabilities (zero-shot JSON judges) or there is too little to fit."""
    import numpy as np

    from misguard.calibration import fit_calibration

    # The reference may label only a sample of the judged responses: judgments without a label are expected.
    joined = _join(config.judgments, config.reference, raw_probabilities=True, skip_bad=config.skip_bad,
                   max_unmatched_share=config.max_unmatched_share, max_unmatched_judge_share=1.0)
    pairs = [(j, r) for j, r in joined.pairs if j.p_unsafe is not None and r.safety is not None]
    if not pairs:
        raise MisguardError(f"{config.judgments.path}: no judgment with probabilities matches a reference label; "
                            "calibration needs a judge that reports p_unsafe (a judge folder, not zero-shot JSON)")
    p_unsafe = np.array([j.p_unsafe for j, _ in pairs])
    has_perception = all(j.p_perception is not None for j, _ in pairs)
    p_perception = np.array([j.p_perception for j, _ in pairs]) if has_perception else None
    judges = sorted(_judge_ids(config.judgments.path))
    try:
        calibration = fit_calibration(
            p_unsafe, [r.safety for _, r in pairs], p_perception, [r.perception for _, r in pairs],
            method=config.method, perception_method=config.perception_method, threshold_rule=config.threshold_rule,
            fitted_on={"judgments": str(config.judgments.path), "reference": str(config.reference.path),
                       "judge": judges, "pairs": len(pairs), "join_by": joined.join_by})
    except ValueError as error:
        raise MisguardError(f"cannot calibrate on {len(pairs)} pairs: {error}") from None
    calibration.save(config.out)
    if config.into_judge is not None:
        _embed(calibration, config.into_judge)
    return calibration


def _judge_ids(path: Path) -> set[str]:
    ids = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                try:
                    ids.add(str(json.loads(line).get("judge", "")))
                except (json.JSONDecodeError, AttributeError):
                    continue
    return ids - {""}


def _embed(calibration, folder: Path) -> None:
    from misguard.judges import JUDGE_FILE, read_judge_spec

    spec = read_judge_spec(folder)
    if not (Path(folder) / JUDGE_FILE).exists():
        raise MisguardError(f"{folder}: no {JUDGE_FILE} to embed the calibration in (make it a judge folder first "
                            "with `misguard make-judge`)")
    spec.calibration = calibration.to_dict()
    write_text_atomic(Path(folder) / JUDGE_FILE, json.dumps(spec.model_dump(), indent=2) + "\n")


@dataclass
class AgreeConfig:
    """One `misguard agree` run. Each field is one CLI option."""

    judgments: LabelSource
    reference: LabelSource
    out: Path
    human: LabelSource | None = None
    """Human labels for the same responses: the judge and the reference are both compared with them."""
    escalate: float | None = None
    """Share of responses (0-1] to list for GPT-4o or human review, least confident first."""
    n_bootstrap: int = 1000
    max_unmatched_share: float = 0.02
    plots: bool = True
    skip_bad: bool = False


@dataclass
class AgreeResult:
    report_path: Path
    markdown_path: Path
    plots: list[Path]
    escalation_path: Path | None
    report: dict


def run_agree(config: AgreeConfig) -> AgreeResult:
    """Agreement of the judge with the reference (and with humans, when given): agreement.json, agreement.md,
    PNG plots, and with `escalate` the review list and the agreement-vs-coverage curve. Raises DataError for bad
    or unmatched rows (with examples)."""
    from misguard.calibration.agreement import agreement_markdown, agreement_report

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    join = dict(skip_bad=config.skip_bad, max_unmatched_share=config.max_unmatched_share)
    joined = _join(config.judgments, config.reference, **join)
    report = {"judge_vs_reference": agreement_report(joined, n_bootstrap=config.n_bootstrap),
              "files": {"judgments": str(config.judgments.path), "reference": str(config.reference.path)}}
    sections = [("Judge vs reference", report["judge_vs_reference"])]
    if config.human is not None:
        report["files"]["human"] = str(config.human.path)
        report["judge_vs_human"] = agreement_report(_join(config.judgments, config.human, **join),
                                                    n_bootstrap=config.n_bootstrap)
        report["reference_vs_human"] = agreement_report(_join(config.reference, config.human, **join),
                                                        n_bootstrap=config.n_bootstrap)
        sections += [("Judge vs human", report["judge_vs_human"]),
                     ("Reference vs human", report["reference_vs_human"])]

    plots: list[Path] = []
    escalation_path = None
    scored = [(j, r) for j, r in joined.pairs if j.p_unsafe is not None and j.safety and r.safety]
    if config.escalate is not None:
        escalation_path, report["escalation"] = _escalate(joined, config.escalate, out)
    if config.plots:
        from misguard.calibration.plots import confusion_heatmaps, escalation_plot, reliability_diagram

        plots.append(confusion_heatmaps(out / "confusion.png", report["judge_vs_reference"]))
        if scored:
            raw = {(j.model, j.split, j.key): j.p_unsafe
                   for j in config.judgments.read(raw_probabilities=True, skip_bad=config.skip_bad)}
            before = [raw.get((j.model, j.split, j.key), j.p_unsafe) for j, _ in scored]
            plots.append(reliability_diagram(
                out / "reliability.png", [j.p_unsafe for j, _ in scored],
                [r.safety == "Unsafe" for _, r in scored],
                before=before if before != [j.p_unsafe for j, _ in scored] else None))
        if "escalation" in report:
            plots.append(escalation_plot(out / "escalation.png", report["escalation"]["curve"]))

    report_path, markdown_path = out / "agreement.json", out / "agreement.md"
    write_text_atomic(report_path, json.dumps(report, indent=2) + "\n")
    markdown = "\n\n".join(agreement_markdown(section, title) for title, section in sections)
    if "escalation" in report:
        markdown += "\n\n" + _escalation_markdown(report["escalation"])
    write_text_atomic(markdown_path, markdown + "\n")
    return AgreeResult(report_path, markdown_path, plots, escalation_path, report)


def _join(judge: LabelSource, reference: LabelSource, *, raw_probabilities: bool = False, skip_bad: bool,
          max_unmatched_share: float, max_unmatched_judge_share: float | None = None) -> Joined:
    return join_labels(judge.read(raw_probabilities=raw_probabilities, skip_bad=skip_bad),
                       reference.read(skip_bad=skip_bad), max_unmatched_share=max_unmatched_share,
                       max_unmatched_judge_share=max_unmatched_judge_share)


def _escalate(joined: Joined, share: float, out: Path) -> tuple[Path, dict]:
    from misguard.calibration.escalation import escalation_curve, select_for_review

    curve = escalation_curve(joined.pairs)
    review = select_for_review([j for j, _ in joined.pairs], share)
    path = out / "escalate.jsonl"
    write_jsonl_atomic(path, [_review_row(record, confidence) for record, confidence in review])
    return path, {"share": share, "escalated": len(review), "file": str(path), "curve": curve}


def _review_row(record: LabelRecord, confidence: float | None) -> dict:
    """One response to send for review: where it is and what the judge said, least confident first."""
    return {"id": record.id, "model": record.model, "split": record.split, "category": record.category,
            "question": record.question, "response": record.response, "image_path1": record.image_path1,
            "image_path2": record.image_path2, "judge_label_str": record.safety,
            "judge_label_perception": record.perception, "p_unsafe": record.p_unsafe, "confidence": confidence,
            "source": f"{record.path}:{record.line}"}


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


def score_escalation(judgments_path: Path, share: float, out: Path) -> Path:
    """`misguard score --escalate`: the least confident share of a judgments file, for GPT-4o or human review
    (no reference needed). Returns the path of OUT/escalate.jsonl."""
    from misguard.calibration.escalation import select_for_review

    records = read_labels(judgments_path)
    review = select_for_review(records, share)
    path = Path(out) / "escalate.jsonl"
    write_jsonl_atomic(path, [_review_row(record, confidence) for record, confidence in review])
    return path
