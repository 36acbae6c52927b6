"""Fixtures shared by the guard's tests: the demo's easy split, the tiny judge's label set, and one vLLM API server
for the whole session (it takes ~30 s to start)."""
from __future__ import annotations

import pytest

from misguard.judges import read_judge_spec
from misguard.core.io import load_split
from tests.guard.vllm_server import vllm_api_server


@pytest.fixture(scope="session")
def vllm_server_url(tiny_model, tmp_path_factory):
    """Base URL (ending in /v1) of vLLM's OpenAI API server on the tiny Qwen2-VL, served as "tiny"."""
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    with vllm_api_server(tiny_model("qwen2_vl"), "tiny", log_path=log) as base_url:
        yield base_url


@pytest.fixture(scope="session")
def easy(demo_dir):
    return load_split(demo_dir, "easy")


@pytest.fixture(scope="session")
def labels(tiny_judge):
    return read_judge_spec(tiny_judge).label_set()
