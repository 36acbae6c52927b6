"""Engines tell a caller's progress of each request as it finishes, within a chunk: the OpenAI engine as each answer
comes back from a server on 127.0.0.1, vLLM (CPU build, in this process) as it finishes each request of one
`LLM.chat` call. Every request is counted once, one whose image cannot be used too."""
from __future__ import annotations

import importlib.util

import pytest

from misguard.engines import EngineOptions, load_engine
from misguard.engines.messages import GenerationParams, ImageFileError, user_request
from tests.engines.test_openai_engine import StubChatServer, http_engine, text_requests

PARAMS = GenerationParams(max_new_tokens=4)


def test_the_openai_engine_reports_each_answer_as_it_comes_back(tmp_path):
    requests = [*text_requests(9), user_request("no-image", [tmp_path / "missing.png"], "What is this?")]
    yielded: list[int] = []
    seen_at: list[tuple[int, int]] = []  # (step, results yielded so far) at each report
    with StubChatServer(delay_s=0.02) as server, http_engine(server.base_url, concurrency=2, batch_size=4) as engine:
        for index, _ in engine.stream(requests, PARAMS, progress=lambda n: seen_at.append((n, len(yielded)))):
            yielded.append(index)
    assert sorted(yielded) == list(range(10))
    assert [n for n, _ in seen_at] == [1] * 10  # the missing image included: its error is its result
    # Reported while their chunk of 4 was still running, before any of its results was handed back.
    assert [at for _, at in seen_at[:4]] == [0, 0, 0, 0]


requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_vllm_reports_each_request_as_it_finishes(tiny_model, easy, labels):
    requests = [user_request(item.id, easy.image_paths(item), item.question) for item in easy.items[:10]]
    with load_engine("vllm", str(tiny_model("qwen2_vl")),
                     EngineOptions(dtype="float32", max_model_len=2048, batch_size=4)) as engine:
        generated: list[int] = []
        results = list(engine.stream(requests, PARAMS, progress=generated.append))
        scored: list[int] = []
        probs = list(engine.label_stream(requests, labels, progress=scored.append))
    assert len(results) == len(probs) == 10 and not any(isinstance(r, ImageFileError) for _, r in results)
    assert generated == [1] * 10 and scored == [1] * 10  # per request, not per chunk of 4
