"""The cascade (lite judge first, VLM judge for the rest) against the VLM judge alone: the share escalated, the
agreement of the cascade's labels with the VLM judge's, and the time saved, for one or more cascade bands.

Runs `misguard score` on the same responses three ways (the VLM judge alone, then the cascade at each band; the
lite judge's own time is inside the cascade's) and `misguard agree` of each cascade's judgments against the VLM
judge's. Any responses, judges and MIS directory work; with no arguments it uses a `misguard demo` output folder:

    python bench/cascade.py --demo misguard-demo [--bands 0.1,0.9 0.02,0.98]
    python bench/cascade.py --responses runs/easy/*.jsonl --data /data/MIS --judge /models/judge \\
        --lite-judge /models/lite-judge [--engine vllm]

Prints one JSON line per band and a summary line (hardware, date, command).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from misguard.core.labels import LabelSource
from misguard.engines.base import EngineOptions
from misguard.mis.agree import AgreeConfig, run_agree
from misguard.mis.score import ScoreConfig, run_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, help="a `misguard demo` output folder (its responses, data and judges)")
    ap.add_argument("--responses", type=Path, nargs="*", default=[])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--judge", type=Path, help="the VLM judge folder")
    ap.add_argument("--lite-judge", type=Path, help="the lite judge folder (calibrated: the band reads its "
                                                      "calibrated p_unsafe)")
    ap.add_argument("--engine", default="transformers")
    ap.add_argument("--bands", nargs="+", default=["0.1,0.9", "0.02,0.98"])
    ap.add_argument("--out", type=Path, help="where the judgments go (default: a temporary folder)")
    args = ap.parse_args()



    if args.demo is not None:
        args.responses = args.responses or sorted((args.demo / "responses").glob("*/*.jsonl"))
        args.data = args.data or args.demo / "data"
        args.judge = args.judge or args.demo / "models" / "tiny-judge"
        args.lite_judge = args.lite_judge or args.demo / "models" / "lite-judge"
    if not (args.responses and args.data and args.judge and args.lite_judge):
        ap.error("give --demo, or --responses, --data, --judge and --lite-judge")
    out = args.out or Path(tempfile.mkdtemp(prefix="misguard-bench-cascade-"))
    options = EngineOptions(dtype="float32" if not torch.cuda.is_available() else "auto")

    def score(name: str, **kwargs):
        started = time.perf_counter()
        result = run_score(ScoreConfig(responses=list(args.responses), judge=args.judge, data=args.data,
                                       out=out / name, engine=args.engine, engine_options=options, n_bootstrap=10,
                                       **kwargs), progress=False)
        return result, time.perf_counter() - started

    vlm, vlm_seconds = score("vlm-alone")
    rows = []
    for band in args.bands:
        cascade, seconds = score(f"cascade-{band}", lite_judge=args.lite_judge, cascade_band=band)
        agreement = run_agree(AgreeConfig(judgments=LabelSource(cascade.judgments_path),
                                          reference=LabelSource(vlm.judgments_path),
                                          out=out / f"agree-{band}", n_bootstrap=200)).report
        overall = agreement["judge_vs_reference"]["overall"]
        row = {"bench": "cascade", "band": band, "responses": cascade.total, **cascade.cascade,
               "safety_vs_vlm_alone": {k: overall["safety"].get(k) for k in ("kappa", "accuracy")},
               "perception_accuracy_vs_vlm_alone": (overall.get("perception") or {}).get("accuracy"),
               "seconds": round(seconds, 2), "vlm_alone_seconds": round(vlm_seconds, 2),
               "time_saved": round(1 - seconds / vlm_seconds, 3)}
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"bench": "cascade", "summary": True, "rows": len(rows), "judgments": str(out),
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                      "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", *sys.argv])}))


if __name__ == "__main__":
    main()
