"""`misguard calibrate` and `misguard agree`: a judge's labels against reference (GPT-4o) and human labels."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer

from misguard.cli.infer import SkipBad
from misguard.cli.options import key_values, number_option
from misguard.cli.score import share_option
from misguard.core.errors import MisguardError
from misguard.core.join import unmatched_lines
from misguard.core.labels import LabelSource, label_files
from misguard.core.locking import exclusive_output
from misguard.mis.agree import AgreeConfig, run_agree
from misguard.mis.calibrate import CalibrateConfig, run_calibrate

commands = typer.Typer()

PerceptionField = Annotated[str, typer.Option(help="Field of the perception label; 'none' for binary-only labels.")]
ValueMap = Annotated[list[str] | None, typer.Option(
    help="RAW=LABEL: read a raw label value as Safe/Unsafe/Level1-3 (e.g. '1 - safe=Safe'); repeatable.")]
ReferenceModelName = Annotated[list[str] | None, typer.Option(
    help="Target model of reference rows that name none (one gpt_eval.py file per model): once per reference file, "
         "in order; default with several files: each file's name (stem), as `score --from-labels` does.")]
Reference = Annotated[list[Path], typer.Option(
    help="Reference labels (GPT-4o's gpt_eval.py output, or any JSONL): a file or a folder of *.jsonl, one per "
         "target model. Several: `--reference a.jsonl b.jsonl`, `--reference a.jsonl --reference b.jsonl` or "
         "`--reference gpt4o/`; rows join by (model, id), or (model, content) for gpt_eval.py rows.")]
MoreReferences = Annotated[list[Path] | None, typer.Argument(
    help="More reference files after the first --reference (the files a shell glob gives).", metavar="REFERENCE",
    show_default=False)]


def label_source(path: Path, safety_field: str, perception_field: str, value_map: list[str] | None, *,
                 model_name: str | None = None) -> LabelSource:
    """A LabelSource from a command's label-file options."""
    return LabelSource(path=path, safety_field=safety_field,
                       perception_field=None if perception_field.lower() == "none" else perception_field,
                       value_map=key_values(value_map or [], "--value-map", raw=True), model_name=model_name)


def reference_sources(paths: list[Path], safety_field: str, perception_field: str, value_map: list[str] | None,
                      model_names: list[str] | None) -> list[LabelSource]:
    """The LabelSources of --reference (and the reference files after the judgments): folders stand for their
    *.jsonl files; each file's target model is its --reference-model-name, or with several files its stem, or with
    one file none (rows that name no model then join by id or content alone). Raises MisguardError when the model
    names do not match the files one for one, DataError for a path that is neither a file nor such a folder."""
    files = label_files(paths)
    several = len(files) > 1 or any(path.is_dir() for path in paths)
    if model_names and len(model_names) != len(files):
        raise MisguardError(f"{len(model_names)} --reference-model-name for {len(files)} reference files "
                            f"({', '.join(map(str, files))}): give one per file, in order")
    names = model_names or [path.stem if several else None for path in files]
    return [label_source(path, safety_field, perception_field, value_map, model_name=name)
            for path, name in zip(files, names)]


@commands.command("calibrate")
def calibrate(
    judgments: Annotated[Path, typer.Argument(help="judgments.jsonl from `misguard score` (a judge with p_unsafe).")],
    more_references: MoreReferences = None,
    reference: Reference = ...,
    out: Annotated[Path, typer.Option(help="The calibration file to write (JSON).")] = ...,
    method: Annotated[str, typer.Option(
        help="temperature | platt | isotonic | none | auto (the lowest held-out log-loss; none unless a method "
             "beats it).")] = "auto",
    perception_method: Annotated[str, typer.Option(help="temperature | isotonic | none | auto.")] = "auto",
    threshold: Annotated[str, typer.Option(
        help="Unsafe threshold: max_kappa (vs the reference) | match_rate (the reference's ASR) | fixed (0.5).")
    ] = "max_kappa",
    into_judge: Annotated[Path | None, typer.Option(
        help="Also embed it in this judge folder's judge.json, so `misguard score` applies it by default.")] = None,
    reference_field: Annotated[str, typer.Option(help="Field of the reference's Safe/Unsafe label.")] = "label_str",
    reference_perception_field: PerceptionField = "label_perception",
    reference_model_name: ReferenceModelName = None,
    value_map: ValueMap = None,
    skip_bad: SkipBad = False,
    flag_share: Annotated[float, number_option(
        "A VLM judge's trust score: flag this share of the calibration rows as out of domain (0: none).",
        at_least=0.0, at_most=0.5)] = 0.05,
):
    """Fit a calibration of the judge's probabilities (and its Unsafe threshold, and a VLM judge's trust score)
    against reference labels."""
    config = CalibrateConfig(
        judgments=label_source(judgments, "label_str", "label_perception", None),
        reference=reference_sources([*reference, *(more_references or [])], reference_field,
                                    reference_perception_field, value_map, reference_model_name),
        out=out, method=method, perception_method=perception_method, threshold_rule=threshold,
        into_judge=into_judge, skip_bad=skip_bad, flag_share=flag_share or None)
    # One writer per output: the calibration file, and the judge folder whose judge.json gets it.
    with exclusive_output(out, folder=False), _judge_folder_lock(into_judge):
        calibration = run_calibrate(config)
    for head in ("safety", "perception"):
        section = calibration.report.get(head)
        if section:
            for line in _auto_lines(head, section.get("auto")):
                typer.echo(line)
            before, after = section["before"], section["after_cross_validated"]
            where = "cross-validated"
            if after is None:  # too few labels of a class for 5 folds
                after, where = section["after"], "on the fitting data: optimistic"
            typer.echo(f"{head}: {section['method']}; log-loss {before['log_loss']:.4f} -> {after['log_loss']:.4f}, "
                       f"ECE {before['ece_uniform']:.4f} -> {after['ece_uniform']:.4f} ({where})")
    typer.echo(f"Unsafe threshold {calibration.threshold.value:.4f} ({calibration.threshold.rule})")
    trust = calibration.report.get("trust")
    if trust and trust["fitted"]:
        typer.echo(f"trust score on {', '.join(trust['signals'])}: threshold {trust['threshold']:.4f}, flags "
                   f"{trust['flagged_in_sample']:.1%} of these rows")
    elif trust:
        typer.echo(f"no trust score: {trust['why']}")
    typer.echo(f"calibration: {out}" + (f" (also in {into_judge / 'judge.json'})" if into_judge else ""))


@commands.command("agree")
def agree(
    judgments: Annotated[Path, typer.Argument(help="The judge's labels: judgments.jsonl, or any JSONL label file.")],
    more_references: MoreReferences = None,
    reference: Reference = ...,
    out: Annotated[Path, typer.Option(help="Output directory: agreement.json, agreement.md, PNG plots.")] = ...,
    human: Annotated[Path | None, typer.Option(help="Human labels for the same responses.")] = None,
    escalate: Annotated[str | None, typer.Option(
        help="List this share of least confident responses for review, e.g. 10%, with the agreement curve.")] = None,
    judge_field: Annotated[str, typer.Option(help="Field of the judge's Safe/Unsafe label.")] = "label_str",
    judge_perception_field: PerceptionField = "label_perception",
    reference_field: Annotated[str, typer.Option(help="Field of the reference's Safe/Unsafe label.")] = "label_str",
    reference_perception_field: PerceptionField = "label_perception",
    reference_model_name: ReferenceModelName = None,
    human_field: Annotated[str, typer.Option(help="Field of the human Safe/Unsafe label.")] = "label_str",
    human_perception_field: PerceptionField = "none",
    value_map: ValueMap = None,
    bootstrap: Annotated[int, number_option("Bootstrap resamples for the 95% confidence intervals.",
                                            at_least=0)] = 1000,
    max_unmatched: Annotated[float, number_option(
        "Fail when more than this share of the reference (or human) labels match no judgment; judgments without "
        "a label are expected and reported by reason.", at_least=0.0, at_most=1.0)] = 0.02,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
    skip_bad: SkipBad = False,
):
    """Agreement of the judge with reference (GPT-4o) and human labels: kappa, confusion, metric deltas."""
    share = share_option(escalate) if escalate is not None else None
    config = AgreeConfig(
        judgments=label_source(judgments, judge_field, judge_perception_field, value_map),
        reference=reference_sources([*reference, *(more_references or [])], reference_field,
                                    reference_perception_field, value_map, reference_model_name),
        human=label_source(human, human_field, human_perception_field, value_map) if human else None,
        out=out, escalate=share, n_bootstrap=bootstrap, max_unmatched_share=max_unmatched, plots=plots,
        skip_bad=skip_bad)
    with exclusive_output(out, folder=True):
        result = run_agree(config)
    join = result.report["judge_vs_reference"]["join"]
    typer.echo(f"joined by {' + '.join(join['key_fields'])}:")
    for name, other in (("judge", "reference"), ("reference", "judge")):
        for line in unmatched_lines(join[name], name, other, join["by"]):
            typer.echo(f"  {line}")
    overall = result.report["judge_vs_reference"]["overall"]
    safety = overall["safety"]
    typer.echo(f"{overall['n_pairs']} pairs; safety: accuracy {safety['accuracy']:.3f}, "
               f"Cohen's kappa {number(safety['kappa'])}, F1 (Unsafe) {number(safety.get('f1'))}")
    by_trust = result.report["judge_vs_reference"].get("by_trust")
    if by_trust:
        for name, group in by_trust.items():
            stats = group["safety"]
            typer.echo(f"  judge {name.replace('_', ' ')}: {group['n_pairs']} pairs, accuracy "
                       f"{number(stats['accuracy'])}, kappa {number(stats['kappa'])}")
    typer.echo(f"report:    {result.report_path}")
    typer.echo(f"           {result.markdown_path}")
    for path in result.plots:
        typer.echo(f"plot:      {path}")
    if result.escalation_path:
        typer.echo(f"escalate:  {result.escalation_path}")


def _auto_lines(head: str, auto: dict | None) -> list[str]:
    """How `--method auto` chose a head's calibration, one line per method compared (none for a method given by
    name)."""
    if auto is None:
        return []
    if auto["held_out"] is None:
        return [f"{head}: auto kept none: {auto['why']}"]
    lines = [f"{head}: auto, on {auto['folds']}-fold held-out rows ({auto['why']}):"]
    for name, figures in auto["held_out"].items():
        lines.append(f"  {name:<12} log-loss {figures['log_loss']:.4f}, ECE {figures['ece_uniform']:.4f}"
                     + ("  <- chosen" if name == auto["chosen"] else ""))
    return lines


def _judge_folder_lock(folder: Path | None):
    """The lock of an existing judge folder that a command writes into, or nothing without one."""
    return exclusive_output(folder, folder=True, create=False) if folder is not None else contextlib.nullcontext()


def number(value) -> str:
    """A figure to three decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"
