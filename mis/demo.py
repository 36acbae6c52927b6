"""`misguard demo`: the whole product on a fresh machine, with no GPU and nothing downloaded.

Generates a clearly synthetic MIS-shaped directory, builds tiny random-weight target VLMs of real
architectures, and runs `infer` over every split. Random weights answer gibberish: the demo shows the pipeline
and its files, not a model's safety. Later stages (score, calibrate, agree) join it as they land.
"""
from __future__ import annotations

import time
from pathlib import Path

from mis.records import SPLITS

DEMO_TARGETS = ("qwen2_vl", "qwen2_5_vl")


def run_demo(out: Path, *, n_items: int = 12, max_new_tokens: int = 24, progress: bool = True) -> dict:
    """Run the demo into `out` (re-running reuses what is there). Returns {"data", "models", "responses"}
    paths; prints each step and where its results went."""
    from rich.console import Console
    from rich.table import Table

    from guard.engines import load_engine
    from guard.engines.base import EngineOptions
    from guard.messages import GenerationParams
    from guard.tiny_models import make_tiny_model
    from mis.demo_data import make_demo_data
    from mis.infer import InferConfig, run_inference

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # tiny models load in milliseconds; their bars would only clutter the demo
    console = Console()
    out = Path(out)
    started = time.time()
    console.print(f"[bold]misguard demo[/bold] → {out.resolve()}")
    console.print("Synthetic data and random-weight models: the outputs show the pipeline, not real safety.\n")

    data = make_demo_data(out / "data", n_items=n_items, seed=0)
    console.print(f"1. synthetic MIS data ({n_items} items x {len(SPLITS)} splits): {data}")

    models = {}
    for arch in DEMO_TARGETS:
        folder = out / "models" / f"tiny-{arch.replace('_', '-')}"
        if not (folder / "config.json").exists():
            make_tiny_model(folder, arch=arch, seed=0)
        models[arch] = folder
    console.print(f"2. tiny target models: {', '.join(str(p) for p in models.values())}")

    console.print("3. misguard infer (transformers engine, batched, resumable):")
    table = Table("target model", "split", "responses", "file")
    table.columns[-1].overflow = "fold"
    responses = []
    for arch, folder in models.items():
        options = EngineOptions(dtype="float32")
        with load_engine("transformers", str(folder), options) as engine:
            for split in SPLITS:
                result = run_inference(InferConfig(
                    model=str(folder), data=data, split=split, out=out / "responses", engine="transformers",
                    engine_options=options, generation=GenerationParams(max_new_tokens=max_new_tokens)),
                    progress=progress, engine=engine)
                responses.append(result.responses_path)
                table.add_row(folder.name, split, str(result.total), str(result.responses_path))
    console.print(table)
    console.print(f"done in {time.time() - started:.0f} s. Next: `misguard infer --model YOUR_MODEL_FOLDER "
                  f"--data YOUR_MIS_DIR --split easy --out runs/` (see README).")
    return {"data": data, "models": models, "responses": responses}
