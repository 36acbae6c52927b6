"""`misguard demo` and the helpers that make test material: make-demo-data, make-judge, make-tiny-model."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misguard.cli.options import number_option
from misguard.core.locking import exclusive_output
from misguard.engines.tiny_models import make_tiny_model as make_model
from misguard.judges.templates import DEFAULT_CODES_TEMPLATE
from misguard.judges.vlm import make_judge_folder
from misguard.mis.demo import run_demo
from misguard.mis.demo_data import make_demo_data as make_data

commands = typer.Typer()


@commands.command("demo")
def demo(
    out: Annotated[Path, typer.Option(help="Where the demo writes everything.")] = Path("misguard-demo"),
    items: Annotated[int, number_option("Items per split.", at_least=1)] = 8,
):
    """Run misguard end to end on generated data and tiny models (no GPU, no downloads)."""
    with exclusive_output(out, folder=True):
        run_demo(out, n_items=items)


@commands.command("make-demo-data")
def make_demo_data(
    out: Annotated[Path, typer.Argument(help="Directory to create.")],
    items: Annotated[int, number_option("Items per split.", at_least=1)] = 24,
    seed: Annotated[int, number_option("Seed of the generated items and images.", at_least=0)] = 0,
):
    """Write a small, clearly synthetic MIS-shaped test directory (published layout, generated images)."""
    with exclusive_output(out, folder=True):
        data = make_data(out, n_items=items, seed=seed)
    typer.echo(f"synthetic MIS data: {data}")


@commands.command("make-judge")
def make_judge(
    folder: Annotated[Path, typer.Argument(help="A model folder saved with save_pretrained.")],
    judge_id: Annotated[str | None, typer.Option(help="The judge's id in judgments; default: folder name.")] = None,
    template: Annotated[str, typer.Option(help="Prompt template id.")] = DEFAULT_CODES_TEMPLATE,
):
    """Make a model folder a judge folder: write its judge.json (template and answer-label token ids)."""
    with exclusive_output(folder, folder=True, create=False):
        spec = make_judge_folder(folder, judge_id=judge_id, template=template)
    typer.echo(f"judge '{spec.id}' ({spec.template}): {folder / 'judge.json'}")


@commands.command("make-tiny-model")
def make_tiny_model(
    out: Annotated[Path, typer.Argument(help="Directory to create.")],
    arch: Annotated[str, typer.Option(help="Architecture, e.g. qwen2_vl, qwen2_5_vl.")] = "qwen2_vl",
    seed: Annotated[int, number_option("Seed of the random weights.", at_least=0)] = 0,
):
    """Build a tiny random-weight model of a real VLM architecture (for tests and the demo), offline."""
    with exclusive_output(out, folder=True):
        folder = make_model(out, arch=arch, seed=seed)
    typer.echo(f"tiny {arch} model: {folder}")
