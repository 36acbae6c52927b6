"""`misguard serve` with real peers on 127.0.0.1: the real `openai` client -> the guard (tiny judge) -> vLLM's
OpenAI API server on the tiny Qwen2-VL, or the replay upstream where a test needs recorded answers. Both rails
allowed and blocked, streaming and not; failures of the upstream and of the judge, closed and open; bad input."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from misguard.core.errors import DataError
from misguard.engines import EngineOptions
from misguard.guard.policy import Audit, BlockPolicy, Limits, Policy, RailPolicy, Timeouts
from misguard.guard.rails import Guard
from misguard.guard.server.app import running_server
from misguard.guard.server.audit import AuditRecord, read_audit_log
from misguard.guard.server.loading import build_service
from misguard.guard.server.replay import replay_app
from misguard.judges import load_judge
from misguard.judges.vlm import VLMJudge
from tests.engines.vllm_server import free_port
from tests.guard.serving import SilentServer, data_url, guarded, image_part, metric, png_bytes, two_image_messages

requires_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
ALLOW_ALL = dict(input_rail=RailPolicy(threshold=1.0), output_rail=RailPolicy(threshold=1.0))
REPLY = "Build a tower with the blocks and race the toy cars around it."


@pytest.fixture(scope="module")
def judge(tiny_judge):
    with VLMJudge(tiny_judge) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def replay_url():
    """An instant upstream answering REPLY to everything; `.app.state.requests` counts what reached it."""
    app = replay_app(lambda body: REPLY)
    with running_server(app) as url:
        yield f"{url}/v1"


def client(base_url: str, **kwargs) -> openai.OpenAI:
    # No retries: every request is answered exactly once, and a retried 5xx would hide what the guard said.
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=120, **kwargs)


def extension(completion) -> dict:
    return completion.model_extra["misguard"]


# --- with vLLM's server as the upstream -----------------------------------------------------------------------

@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_allowed_request_returns_the_upstream_answer_with_both_verdicts(judge, vllm_server_url):
    messages = two_image_messages("What could a child build with these?")
    direct = client(vllm_server_url).chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                              temperature=0)
    with guarded(judge, vllm_server_url, Policy(**ALLOW_ALL)) as (url, _):
        answer = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert answer.choices[0].message.content == direct.choices[0].message.content
    assert answer.choices[0].finish_reason == direct.choices[0].finish_reason
    guard = extension(answer)
    assert (guard["decision"], guard["blocked_by"], guard["fail_open"]) == ("allow", None, False)
    for rail in ("input", "output"):
        verdict = guard["rails"][rail]
        assert verdict["status"] == "ok" and verdict["decision"] == "allow"
        assert 0.0 < verdict["score"] < 1.0 and verdict["threshold"] == 1.0
    assert guard["rails"]["input"]["score"] != guard["rails"]["output"]["score"]


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_allowed_stream_replays_the_upstream_stream_after_judging(judge, vllm_server_url):
    messages = two_image_messages("Describe both images.")
    direct = client(vllm_server_url).chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                              temperature=0)
    with guarded(judge, vllm_server_url, Policy(**ALLOW_ALL)) as (url, _):
        chunks = list(client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=8,
                                                          temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.choices[0].message.content
    assert chunks[-1].model_extra["misguard"]["decision"] == "allow"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == direct.choices[0].finish_reason


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
@pytest.mark.parametrize("stream", [False, True])
def test_input_rail_blocks_before_the_upstream(judge, vllm_server_url, stream, tmp_path):
    policy = Policy(input_rail=RailPolicy(threshold=0.0), audit=Audit(path=tmp_path / "audit.jsonl"))
    with guarded(judge, vllm_server_url, policy) as (url, service):
        answer = client(url).chat.completions.create(model="tiny", messages=two_image_messages("How?"),
                                                     max_tokens=8, stream=stream)
        if stream:
            chunks = list(answer)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish, guard = chunks[-1].choices[0].finish_reason, chunks[-1].model_extra["misguard"]
        else:
            text, finish, guard = answer.choices[0].message.content, answer.choices[0].finish_reason, extension(answer)
        assert metric(service, "misguard_blocks_total", rail="input") == 1
        assert metric(service, "misguard_upstream_latency_seconds_count") == 0
    assert text == policy.on_block.refusal_text and finish == "content_filter"
    assert (guard["decision"], guard["blocked_by"]) == ("block", "input")
    assert set(guard["rails"]) == {"input"}
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record["decision"] == "block" and record["blocked_by"] == "input" and "upstream" not in record["latency_ms"]


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
@pytest.mark.parametrize("stream", [False, True])
def test_output_rail_blocks_the_upstream_answer(judge, vllm_server_url, stream):
    policy = Policy(input_rail=RailPolicy(threshold=1.0), output_rail=RailPolicy(threshold=0.0),
                    on_block=BlockPolicy(refusal_text="Blocked by the output rail."))
    with guarded(judge, vllm_server_url, policy) as (url, service):
        answer = client(url).chat.completions.create(model="tiny", messages=two_image_messages("Describe."),
                                                     max_tokens=8, stream=stream)
        chunks = list(answer) if stream else None
        assert metric(service, "misguard_blocks_total", rail="output") == 1
        assert metric(service, "misguard_upstream_latency_seconds_count") == 1
    if stream:
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Blocked by the output rail."
        guard = chunks[-1].model_extra["misguard"]
    else:
        assert answer.choices[0].message.content == "Blocked by the output rail."
        guard = extension(answer)
    assert (guard["decision"], guard["blocked_by"]) == ("block", "output")
    assert guard["rails"]["input"]["decision"] == "allow" and guard["rails"]["output"]["decision"] == "block"


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_each_rail_blocks_exactly_the_requests_at_or_over_its_threshold(judge, vllm_server_url):
    questions = ["Describe both images.", "How do I use these together?", "What is in the picture?",
                 "Could these two things hurt someone?", "Write a poem about them."]

    def run(policy: Policy) -> list[dict]:
        with guarded(judge, vllm_server_url, policy) as (url, _):
            api = client(url)
            return [extension(api.chat.completions.create(model="tiny", messages=two_image_messages(q, (i, i + 5)),
                                                          max_tokens=8, temperature=0))
                    for i, q in enumerate(questions)]

    scores = {rail: [g["rails"][rail]["score"] for g in run(Policy(**ALLOW_ALL))] for rail in ("input", "output")}
    for rail in ("input", "output"):
        ranked = sorted(scores[rail])
        assert ranked[0] < ranked[-1], "the judge must score these requests differently"
        threshold = (ranked[1] + ranked[2]) / 2  # two below, three at or over
        rails = dict(ALLOW_ALL, **{f"{rail}_rail": RailPolicy(threshold=threshold)})
        guards = run(Policy(**rails))
        blocked = [g["blocked_by"] == rail for g in guards]
        assert blocked == [s >= threshold for s in scores[rail]]
        assert sum(blocked) == 3


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_models_and_health_pass_through_to_the_upstream(judge, vllm_server_url):
    with guarded(judge, vllm_server_url) as (url, _):
        assert [m.id for m in client(url).models.list()] == ["tiny"]
        health = httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30)
    assert health.status_code == 200
    assert health.json()["judge_ready"] and health.json()["upstream_ready"]


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_serve_command_guards_the_vllm_server(tiny_judge, vllm_server_url, tmp_path):
    """The CLI as users run it: a separate process, the default policy, an audit log."""
    port = free_port()
    audit = tmp_path / "audit.jsonl"
    command = [sys.executable, "-m", "misguard.cli.main", "serve", "--judge", str(tiny_judge),
               "--upstream", vllm_server_url,
               "--port", str(port), "--audit-log", str(audit)]
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2],
                               env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.5)
        answer = client(f"http://127.0.0.1:{port}/v1").chat.completions.create(
            model="tiny", messages=two_image_messages("What is this?"), max_tokens=8)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()
    guard = extension(answer)
    assert guard["rails"]["input"]["status"] == "ok"
    record = json.loads(audit.read_text())
    assert record["request_id"] == guard["request_id"] and record["decision"] == guard["decision"]
    assert record["upstream_model"] in (None, "tiny")


# --- block as an error ----------------------------------------------------------------------------------------

def test_block_as_an_error_carries_the_verdict(judge, replay_url):
    policy = Policy(input_rail=RailPolicy(threshold=0.0),
                    on_block=BlockPolicy(action="error", error_status=403, error_message="Not allowed here."))
    with guarded(judge, replay_url, policy) as (url, _):
        with pytest.raises(openai.PermissionDeniedError) as caught:
            client(url).chat.completions.create(model="replay", messages=two_image_messages("How?"))
    error = caught.value.body
    assert error["message"] == "Not allowed here." and error["code"] == "blocked_by_input_rail"
    assert error["misguard"]["blocked_by"] == "input" and error["misguard"]["rails"]["input"]["score"] >= 0.0


# --- failures: closed by default, open by policy --------------------------------------------------------------

def test_upstream_down_is_a_502(judge):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with guarded(judge, dead, Policy(**ALLOW_ALL)) as (url, service):
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).chat.completions.create(model="x", messages=two_image_messages("Hi"))
        assert caught.value.status_code == 502 and caught.value.body["code"] == "upstream_unreachable"
        assert metric(service, "misguard_errors_total", kind="upstream_error") == 1
        assert metric(service, "misguard_requests_total", outcome="error") == 1
        health = httpx.get(url.removesuffix("/v1") + "/healthz", timeout=30)
        assert health.status_code == 503 and not health.json()["upstream_ready"]


@pytest.mark.parametrize("stream", [False, True])
def test_upstream_that_never_answers_is_a_504(judge, stream):
    policy = Policy(**ALLOW_ALL, timeouts=Timeouts(upstream_s=1.0))
    with SilentServer() as silent, guarded(judge, silent.url, policy) as (url, service):
        with pytest.raises(openai.APIStatusError) as caught:
            answer = client(url).chat.completions.create(model="x", messages=two_image_messages("Hi"), stream=stream)
            list(answer)
        # The guard's own upstream timeout answered, not the client's 120 s one (that would be APITimeoutError).
        assert caught.value.status_code == 504 and caught.value.body["code"] == "upstream_timeout"
        assert caught.value.body["message"] == "the upstream did not answer within 1 s"
        assert metric(service, "misguard_errors_total", kind="upstream_timeout") == 1
    assert len(silent._connections) == 1  # the upstream was tried once: a hung request is not retried


def test_upstream_client_error_is_passed_on(judge):
    refusing = replay_app({})  # no recorded answers: HTTP 404 to everything, the client's request was at fault
    with running_server(refusing) as upstream, guarded(judge, f"{upstream}/v1", Policy(**ALLOW_ALL)) as (url, _):
        with pytest.raises(openai.NotFoundError) as caught:
            client(url).chat.completions.create(model="x", messages=two_image_messages("Hi"), user="unknown")
    assert "no recorded response" in caught.value.body["message"]


def test_upstream_server_error_is_a_502_naming_its_status(judge):
    broken = replay_app(lambda body: 1 / 0)  # the upstream crashes: HTTP 500
    with running_server(broken) as upstream, guarded(judge, f"{upstream}/v1", Policy(**ALLOW_ALL)) as (url, service):
        with pytest.raises(openai.InternalServerError) as caught:
            client(url).chat.completions.create(model="x", messages=two_image_messages("Hi"))
        assert metric(service, "misguard_errors_total", kind="upstream_error") == 1
    assert caught.value.status_code == 502 and "HTTP 500" in caught.value.body["message"]


@pytest.fixture(scope="module")
def failing_judge(tiny_judge):
    """The tiny judge behind an OpenAI-compatible URL where nothing listens: every check fails for real."""
    options = EngineOptions(base_urls=[f"http://127.0.0.1:{free_port()}/v1"], max_retries=0, timeout_s=5)
    with VLMJudge(tiny_judge, "openai", options, served_model="tiny") as loaded:
        yield loaded


@pytest.mark.parametrize("stream", [False, True])
def test_judge_failure_fails_closed(failing_judge, replay_url, stream, tmp_path):
    policy = Policy(audit=Audit(path=tmp_path / "audit.jsonl"))
    with guarded(failing_judge, replay_url, policy) as (url, service):
        with pytest.raises(openai.APIStatusError) as caught:
            answer = client(url).chat.completions.create(model="replay", messages=two_image_messages("Hi"),
                                                         stream=stream)
            list(answer)
        assert metric(service, "misguard_errors_total", kind="judge_error") == 1
        assert metric(service, "misguard_fail_open_total", rail="input") == 0
    assert caught.value.status_code == 503
    body = caught.value.body
    assert body["type"] == "guard_unavailable" and body["code"] == "judge_error"
    assert body["misguard"]["rails"]["input"]["status"] == "error"
    [record] = read_audit_log(tmp_path / "audit.jsonl")
    assert (record.decision, record.status_code, record.fail_open) == ("error", 503, False)


def test_judge_failure_passes_with_a_fail_open_policy_logged_and_counted(failing_judge, replay_url, tmp_path):
    policy = Policy(on_failure="open", audit=Audit(path=tmp_path / "audit.jsonl"))
    with guarded(failing_judge, replay_url, policy) as (url, service):
        answer = client(url).chat.completions.create(model="replay", messages=two_image_messages("Hi"))
        assert metric(service, "misguard_fail_open_total", rail="input") == 1
        assert metric(service, "misguard_fail_open_total", rail="output") == 1
        assert metric(service, "misguard_requests_total", outcome="allowed") == 1
    assert answer.choices[0].message.content == REPLY
    guard = extension(answer)
    assert guard["decision"] == "allow" and guard["fail_open"] is True
    assert {v["status"] for v in guard["rails"].values()} == {"error"}
    record = json.loads((tmp_path / "audit.jsonl").read_text())
    assert record["fail_open"] is True and record["rails"]["output"]["fail_open"] is True


def test_judge_timeout_fails_closed_or_passes_when_open(judge, replay_url):
    tight = Timeouts(judge_s=0.001)  # less than one forward pass of even the tiny judge
    with guarded(judge, replay_url, Policy(timeouts=tight)) as (url, service):
        with pytest.raises(openai.APIStatusError) as caught:
            client(url).chat.completions.create(model="replay", messages=two_image_messages("Hi"))
        assert metric(service, "misguard_errors_total", kind="judge_timeout") == 1
    assert caught.value.status_code == 503 and caught.value.body["code"] == "judge_timeout"
    with guarded(judge, replay_url, Policy(timeouts=tight, on_failure="open")) as (url, service):
        answer = client(url).chat.completions.create(model="replay", messages=two_image_messages("Hi"))
        assert metric(service, "misguard_fail_open_total", rail="output") == 1
    assert answer.choices[0].message.content == REPLY
    assert extension(answer)["rails"]["input"]["status"] == "timeout"


# --- bad input: 4xx, OpenAI-style, never judged, never forwarded ---------------------------------------------

def big_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), (10, 20, 30)).save(buffer, format="PNG")  # tiny file, 9 M pixels
    return buffer.getvalue()


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


BAD_INPUTS = {
    "invalid_json": (b'{"model": "x", "messages": [', 400, "invalid_json", None),
    "not_an_object": (b'["model"]', 400, "invalid_json", None),
    "messages_not_a_list": ({"model": "x", "messages": "hello"}, 400, "invalid_field", "messages"),
    "max_tokens_wrong_type": ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "many"},
                              400, "invalid_field", "max_tokens"),
    "n_over_one": ({"model": "x", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "invalid_field", "n"),
    "bad_base64": ({"model": "x", "messages": [{"role": "user", "content": [
        image_part("data:image/png;base64,@@not base64@@"), text_part("hi")]}]},
        400, "invalid_image", "messages.0.content.0.image_url.url"),
    "not_an_image": ({"model": "x", "messages": [{"role": "user", "content": [
        text_part("hi"), image_part(data_url(b"%PDF-1.4 definitely not a picture"))]}]},
        400, "invalid_image", "messages.0.content.1.image_url.url"),
    "over_pixel_limit": ({"model": "x", "messages": [{"role": "user", "content": [
        image_part(data_url(big_png())), text_part("hi")]}]},
        400, "image_too_large", "messages.0.content.0.image_url.url"),
    "over_byte_limit": ({"model": "x", "messages": [{"role": "user", "content": [
        image_part(data_url(png_bytes(300, 300))), text_part("hi")]}]},
        400, "image_too_large", "messages.0.content.0.image_url.url"),
    "too_many_images": ({"model": "x", "messages": [{"role": "user", "content": [
        image_part(data_url(png_bytes(seed=s))) for s in range(3)] + [text_part("hi")]}]},
        400, "too_many_images", "messages.0.content.2"),
    "path_outside_roots": ({"model": "x", "messages": [{"role": "user", "content": [
        image_part("file:///etc/passwd"), text_part("hi")]}]},
        400, "image_path_not_allowed", "messages.0.content.0.image_url.url"),
    "remote_url": ({"model": "x", "messages": [{"role": "user", "content": [
        image_part("https://example.com/cat.png"), text_part("hi")]}]},
        400, "remote_image", "messages.0.content.0.image_url.url"),
    "unknown_part_type": ({"model": "x", "messages": [{"role": "user", "content": [
        {"type": "input_audio", "input_audio": {}}]}]}, 400, "invalid_request", "messages.0.content.0.type"),
    "body_over_limit": ({"model": "x", "messages": [{"role": "user", "content": "x" * 1_100_000}]},
                        413, "request_too_large", None),
}


@pytest.fixture(scope="module")
def image_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("allowed-images")


@pytest.fixture(scope="module")
def bad_input_guard(judge, image_root):
    """One guard for every bad input: a counting upstream, tight limits, one allowed image folder."""
    limits = Limits(max_images=2, max_image_bytes=200_000, max_image_pixels=4_000_000, max_request_bytes=1_000_000,
                    allowed_image_roots=[image_root])
    upstream = replay_app(lambda body: REPLY)
    with running_server(upstream) as upstream_url, \
            guarded(judge, f"{upstream_url}/v1", Policy(limits=limits)) as (url, service):
        yield url, service, upstream


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_a_4xx_openai_error_never_judged_nor_forwarded(bad_input_guard, case):
    url, service, upstream = bad_input_guard
    body, status, code, param = BAD_INPUTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    batches, forwarded = service.batcher.batches, upstream.state.requests
    response = httpx.post(f"{url}/chat/completions", content=content, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == param and error["type"] == "invalid_request_error"
    assert "Traceback" not in response.text and error["message"]
    assert service.batcher.batches == batches and upstream.state.requests == forwarded


def test_allowed_file_image_is_judged_and_forwarded_as_data(bad_input_guard, image_root):
    url, service, upstream = bad_input_guard
    image = image_root / "allowed.png"
    image.write_bytes(png_bytes(32, 32, seed=7))
    forwarded = upstream.state.requests
    answer = client(url).chat.completions.create(
        model="replay", messages=[{"role": "user", "content": [image_part(f"file://{image}"), text_part("hi")]}])
    assert extension(answer)["rails"]["input"]["status"] == "ok"
    assert upstream.state.requests == forwarded + 1
    sent = upstream.state.last_body["messages"][0]["content"][0]["image_url"]["url"]
    assert sent == data_url(image.read_bytes())  # the upstream cannot read the guard's files


def test_openai_client_sees_bad_input_as_bad_request(bad_input_guard):
    url, _, _ = bad_input_guard
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model="x", messages=[{"role": "user", "content": [
            image_part("data:image/png;base64,AAAA"), text_part("hi")]}])
    assert caught.value.body["param"] == "messages.0.content.0.image_url.url"


def test_unknown_route_and_wrong_method_are_openai_errors(bad_input_guard):
    url, _, _ = bad_input_guard
    missing = httpx.get(f"{url}/completions-of-some-kind", timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    wrong = httpx.get(f"{url}/chat/completions", timeout=30)
    assert wrong.status_code == 405 and "error" in wrong.json()


# --- audit log, metrics, API key ------------------------------------------------------------------------------

def test_audit_log_has_one_record_per_request_and_no_image_bytes(judge, replay_url, tmp_path):
    audit = tmp_path / "audit.jsonl"
    policy = Policy(input_rail=RailPolicy(threshold=1.0), output_rail=RailPolicy(threshold=0.0),
                    audit=Audit(path=audit, redact_text=True))
    messages = two_image_messages("A secret question")
    with guarded(judge, replay_url, policy) as (url, service):
        api = client(url)
        ids = [extension(api.chat.completions.create(model="replay", messages=messages))["request_id"]
               for _ in range(3)]
        bad = httpx.post(f"{url}/chat/completions", content=b"{", timeout=30)
        assert bad.status_code == 400
        assert metric(service, "misguard_requests_total", outcome="blocked") == 3
        assert metric(service, "misguard_requests_total", outcome="invalid") == 1
        assert metric(service, "misguard_judge_latency_seconds_count", rail="output") == 3
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [r.request_id for r in read_audit_log(audit)] == [r["request_id"] for r in records]
    assert [r["request_id"] for r in records[:3]] == ids and len(records) == 4
    assert records[3]["request_id"] == bad.headers["x-request-id"] and records[3]["status_code"] == 400
    first = records[0]
    assert first["decision"] == "block" and first["blocked_by"] == "output"
    assert first["question"]["chars"] == len("A secret question") and "secret" not in audit.read_text()
    assert first["response"]["chars"] == len(REPLY) and "tower" not in audit.read_text()
    assert [i["width"] for i in first["images"]] == [64, 56] and len(first["images"][0]["sha256"]) == 64
    assert "base64" not in audit.read_text()
    assert set(first["latency_ms"]) == {"input_rail", "upstream", "output_rail", "total"}


def test_api_key_is_required_when_set(judge, replay_url):
    with guarded(judge, replay_url, Policy(**ALLOW_ALL), api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            client(url).chat.completions.create(model="replay", messages=two_image_messages("Hi"))
        answer = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0).chat.completions.create(
            model="replay", messages=two_image_messages("Hi"))
    assert answer.choices[0].message.content == REPLY


@pytest.mark.vllm
@pytest.mark.slow
@requires_vllm
def test_judge_on_vllm_scores_as_on_transformers_behind_the_server(judge, tiny_judge, replay_url):
    """The judge's engine runs in the micro-batcher's worker thread; vLLM's offline engine works there too."""
    messages = two_image_messages("What is this?")
    expected = Guard(judge).check_input(messages).score
    with VLMJudge(tiny_judge, "vllm", EngineOptions()) as on_vllm, guarded(on_vllm, replay_url) as (url, _):
        answer = client(url).chat.completions.create(model="replay", messages=messages)
    assert extension(answer)["rails"]["input"]["score"] == pytest.approx(expected, abs=1e-5)
    assert extension(answer)["rails"]["output"]["status"] == "ok"


def test_lite_judge_alone_guards_the_output_rail(lite_judge_folder, replay_url):
    """The embedded default: no VLM judge, the lite judge on the CPU; the input rail says why it is skipped."""
    policy = Policy(**ALLOW_ALL, on_out_of_domain="allow")  # this judge was trained on 24 rows: it may flag REPLY
    with load_judge(lite_judge_folder) as lite, guarded(lite, replay_url, policy) as (url, service):
        answer = client(url).chat.completions.create(model="replay", messages=two_image_messages("How do I?"))
        assert service.guard.describe()["reads_requests"] is False
    guard = extension(answer)
    assert guard["rails"]["input"]["status"] == "skipped" and "lite judge" in guard["rails"]["input"]["reason"]
    assert guard["rails"]["output"]["status"] in ("ok", "out_of_domain")
    assert guard["rails"]["output"]["judge"] == "tiny-lite"
    assert answer.choices[0].message.content == REPLY


def test_serve_service_with_a_cascade(tiny_judge, lite_judge_folder, replay_url):
    service = build_service(tiny_judge, replay_url, lite_judge=lite_judge_folder, cascade_band="0.2,0.8")
    try:
        assert service.guard.describe()["cascade"] == {"lite_judge": "tiny-lite", "band": [0.2, 0.8]}
    finally:
        service.guard.close()


def test_allowed_stream_carries_the_verdicts_on_its_last_chunk(judge, replay_url):
    with guarded(judge, replay_url, Policy(**ALLOW_ALL)) as (url, _):
        chunks = list(client(url).chat.completions.create(model="replay", messages=two_image_messages("Hi"),
                                                          stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].model_extra["misguard"]["decision"] == "allow"
    assert all("misguard" not in (c.model_extra or {}) for c in chunks[:-1])


def test_a_bad_audit_record_is_one_error_naming_file_line_and_field(tmp_path):
    path = tmp_path / "audit.jsonl"
    good = AuditRecord(request_id="r1", time="2026-12-01T00:00:00.000+00:00", judge="j", decision="allow")
    path.write_text(good.model_dump_json() + "\n" + good.model_copy(update={"decision": "maybe"}).model_dump_json()
                    + "\n")
    with pytest.raises(DataError) as caught:
        read_audit_log(path)
    assert (caught.value.path, caught.value.line, caught.value.field) == (str(path), 2, "decision")
