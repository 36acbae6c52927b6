"""`misguard demo`: the whole product on a fresh machine, with no GPU and nothing downloaded.

Generates a clearly synthetic MIS-shaped directory, builds tiny random-weight target VLMs of real
architectures, runs `infer` over every split, then `score`s every response with a tiny random-weight judge
(a Qwen2-VL judge folder: model + judge.json). Random weights answer gibberish and judge at random: the demo
shows the pipeline and its files, not a model's safety. Later stages (train, calibrate, agree) join it as they
land.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from mis.records import SPLITS

DEMO_TARGETS = ("qwen2_vl", "qwen2_5_vl")
DEMO_JUDGE_ARCH = "qwen2_vl"


def run_demo(out: Path, *, n_items: int = 12, max_new_tokens: int = 24, progress: bool = True) -> dict:
    """Run the demo into `out` (re-running reuses what is there). Returns {"data", "models", "responses",
    "judge", "judgments", "metrics"} paths; prints each step and where its results went."""
    from rich.console import Console
    from rich.table import Table
    from transformers.utils import logging as hf_logging

    from guard.engines import load_engine
    from guard.engines.base import EngineOptions
    from guard.judge import JUDGE_FILE, write_judge_spec
    from guard.messages import GenerationParams
    from guard.tiny_models import make_tiny_model
    from mis.demo_data import make_demo_data
    from mis.infer import InferConfig, run_inference
    from mis.score import ScoreConfig, run_score

    hf_logging.disable_progress_bar()  # tiny models load in milliseconds; their bars would only clutter the demo
    console = Console(soft_wrap=True)  # paths whole, never broken across lines
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

    judge = out / "models" / "tiny-judge"
    if not (judge / JUDGE_FILE).exists():
        make_tiny_model(judge, arch=DEMO_JUDGE_ARCH, seed=1)
        write_judge_spec(judge, judge_id="tiny-judge")
    console.print(f"4. misguard score (tiny judge {judge}: label-token probabilities, one forward pass per "
                  "response):")
    scored = run_score(ScoreConfig(responses=responses, judge=judge, data=data, out=out / "scores",
                                   engine_options=EngineOptions(dtype="float32")), progress=progress)
    metrics = json.loads(scored.metrics_paths[0].read_text())
    table = Table("target model", "split", "scored", "ASR %", "HR %", "RSR %", "RR %")
    for group in metrics["groups"]:
        values = group["overall"]["values"] or {}
        table.add_row(group["model"], group["split"], str(group["scored"]),
                      *(f"{values[m]:.1f}" if m in values else "-" for m in ("ASR", "HR", "RSR", "RR")))
    console.print(table)
    console.print(f"   judgments: {scored.judgments_path}")
    console.print(f"   metrics:   {scored.metrics_paths[0]} and {scored.metrics_paths[1]} (with 95% CIs)")
    console.print(f"done in {time.time() - started:.0f} s. Next: `misguard infer --model YOUR_MODEL_FOLDER "
                  f"--data YOUR_MIS_DIR --split easy --out runs/`, then `misguard score runs/easy/*.jsonl "
                  "--judge YOUR_JUDGE_FOLDER --data YOUR_MIS_DIR --out scores/` (see README).")
    return {"data": data, "models": models, "responses": responses, "judge": judge,
            "judgments": scored.judgments_path, "metrics": scored.metrics_paths[0]}
