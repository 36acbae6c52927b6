"""Load on `misguard serve`: 1,000 requests at 64 concurrent, each a real MOSSBench image and question, answered
by a replay upstream with that row's real recorded response (../shared/data/mossbench). Nothing is dropped,
each request is answered exactly once, and the latencies are recorded (printed and written beside the audit)."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import openai
import pytest

from misguard.guard.policy import Audit, Batching, Policy
from misguard.guard.server.app import running_server
from misguard.guard.server.replay import replay_app
from misguard.judges.vlm import VLMJudge
from tests.conftest import SHARED_DATA
from tests.guard.serving import data_url, guarded, metric

MOSSBENCH = SHARED_DATA / "mossbench"
N_REQUESTS = 1000
CONCURRENCY = 64


def mossbench_rows() -> list[dict]:
    path = MOSSBENCH / "mossbench_benign_responses.jsonl"
    if not path.exists():
        pytest.skip(f"MOSSBench data not found at {MOSSBENCH} (../shared/data is not part of a bare clone)")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["image_path"] and (MOSSBENCH / r["image_path"]).exists() and r["response"]]


@pytest.mark.slow
def test_thousand_requests_at_64_concurrent_are_each_answered_once(tiny_judge, tmp_path):
    rows = mossbench_rows()
    chosen = [rows[i % len(rows)] for i in range(N_REQUESTS)]
    recorded = {row["id"]: row["response"] for row in rows}
    images = {row["image_path"]: data_url((MOSSBENCH / row["image_path"]).read_bytes(), "image/jpeg")
              for row in chosen}
    audit = tmp_path / "audit.jsonl"
    policy = Policy(audit=Audit(path=audit), batching=Batching(max_batch_size=16, max_wait_ms=5))
    upstream = replay_app(recorded)

    async def send_all(url: str) -> list[tuple[dict, float, object]]:
        api = openai.AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(row: dict):
            async with gate:
                started = time.perf_counter()
                try:
                    answer = await api.chat.completions.create(
                        model="replay", user=row["id"], max_tokens=64,
                        messages=[{"role": "user", "content": [
                            {"type": "image_url", "image_url": {"url": images[row["image_path"]]}},
                            {"type": "text", "text": row["question"]}]}])
                except openai.APIError as exc:
                    answer = exc
                return row, time.perf_counter() - started, answer

        try:
            return await asyncio.gather(*(one(row) for row in chosen))
        finally:
            await api.close()

    with VLMJudge(tiny_judge) as judge, running_server(upstream) as upstream_url, \
            guarded(judge, f"{upstream_url}/v1", policy) as (url, service):
        started = time.perf_counter()
        results = asyncio.run(send_all(url))
        wall = time.perf_counter() - started
        requests_counted = sum(metric(service, "misguard_requests_total", outcome=o)
                               for o in ("allowed", "blocked", "error", "invalid", "busy"))
        mean_batch = (metric(service, "misguard_judge_batch_size_sum")
                      / max(1.0, metric(service, "misguard_judge_batch_size_count")))

    failures = [(row["id"], answer) for row, _, answer in results if isinstance(answer, Exception)]
    assert not failures, f"{len(failures)} requests failed, first: {failures[:3]}"
    assert len(results) == N_REQUESTS and requests_counted == N_REQUESTS
    request_ids = [answer.model_extra["misguard"]["request_id"] for _, _, answer in results]
    assert len(set(request_ids)) == N_REQUESTS
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(r["request_id"] for r in records) == sorted(request_ids)  # each answered exactly once
    passed_input = 0
    for row, _, answer in results:
        guard = answer.model_extra["misguard"]
        assert guard["rails"]["input"]["status"] == "ok"
        if guard["blocked_by"] == "input":
            assert "output" not in guard["rails"]
            continue
        passed_input += 1
        assert guard["rails"]["output"]["status"] == "ok"
        if guard["decision"] == "allow":
            assert answer.choices[0].message.content == recorded[row["id"]]  # the row's own recorded answer
    assert upstream.state.requests == passed_input  # blocked requests never reached the upstream
    latencies = np.array([seconds for _, seconds, _ in results]) * 1000
    summary = {"requests": N_REQUESTS, "concurrency": CONCURRENCY, "wall_s": round(wall, 2),
               "requests_per_s": round(N_REQUESTS / wall, 2), "p50_ms": round(float(np.percentile(latencies, 50)), 1),
               "p99_ms": round(float(np.percentile(latencies, 99)), 1), "mean_judge_batch": round(mean_batch, 2),
               "blocked": sum(1 for _, _, a in results if a.model_extra["misguard"]["decision"] == "block")}
    print("guard load:", json.dumps(summary))
    (tmp_path / "load-summary.json").write_text(json.dumps(summary) + "\n")
    assert mean_batch > 1.0, "64 concurrent requests should be judged in micro-batches"
