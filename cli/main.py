"""The `misguard` command line: each command parses its options, calls one library function and prints.

Nothing heavy is imported at module level, so `misguard --help` starts fast and never imports torch.
MisguardError (bad input, a missing model or extra) becomes a one-line message and exit code 1, here only.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from misguard.core.offline import enforce_offline
from misguard.core.errors import MisguardError

app = typer.Typer(
    name="misguard",
    help="Offline judge and guardrail for vision-language models on the MIS multi-image safety benchmark.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Engine options shared by every command that runs a model (infer, score): declared once, built by engine_options.
Engine = Annotated[str, typer.Option(help="transformers | vllm | openai")]
BaseUrl = Annotated[Optional[list[str]], typer.Option(
    help="OpenAI-compatible server URL ending in /v1 (--engine openai); repeat for round-robin.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Batch size; default: automatic.")]
Dtype = Annotated[str, typer.Option(help="auto | float32 | bfloat16 | float16")]
TensorParallel = Annotated[int, typer.Option(help="vLLM: GPUs per model replica.")]
PipelineParallel = Annotated[int, typer.Option(help="vLLM: pipeline stages (multi-node with ray).")]
ExecutorBackend = Annotated[Optional[str], typer.Option(help="vLLM: mp | ray.")]
MaxModelLen = Annotated[Optional[int], typer.Option(help="vLLM: context length.")]
GpuMemory = Annotated[Optional[float], typer.Option(help="vLLM: share of GPU memory.")]
VllmArg = Annotated[Optional[list[str]], typer.Option(
    help="vLLM: any further LLM() argument as KEY=VALUE (VALUE read as JSON if it parses), repeatable; "
         "e.g. kv_cache_memory_bytes=2147483648.")]
Concurrency = Annotated[int, typer.Option(help="openai: requests in flight.")]
ApiKey = Annotated[str, typer.Option(envvar="MISGUARD_API_KEY", help="openai: API key.")]
TrustRemoteCode = Annotated[bool, typer.Option(help="Run code shipped in the model folder.")]
PrefixReuse = Annotated[bool, typer.Option(
    help="transformers: run the image + question prefix that responses to one item share once, not per response.")]
SkipBad = Annotated[bool, typer.Option(help="Log and count bad items instead of stopping.")]
LiteJudgeOption = Annotated[Optional[Path], typer.Option(
    help="A lite judge in front of --judge: it decides what it is confident about, --judge the rest.")]
CascadeBandOption = Annotated[str, typer.Option(
    help="LOW,HIGH on the lite judge's calibrated p_unsafe: it decides p >= HIGH, or p <= LOW with a perception "
         "level at >= HIGH; the rest is escalated.")]
Quiet = Annotated[bool, typer.Option(help="No progress bar.")]


@app.command()
def infer(
    model: Annotated[str, typer.Option(help="Local model folder, or the served model name with --engine openai.")],
    data: Annotated[Path, typer.Option(help="MIS test directory (mis_easy.json, ... and the image folders).")],
    split: Annotated[str, typer.Option(help="easy | hard | real")],
    out: Annotated[Path, typer.Option(help="Output directory: responses go to OUT/<split>/<model-name>.jsonl.")],
    engine: Engine = "transformers",
    base_url: BaseUrl = None,
    batch_size: BatchSize = None,
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per response.")] = 1024,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    limit: Annotated[Optional[int], typer.Option(help="Only the first N items of the split.")] = None,
    shard: Annotated[Optional[str], typer.Option(help="I/N: run items I, I+N, ... (join with `misguard merge`).")] = None,
    model_name: Annotated[Optional[str], typer.Option(help="Name in the output; default: the folder's name.")] = None,
    dtype: Dtype = "auto",
    tensor_parallel_size: TensorParallel = 1,
    pipeline_parallel_size: PipelineParallel = 1,
    distributed_executor_backend: ExecutorBackend = None,
    max_model_len: MaxModelLen = None,
    gpu_memory_utilization: GpuMemory = None,
    vllm_arg: VllmArg = None,
    concurrency: Concurrency = 16,
    api_key: ApiKey = "EMPTY",
    trust_remote_code: TrustRemoteCode = False,
    skip_bad: SkipBad = False,
    quiet: Quiet = False,
):
    """Run a target VLM over an MIS split and write its responses (resumable: re-run to finish)."""
    from misguard.engines.messages import GenerationParams
    from misguard.mis.infer import InferConfig, parse_shard, run_inference

    options = engine_options(locals())
    config = InferConfig(
        model=model, data=data, split=split, out=out, engine=engine, engine_options=options,
        generation=GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature),
        model_name=model_name, limit=limit, shard=parse_shard(shard) if shard else None, skip_bad=skip_bad)
    result = run_inference(config, progress=not quiet)
    typer.echo(f"{result.generated} new responses ({result.already_done} already there, "
               f"{result.skipped_items} bad items skipped) in {result.seconds:.1f} s")
    typer.echo(f"responses: {result.responses_path}")
    typer.echo(f"manifest:  {result.manifest_path}")


@app.command()
def score(
    responses: Annotated[Optional[list[Path]], typer.Argument(
        help="Responses files (JSON Lines from `misguard infer`), one or more target models.")] = None,
    data: Annotated[Path, typer.Option(help="The MIS test directory the responses were made on.")] = ...,
    out: Annotated[Path, typer.Option(help="Output directory: judgments.jsonl, metrics.json, metrics.md.")] = ...,
    judge: Annotated[Optional[Path], typer.Option(
        help="Judge folder (model + judge.json), or a plain instruct VLM folder (zero-shot JSON).")] = None,
    from_labels: Annotated[Optional[list[Path]], typer.Option(
        help="Instead of judging: GPT-4o verdict files as gpt_eval.py writes them (one per target model).")] = None,
    label_model_name: Annotated[Optional[list[str]], typer.Option(
        help="With --from-labels: the target model of each file, in order (default: file names).")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        help="Calibration file from `misguard calibrate` (default: the one in the judge's judge.json).")] = None,
    engine: Engine = "transformers",
    base_url: BaseUrl = None,
    served_model: Annotated[Optional[str], typer.Option(
        help="openai: the judge's model name on the server (default: the judge folder's path).")] = None,
    batch_size: BatchSize = None,
    dtype: Dtype = "auto",
    tensor_parallel_size: TensorParallel = 1,
    pipeline_parallel_size: PipelineParallel = 1,
    distributed_executor_backend: ExecutorBackend = None,
    max_model_len: MaxModelLen = None,
    gpu_memory_utilization: GpuMemory = None,
    vllm_arg: VllmArg = None,
    concurrency: Concurrency = 16,
    api_key: ApiKey = "EMPTY",
    trust_remote_code: TrustRemoteCode = False,
    prefix_reuse: PrefixReuse = True,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% confidence intervals.")] = 1000,
    escalate: Annotated[Optional[str], typer.Option(
        help="Also list this share of least confident judgments for GPT-4o or human review, e.g. 10%.")] = None,
    lite_judge: LiteJudgeOption = None,
    cascade_band: CascadeBandOption = "0.1,0.9",
    skip_bad: SkipBad = False,
    quiet: Quiet = False,
):
    """Judge responses with a local judge (or read GPT-4o's labels) and write the MIS metrics (resumable)."""
    from misguard.mis.score import ScoreConfig, run_score, score_reference_labels

    share = share_option(escalate) if escalate is not None else None  # a bad value fails before any work
    if from_labels:
        if responses or judge:
            raise MisguardError("--from-labels reads verdicts instead of judging: give no responses or --judge")
        result = score_reference_labels(from_labels, data, out, model_names=label_model_name, skip_bad=skip_bad,
                                        n_bootstrap=bootstrap)
    else:
        if not responses or judge is None:
            raise MisguardError("give responses files and --judge (or --from-labels GPT_EVAL_FILES)")
        options = engine_options(locals())
        result = run_score(ScoreConfig(responses=list(responses), judge=judge, data=data, out=out, engine=engine,
                                       engine_options=options, served_model=served_model, calibration=calibration,
                                       skip_bad=skip_bad, n_bootstrap=bootstrap, lite_judge=lite_judge,
                                       cascade_band=cascade_band), progress=not quiet)
        typer.echo(f"{result.judged} new judgments ({result.already_done} already there) in {result.seconds:.1f} s")
        if result.cascade is not None and result.cascade["share_escalated"] is not None:
            c = result.cascade
            typer.echo(f"cascade:  {c['decided_by_lite']} decided by the lite judge ({c['lite_seconds']:.1f} s), "
                       f"{c['escalated']} escalated ({c['share_escalated']:.0%}) to the VLM judge "
                       f"({c['vlm_seconds']:.1f} s)")
    typer.echo(f"{result.total} judgments, {result.unscored} unscored: {result.judgments_path}")
    typer.echo(f"metrics:   {result.metrics_paths[0]}")
    typer.echo(f"           {result.metrics_paths[1]}")
    if share is not None:
        from misguard.mis.evaluate import score_escalation

        typer.echo(f"escalate:  {score_escalation(result.judgments_path, share, out)}")


PerceptionField = Annotated[str, typer.Option(help="Field of the perception label; 'none' for binary-only labels.")]
ValueMap = Annotated[Optional[list[str]], typer.Option(
    help="RAW=LABEL: read a raw label value as Safe/Unsafe/Level1-3 (e.g. '1 - safe=Safe'); repeatable.")]


def label_source(path: Path, safety_field: str, perception_field: str, value_map: list[str] | None, *,
                 id_field: str = "id", model_name: str | None = None):
    """A LabelSource from a command's label-file options."""
    from misguard.mis.evaluate import LabelSource

    return LabelSource(path=path, safety_field=safety_field,
                       perception_field=None if perception_field.lower() == "none" else perception_field,
                       id_field=id_field, value_map={str(k): str(v) for k, v in
                                                     parse_key_values(value_map or [], "--value-map", raw=True).items()},
                       model_name=model_name)


@app.command()
def calibrate(
    judgments: Annotated[Path, typer.Argument(help="judgments.jsonl from `misguard score` (a judge with p_unsafe).")],
    reference: Annotated[Path, typer.Option(help="Reference labels (GPT-4o's gpt_eval.py output, or any JSONL).")],
    out: Annotated[Path, typer.Option(help="The calibration file to write (JSON).")],
    method: Annotated[str, typer.Option(help="temperature | platt | isotonic | none | auto (by CV log-loss).")] = "auto",
    perception_method: Annotated[str, typer.Option(help="temperature | isotonic | none | auto.")] = "auto",
    threshold: Annotated[str, typer.Option(
        help="Unsafe threshold: max_kappa (vs the reference) | match_rate (the reference's ASR) | fixed (0.5).")
    ] = "max_kappa",
    into_judge: Annotated[Optional[Path], typer.Option(
        help="Also embed it in this judge folder's judge.json, so `misguard score` applies it by default.")] = None,
    reference_field: Annotated[str, typer.Option(help="Field of the reference's Safe/Unsafe label.")] = "label_str",
    reference_perception_field: PerceptionField = "label_perception",
    reference_model_name: Annotated[Optional[str], typer.Option(
        help="Target model of reference rows that name none (one gpt_eval.py file per model).")] = None,
    value_map: ValueMap = None,
    skip_bad: SkipBad = False,
):
    """Fit a calibration of the judge's probabilities (and its Unsafe threshold) against reference labels."""
    from misguard.mis.evaluate import CalibrateConfig, run_calibrate

    calibration = run_calibrate(CalibrateConfig(
        judgments=label_source(judgments, "label_str", "label_perception", None),
        reference=label_source(reference, reference_field, reference_perception_field, value_map,
                               model_name=reference_model_name),
        out=out, method=method, perception_method=perception_method, threshold_rule=threshold,
        into_judge=into_judge, skip_bad=skip_bad))
    for head in ("safety", "perception"):
        section = calibration.report.get(head)
        if section:
            before, after = section["before"], section["after_cross_validated"]
            where = "cross-validated"
            if after is None:  # too few labels of a class for 5 folds
                after, where = section["after"], "on the fitting data: optimistic"
            typer.echo(f"{head}: {section['method']}; log-loss {before['log_loss']:.4f} -> {after['log_loss']:.4f}, "
                       f"ECE {before['ece_uniform']:.4f} -> {after['ece_uniform']:.4f} ({where})")
    typer.echo(f"Unsafe threshold {calibration.threshold.value:.4f} ({calibration.threshold.rule})")
    typer.echo(f"calibration: {out}" + (f" (also in {into_judge / 'judge.json'})" if into_judge else ""))


@app.command()
def agree(
    judgments: Annotated[Path, typer.Argument(help="The judge's labels: judgments.jsonl, or any JSONL label file.")],
    reference: Annotated[Path, typer.Option(help="Reference labels (GPT-4o's gpt_eval.py output, or any JSONL).")],
    out: Annotated[Path, typer.Option(help="Output directory: agreement.json, agreement.md, PNG plots.")],
    human: Annotated[Optional[Path], typer.Option(help="Human labels for the same responses.")] = None,
    escalate: Annotated[Optional[str], typer.Option(
        help="List this share of least confident responses for review, e.g. 10%, with the agreement curve.")] = None,
    judge_field: Annotated[str, typer.Option(help="Field of the judge's Safe/Unsafe label.")] = "label_str",
    judge_perception_field: PerceptionField = "label_perception",
    reference_field: Annotated[str, typer.Option(help="Field of the reference's Safe/Unsafe label.")] = "label_str",
    reference_perception_field: PerceptionField = "label_perception",
    reference_model_name: Annotated[Optional[str], typer.Option(
        help="Target model of reference rows that name none (one gpt_eval.py file per model).")] = None,
    human_field: Annotated[str, typer.Option(help="Field of the human Safe/Unsafe label.")] = "label_str",
    human_perception_field: PerceptionField = "none",
    value_map: ValueMap = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the 95% confidence intervals.")] = 1000,
    max_unmatched: Annotated[float, typer.Option(
        help="Fail when more than this share of either side matches nothing.")] = 0.02,
    plots: Annotated[bool, typer.Option(help="Write the PNG plots.")] = True,
    skip_bad: SkipBad = False,
):
    """Agreement of the judge with reference (GPT-4o) and human labels: kappa, confusion, metric deltas."""
    from misguard.mis.evaluate import AgreeConfig, run_agree

    share = share_option(escalate) if escalate is not None else None
    result = run_agree(AgreeConfig(
        judgments=label_source(judgments, judge_field, judge_perception_field, value_map),
        reference=label_source(reference, reference_field, reference_perception_field, value_map,
                               model_name=reference_model_name),
        human=label_source(human, human_field, human_perception_field, value_map) if human else None,
        out=out, escalate=share, n_bootstrap=bootstrap, max_unmatched_share=max_unmatched, plots=plots,
        skip_bad=skip_bad))
    overall = result.report["judge_vs_reference"]["overall"]
    safety = overall["safety"]
    typer.echo(f"{overall['n_pairs']} pairs; safety: accuracy {safety['accuracy']:.3f}, "
               f"Cohen's kappa {_fmt(safety['kappa'])}, F1 (Unsafe) {_fmt(safety.get('f1'))}")
    typer.echo(f"report:    {result.report_path}")
    typer.echo(f"           {result.markdown_path}")
    for path in result.plots:
        typer.echo(f"plot:      {path}")
    if result.escalation_path:
        typer.echo(f"escalate:  {result.escalation_path}")


def share_option(text: str) -> float:
    """--escalate's value ("10%" or "0.1") as a share; a bad value is a MisguardError naming the option."""
    from misguard.calibration.escalation import parse_share

    try:
        return parse_share(text)
    except ValueError as error:
        raise MisguardError(f"--escalate: {error}") from None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


TRAIN_VLM_ONLY = ("base", "lora", "epochs", "lr", "batch_size", "grad_accum", "lora_r", "train_vision", "dtype",
                  "resume")
"""`misguard train` options that only the VLM judge takes (--kind lite refuses them when given)."""
TRAIN_LITE_ONLY = ("lite_c",)


@app.command()
def train(
    ctx: typer.Context,
    responses: Annotated[list[Path], typer.Option(help="Responses files from `misguard infer`; repeatable.")],
    labels: Annotated[list[Path], typer.Option(
        help="GPT-4o's verdicts on them: gpt_eval.py files (one per target model) or judgments.jsonl; repeatable.")],
    data: Annotated[Path, typer.Option(help="The MIS test directory the responses were made on.")],
    out: Annotated[Path, typer.Option(help="The judge folder to write.")],
    kind: Annotated[str, typer.Option(
        help="vlm: fine-tune a VLM (--base); lite: logistic heads on a frozen text encoder (all-MiniLM-L6-v2), "
             "CPU only, reads question + response, never the images.")] = "vlm",
    base: Annotated[Optional[Path], typer.Option(
        help="vlm: the base VLM folder (save_pretrained) to fine-tune into a judge.")] = None,
    label_model_name: Annotated[Optional[list[str]], typer.Option(
        help="The target model of each --labels file, in order (default: the file names).")] = None,
    lora: Annotated[bool, typer.Option("--lora/--full", help="vlm: LoRA adapter (merged on save) or full fine-tuning.")
                    ] = True,
    epochs: Annotated[int, typer.Option(help="vlm: passes over the training examples.")] = 3,
    lr: Annotated[Optional[float], typer.Option(help="vlm: learning rate; default 2e-4 (LoRA) or 1e-5 (full).")
                  ] = None,
    val_frac: Annotated[float, typer.Option(help="Share of MIS items held out for validation.")] = 0.1,
    batch_size: Annotated[int, typer.Option(help="vlm: examples per device per step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="vlm: steps per optimizer update.")] = 1,
    lora_r: Annotated[int, typer.Option(help="vlm: LoRA rank.")] = 16,
    train_vision: Annotated[bool, typer.Option(help="vlm: also train the vision tower (frozen by default).")] = False,
    lite_c: Annotated[Optional[list[float]], typer.Option(
        help="lite: a candidate C (inverse L2 strength) of the heads, repeatable; default 1, 10, 100, 1000, the "
             "best by cross-validated log-loss on the training split.")] = None,
    judge_id: Annotated[Optional[str], typer.Option(help="The judge's id; default: the out folder's name.")] = None,
    dtype: Annotated[str, typer.Option(help="vlm: auto | float32 | bfloat16")] = "auto",
    seed: Annotated[int, typer.Option(help="vlm: LoRA init, data order, dropout; lite: the C search's folds.")] = 0,
    resume: Annotated[bool, typer.Option(help="vlm: continue from the last checkpoint in OUT/checkpoints.")] = True,
    skip_bad: SkipBad = False,
    quiet: Quiet = False,
):
    """Train a judge on GPT-4o's labels (a fine-tuned VLM, or with --kind lite a CPU text judge); writes a judge
    folder that score/agree/calibrate/serve take."""
    from misguard.mis.train import TrainData, run_train

    if kind not in ("vlm", "lite"):
        raise MisguardError(f"--kind must be vlm or lite, got {kind!r}")
    other = TRAIN_VLM_ONLY if kind == "lite" else TRAIN_LITE_ONLY
    given = [name for name in other if _given(ctx, name)]
    if given:
        flags = ["--lora/--full" if n == "lora" else "--" + n.replace("_", "-") for n in given]
        raise MisguardError(f"{', '.join(flags)}: only for --kind {'vlm' if kind == 'lite' else 'lite'}")
    train_data = TrainData(responses=responses, labels=labels, data=data, label_model_names=label_model_name,
                           val_frac=val_frac, skip_bad=skip_bad)
    if kind == "lite":
        from misguard.judge_training.lite import DEFAULT_C_GRID, LiteTrainConfig

        config = LiteTrainConfig(out=out, c_grid=tuple(lite_c) if lite_c else DEFAULT_C_GRID, seed=seed,
                                 judge_id=judge_id)
    else:
        from misguard.judge_training.trainer import TrainConfig

        if base is None:
            raise MisguardError("--base is required for --kind vlm (the VLM folder to fine-tune)")
        config = TrainConfig(base=base, out=out, lora=lora, lora_r=lora_r, train_vision=train_vision, epochs=epochs,
                             lr=lr, batch_size=batch_size, grad_accum=grad_accum, seed=seed, dtype=dtype,
                             judge_id=judge_id, resume=resume)
    run = run_train(train_data, config, progress=not quiet)
    for side, counts in run.counts.items():
        typer.echo(f"{side}: {counts['responses']} responses, {counts['items']} items; safety {counts['safety']}, "
                   f"perception {counts['perception']}")
    result = run.result
    if kind == "lite":
        cv = {row["C"]: row["log_loss"] for row in result.cv}
        typer.echo(f"C {result.C:g}" + (f" (cross-validated log-loss {cv[result.C]:.4f})" if cv else "")
                   + ("" if result.has_perception else "; Unsafe head only (one perception level in the labels)"))
        if result.validation is not None:
            safety, perception = result.validation["safety"], result.validation["perception"]
            typer.echo(f"validation: safety kappa {_fmt(safety['kappa'])}, accuracy {_fmt(safety['accuracy'])}, "
                       f"F1 (Unsafe) {_fmt(safety['f1'])}"
                       + (f"; perception accuracy {_fmt(perception['accuracy'])}" if perception else ""))
    elif result.validation is not None:
        safety = result.validation["safety"]
        typer.echo(f"best epoch {result.best_epoch}: validation safety kappa {_fmt(safety['kappa'])}, "
                   f"accuracy {_fmt(safety['accuracy'])}")
    typer.echo(f"judge:     {result.out} ({result.seconds:.0f} s)")
    typer.echo(f"card:      {result.judge_card}")


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether the user set option `name` (on the command line or through its environment variable)."""
    source = ctx.get_parameter_source(name)
    # By name: typer ships its own copy of click, whose ParameterSource is not click's.
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


@app.command()
def merge(
    out: Annotated[Path, typer.Argument(help="The --out directory of the sharded runs.")],
    split: Annotated[str, typer.Option(help="easy | hard | real")],
    model_name: Annotated[str, typer.Option(help="The model name in the shard file names.")],
):
    """Join the shards of a `misguard infer --shard I/N` run into one responses file."""
    from misguard.mis.infer import merge_shards

    typer.echo(f"merged: {merge_shards(out, split, model_name)}")


@app.command()
def serve(
    judge: Annotated[Path, typer.Option(
        help="Judge folder: a VLM judge (model + judge.json), a plain instruct VLM folder, or a lite judge "
             "(`misguard train --kind lite`; it guards the output rail only).")],
    upstream: Annotated[str, typer.Option(help="The guarded VLM's OpenAI-compatible URL ending in /v1.")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the guard.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    policy: Annotated[Optional[Path], typer.Option(help="Policy YAML (rails, thresholds, failure mode, limits, "
                                                        "audit log); default: the built-in policy.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(
        help="Calibration file for the output rail (default: the one in the judge's judge.json).")] = None,
    audit_log: Annotated[Optional[Path], typer.Option(help="JSON Lines audit log (overrides the policy's).")] = None,
    client_api_key: Annotated[Optional[str], typer.Option(
        envvar="MISGUARD_SERVE_API_KEY", help="Clients must send 'Authorization: Bearer KEY'.")] = None,
    upstream_api_key: Annotated[Optional[str], typer.Option(
        envvar="MISGUARD_UPSTREAM_API_KEY", help="API key the guard sends to the upstream.")] = None,
    lite_judge: LiteJudgeOption = None,
    cascade_band: CascadeBandOption = "0.1,0.9",
    engine: Engine = "transformers",
    base_url: BaseUrl = None,
    served_model: Annotated[Optional[str], typer.Option(
        help="openai: the judge's model name on the server (default: the judge folder's path).")] = None,
    batch_size: BatchSize = None,
    dtype: Dtype = "auto",
    tensor_parallel_size: TensorParallel = 1,
    pipeline_parallel_size: PipelineParallel = 1,
    distributed_executor_backend: ExecutorBackend = None,
    max_model_len: MaxModelLen = None,
    gpu_memory_utilization: GpuMemory = None,
    vllm_arg: VllmArg = None,
    concurrency: Concurrency = 16,
    api_key: ApiKey = "EMPTY",
    trust_remote_code: TrustRemoteCode = False,
):
    """Put the judge in front of a deployed VLM as an OpenAI-compatible guardrail (input and output rails)."""
    from misguard.guard.server.app import create_app, run_server
    from misguard.guard.server.loading import build_service

    service = build_service(judge, upstream, policy_path=policy, calibration_path=calibration, audit_log=audit_log,
                            engine=engine, options=engine_options(locals()), served_model=served_model,
                            upstream_api_key=upstream_api_key, lite_judge=lite_judge, cascade_band=cascade_band)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.secho(f"warning: binding {host}: the guard is reachable from other machines", err=True,
                    fg=typer.colors.YELLOW)
    typer.echo(f"misguard guard: judge {service.guard.judge_id} -> upstream {upstream}, on http://{host}:{port}/v1")
    run_server(create_app(service, api_key=client_api_key), host, port)


@app.command("make-demo-data")
def make_demo_data(
    out: Annotated[Path, typer.Argument(help="Directory to create.")],
    items: Annotated[int, typer.Option(help="Items per split.")] = 24,
    seed: Annotated[int, typer.Option()] = 0,
):
    """Write a small, clearly synthetic MIS-shaped test directory (published layout, generated images)."""
    from misguard.mis.demo_data import make_demo_data as make

    typer.echo(f"synthetic MIS data: {make(out, n_items=items, seed=seed)}")


@app.command("make-judge")
def make_judge(
    folder: Annotated[Path, typer.Argument(help="A model folder saved with save_pretrained.")],
    judge_id: Annotated[Optional[str], typer.Option(help="The judge's id in judgments; default: folder name.")] = None,
    template: Annotated[str, typer.Option(help="Prompt template id.")] = "mis-judge-codes-v1",
):
    """Make a model folder a judge folder: write its judge.json (template and answer-label token ids)."""
    from misguard.judges import write_judge_spec

    spec = write_judge_spec(folder, judge_id=judge_id, template=template)
    typer.echo(f"judge '{spec.id}' ({spec.template}): {folder / 'judge.json'}")


@app.command("make-tiny-model")
def make_tiny_model(
    out: Annotated[Path, typer.Argument(help="Directory to create.")],
    arch: Annotated[str, typer.Option(help="Architecture, e.g. qwen2_vl, qwen2_5_vl.")] = "qwen2_vl",
    seed: Annotated[int, typer.Option()] = 0,
):
    """Build a tiny random-weight model of a real VLM architecture (for tests and the demo), offline."""
    from misguard.engines.tiny_models import make_tiny_model as make

    typer.echo(f"tiny {arch} model: {make(out, arch=arch, seed=seed)}")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes everything.")] = Path("misguard-demo"),
    items: Annotated[int, typer.Option(help="Items per split.")] = 12,
):
    """Run misguard end to end on generated data and tiny models (no GPU, no downloads)."""
    from misguard.mis.demo import run_demo

    run_demo(out, n_items=items)


def engine_options(command_args: dict):
    """The EngineOptions from a command's arguments (its `locals()`), which declare the shared engine options
    with the aliases at the top of this module."""
    from misguard.engines.base import EngineOptions

    a = command_args
    return EngineOptions(
        batch_size=a["batch_size"], dtype=a["dtype"], trust_remote_code=a["trust_remote_code"],
        tensor_parallel_size=a["tensor_parallel_size"], pipeline_parallel_size=a["pipeline_parallel_size"],
        distributed_executor_backend=a["distributed_executor_backend"], max_model_len=a["max_model_len"],
        gpu_memory_utilization=a["gpu_memory_utilization"],
        vllm_args=parse_key_values(a["vllm_arg"] or [], "--vllm-arg"), base_urls=list(a["base_url"] or []),
        api_key=a["api_key"], concurrency=a["concurrency"], prefix_reuse=a.get("prefix_reuse", True))


def parse_key_values(pairs: list[str], option: str, *, raw: bool = False) -> dict:
    """['a=1', 'b=x'] -> {'a': 1, 'b': 'x'}: values parsed as JSON where they parse, else kept as strings
    (raw=True: always strings). The key ends at the last '=', so keys may contain '=' but values may not."""
    import json

    parsed = {}
    for pair in pairs:
        key, sep, value = pair.rpartition("=") if raw else pair.partition("=")
        if not sep or not key:
            raise MisguardError(f"{option} takes KEY=VALUE, got '{pair}'")
        if raw:
            parsed[key] = value
            continue
        try:
            parsed[key] = json.loads(value)
        except json.JSONDecodeError:
            parsed[key] = value
    return parsed


def main() -> None:
    """Console-script entry point: run the app; a MisguardError becomes one line on stderr and exit code 1."""
    enforce_offline()
    logging.basicConfig(level=logging.WARNING, format="misguard: %(levelname)s: %(message)s")
    try:
        app()
    except MisguardError as exc:
        typer.secho(f"misguard: error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("misguard: interrupted; re-run the same command to resume", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
