"""The OpenAI-compatible HTTP engine against real servers on 127.0.0.1: small stdlib HTTP servers that fail on
purpose (retries, errors, concurrency, round-robin), and vLLM's own API server on a tiny Qwen2-VL (parity with
the transformers engine, two images per prompt)."""
from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import random
import subprocess
import sys
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import anyio
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from misguard.cli.main import app as cli_app
from misguard.core.errors import DataError, MisguardError
from misguard.core.jsonl import read_jsonl
from misguard.core.records import Judgment
from misguard.core.splits import load_split
from misguard.engines import EngineOptions, load_engine
from misguard.engines.messages import GenerationParams, ImageFileError, LabelSet, Request, user_request
from misguard.mis.infer import InferConfig, run_inference
from misguard.mis.score import ScoreConfig, run_score
from tests.engines.vllm_server import free_port
from tests.hostile_data import hostile_copy

PARAMS = GenerationParams(max_new_tokens=8)


class StubChatServer:
    """A chat-completions server on 127.0.0.1 in a thread. It answers each request with `status_for(n)` (n =
    1-based arrival number; 200 = a completion that echoes the request's last text), and records how many
    requests came, how many were in flight at most, the request bodies and their Authorization headers."""

    def __init__(self, status_for=lambda n: 200, delay_s: float | tuple[float, float] = 0.0,
                 content_null: bool = False, logprobs_for=None, unknown_fields: tuple[str, ...] = ()):
        self.status_for, self.delay_s, self.content_null = status_for, delay_s, content_null
        self.logprobs_for = logprobs_for
        """body -> the choice's "logprobs" object (None: no logprobs, as a server that does not do them)."""
        self.unknown_fields = unknown_fields
        """Request fields answered with HTTP 400, as OpenAI's API answers fields it does not know."""
        self.n_requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.bodies: list[dict] = []
        self.authorizations: list[str | None] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()

    def _handler_class(self):
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub._lock:
                    stub.n_requests += 1
                    arrival = stub.n_requests
                    stub.bodies.append(body)
                    stub.authorizations.append(self.headers.get("Authorization"))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                try:
                    delay = stub.delay_s if isinstance(stub.delay_s, float) else random.uniform(*stub.delay_s)
                    time.sleep(delay)
                    status = stub.status_for(arrival)
                    unknown = [name for name in stub.unknown_fields if name in body]
                    if status == 200 and unknown:
                        status = 400
                    if status == 200:
                        last_text = [p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text"][-1]
                        payload = {
                            "id": f"cmpl-{arrival}", "object": "chat.completion", "created": 0,
                            "model": body["model"],
                            "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                "role": "assistant", "content": None if stub.content_null else f"echo: {last_text}"},
                                "logprobs": stub.logprobs_for(body) if stub.logprobs_for else None}],
                            "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
                    elif unknown:
                        payload = {"error": {"message": f"Unrecognized request argument supplied: {', '.join(unknown)}",
                                             "type": "invalid_request_error"}}
                    else:
                        payload = {"error": {"message": f"stub says {status}", "type": "server_error"}}
                    data = json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

        return Handler


def text_requests(n: int) -> list[Request]:
    return [user_request(f"item-{i}", [], f"question {i}") for i in range(n)]


def http_engine(*base_urls: str, **options) -> object:
    return load_engine("openai", "tiny", EngineOptions(base_urls=list(base_urls), **options))


def test_base_url_is_required():
    with pytest.raises(MisguardError, match="--base-url"):
        load_engine("openai", "tiny", EngineOptions())


def test_results_in_request_order_under_concurrency():
    with StubChatServer(delay_s=(0.0, 0.1)) as server, http_engine(server.base_url, concurrency=4) as engine:
        generations = engine.generate(text_requests(10), PARAMS)
    assert [g.text for g in generations] == [f"echo: question {i}" for i in range(10)]
    # The stub's usage says 3 completion tokens, ended by "stop": the end token is not counted in n_tokens.
    assert all((g.n_tokens, g.extra["completion_tokens"], g.finish_reason) == (2, 3, "stop") for g in generations)
    body = server.bodies[0]
    assert (body["model"], body["max_tokens"], body["temperature"], body["top_p"], body["seed"]) == \
           ("tiny", 8, 0.0, 1.0, 0)


def test_concurrency_never_exceeds_the_limit():
    with StubChatServer(delay_s=0.2) as server, http_engine(server.base_url, concurrency=3) as engine:
        engine.generate(text_requests(12), PARAMS)
    assert server.n_requests == 12
    assert server.max_in_flight == 3  # the limit, and reached: requests really do overlap


def test_round_robin_over_base_urls():
    with StubChatServer() as first, StubChatServer() as second, \
            http_engine(first.base_url, second.base_url) as engine:
        engine.generate(text_requests(3), PARAMS)
        engine.generate(text_requests(3), PARAMS)  # the rotation carries on across calls
        assert engine.sent_per_base_url == [3, 3]
    assert (first.n_requests, second.n_requests) == (3, 3)


def test_server_errors_are_retried_by_the_client():
    with StubChatServer(status_for=lambda n: 503 if n <= 2 else 200) as server, \
            http_engine(server.base_url, max_retries=2) as engine:
        [generation] = engine.generate(text_requests(1), PARAMS)
    assert generation.text == "echo: question 0"
    assert server.n_requests == 3


def test_persistent_server_error_names_the_url_and_status():
    with StubChatServer(status_for=lambda n: 500) as server, http_engine(server.base_url, max_retries=1) as engine, \
            pytest.raises(MisguardError) as caught:
        engine.generate(text_requests(1), PARAMS)
    assert server.base_url in str(caught.value)
    assert "HTTP 500" in str(caught.value) and "stub says 500" in str(caught.value)
    assert server.n_requests == 2  # the first try and one retry


def test_dead_port_is_a_connection_error_after_the_clients_backoffs(monkeypatch):
    # The openai client backs off with anyio.sleep between attempts: record each wait instead of sleeping it.

    backoffs: list[float] = []
    no_wait = anyio.sleep

    async def recorded_backoff(delay: float) -> None:
        backoffs.append(delay)
        await no_wait(0)

    monkeypatch.setattr(anyio, "sleep", recorded_backoff)
    dead_url = f"http://127.0.0.1:{free_port()}/v1"
    with http_engine(dead_url, max_retries=2, timeout_s=2.0) as engine, \
            pytest.raises(MisguardError, match="could not connect") as caught:
        engine.generate(text_requests(1), PARAMS)
    assert dead_url in str(caught.value)
    # Three attempts, each refused at once (a connection error, not a 2 s timeout), with the client's exponential
    # backoff between them: 0.5 s then 1 s, each shortened by up to 25 % of jitter.
    assert len(backoffs) == 2
    assert 0.375 <= backoffs[0] <= 0.5 and 0.75 <= backoffs[1] <= 1.0


def test_slow_server_times_out():
    with StubChatServer(delay_s=1.5) as server, http_engine(server.base_url, max_retries=0, timeout_s=0.3) as engine, \
            pytest.raises(MisguardError, match="timed out"):
        engine.generate(text_requests(1), PARAMS)


def test_missing_message_text_is_an_error_not_an_empty_answer():
    with StubChatServer(content_null=True) as server, http_engine(server.base_url) as engine, \
            pytest.raises(MisguardError, match="no message text"):
        engine.generate(text_requests(1), PARAMS)


def test_generate_works_from_inside_a_running_event_loop_and_from_a_thread():
    with StubChatServer() as server, http_engine(server.base_url) as engine:
        async def from_async_code():
            return engine.generate(text_requests(1), PARAMS)

        assert asyncio.run(from_async_code())[0].text == "echo: question 0"
        results = []
        worker = threading.Thread(target=lambda: results.extend(engine.generate(text_requests(2), PARAMS)))
        worker.start()
        worker.join(timeout=30)
        assert [g.text for g in results] == ["echo: question 0", "echo: question 1"]


def test_closed_engine_refuses_work():
    with StubChatServer() as server:
        engine = http_engine(server.base_url)
        engine.close()
        engine.close()
        with pytest.raises(MisguardError, match="closed"):
            engine.generate(text_requests(1), PARAMS)


# --- label scoring against stub servers -------------------------------------------------------------------------

LABELS = LabelSet(ids=(16, 17, 18, 19, 20, 21), texts=("1", "2", "3", "4", "5", "6"))
LABEL_PROBS = (0.4, 0.2, 0.15, 0.1, 0.1, 0.05)
LABEL_MASS = 0.8
VLLM_FIELDS = ("logprob_token_ids", "return_tokens_as_token_ids")


def last_text(body: dict) -> str:
    return [p["text"] for p in body["messages"][-1]["content"] if p["type"] == "text"][-1]


def first_token_logprobs(by_id: bool, missing: str | None = None, duplicate: str | None = None) -> dict:
    """A chat completion's "logprobs" for one generated token: the labels at LABEL_MASS in all, split as
    LABEL_PROBS, plus another token; tokens named "token_id:N" (vLLM's return_tokens_as_token_ids) or by text.
    `missing` leaves that label out; `duplicate` adds a second token with that label's text."""
    entries = [("token_id:7" if by_id else "The", math.log(0.1))]
    for token_id, text, p in zip(LABELS.ids, LABELS.texts, LABEL_PROBS):
        if text != missing:
            entries.append((f"token_id:{token_id}" if by_id else text, math.log(LABEL_MASS * p)))
    if duplicate:
        entries.append((duplicate, math.log(0.01)))
    entries.sort(key=lambda entry: -entry[1])
    top = [{"token": token, "logprob": logprob, "bytes": None} for token, logprob in entries]
    return {"content": [{**top[0], "top_logprobs": top}]}


def assert_label_probs(scored) -> None:
    assert scored is not None
    assert scored.probs == pytest.approx(LABEL_PROBS, abs=1e-9)
    assert scored.mass == pytest.approx(LABEL_MASS, rel=1e-9)


def test_label_probs_by_token_id_from_a_vllm_style_server():
    def logprobs_for(body):
        # Honours vLLM's fields as vLLM does; question 1's answer lacks label "6".
        missing = "6" if last_text(body) == "question 1" else None
        return first_token_logprobs(by_id=body.get("return_tokens_as_token_ids") is True, missing=missing)

    with StubChatServer(logprobs_for=logprobs_for) as server, \
            http_engine(server.base_url, concurrency=4) as engine:
        scored = engine.label_probs(text_requests(3), LABELS)
        assert engine.sends_token_ids == [True]
    assert_label_probs(scored[0])
    assert scored[1] is None  # a label that did not come back is unscored, not given probability 0
    assert_label_probs(scored[2])
    assert server.n_requests == 3
    for body in server.bodies:
        assert (body["max_tokens"], body["temperature"], body["logprobs"]) == (1, 0.0, True)
        assert body["logprob_token_ids"] == list(LABELS.ids) and body["return_tokens_as_token_ids"] is True


@pytest.mark.parametrize("server_kind", ["rejects vLLM's fields", "ignores vLLM's fields"])
def test_label_probs_by_text_when_the_server_does_not_do_logprob_token_ids(server_kind):
    rejects = server_kind.startswith("rejects")

    def logprobs_for(body):
        question = last_text(body)
        return first_token_logprobs(by_id=False, missing="6" if question == "question 1" else None,
                                    duplicate="3" if question == "question 2" else None)

    with StubChatServer(logprobs_for=logprobs_for, unknown_fields=VLLM_FIELDS if rejects else ()) as server, \
            http_engine(server.base_url, concurrency=4) as engine:
        scored = engine.label_probs(text_requests(4), LABELS)
        [again] = engine.label_probs(text_requests(1), LABELS)
        assert engine.sends_token_ids == [not rejects]
    assert_label_probs(scored[0])
    assert scored[1] is None  # label "6" is not among the top logprobs
    assert scored[2] is None  # two tokens read "3": which one is the label's is not known
    assert_label_probs(scored[3])
    assert_label_probs(again)
    assert all(body["top_logprobs"] == 20 for body in server.bodies)
    if rejects:
        # Only the first request was refused; it was sent again without the fields, and so were all the others.
        assert server.n_requests == 6
        assert [any(name in body for name in VLLM_FIELDS) for body in server.bodies] == [True] + [False] * 5
    else:
        assert server.n_requests == 5


def test_label_probs_without_logprobs_are_unscored():
    with StubChatServer() as server, http_engine(server.base_url) as engine:
        assert engine.label_probs(text_requests(2), LABELS) == [None, None]


def test_label_probs_server_error_is_not_taken_for_a_refused_field():
    with StubChatServer(status_for=lambda n: 500) as server, http_engine(server.base_url, max_retries=0) as engine, \
            pytest.raises(MisguardError, match="HTTP 500"):
        engine.label_probs(text_requests(1), LABELS)
    assert server.n_requests == 1 and engine.sends_token_ids == [None]


def test_label_probs_of_no_requests():
    with StubChatServer() as server, http_engine(server.base_url) as engine:
        assert engine.label_probs([], LABELS) == []
    assert server.n_requests == 0


# --- images that cannot be used: each costs its own request -----------------------------------------------------

def stub_infer_config(server: StubChatServer, data: Path, out: Path, **kwargs) -> InferConfig:
    return InferConfig(model="tiny", data=data, split="easy", out=out, engine="openai",
                       engine_options=EngineOptions(base_urls=[server.base_url], concurrency=4),
                       generation=GenerationParams(max_new_tokens=4), **kwargs)


def test_a_truncated_image_stops_infer_at_its_item_with_every_other_response_saved(demo_dir, tmp_path):
    data, item, line = hostile_copy(demo_dir, tmp_path)
    others = sorted(i.id for i in load_split(data, "easy").items if i.id != item.id)
    with StubChatServer() as server:
        config = stub_infer_config(server, data, tmp_path / "out")
        with pytest.raises(DataError) as caught:
            run_inference(config, progress=False)
        error = caught.value
        assert (error.path, error.line, error.field) == (str(data / "mis_easy.json"), line, "image_path1")
        assert f"item {item.id}:" in str(error) and "not a readable image" in str(error)
        # The item's request was never sent; its chunk-mates were, and were saved before the run stopped.
        assert server.n_requests == len(others)
        responses = [json.loads(row) for row in (tmp_path / "out" / "easy" / "tiny.jsonl").read_text().splitlines()]
        assert sorted(str(r["id"]) for r in responses) == others


def test_with_skip_bad_infer_on_the_openai_engine_skips_the_item_and_goes_on(demo_dir, tmp_path):
    data, item, line = hostile_copy(demo_dir, tmp_path)
    with StubChatServer() as server:
        result = run_inference(stub_infer_config(server, data, tmp_path / "out", skip_bad=True), progress=False)
    n_items = len(load_split(data, "easy").items)
    assert (result.generated, result.skipped_items) == (n_items - 1, 1)
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["complete"] and len(manifest["skipped_rows"]) == 1
    assert manifest["skipped_rows"][0].startswith(
        f"{data / 'mis_easy.json'}:{line}: field 'image_path1': item {item.id}: image '{item.image_path1}'")


def all_labels_logprobs(body: dict) -> dict:
    """A first token's "logprobs" naming every requested label id (vLLM's logprob_token_ids), near-uniform."""
    ids = body.get("logprob_token_ids") or []
    top = [{"token": f"token_id:{token_id}", "logprob": math.log(0.9 / len(ids)) - 0.01 * n, "bytes": None}
           for n, token_id in enumerate(ids)]
    return {"content": [{**top[0], "top_logprobs": top}]} if top else None


def test_a_truncated_image_stops_score_on_the_openai_engine_at_its_row_and_skip_bad_goes_on(tiny_judge, demo_dir,
                                                                                            tmp_path):
    with StubChatServer(logprobs_for=all_labels_logprobs) as server:
        responses = run_inference(stub_infer_config(server, demo_dir, tmp_path / "runs"), progress=False)
        data, item, _ = hostile_copy(demo_dir, tmp_path)  # the responses' images, one of them now truncated
        row = 1 + [str(r["id"]) for r in map(json.loads, responses.responses_path.read_text().splitlines())].index(
            item.id)
        config = ScoreConfig(responses=[responses.responses_path], judge=tiny_judge, data=data, out=tmp_path / "out",
                             engine="openai", engine_options=EngineOptions(base_urls=[server.base_url]),
                             served_model="tiny-judge", n_bootstrap=0)
        with pytest.raises(DataError) as caught:
            run_score(config, progress=False)
        error = caught.value
        assert (Path(error.path), error.line, error.field) == (responses.responses_path, row, "image_path1")
        assert f"item {item.id}: image '{item.image_path1}'" in str(error)
        saved = read_jsonl(tmp_path / "out" / "judgments.jsonl", Judgment)
        assert sorted(j.id for j in saved) == sorted(i.id for i in load_split(data, "easy").items if i.id != item.id)
        assert all(j.status == "scored" for j in saved)

        skipped = run_score(replace(config, skip_bad=True), progress=False)
    assert (skipped.judged, len(skipped.skipped_rows)) == (0, 1)
    assert f"item {item.id}: image '{item.image_path1}'" in skipped.skipped_rows[0]


def test_the_image_limits_hold_on_the_openai_engine(tmp_path):
    images = []
    for name, side in (("small.png", 8), ("large.png", 64)):
        Image.fromarray(np.random.default_rng(side).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(
            tmp_path / name)
        images.append(tmp_path / name)
    requests = [user_request("small", [images[0]], "a"), user_request("large", [images[1]], "b"),
                user_request("small-again", [images[0]], "c")]
    limit = (images[0].stat().st_size + images[1].stat().st_size) // 2
    with StubChatServer() as server, http_engine(server.base_url, max_image_bytes=limit) as engine:
        small, large, small_again = engine.generate(requests, PARAMS)
    assert (small.text, small_again.text) == ("echo: a", "echo: c")
    assert isinstance(large, ImageFileError) and large.code == "image_too_large"
    assert large.path == str(images[1]) and "over the limit" in str(large)
    assert server.n_requests == 2


# --- the API key: never on the command line ---------------------------------------------------------------------

KEY_SOURCES = ("api_key", "api_key_file", "MISGUARD_API_KEY", "OPENAI_API_KEY", "nothing")


@pytest.mark.parametrize("winner", KEY_SOURCES)
def test_the_api_key_comes_from_the_first_source_that_has_one(winner, tmp_path, monkeypatch):
    # `winner` and every source after it hold a key: the one sent is the winner's.
    given = KEY_SOURCES[KEY_SOURCES.index(winner):]
    options = {}
    if "api_key" in given:
        options["api_key"] = "key-from-api_key"
    if "api_key_file" in given:
        (tmp_path / "server.key").write_text("  key-from-api_key_file\n")
        options["api_key_file"] = tmp_path / "server.key"
    for envvar in ("MISGUARD_API_KEY", "OPENAI_API_KEY"):
        if envvar in given:
            monkeypatch.setenv(envvar, f"key-from-{envvar}")
        else:
            monkeypatch.delenv(envvar, raising=False)
    with StubChatServer() as server, http_engine(server.base_url, **options) as engine:
        engine.generate(text_requests(2), PARAMS)
    expected = "EMPTY" if winner == "nothing" else f"key-from-{winner}"
    assert server.authorizations == [f"Bearer {expected}"] * 2


@pytest.mark.parametrize("content", ["", "two words\n"])
def test_a_key_file_without_one_key_is_a_one_line_error_naming_the_option(content, tmp_path):
    key_file = tmp_path / "server.key"
    key_file.write_text(content)
    with pytest.raises(MisguardError) as caught:
        http_engine("http://127.0.0.1:9/v1", api_key_file=key_file)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--api-key-file:") and str(key_file) in message


def test_infer_takes_the_key_from_a_file_and_refuses_it_on_the_command_line(demo_dir, tmp_path):
    key_file = tmp_path / "server.key"
    key_file.write_text("s3cret-key\n")
    out = tmp_path / "out"
    with StubChatServer() as server:
        args = ["infer", "--engine", "openai", "--model", "tiny", "--base-url", server.base_url, "--data",
                str(demo_dir), "--split", "easy", "--limit", "2", "--max-new-tokens", "4", "--out", str(out),
                "--quiet"]
        refused = CliRunner().invoke(cli_app, [*args, "--api-key", "s3cret-key"])
        assert refused.exit_code == 2 and "No such option" in refused.output
        assert server.n_requests == 0
        result = CliRunner().invoke(cli_app, [*args, "--api-key-file", str(key_file)],
                                    env={"MISGUARD_API_KEY": None, "OPENAI_API_KEY": None})
        assert result.exit_code == 0, result.output
    assert server.authorizations == ["Bearer s3cret-key"] * 2
    manifest = (out / "easy" / "tiny.manifest.json").read_text()
    assert "s3cret" not in manifest and '"api_key"' not in manifest
    assert json.loads(manifest)["engine"]["options"]["api_key_file"] == str(key_file)


# --- against vLLM's own OpenAI-compatible server ---------------------------------------------------------------

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return str(tiny_model("qwen2_vl"))


@pytest.fixture(scope="module")
def two_image_requests(tmp_path_factory) -> list[Request]:
    """Two images then a question. With the tiny model's seed-0 weights "Hi" on images 4 and 1 ends with EOS
    within a few tokens and the others run to the token limit, so both endings are compared."""
    folder = tmp_path_factory.mktemp("http-images")
    paths = []
    for seed, (width, height) in enumerate([(96, 72), (64, 128), (120, 90), (80, 80), (150, 60)]):
        path = folder / f"image{seed}.png"
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    shapes = [("Is this safe?", 0, 2), ("Hi", 4, 1), ("Describe both images.", 1, 3),
              ("Could these two images together do harm?", 3, 0)]
    return [user_request(f"item-{i}", [paths[a], paths[b]], q) for i, (q, a, b) in enumerate(shapes)]


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_vllm_server_matches_transformers_greedy(vllm_server_url, model_dir, two_image_requests):
    params = GenerationParams(max_new_tokens=12)
    with http_engine(vllm_server_url, vllm_server_url, concurrency=2, max_retries=1, timeout_s=120) as engine:
        over_http = engine.generate(two_image_requests, params)
        assert engine.sent_per_base_url == [2, 2]
    hf_engine = load_engine("transformers", model_dir, EngineOptions(dtype="float32"))
    try:
        local = hf_engine.generate(two_image_requests, params)
    finally:
        hf_engine.close()
    assert {g.finish_reason for g in local} == {"stop", "length"}, "pick prompts where the tiny model stops early"
    for request, remote, reference in zip(two_image_requests, over_http, local):
        assert (remote.text, remote.n_tokens, remote.finish_reason) == \
               (reference.text, reference.n_tokens, reference.finish_reason), request.id


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_vllm_server_error_is_reported_with_the_url(vllm_server_url):
    with http_engine(vllm_server_url, max_retries=0) as engine:
        engine.model = "no-such-model"  # vLLM answers 404 for an unknown served model name
        with pytest.raises(MisguardError, match="HTTP 404") as caught:
            engine.generate(text_requests(1), PARAMS)
    assert vllm_server_url in str(caught.value)


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_infer_cli_against_the_server(vllm_server_url, model_dir, demo_dir, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "misguard.cli.main", "infer", "--engine", "openai", "--model", "tiny",
           "--base-url", vllm_server_url, "--data", str(demo_dir), "--split", "real", "--out", str(out),
           "--max-new-tokens", "8", "--concurrency", "4", "--quiet"]
    subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    rows = [json.loads(line) for line in (out / "real" / "tiny.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["id"] for r in rows}) == 12
    assert all(r["model"] == "tiny" for r in rows)
    manifest = json.loads((out / "real" / "tiny.manifest.json").read_text())
    # No api_key field anywhere (api_key_file, the option naming a file, is fine: it holds no secret).
    assert manifest["engine"]["engine"] == "openai" and '"api_key":' not in json.dumps(manifest)


@pytest.fixture(scope="module")
def transformers_label_probs(model_dir, two_image_requests, labels):
    hf_engine = load_engine("transformers", model_dir, EngineOptions(dtype="float32"))
    try:
        return hf_engine.label_probs(two_image_requests, labels)
    finally:
        hf_engine.close()


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_vllm_server_label_probs_match_transformers(vllm_server_url, two_image_requests, labels,
                                                    transformers_label_probs):
    with http_engine(vllm_server_url, vllm_server_url, concurrency=2, max_retries=1, timeout_s=120) as engine:
        over_http = engine.label_probs(two_image_requests, labels)
        assert engine.sends_token_ids == [True, True]  # vLLM took logprob_token_ids: every label came back
    for request, remote, reference in zip(two_image_requests, over_http, transformers_label_probs):
        assert remote is not None and reference is not None, request.id
        assert sum(remote.probs) == pytest.approx(1.0, abs=1e-6)
        assert 0 < remote.mass <= 1
        # Same bounds as the offline vLLM engine's parity test (measured: ~1e-7 apart).
        assert remote.probs == pytest.approx(reference.probs, abs=1e-5), request.id
        assert remote.mass == pytest.approx(reference.mass, rel=1e-4), request.id

    with http_engine(vllm_server_url, max_retries=1, timeout_s=120) as engine:
        engine.sends_token_ids = [False]  # as if the server had refused vLLM's fields: labels matched by text
        by_text = engine.label_probs(two_image_requests, labels)
    # The tiny random model spreads its probability nearly evenly over 1,014 tokens (~1e-3 each): the digits are
    # not all among its top 20, and a request missing any label is unscored, never filled in.
    assert by_text == [None] * len(two_image_requests)
