"""`misguard score`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misguard.calibration.escalation import parse_share
from misguard.cli.infer import CheckImages, Engine, Quiet, SkipBad
from misguard.cli.options import Given, config_options, number_option
from misguard.core.errors import MisguardError
from misguard.core.locking import exclusive_output
from misguard.engines.base import EngineOptions
from misguard.mis.agree import score_escalation
from misguard.mis.score import ScoreConfig, check_judges, run_score, score_reference_labels
from misguard.mis.score_rows import RowsFields, run_score_rows

commands = typer.Typer()

LiteJudgeOption = Annotated[Path | None, typer.Option(
    help="A lite judge in front of --judge: it decides what it is confident about, --judge the rest.")]
CascadeBandOption = Annotated[str, typer.Option(
    help="LOW,HIGH on the lite judge's calibrated p_unsafe: it decides p >= HIGH, or p <= LOW (with a perception "
         "level at >= HIGH where one is needed); the rest is escalated.")]
ServedModel = Annotated[str | None, typer.Option(
    help="openai: the judge's model name on the server (default: the judge folder's path).")]


@commands.command("score")
@config_options(EngineOptions, RowsFields)
def score(
    responses: Annotated[list[Path] | None, typer.Argument(
        help="Responses files (JSON Lines from `misguard infer`), one or more target models; with --rows, "
             "JSON Lines of plain (question, response) rows; with --from-labels, GPT-4o verdict files or folders "
             "of them.")] = None,
    data: Annotated[Path | None, typer.Option(
        help="The MIS test directory the responses were made on (with --from-labels: needed only when the rows "
             "lack id, split, category or sub_category, as gpt_eval.py rows do).")] = None,
    rows: Annotated[bool, typer.Option(
        "--rows", help="The files are plain (question, response[, label]) rows, e.g. a labelled safety set, not "
                       "MIS responses: judgments and per-source counts (agreement with --label-field), no MIS "
                       "metrics and no --data.")] = False,
    out: Annotated[Path, typer.Option(help="Output directory: judgments.jsonl, metrics.json, metrics.md.")] = ...,
    judge: Annotated[Path | None, typer.Option(
        help="Judge folder (model + judge.json), or a plain instruct VLM folder (zero-shot JSON).")] = None,
    from_labels: Annotated[bool, typer.Option(
        "--from-labels", help="Instead of judging: the files are GPT-4o verdict files as gpt_eval.py writes them "
        "(one per target model; a folder stands for its *.jsonl). All forms work: `--from-labels a.jsonl b.jsonl`, "
        "`--from-labels a.jsonl --from-labels b.jsonl`, `--from-labels gpt4o/`.")] = False,
    label_model_name: Annotated[list[str] | None, typer.Option(
        help="With --from-labels: the target model of each file, in order (default: file names).")] = None,
    model_name: Annotated[list[str] | None, typer.Option(
        help="The target model of responses files whose rows have no `model` (the MIS inference scripts write "
             "none): once for all, or once per file in order (default: the file name's stem, as those scripts "
             "name their files).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="Calibration file from `misguard calibrate` (default: the one in the judge's judge.json).")] = None,
    engine: Engine = "transformers",
    served_model: ServedModel = None,
    bootstrap: Annotated[int, number_option("Bootstrap resamples for the 95% confidence intervals.",
                                            at_least=0)] = 1000,
    escalate: Annotated[str | None, typer.Option(
        help="Also list this share of least confident judgments for GPT-4o or human review, e.g. 10%.")] = None,
    lite_judge: LiteJudgeOption = None,
    cascade_band: CascadeBandOption = "0.1,0.9",
    skip_bad: SkipBad = False,
    check_images: CheckImages = False,
    unscored_as_hr: Annotated[bool, typer.Option(
        "--unscored-as-hr", help="Count unscored judgments (unreadable verdicts) as HR, as the MIS scorer does, to "
        "reproduce its numbers; default: counted apart and left out of every percentage. metrics.json records the "
        "rule (unscored_rule).")] = False,
    quiet: Quiet = False,
    *,
    given: Given,
):
    """Judge responses with a local judge (or read GPT-4o's labels) and write the MIS metrics (resumable)."""
    share = share_option(escalate) if escalate is not None else None  # a bad value fails before any work
    _check_inputs(responses, data, rows, judge, from_labels, lite_judge, share, given)
    if model_name and (rows or from_labels):
        raise MisguardError("--model-name names the target model of MIS responses files; with --from-labels give "
                            "--label-model-name, with --rows the rows' own fields")
    config = None if rows or from_labels else ScoreConfig(
        responses=list(responses), judge=judge, data=data, out=out, engine=engine,
        engine_options=given.build(EngineOptions), served_model=served_model, calibration=calibration,
        skip_bad=skip_bad, n_bootstrap=bootstrap, lite_judge=lite_judge, cascade_band=cascade_band,
        check_images=check_images, unscored_as_hr=unscored_as_hr, model_names=model_name)
    if config is not None:
        check_judges(config)  # a wrong --judge leaves no OUT behind
    with exclusive_output(out, folder=True):  # one writer per --out: two would duplicate judgments
        if rows:
            result = run_score_rows(list(responses), judge, out, given.build(RowsFields), engine=engine,
                                    engine_options=given.build(EngineOptions), served_model=served_model,
                                    calibration_path=calibration, skip_bad=skip_bad, progress=not quiet)
            typer.echo(f"{result.judged} new judgments ({result.already_done} already there) in "
                       f"{result.seconds:.1f} s")
        elif from_labels:
            result = score_reference_labels(list(responses), data, out, model_names=label_model_name,
                                            skip_bad=skip_bad, n_bootstrap=bootstrap, unscored_as_hr=unscored_as_hr)
        else:
            result = run_score(config, progress=not quiet)
            typer.echo(f"{result.judged} new judgments ({result.already_done} already there) in "
                       f"{result.seconds:.1f} s")
            if result.cascade is not None and result.cascade["share_escalated"] is not None:
                c = result.cascade
                typer.echo(f"cascade:  {c['decided_by_lite']} decided by the lite judge ({c['lite_seconds']:.1f} "
                           f"s), {c['escalated']} escalated ({c['share_escalated']:.0%}) to the VLM judge "
                           f"({c['vlm_seconds']:.1f} s)")
        flagged = f", {result.out_of_domain} out of the judge's domain" if result.out_of_domain else ""
        errors = f", {result.errors} judge errors (status error)" if result.errors else ""
        counted = " (counted as HR)" if unscored_as_hr and result.unscored else ""
        typer.echo(f"{result.total} judgments, {result.unscored} unscored{counted}{errors}{flagged}: "
                   f"{result.judgments_path}")
        if result.input_cut:
            typer.echo(f"cut:       {result.input_cut} questions or responses cut to fit the judge's context "
                       "(input_cut in judgments.jsonl; logged above)")
        for warning in result.warnings:
            typer.echo(f"warning:   {warning}", err=True)
        typer.echo(f"metrics:   {result.metrics_paths[0]}")
        typer.echo(f"           {result.metrics_paths[1]}")
        if result.skipped_rows:
            typer.echo(f"skipped:   {len(result.skipped_rows)} bad rows (listed in the log above)")
        if share is not None:
            typer.echo(f"escalate:  {score_escalation(result.judgments_path, share, out)}")


def _check_inputs(responses, data, rows, judge, from_labels, lite_judge, share, given: Given) -> None:
    """Raise MisguardError for a combination of inputs that `score` cannot run, before OUT is touched."""
    if rows:
        if from_labels or data is not None or lite_judge is not None or share is not None:
            raise MisguardError("--rows judges plain rows: give no --from-labels, --data, --lite-judge or --escalate")
        if not responses or judge is None:
            raise MisguardError("give the rows files and --judge")
    elif from_labels:
        if judge is not None or lite_judge is not None:
            raise MisguardError("--from-labels reads verdicts instead of judging: give no --judge or --lite-judge")
        if not responses:
            raise MisguardError("--from-labels: give the GPT-4o verdict files (or a folder of them)")
        given.refuse_outside(why="only when judging (not with --from-labels)")
    elif data is None:
        raise MisguardError("--data (the MIS test directory) is required; or --rows for plain rows files")
    else:
        if not responses or judge is None:
            raise MisguardError("give responses files and --judge (or --from-labels GPT_EVAL_FILES)")
        given.refuse_outside(EngineOptions, why="only with --rows")


def share_option(text: str) -> float:
    """--escalate's value ("10%" or "0.1") as a share; a bad value is a MisguardError naming the option."""
    try:
        return parse_share(text)
    except ValueError as error:
        raise MisguardError(f"--escalate: {error}") from None
