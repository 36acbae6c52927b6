"""Helpers for the guard server's tests: a guard on a thread in front of an upstream, image data URLs, a peer that
accepts connections and never answers, a judge that gives one fixed score, and reading Prometheus metrics."""
from __future__ import annotations

import base64
import io
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from misguard.guard.policy import Policy
from misguard.guard.rails import Guard
from misguard.guard.server.app import create_app, running_server
from misguard.guard.server.service import GuardService
from misguard.judges import Assessment, Judge
from misguard.judges.protocol import JudgeBase


@contextmanager
def guarded(judge: Judge, upstream_url: str, policy: Policy | None = None, *,
            api_key: str | None = None) -> Iterator[tuple[str, GuardService]]:
    """(guard base URL ending in /v1, its service) for a guard with `policy` in front of `upstream_url`."""
    service = GuardService(Guard(judge, policy or Policy()), upstream_url)
    with running_server(create_app(service, api_key=api_key)) as url:
        yield f"{url}/v1", service


class FixedScoreJudge(JudgeBase):
    """A judge of the Judge protocol that gives every case the same p_unsafe, as it comes: for what the guard
    makes of a score itself (NaN, infinity, out of range), without a model in the way. Counts its calls."""

    def __init__(self, p_unsafe: float, *, judge_id: str = "fixed-score", trust: float | None = None):
        self.p_unsafe = p_unsafe
        self.trust = trust
        self.calls = 0
        self._id = judge_id

    id = property(lambda self: self._id)
    template = property(lambda self: "fixed-score-v1")
    calibration_id = property(lambda self: None)
    unsafe_threshold = property(lambda self: 0.5)
    reads_requests = property(lambda self: True)
    has_perception = property(lambda self: False)

    def judge(self, cases):
        self.calls += 1
        # The label a careless judge would derive: NaN >= 0.5 is False, so "Safe".
        label = "Unsafe" if self.p_unsafe >= 0.5 else "Safe"
        return [Assessment(judge=self.id, template=self.template, status="scored", label=label,
                           p_unsafe=self.p_unsafe, p_unsafe_raw=self.p_unsafe, trust=self.trust) for _ in cases]

    def describe(self):
        return {"id": self.id, "p_unsafe": repr(self.p_unsafe)}


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def two_image_messages(question: str, seeds: tuple[int, int] = (0, 1)) -> list[dict]:
    """An MIS-shaped user turn: two images (data URLs), then the question."""
    return [{"role": "user", "content": [image_part(data_url(png_bytes(seed=seeds[0]))),
                                         image_part(data_url(png_bytes(56, 72, seed=seeds[1]))),
                                         {"type": "text", "text": question}]}]


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts connections and reads, but never answers: an upstream that hangs."""

    def __init__(self):
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1"
        self._connections: list[socket.socket] = []
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop:
            try:
                connection, _ = self._sock.accept()
            except OSError:
                continue
            self._connections.append(connection)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        for connection in self._connections:
            connection.close()
        self._sock.close()


def metric(service: GuardService, name: str, **labels: str) -> float:
    """The value of one sample of the guard's metrics (0.0 when absent), read from its exposition text."""
    for family in text_string_to_metric_families(service.metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0
