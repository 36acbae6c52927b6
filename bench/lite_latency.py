"""The lite judge's per-item latency at batch 1 (p50/p99) and its items/s batched, on the CPU.

Builds a lite judge folder (LiteHeads fitted on --train-rows feature rows, write_lite_judge), loads it with
LiteJudge, and times `LiteJudge.judge(cases)` (the Judge protocol, as the guard's output rail and `misguard
score` call it): the encoder (all-MiniLM-L6-v2, long
responses windowed, never truncated) and both heads, the whole of what the guard's output rail and `misguard
score` call per item. Texts are MOSSBench's real questions and recorded responses
(../shared/data/mossbench/mossbench_benign_responses.jsonl: 2,700 responses of 9 VLMs, median about 190 tokens,
about 40 % longer than one 254-token window), so the latency follows real response lengths; without that file,
generated MIS-like texts with a similar length spread. The heads are fitted on seeded random labels (MOSSBench
has none): only speed is meaningful, and a head's cost does not depend on its weights.

Batch 1: --warmup untimed calls, then one call per item for --items items (questions and responses drawn from
rows the heads were not fitted on); p50/p90/p99/max of the per-call wall time, overall and by the number of
254-token windows the response needs. Batched: the same items in batches of each --batch-sizes size, items/s
over the whole pass (at least one full batch), after one untimed batch.

    python bench/lite_latency.py --items 500 --batch-sizes 8,32,128

Goal (issue 7): <= 20 ms p99 per item at batch 1 on 2 CPU cores. Prints a setup line (hardware, versions, date,
command, text lengths), then one JSON line per measurement, each with the 1-minute load average before and after
it (other processes on a shared machine show up there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import transformers

from bench.hardware import cpu_name  # noqa: E402
from misguard.judges import Case
from misguard.judges.lite.encoder import TextEncoder
from misguard.judges.lite.heads import LiteHeads, build_features
from misguard.judges.lite.judge import LiteJudge, write_lite_judge

MOSSBENCH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "mossbench" / \
    "mossbench_benign_responses.jsonl"
GOAL_P99_MS_AT_1 = 20.0

_SUBJECTS = ["the knife on the counter", "the pills in the cabinet", "the ladder by the window", "the gas canister",
             "the lock on the gate", "the car parked at the crossing", "the chemicals under the sink"]
_SENTENCES = ["The image shows {s} next to a group of people.", "Handling {s} safely means keeping it out of reach.",
              "I can't help with using {s} to hurt anyone.", "If you are worried about {s}, ask a professional.",
              "Many households keep {s} for ordinary reasons, and local rules say how to store it.",
              "Here are a few general points about {s} and the setting in the second picture."]


def load_texts(path: Path, n: int, seed: int) -> tuple[list[tuple[str, str]], str]:
    """n (question, response) pairs in a seeded order, and where they came from: MOSSBench's rows when the file
    exists, else generated MIS-like texts (responses of 0-40 sentences, about MOSSBench's length spread)."""
    rng = random.Random(seed)
    if path.is_file():
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        rng.shuffle(rows)
        pairs = [(row["question"], row["response"] or "") for row in rows]
        return (pairs * (n // len(pairs) + 1))[:n], f"mossbench ({path.name}, {len(rows)} rows)"
    pairs = []
    for _ in range(n):
        subject = rng.choice(_SUBJECTS)
        question = f"How should I deal with {subject} in these two pictures?"
        length = min(int(rng.lognormvariate(2.0, 0.9)), 40)
        pairs.append((question, " ".join(rng.choice(_SENTENCES).format(s=subject) for _ in range(length))))
    return pairs, "generated MIS-like texts"


def build_judge(folder: Path, encoder, pairs: list[tuple[str, str]], seed: int) -> None:
    """Fit LiteHeads on these pairs' features with seeded random labels (both classes, all three perception
    levels) and write a lite judge folder."""
    features = build_features(encoder, [q for q, _ in pairs], [r for _, r in pairs])
    rng = np.random.default_rng(seed)
    y_unsafe = np.arange(len(pairs)) % 2
    y_perception = np.arange(len(pairs)) % 3
    rng.shuffle(y_unsafe)
    rng.shuffle(y_perception)
    write_lite_judge(folder, LiteHeads().fit(features, y_unsafe, y_perception), judge_id="bench-lite")


def percentiles_ms(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1000
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p90": round(float(np.percentile(ms, 90)), 2),
            "p99": round(float(np.percentile(ms, 99)), 2), "max": round(float(ms.max()), 2),
            "mean": round(float(ms.mean()), 2)}


def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


def emit(record: dict[str, Any]) -> None:
    print(json.dumps({"bench": "lite_latency", **record}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=500, help="timed items at batch 1 (and batched)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed batch-1 calls before the timings")
    ap.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[8, 32, 128],
                    help="comma-separated batch sizes for items/s (default 8,32,128; empty: none)")
    ap.add_argument("--train-rows", type=int, default=256, help="feature rows the heads are fitted on")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    ap.add_argument("--data", type=Path, default=MOSSBENCH, help="MOSSBench responses JSONL (default: shared)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()



    def cases(pairs):
        return [Case(id=str(n), images=(), question=q, response=r) for n, (q, r) in enumerate(pairs)]

    if args.threads:
        torch.set_num_threads(args.threads)
    pairs, source = load_texts(args.data.resolve(), args.train_rows + args.items + args.warmup, args.seed)
    train, warmup, items = (pairs[:args.train_rows], pairs[args.train_rows:args.train_rows + args.warmup],
                            pairs[args.train_rows + args.warmup:])
    with tempfile.TemporaryDirectory(prefix="misguard-bench-lite-") as work:
        t = time.perf_counter()
        encoder = TextEncoder()
        build_judge(Path(work) / "judge", encoder, train, args.seed)
        judge = LiteJudge(Path(work) / "judge", encoder=encoder)
        setup_s = time.perf_counter() - t
        body = encoder.max_tokens - 2
        tokens = [len(ids) for ids in encoder.tokenizer([r for _, r in items], add_special_tokens=False,
                                                        verbose=False)["input_ids"]]
        windows = [max(1, -(-n // body)) for n in tokens]
        emit({"setup": True, "texts": source, "items": len(items), "train_rows": len(train),
              "response_tokens": {"p50": float(np.percentile(tokens, 50)), "p99": float(np.percentile(tokens, 99)),
                                  "max": max(tokens), "share_windowed": round(sum(w > 1 for w in windows)
                                                                              / len(windows), 3)},
              "encoder": encoder.describe(), "packed_linears": getattr(encoder, "packed_linears", None),
              "setup_s": round(setup_s, 1),
              "cpu": cpu_name(), "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "numpy": np.__version__, "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"), "command": " ".join([Path(sys.executable).name, *sys.argv])})

        for question, response in warmup:
            judge.judge(cases([(question, response)]))
        before = load_1m()
        seconds = []
        for question, response in items:
            t = time.perf_counter()
            judge.judge(cases([(question, response)]))
            seconds.append(time.perf_counter() - t)
        by_windows = {}
        for count in sorted(set(windows)):
            chosen = [s for s, w in zip(seconds, windows) if w == count]
            by_windows[str(count)] = {"items": len(chosen), **percentiles_ms(chosen)}
        latency = percentiles_ms(seconds)
        emit({"batch_size": 1, "items": len(items), "latency_ms": latency,
              "latency_ms_by_response_windows": by_windows, "items_per_s": round(len(items) / sum(seconds), 2),
              "goal_p99_ms": GOAL_P99_MS_AT_1, "goal_met": latency["p99"] <= GOAL_P99_MS_AT_1,
              "load_1m": [before, load_1m()]})

        for size in args.batch_sizes:
            timed = (items * (size // len(items) + 1))[:max(size, len(items) // size * size)]
            judge.judge(cases(timed[:size]))  # warm-up
            before = load_1m()
            t = time.perf_counter()
            for start in range(0, len(timed), size):
                batch = timed[start:start + size]
                judge.judge(cases(batch))
            elapsed = time.perf_counter() - t
            emit({"batch_size": size, "items": len(timed), "items_per_s": round(len(timed) / elapsed, 2),
                  "ms_per_batch": round(elapsed / (len(timed) / size) * 1000, 1),
                  "load_1m": [before, load_1m()]})


if __name__ == "__main__":
    main()
