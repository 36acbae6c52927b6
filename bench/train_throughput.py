"""`misguard train` samples/s: LoRA fine-tuning of a judge on MIS-sized items (two images, rubric, question,
MIS-length response), timed from the first to the last optimizer step (model loading, validation and the
merged-model export are outside the timing and reported apart).

CPU (tiny model):   python bench/train_throughput.py --size tiny --items 48
GPU (H100):         python bench/train_throughput.py --size 7b --items 400 --batch-size 16
Full-size shapes are random-init (no weights can be downloaded): only speed is meaningful. Prints one JSON line.
Baseline (issue 5, H100, 2026-11-22, plain peft LoRA r=16 on the language model, gradient checkpointing, batch
16): 7.4 samples/s (2B), 4.3 samples/s (7B). Goal: >= 30 (2B) and >= 10 (7B).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import TrainerCallback

from bench.infer_throughput import bench_data, build_model  # noqa: E402
from bench.judge_throughput import RESPONSE  # noqa: E402
from misguard.core.splits import load_split
from misguard.judge_training.examples import TrainingExample
from misguard.judge_training.vlm import TrainConfig, train_judge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "2b", "7b"], default="tiny")
    ap.add_argument("--items", type=int, default=48, help="training examples (one response per MIS item)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    args = ap.parse_args()



    work = Path(tempfile.mkdtemp(prefix="misguard-bench-train-"))
    data = bench_data(work / "data", args.items, args.size)
    base = build_model(args.size, work / "base")
    split = load_split(data, "easy")
    examples = [TrainingExample(
        item_key=f"easy/{item.id}", split="easy", id=item.id, model="target", category=item.category,
        sub_category=item.sub_category, images=tuple(str(p) for p in split.image_paths(item)),
        question=item.question, response=RESPONSE, label_str="Unsafe" if n % 3 == 0 else "Safe",
        label_perception=f"Perception Level{n % 3 + 1}") for n, item in enumerate(split.items)]

    class Timer(TrainerCallback):
        started = ended = 0.0
        steps = 0

        def on_step_begin(self, _args, state, control, **kwargs):
            if not self.started:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.started = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            torch.cuda.synchronize() if torch.cuda.is_available() else None
            self.ended, self.steps = time.perf_counter(), self.steps + 1

    timer = Timer()
    config = TrainConfig(base=base, out=work / "judge", lora=not args.full, epochs=args.epochs,
                         batch_size=args.batch_size, resume=False)
    started = time.perf_counter()
    train_judge(config, examples, [], progress=False, callbacks=[timer])
    total_s = time.perf_counter() - started
    # From the first step's start to the last step's end; the last batch of an epoch may be short.
    timed_samples = min(timer.steps * args.batch_size, len(examples) * args.epochs)
    print(json.dumps({
        "bench": "train_throughput", "size": args.size, "items": len(examples), "epochs": args.epochs,
        "batch_size": args.batch_size, "lora": not args.full, "steps": timer.steps,
        "samples_per_s": round(timed_samples / (timer.ended - timer.started), 3) if timer.steps else None,
        "total_seconds_with_load_and_export": round(total_s, 1),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }))


if __name__ == "__main__":
    main()
