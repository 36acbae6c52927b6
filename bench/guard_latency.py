"""`misguard serve`: the latency the guard adds (p50/p99) and its requests/s at 1, 8 and 64 concurrent clients.

One process runs three things: a replay upstream (guard.server.replay, an OpenAI-compatible stub that answers
at once with a fixed MIS-length response), the guard in front of it (create_app(GuardService(Guard(judge,
policy), stub/v1)), both served by uvicorn on threads (running_server), and an async HTTP client (httpx) with
one worker per concurrent client. Every request is an MIS-shaped chat completion: two base64 images and an
MIS question (the generated images are flat few-KiB PNGs; --photo-like sends noisy JPEGs of a real photo's
size, which costs the guard more per request to decode and hash but the judge the same). At each concurrency
level the same request bodies are sent first straight to the stub, then
through the guard; the added latency is guarded minus direct, at p50 and at p99 (a difference of percentiles,
not a percentile of differences). Both rails are on and judge every request: the policy's thresholds are 1.0,
so a random-weight judge never blocks at the input rail (which would skip the upstream and the output rail).
Every guarded answer must be HTTP 200 with the `misguard` field, decision "allow" and both rails "ok"; any
other answer is counted as an error and the script exits 1.

CPU (tiny model):   python bench/guard_latency.py --size tiny --requests 200 --concurrency 1,8,64
GPU (H100):         python bench/guard_latency.py --size 7b --requests 200 --concurrency 1,8,64
Full-size shapes are random-init (no weights can be downloaded): only speed is meaningful. --size 2b|7b builds
the published Qwen2-VL-2B/7B shapes in bf16 on the GPU (bench/infer_throughput.py's build_model) and resizes
every image to 504 px (324 visual tokens each, an MIS image's size); the device is cuda when one is present.
Goal (issue 6), H100 with the 7B shape: <= 60 ms added at p50 at concurrency 1, >= 20 requests/s at 64.

The client, the stub and the guard share one Python process (and its GIL) with the judge's thread: on a machine
with few CPU cores (the project's CPU machine has 2) the figures are relative ones, and the client's own cost
is in both the direct and the guarded latency. Prints one JSON line per concurrency level, then a summary line
with the hardware, the date and the arguments.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import io

import httpx
import numpy as np
import torch
import transformers
from PIL import Image

from bench.hardware import cpu_name  # noqa: E402
from bench.infer_throughput import bench_data, build_model, mis_sized_images  # noqa: E402
from bench.judge_throughput import RESPONSE  # noqa: E402
from misguard.core.splits import load_split
from misguard.engines import EngineOptions
from misguard.guard.policy import Batching, Policy, RailPolicy
from misguard.guard.rails import Guard
from misguard.guard.server.app import create_app, running_server
from misguard.guard.server.replay import replay_app
from misguard.guard.server.service import GuardService
from misguard.judges.vlm import make_judge_folder

# Issue 6's goals, for the 7B shape on an H100.
GOAL_ADDED_P50_MS_AT_1 = 60.0
GOAL_REQUESTS_PER_S_AT_64 = 20.0


def request_bodies(data: Path, n: int, *, photo_like: bool = False) -> list[bytes]:
    """n distinct MIS-shaped chat completion bodies (JSON bytes): two base64 images and the question. The
    generated images are flat shapes whose PNGs are a few KiB; with `photo_like` each gets seeded pixel noise
    and is sent as a JPEG (quality 90), about the size of an MIS photo, so the guard's own per-request work
    (base64, decoding, hashing, JSON of a large body) is of a real request's size."""
    split = load_split(data, "easy")
    bodies = []
    for index, item in enumerate(split.items[:n]):
        content: list[dict[str, Any]] = []
        for side, path in enumerate(split.image_paths(item)):
            if photo_like:
                url = "data:image/jpeg;base64," + base64.b64encode(_photo_like(path, seed=2 * index + side)).decode()
            else:
                url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": item.question})
        bodies.append(json.dumps({"model": "target", "messages": [{"role": "user", "content": content}],
                                  "max_tokens": 256, "temperature": 0}).encode())
    return bodies


def _photo_like(path: Path, *, seed: int) -> bytes:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    noise = np.random.default_rng(seed).normal(0.0, 24.0, pixels.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


async def send_all(client, url: str, bodies: list[bytes], n: int, concurrency: int, *,
                   guarded: bool) -> tuple[list[float], float, list[str], list[dict[str, Any]]]:
    """Send n requests (cycling over `bodies`) with `concurrency` workers. Returns (latencies in s, wall
    seconds, error descriptions, the `misguard` fields of the guarded answers)."""
    latencies: list[float] = []
    errors: list[str] = []
    extensions: list[dict[str, Any]] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < n:
            i = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                response = await client.post(url, content=bodies[i % len(bodies)],
                                             headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:  # a transport failure or timeout: an error of the run, reported
                errors.append(f"request {i}: {exc.__class__.__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - started)
            problem = check_answer(response, guarded, extensions)
            if problem:
                errors.append(f"request {i}: {problem}")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started, errors, extensions


def check_answer(response, guarded: bool, extensions: list[dict[str, Any]]) -> str | None:
    """Why the answer is not a good one (None when it is): HTTP 200, a chat completion, and through the guard
    the `misguard` field with decision allow and both rails judged."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    try:
        body = response.json()
        body["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return f"not a chat completion: {response.text[:300]}"
    if not guarded:
        return None
    extension = body.get("misguard")
    if not isinstance(extension, dict):
        return "no misguard field in the answer"
    extensions.append(extension)
    rails = extension.get("rails") or {}
    statuses = {rail: (rails.get(rail) or {}).get("status") for rail in ("input", "output")}
    if extension.get("decision") != "allow" or any(s != "ok" for s in statuses.values()):
        return f"decision {extension.get('decision')!r}, rails {statuses}"
    return None


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 2) if values else None


def metric_sums(text: str, name: str) -> tuple[float, float]:
    """(sum, count) of a label-less Prometheus histogram in /metrics' text."""
    found = {}
    for line in text.splitlines():
        for suffix in ("_sum", "_count"):
            if line.startswith(f"{name}{suffix} "):
                found[suffix] = float(line.split()[1])
    return found.get("_sum", 0.0), found.get("_count", 0.0)


async def run_levels(args, stub_url: str, guard_url: str, bodies: list[bytes]) -> list[dict[str, Any]]:
    levels = []
    limits = httpx.Limits(max_connections=max(args.concurrency) + 8,
                          max_keepalive_connections=max(args.concurrency) + 8)
    async with httpx.AsyncClient(timeout=600.0, limits=limits) as client:
        for concurrency in args.concurrency:
            stub = f"{stub_url}/v1/chat/completions"
            guard = f"{guard_url}/v1/chat/completions"
            if args.warmup:  # connections, kernels, allocator: outside the timings, for both
                for url, guarded in ((stub, False), (guard, True)):
                    _, _, errors, _ = await send_all(client, url, bodies, args.warmup, concurrency, guarded=guarded)
                    fail_on(errors, f"warm-up at concurrency {concurrency}")
            direct, direct_s, errors, _ = await send_all(client, stub, bodies, args.requests, concurrency,
                                                         guarded=False)
            fail_on(errors, f"direct requests at concurrency {concurrency}")
            before = (await client.get(f"{guard_url}/metrics")).text
            guarded, guarded_s, errors, extensions = await send_all(client, guard, bodies, args.requests,
                                                                    concurrency, guarded=True)
            after = (await client.get(f"{guard_url}/metrics")).text
            size_sum, batches = (a - b for a, b in zip(metric_sums(after, "misguard_judge_batch_size"),
                                                       metric_sums(before, "misguard_judge_batch_size")))
            batch_s, _ = (a - b for a, b in zip(metric_sums(after, "misguard_judge_batch_seconds"),
                                                metric_sums(before, "misguard_judge_batch_seconds")))
            rail_ms = {rail: [e["rails"][rail]["latency_ms"] / 1000 for e in extensions
                              if (e.get("rails") or {}).get(rail, {}).get("latency_ms") is not None]
                       for rail in ("input", "output")}
            level = {
                "bench": "guard_latency", "size": args.size, "concurrency": concurrency,
                "requests": args.requests, "errors": len(errors),
                "direct_ms": {"p50": percentile_ms(direct, 50), "p99": percentile_ms(direct, 99)},
                "guarded_ms": {"p50": percentile_ms(guarded, 50), "p99": percentile_ms(guarded, 99)},
                "added_ms": {"p50": _minus(percentile_ms(guarded, 50), percentile_ms(direct, 50)),
                             "p99": _minus(percentile_ms(guarded, 99), percentile_ms(direct, 99))},
                "guarded_requests_per_s": round(len(guarded) / guarded_s, 2),
                "direct_requests_per_s": round(len(direct) / direct_s, 2),
                "judge_batches": int(batches),
                "judge_mean_batch_size": round(size_sum / batches, 2) if batches else None,
                "judge_batch_ms_mean": round(batch_s / batches * 1000, 2) if batches else None,
                # From submission to verdict, queueing in the micro-batcher included (the verdicts' latency_ms).
                "rail_ms_p50": {rail: percentile_ms(values, 50) for rail, values in rail_ms.items()},
            }
            print(json.dumps(level), flush=True)
            fail_on(errors, f"guarded requests at concurrency {concurrency}")
            levels.append(level)
    return levels


def _minus(a: float | None, b: float | None) -> float | None:
    return round(a - b, 2) if a is not None and b is not None else None


def fail_on(errors: list[str], what: str) -> None:
    if errors:
        shown = "\n  ".join(errors[:5])
        raise SystemExit(f"guard_latency: {len(errors)} failed answers in {what}; the first:\n  {shown}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=["tiny", "2b", "7b"], default="tiny")
    ap.add_argument("--requests", type=int, default=200, help="timed requests per concurrency level (and path)")
    ap.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 64],
                    help="comma-separated concurrent clients, one level each (default 1,8,64)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="the policy's batching.max_batch_size")
    ap.add_argument("--max-wait-ms", type=float, default=5.0, help="the policy's batching.max_wait_ms")
    ap.add_argument("--image-size", type=int, default=None,
                    help="resize every image to this many px square (default: 504 for 2b/7b, the generated "
                         "224-448 px for tiny)")
    ap.add_argument("--photo-like", action="store_true",
                    help="send noisy JPEGs of an MIS photo's size instead of the generated few-KiB PNGs")
    ap.add_argument("--items", type=int, default=64, help="distinct request bodies, cycled over")
    ap.add_argument("--warmup", type=int, default=8, help="untimed requests per level and path before the timings")
    args = ap.parse_args()



    # Removed at the end: a 7B judge folder is 15 GiB of random weights.
    work = Path(tempfile.mkdtemp(prefix="misguard-bench-guard-"))
    try:
        data = bench_data(work / "data", args.items, args.size)
        if args.image_size:
            mis_sized_images(data, args.image_size)
        bodies = request_bodies(data, args.items, photo_like=args.photo_like)
        model = build_model(args.size, work / "judge")
        make_judge_folder(model, judge_id=f"bench-{args.size}")

        # Thresholds 1.0: both rails judge every request and none blocks (see the docstring).
        policy = Policy(input_rail=RailPolicy(threshold=1.0), output_rail=RailPolicy(threshold=1.0),
                        batching=Batching(max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms))
        # As `misguard serve` does (guard/server/loading.py): the engine's batch is the policy's micro-batch.
        guard = Guard(model, policy, options=EngineOptions(batch_size=args.max_batch_size))
        with running_server(replay_app(lambda body: RESPONSE)) as stub_url:
            service = GuardService(guard, f"{stub_url}/v1")
            with running_server(create_app(service)) as guard_url:
                levels = asyncio.run(run_levels(args, stub_url, guard_url, bodies))
        guard.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    by_level = {level["concurrency"]: level for level in levels}
    goals = None
    if args.size == "7b" and torch.cuda.is_available() and 1 in by_level and 64 in by_level:
        goals = {"added_p50_ms_at_1": by_level[1]["added_ms"]["p50"], "goal_added_p50_ms_at_1": GOAL_ADDED_P50_MS_AT_1,
                 "requests_per_s_at_64": by_level[64]["guarded_requests_per_s"],
                 "goal_requests_per_s_at_64": GOAL_REQUESTS_PER_S_AT_64}
        goals["met"] = (goals["added_p50_ms_at_1"] <= GOAL_ADDED_P50_MS_AT_1
                        and goals["requests_per_s_at_64"] >= GOAL_REQUESTS_PER_S_AT_64)
    print(json.dumps({
        "bench": "guard_latency", "summary": True, "size": args.size,
        "levels": [{k: level[k] for k in ("concurrency", "added_ms", "guarded_ms", "direct_ms",
                                          "guarded_requests_per_s", "judge_mean_batch_size")} for level in levels],
        "goals": goals, "request_body_kib_mean": round(sum(map(len, bodies)) / len(bodies) / 1024, 1),
        "args": vars(args), "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
    }), flush=True)


if __name__ == "__main__":
    main()
