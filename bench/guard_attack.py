"""Issue 21's guard figures: its memory under the image attack, and its latency under load, with a lite judge.

One process runs a replay upstream (guard.server.replay: an OpenAI-compatible stub answering at once with a fixed
MIS-length response), the guard in front of it (create_app(GuardService(Guard(lite judge, policy), stub/v1)),
both served by uvicorn on threads (running_server), and an async HTTP client (httpx). The policy is the default
one, limits included, except that nothing blocks (as in bench/guard_latency.py: thresholds 1.0, out-of-domain
verdicts allowed), so every answer goes the whole way, upstream and output rail. The judge is a lite judge
(the cross-encoder, CPU) fine-tuned for one epoch on --train-rows Safe-RLHF mini rows by the shipped trainer
(bench/lite_latency.py's quick_judge) and cached under the checkout's bench-results/guard-attack/; only speed
and memory are measured, which do not depend on its weights. It reads no requests, so only the output rail
judges; the input rail is on in the policy and skipped by the guard.

- attack: --attack-concurrency requests sent at once, each with four 4000x4000 1-bit PNGs as data URLs (about
  11 KB a request, inside the default pixel limit of 4096*4096), --rounds times. Per round: the process's RSS
  before, its peak during the burst (VmRSS sampled every 10 ms on a thread, and VmHWM, reset before the burst
  through /proc/self/clear_refs), and its RSS --settle-s seconds after the last answer (nothing collected or
  trimmed: what a real server would hold). After the last round, the RSS after glibc's malloc_trim(0) too,
  labelled as such. Status codes and error codes counted (a 413 or 429 is an answer, not a failure).
- load: --requests MIS-shaped requests (two small generated images and an MIS question, bench/guard_latency.py's
  request bodies) from --concurrency workers, after --warmup untimed ones: p50/p99 latency of the answers,
  requests/s, status codes and the guard's decisions counted, peak RSS as above.

The misguard imported is the one first on the path, so the same script measures an older checkout:

    .venv-test/bin/python bench/guard_attack.py --out bench-results/guard-attack/after.json
    cd /tmp/before && PYTHONPATH=/tmp/before /work/main/.venv-test/bin/python /work/main/bench/guard_attack.py \\
        --out /work/main/bench-results/guard-attack/before.json

Prints one JSON line per phase, each with the 1-minute load average before and after it (the project's CPU
machine has 2 cores shared with other processes), then a summary line with the checkout, hardware, date and
command; --out writes all of them to one JSON file. The client shares the process (and its GIL) with the guard
and the judge: its own memory is in the figures, and is small (the attack's bodies are 11 KB each).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import ctypes
import ctypes.util
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

# First, before this script's repository joins the path: PYTHONPATH's checkout (an older one) is what is measured.
import misguard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.guard_latency import metric_sums, percentile_ms, request_bodies  # noqa: E402
from bench.hardware import cpu_name  # noqa: E402
from bench.infer_throughput import bench_data  # noqa: E402
from bench.judge_throughput import RESPONSE  # noqa: E402
from bench.lite_latency import quick_judge  # noqa: E402
from misguard.guard.policy import Policy, RailPolicy  # noqa: E402
from misguard.guard.rails import Guard  # noqa: E402
from misguard.guard.server.app import create_app, running_server  # noqa: E402
from misguard.guard.server.replay import replay_app  # noqa: E402
from misguard.guard.server.service import GuardService  # noqa: E402

CHECKOUT = Path(misguard.__file__).resolve().parents[1]
ATTACK_SIDE = 4000  # px: 16,000,000 pixels, under the default limits.max_image_pixels (4096 * 4096)
ATTACK_IMAGES = 4  # per request: the default limits.max_images
MIB = 2**20


# ---- this process's memory ----

def memory_kib() -> dict[str, int]:
    """This process's VmRSS and VmHWM in KiB, from /proc/self/status."""
    text = Path("/proc/self/status").read_text()
    return {key: int(value) for key, value in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", text, re.M)}


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux's clear_refs 5). Returns whether the kernel allowed it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def malloc_trim() -> bool:
    """Return glibc's free heap pages to the system (malloc_trim(0)). Returns False where there is no glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


def mib(kib: int) -> float:
    return round(kib / 1024, 1)


class PeakSampler:
    """The highest VmRSS seen while the `with` block runs, sampled every `interval_s` on a thread (VmHWM, reset on
    entry, catches what falls between samples)."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s = interval_s
        self.peak_kib = 0
        self.samples = 0
        self.hwm_reset = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, memory_kib()["VmRSS"])
            self.samples += 1
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakSampler:
        self.hwm_reset = reset_peak()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kib = max(self.peak_kib, memory_kib()["VmRSS"])

    def figures(self) -> dict[str, Any]:
        """Peak RSS (sampled) and VmHWM in MiB; VmHWM is the peak since the reset only where the reset worked."""
        return {"peak_rss_mib": mib(self.peak_kib), "vm_hwm_mib": mib(memory_kib()["VmHWM"]),
                "vm_hwm_reset": self.hwm_reset, "rss_samples": self.samples}


# ---- requests ----

def attack_png(seed: int) -> bytes:
    """A 4000x4000 1-bit PNG of about 2 KB: black, with 16 seeded white pixels so that no two are the same."""
    image = Image.new("1", (ATTACK_SIDE, ATTACK_SIDE))
    for x, y in np.random.default_rng(seed).integers(0, ATTACK_SIDE, (16, 2)):
        image.putpixel((int(x), int(y)), 1)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def attack_bodies(n: int) -> list[bytes]:
    """n chat completion bodies (JSON bytes), each with ATTACK_IMAGES distinct attack PNGs and a question."""
    bodies = []
    for i in range(n):
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                       + base64.b64encode(attack_png(ATTACK_IMAGES * i + k)).decode()}}
            for k in range(ATTACK_IMAGES)]
        content.append({"type": "text", "text": "What do these pictures show?"})
        bodies.append(json.dumps({"model": "target", "messages": [{"role": "user", "content": content}],
                                  "max_tokens": 256, "temperature": 0}).encode())
    return bodies


class Answers:
    """What came back for a set of requests: latencies, status codes, error codes and the guard's decisions."""

    def __init__(self):
        self.latencies: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.error_codes: Counter[str] = Counter()
        self.decisions: Counter[str] = Counter()

    def add(self, response: httpx.Response, seconds: float) -> None:
        self.latencies.append(seconds)
        self.statuses[str(response.status_code)] += 1
        try:
            body = response.json()
        except ValueError:
            return
        if not isinstance(body, dict):
            return
        if isinstance(body.get("error"), dict):
            self.error_codes[str(body["error"].get("code") or body["error"].get("type"))] += 1
        extension = body.get("misguard")
        if isinstance(extension, dict):
            self.decisions[str(extension.get("decision"))] += 1

    def failed(self, exc: Exception) -> None:
        """A transport failure or client timeout: counted under its class name, no latency."""
        self.statuses[f"transport:{exc.__class__.__name__}"] += 1

    def figures(self) -> dict[str, Any]:
        return {"statuses": dict(sorted(self.statuses.items())), "error_codes": dict(sorted(self.error_codes.items())),
                "decisions": dict(sorted(self.decisions.items())),
                "latency_ms": {"p50": percentile_ms(self.latencies, 50), "p99": percentile_ms(self.latencies, 99),
                               "max": percentile_ms(self.latencies, 100)}}


async def send(client: httpx.AsyncClient, url: str, bodies: list[bytes], n: int, concurrency: int) -> Answers:
    """n requests (cycling over `bodies`) from `concurrency` workers; every answer counted, none refused."""
    answers = Answers()
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
            except httpx.HTTPError as exc:
                answers.failed(exc)
                continue
            answers.add(response, time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return answers


# ---- phases ----

def load_1m() -> float:
    return round(os.getloadavg()[0], 2)


async def attack_phase(args, client: httpx.AsyncClient, url: str) -> dict[str, Any]:
    bodies = attack_bodies(args.attack_concurrency)
    started = time.perf_counter()
    loads = [load_1m()]
    rounds = []
    for index in range(args.rounds):
        before = memory_kib()["VmRSS"]
        with PeakSampler() as sampler:
            burst_started = time.perf_counter()
            answers = await send(client, url, bodies, len(bodies), len(bodies))
            burst_s = time.perf_counter() - burst_started
        # What the guard still holds once the burst is over: no gc.collect, no trim, as a real server would.
        await asyncio.sleep(args.settle_s)
        rounds.append({"round": index, "rss_before_mib": mib(before), **sampler.figures(),
                       f"rss_after_{args.settle_s:g}s_mib": mib(memory_kib()["VmRSS"]),
                       "burst_s": round(burst_s, 2), **answers.figures()})
    trimmed = malloc_trim()
    loads.append(load_1m())
    peak = max(r["peak_rss_mib"] for r in rounds)
    return {"bench": "guard_attack", "phase": "attack", "concurrency": args.attack_concurrency,
            "images_per_request": ATTACK_IMAGES, "image_px": f"{ATTACK_SIDE}x{ATTACK_SIDE}", "image_mode": "1",
            "request_body_kib_mean": round(sum(map(len, bodies)) / len(bodies) / 1024, 1),
            "rss_before_mib": rounds[0]["rss_before_mib"], "peak_rss_mib": peak,
            "peak_rss_added_mib": round(peak - rounds[0]["rss_before_mib"], 1),
            f"rss_after_{args.settle_s:g}s_mib": rounds[-1][f"rss_after_{args.settle_s:g}s_mib"],
            "rss_after_malloc_trim_mib": mib(memory_kib()["VmRSS"]) if trimmed else None,
            "statuses": dict(sum((Counter(r["statuses"]) for r in rounds), Counter())),
            "rounds": rounds, "seconds": round(time.perf_counter() - started, 1), "load_1m": loads}


async def load_phase(args, client: httpx.AsyncClient, url: str, bodies: list[bytes]) -> dict[str, Any]:
    started = time.perf_counter()
    if args.warmup:
        await send(client, url, bodies, args.warmup, args.concurrency)
    loads = [load_1m()]
    metrics_url = url.replace("/v1/chat/completions", "/metrics")
    metrics_before = (await client.get(metrics_url)).text
    before = memory_kib()["VmRSS"]
    with PeakSampler() as sampler:
        timed_started = time.perf_counter()
        answers = await send(client, url, bodies, args.requests, args.concurrency)
        wall_s = time.perf_counter() - timed_started
    loads.append(load_1m())
    metrics_after = (await client.get(metrics_url)).text
    # The judge's share of the wall time says whether the judge or the rest of the guard is the bottleneck.
    size_sum, batches = (a - b for a, b in zip(metric_sums(metrics_after, "misguard_judge_batch_size"),
                                               metric_sums(metrics_before, "misguard_judge_batch_size")))
    batch_s, _ = (a - b for a, b in zip(metric_sums(metrics_after, "misguard_judge_batch_seconds"),
                                        metric_sums(metrics_before, "misguard_judge_batch_seconds")))
    judge = {"judge_batches": int(batches), "judge_mean_batch_size": round(size_sum / batches, 2) if batches else None,
             "judge_batch_ms_mean": round(batch_s / batches * 1000, 2) if batches else None,
             "judge_busy_share": round(batch_s / wall_s, 3)}
    return {"bench": "guard_attack", "phase": "load", "requests": args.requests, "concurrency": args.concurrency,
            "images_per_request": 2, "request_body_kib_mean": round(sum(map(len, bodies)) / len(bodies) / 1024, 1),
            **answers.figures(), "requests_per_s": round(len(answers.latencies) / wall_s, 2), **judge,
            "rss_before_mib": mib(before), **sampler.figures(), "timed_s": round(wall_s, 1),
            "seconds": round(time.perf_counter() - started, 1), "load_1m": loads}


async def run_phases(args, guard_url: str, load_bodies: list[bytes]) -> list[dict[str, Any]]:
    widest = max(args.concurrency, args.attack_concurrency) + 8
    url = f"{guard_url}/v1/chat/completions"
    phases = []
    async with httpx.AsyncClient(timeout=600.0, limits=httpx.Limits(max_connections=widest,
                                                                    max_keepalive_connections=widest)) as client:
        # The judge's first passes and the connections, before any figure: the baseline is a warm server's.
        await send(client, url, load_bodies, max(args.warmup, 1), min(args.concurrency, 8))
        for phase in args.phases:
            record = (await attack_phase(args, client, url) if phase == "attack"
                      else await load_phase(args, client, url, load_bodies))
            print(json.dumps(record), flush=True)
            phases.append(record)
    return phases


# ---- setup ----

def lite_judge(folder: Path | None, rows: int, seed: int) -> tuple[Path, str]:
    """(a lite judge folder, where it came from): `folder` as given, else the checkout's cached quick judge,
    trained in a child process (into a temporary folder, then moved into place) when there is none yet. Raises
    SystemExit when the training fails."""
    if folder is not None:
        return folder, "given"
    cached = CHECKOUT / "bench-results" / "guard-attack" / f"lite-judge-{rows}rows-seed{seed}"
    if (cached / "judge.json").is_file():
        return cached, "cached"
    cached.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="lite-judge-", dir=cached.parent))
    try:
        # In a child process: training's memory would otherwise stay in this process's RSS, the baseline.
        child = multiprocessing.get_context("spawn").Process(target=quick_judge, args=(work / "judge", rows, seed))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"guard_attack: training the lite judge failed (exit code {child.exitcode})")
        (work / "judge").rename(cached)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return cached, "trained"


def checkout_state() -> dict[str, Any]:
    """The checkout whose misguard ran: its path, commit and whether its tracked files differ from the commit."""
    def git(*argv: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(CHECKOUT), *argv], capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {"misguard": str(Path(misguard.__file__).resolve()), "commit": git("rev-parse", "--short", "HEAD"),
            "modified_files": None if status is None else len(status.splitlines())}


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return Path("/proc/loadavg").read_text().strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000, help="timed requests in the load phase")
    ap.add_argument("--concurrency", type=int, default=64, help="concurrent clients in the load phase")
    ap.add_argument("--rounds", type=int, default=3, help="bursts in the attack phase")
    ap.add_argument("--attack-concurrency", type=int, default=16, help="requests in one attack burst, sent at once")
    ap.add_argument("--settle-s", type=float, default=5.0, help="wait after a burst before its RSS is read")
    ap.add_argument("--phases", type=lambda s: s.split(","), default=["attack", "load"],
                    help="comma-separated, run in order (default attack,load: the attack from a warm, unloaded guard)")
    ap.add_argument("--items", type=int, default=64, help="distinct load request bodies, cycled over")
    ap.add_argument("--warmup", type=int, default=16, help="untimed requests before the phases and the load timing")
    ap.add_argument("--judge", type=Path, default=None, help="a lite judge folder (default: the cached quick one)")
    ap.add_argument("--train-rows", type=int, default=64, help="Safe-RLHF mini rows the quick judge is trained on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="write the phases and the summary to this JSON file")
    args = ap.parse_args()
    unknown = set(args.phases) - {"attack", "load"}
    if unknown:
        ap.error(f"--phases: unknown {', '.join(sorted(unknown))} (attack, load)")

    setup_started = time.perf_counter()
    folder, judge_source = lite_judge(args.judge, args.train_rows, args.seed)
    work = Path(tempfile.mkdtemp(prefix="misguard-bench-attack-"))
    try:
        load_bodies = request_bodies(bench_data(work / "data", args.items, "tiny"), args.items)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Default limits; thresholds 1.0 and out-of-domain allowed, so a verdict never cuts a request short.
    guard = Guard(folder, Policy(input_rail=RailPolicy(threshold=1.0), output_rail=RailPolicy(threshold=1.0),
                                 on_out_of_domain="allow"))
    setup_s = time.perf_counter() - setup_started
    uptime_before = uptime()
    with running_server(replay_app(lambda body: RESPONSE)) as stub_url:
        with running_server(create_app(GuardService(guard, f"{stub_url}/v1"))) as guard_url:
            phases = asyncio.run(run_phases(args, guard_url, load_bodies))
    guard.close()

    summary = {
        "bench": "guard_attack", "summary": True, **checkout_state(),
        "judge": {"folder": str(folder), "source": judge_source, "id": guard.judge_id,
                  "rails": {rail: guard.enabled(rail) for rail in ("input", "output")}},
        "setup_s": round(setup_s, 1), "uptime": {"before": uptime_before, "after": uptime()},
        "cpu": f"{cpu_name()} ({os.cpu_count()} cores)", "cores_usable": len(os.sched_getaffinity(0)),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "cwd": os.getcwd(),
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"phases": phases, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
