"""`misguard infer` and `misguard merge`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misguard.cli.options import Given, config_options, number_option
from misguard.core.locking import exclusive_output
from misguard.core.progress import silence_library_bars
from misguard.engines.base import EngineOptions
from misguard.engines.messages import GenerationParams
from misguard.mis.infer import SHARDS_FOLDER, InferConfig, merge_shards, parse_shard, run_inference

commands = typer.Typer()


def _quiet(quiet: bool) -> bool:
    """--quiet, as it is parsed: the libraries' bars go too (before the command loads any model)."""
    if quiet:
        silence_library_bars()
    return quiet


Engine = Annotated[str, typer.Option(help="transformers | vllm | openai")]
SkipBad = Annotated[bool, typer.Option(help="Log and count bad rows instead of stopping at the first.")]
Quiet = Annotated[bool, typer.Option(help="No progress bars: neither misguard's nor transformers' or datasets'.",
                                     callback=_quiet)]
CheckImages = Annotated[bool, typer.Option(
    help="Decode every image before the run, so one that does not decode (a truncated file) is a bad row found up "
         "front; without it only the images' headers are checked first, and such an image is found when its item "
         "runs, with the same effect.")]


@commands.command("infer")
@config_options(EngineOptions, GenerationParams)
def infer(
    model: Annotated[str, typer.Option(help="Local model folder, or the served model name with --engine openai.")],
    data: Annotated[Path, typer.Option(help="MIS test directory (mis_easy.json, ... and the image folders).")],
    split: Annotated[str, typer.Option(help="easy | hard | real")],
    out: Annotated[Path, typer.Option(help="Output directory: responses go to OUT/<split>/<model-name>.jsonl.")],
    engine: Engine = "transformers",
    limit: Annotated[int | None, number_option("Only the first N items of the split.", at_least=1)] = None,
    shard: Annotated[str | None, typer.Option(
        help="I/N: run items I, I+N, ... (join with `misguard merge`).")] = None,
    model_name: Annotated[str | None, typer.Option(help="Name in the output; default: the folder's name.")] = None,
    skip_bad: SkipBad = False,
    check_images: CheckImages = False,
    quiet: Quiet = False,
    *,
    given: Given,
):
    """Run a target VLM over an MIS split and write its responses (resumable: re-run to finish)."""
    config = InferConfig(model=model, data=data, split=split, out=out, engine=engine,
                         engine_options=given.build(EngineOptions), generation=given.build(GenerationParams),
                         model_name=model_name, limit=limit, shard=parse_shard(shard) if shard else None,
                         skip_bad=skip_bad, check_images=check_images)
    # run_inference holds the responses file's one-writer lock (each shard has its own), once its inputs check.
    result = run_inference(config, progress=not quiet)
    typer.echo(f"{result.generated} new responses ({result.already_done} already there, "
               f"{result.skipped_items} bad items skipped) in {result.seconds:.1f} s")
    typer.echo(f"responses: {result.responses_path}")
    typer.echo(f"manifest:  {result.manifest_path}")


@commands.command("merge")
def merge(
    out: Annotated[Path, typer.Argument(help="The --out directory of the sharded runs.")],
    split: Annotated[str, typer.Option(help="easy | hard | real")],
    model_name: Annotated[str, typer.Option(help="The model name in the shard file names.")],
):
    """Join the shards of a `misguard infer --shard I/N` run into one responses file, and move the shards into
    OUT/<split>/shards/ (so a tool that reads every file of OUT/<split>/ sees each response once)."""
    with exclusive_output(Path(out) / split / f"{model_name}.jsonl", folder=False):
        merged = merge_shards(out, split, model_name)
    typer.echo(f"merged:    {merged}")
    typer.echo(f"shards:    moved to {merged.parent / SHARDS_FOLDER}/ (done; a re-run of merge reads them there), so "
               f"{merged.parent}/ holds each response once")

