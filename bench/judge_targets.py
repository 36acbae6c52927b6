"""K target models per item: `misguard score` judgments/s with and without prefix reuse.

The judge prompt puts the two images, the rubric and the question first and the response last, so the K target
models' responses to one item share a long prefix. With prefix reuse (the default) the transformers engine runs
that prefix (vision tower + prefix tokens) once per item and only each response's tail after it
(engines/prefix.py). This times `run_score` end to end (data loading, the join of responses to items,
judging, writing judgments and metrics) on K responses files, one per target model:
  - K = 1 with reuse (nothing to share: the per-judgment baseline),
  - each K in --targets with reuse, and the largest K without it (on --plain-items items at most).

CPU (tiny model):   python bench/judge_targets.py --size tiny --items 24 --targets 1,7
GPU (H100):         python bench/judge_targets.py --size 7b --items 200 --targets 1,7 --plain-items 100
End to end (H100):  python bench/judge_targets.py --size 7b --items 2285 --targets 7 --plain-items 0
Full-size shapes are random-init (no weights can be downloaded): only speed is meaningful. Items are MIS-sized:
two 504 px images and a target response of about 90-150 tokens. Prints one JSON line per run and a summary.
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

from bench.infer_throughput import bench_data, build_model  # noqa: E402
from bench.judge_throughput import H100_ROOFLINE, RESPONSE  # noqa: E402
from misguard.core.jsonl import write_jsonl_atomic
from misguard.core.records import Response
from misguard.core.splits import load_split
from misguard.engines import EngineOptions, load_engine
from misguard.judges.vlm import VLMJudge, make_judge_folder
from misguard.mis.score import ScoreConfig, run_score


def target_response(k: int) -> str:
    """Target model k's response: RESPONSE's sentences rotated by k and cut to 3-5 of them, so the K responses
    to an item differ in words and length, as real target models' do."""
    sentences = [s.strip() + "." for s in RESPONSE.split(".") if s.strip()]
    rotated = sentences[k % len(sentences):] + sentences[:k % len(sentences)]
    return " ".join(rotated[:3 + k % 3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "2b", "7b"], default="tiny")
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--targets", default="1,7", help="comma-separated K values (target models per item)")
    ap.add_argument("--plain-items", type=int, default=None,
                    help="items for the run without reuse at the largest K (default: all; 0: skip it)")
    ap.add_argument("--batch-size", type=int, default=None, help="the engine's batch size (default: automatic)")
    args = ap.parse_args()
    targets = sorted({int(k) for k in args.targets.split(",")})



    work = Path(tempfile.mkdtemp(prefix="misguard-bench-targets-"))
    t = time.perf_counter()
    data = bench_data(work / "data", args.items, args.size)
    model = build_model(args.size, work / "judge")
    make_judge_folder(model, judge_id=f"bench-{args.size}")
    print(f"# data and model built in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    items = load_split(data, "easy").items
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    roofline = H100_ROOFLINE.get(args.size) if "H100" in device else None

    def responses_files(k: int, n_items: int) -> list[Path]:
        files = []
        for m in range(k):
            path = work / f"responses-{n_items}" / f"target-{m}.jsonl"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                write_jsonl_atomic(path, [Response(**item.model_dump(), response=target_response(m),
                                                   model=f"target-{m}") for item in items[:n_items]])
            files.append(path)
        return files

    engines = {reuse: load_engine("transformers", str(model), EngineOptions(batch_size=args.batch_size,
                                                                            prefix_reuse=reuse))
               for reuse in (True, False)}
    runs = [(k, True, args.items) for k in sorted({1, *targets})]
    plain_items = args.items if args.plain_items is None else min(args.plain_items, args.items)
    if plain_items:
        runs.append((targets[-1], False, plain_items))
    rates = {}
    for k, reuse, n_items in runs:
        judge = VLMJudge(model, engine_instance=engines[reuse])
        files = responses_files(k, n_items)
        warm = responses_files(1, 2)  # kernels and allocator warmed outside the timing
        run_score(ScoreConfig(responses=warm, judge=model, data=data, out=work / f"warm-{k}-{reuse}",
                              n_bootstrap=0), progress=False, judge=judge)
        sync()
        t = time.perf_counter()
        result = run_score(ScoreConfig(responses=files, judge=model, data=data, out=work / f"scores-{k}-{reuse}",
                                       n_bootstrap=0), progress=False, judge=judge)
        sync()
        seconds = time.perf_counter() - t
        rates[(k, reuse)] = result.judged / seconds
        print(json.dumps({
            "bench": "judge_targets", "size": args.size, "targets": k, "prefix_reuse": reuse, "items": n_items,
            "judgments": result.judged, "seconds": round(seconds, 2),
            "judgments_per_s": round(rates[(k, reuse)], 3),
            "items_per_s_share_of_h100_roofline": round(rates[(k, reuse)] / roofline, 3) if roofline else None,
            "batch_size": engines[reuse].batch_size, "device": device, "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d")}))
    base = rates[(1, True)]
    summary = {f"K={k} vs K=1 per judgment": round(rates[(k, True)] / base, 2) for k in targets if k != 1}
    if (targets[-1], False) in rates:
        summary[f"K={targets[-1]} reuse vs plain"] = round(rates[(targets[-1], True)] / rates[(targets[-1], False)],
                                                           2)
    print(json.dumps({"bench": "judge_targets", "summary": summary}))


if __name__ == "__main__":
    main()
