"""`misguard train`: a VLM judge (`--kind vlm`) or a lite judge (`--kind lite`) from responses and labels."""
from __future__ import annotations

from typing import Annotated

import typer

from misguard.cli.evaluate import number
from misguard.cli.infer import Quiet
from misguard.cli.options import Given, config_options
from misguard.core.errors import MisguardError
from misguard.core.locking import exclusive_output
from misguard.judge_training.lite import LiteTrainConfig
from misguard.judge_training.vlm import TrainConfig
from misguard.mis.train import TrainData, check_training, run_train

commands = typer.Typer()
KINDS = {"vlm": TrainConfig, "lite": LiteTrainConfig}


@commands.command("train")
@config_options(TrainData, TrainConfig, LiteTrainConfig)
def train(
    kind: Annotated[str, typer.Option(
        help="vlm: fine-tune a VLM (--base); lite: fine-tune a text cross-encoder (all-MiniLM-L6-v2) on the CPU; "
             "it reads question (+ image description) and response, never the images.")] = "vlm",
    quiet: Quiet = False,
    *,
    given: Given,
):
    """Train a judge on GPT-4o's labels (a fine-tuned VLM, or with --kind lite a CPU text judge); writes a judge
    folder that score/agree/calibrate/serve take."""
    if kind not in KINDS:
        raise MisguardError(f"--kind must be {' or '.join(KINDS)}, got {kind!r}")
    other = next(k for k in KINDS if k != kind)
    given.refuse_outside(TrainData, KINDS[kind], why=f"only for --kind {other}")
    data, config = given.build(TrainData), given.build(KINDS[kind], context=f"for --kind {kind}")
    check_training(config)  # a wrong --base or a missing extra leaves no judge folder behind
    with exclusive_output(config.out, folder=True):  # one writer per judge folder and its checkpoints
        run = run_train(data, config, progress=not quiet)
    for side, counts in run.counts.items():
        typer.echo(f"{side}: {counts['responses']} responses, {counts['items']} items; safety {counts['safety']}, "
                   f"perception {counts['perception']}")
    result = run.result
    if kind == "lite":
        typer.echo(f"best epoch {result.best_epoch}; Unsafe threshold {result.unsafe_threshold:.4f}"
                   + ("" if result.has_perception else "; no perception labels: Unsafe head only"))
        for name, figures in [("all", result.validation["all"]), *result.validation["sources"].items()]:
            typer.echo(f"validation {name}: {figures['n']} rows, kappa {number(figures['kappa'])}, accuracy "
                       f"{number(figures['accuracy'])}, F1 (Unsafe) {number(figures['f1'])}, "
                       f"{figures['flagged']:.1%} flagged out of domain")
    elif result.validation is not None:
        safety = result.validation["safety"]
        typer.echo(f"best epoch {result.best_epoch}: validation safety kappa {number(safety['kappa'])}, "
                   f"accuracy {number(safety['accuracy'])}")
    typer.echo(f"judge:     {result.out} ({result.seconds:.0f} s)")
    typer.echo(f"card:      {result.judge_card}")
