"""The guard server against hostile input (issue 21): a judge whose score is not a number, clients without the
key, clients that hold connections open, the audit log's privacy, size and JSON, bodies nested or long beyond
reason; and schemathesis fuzzing the guard's own OpenAPI schema."""
from __future__ import annotations

import json
import math
import socket
import stat
import time
from pathlib import Path

import httpx
import openai
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from misguard.cli.main import app as cli_app
from misguard.core.errors import MisguardError
from misguard.guard.policy import Audit, Limits, Policy, RailPolicy, Server
from misguard.guard.rails import Guard
from misguard.guard.server.app import create_app, running_server
from misguard.guard.server.audit import AuditLog, AuditRecord, read_audit_log
from misguard.guard.server.replay import replay_app
from misguard.guard.server.service import GuardService
from misguard.judges.vlm import VLMJudge
from tests.guard.serving import FixedScoreJudge, guarded, metric, two_image_messages

UNSAFE_REPLY = "Sure: first mix the two powders in the jar, then seal it and heat it."


@pytest.fixture(scope="module")
def replay_url():
    with running_server(replay_app(lambda body: UNSAFE_REPLY)) as url:
        yield f"{url}/v1"


def client(base_url: str, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=60)


def strict_json(line: str):
    """json.loads that refuses NaN and Infinity, as strict JSON readers (jq, log shippers) do."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(line, parse_constant=refuse)


def audit_records(path: Path) -> list[dict]:
    return [strict_json(line) for line in path.read_text().splitlines()]


# --- a judge whose score is not a probability is a judge error ------------------------------------------------

NOT_PROBABILITIES = [math.nan, math.inf, 1.5]


@pytest.mark.parametrize("p_unsafe", NOT_PROBABILITIES, ids=["nan", "inf", "1.5"])
@pytest.mark.parametrize("on_failure", ["closed", "open"])
def test_the_rails_treat_a_score_that_is_not_a_probability_as_a_judge_error(p_unsafe, on_failure):
    guard = Guard(FixedScoreJudge(p_unsafe), Policy(on_failure=on_failure))
    for verdict in (guard.check_input(two_image_messages("How?")),
                    guard.check_output(two_image_messages("How?"), UNSAFE_REPLY)):
        assert verdict.status == "error" and verdict.score is None and verdict.score_raw is None
        assert "not a probability" in verdict.reason
        assert (verdict.decision, verdict.fail_open) == (("block", False) if on_failure == "closed" else
                                                         ("allow", True))


def test_an_untrustworthy_trust_score_is_a_judge_error():
    verdict = Guard(FixedScoreJudge(0.1, trust=math.nan)).check_input(two_image_messages("How?"))
    assert (verdict.status, verdict.decision) == ("error", "block") and "trust nan" in verdict.reason


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_nan_from_the_judge_fails_closed_and_client_audit_and_metrics_agree(replay_url, stream, tmp_path):
    audit = tmp_path / "audit.jsonl"
    judge = FixedScoreJudge(math.nan)
    with guarded(judge, replay_url, Policy(audit=Audit(path=audit))) as (url, service):
        with pytest.raises(openai.APIStatusError) as caught:
            list(client(url).chat.completions.create(model="replay", messages=two_image_messages("How?"),
                                                     stream=stream))
        counted = {outcome: metric(service, "misguard_requests_total", outcome=outcome)
                   for outcome in ("allowed", "blocked", "error")}
        judge_errors = metric(service, "misguard_errors_total", kind="judge_error")
    assert judge.calls == 1, "the input rail failed closed: nothing was forwarded or judged after it"
    assert caught.value.status_code == 503 and caught.value.body["code"] == "judge_error"
    assert caught.value.body["misguard"]["rails"]["input"]["status"] == "error"
    [record] = audit_records(audit)
    assert (record["decision"], record["status_code"], record["fail_open"]) == ("error", 503, False)
    assert record["rails"]["input"]["score"] is None and "nan" in record["rails"]["input"]["reason"]
    assert counted == {"allowed": 0, "blocked": 0, "error": 1} and judge_errors == 1


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_nan_from_the_judge_under_fail_open_passes_marked_and_counted(replay_url, stream, tmp_path):
    audit = tmp_path / "audit.jsonl"
    policy = Policy(on_failure="open", audit=Audit(path=audit))
    with guarded(FixedScoreJudge(math.nan), replay_url, policy) as (url, service):
        answer = client(url).chat.completions.create(model="replay", messages=two_image_messages("How?"),
                                                     stream=stream)
        if stream:
            chunks = list(answer)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            guard = chunks[-1].model_extra["misguard"]
        else:
            text, guard = answer.choices[0].message.content, answer.model_extra["misguard"]
        counted = {outcome: metric(service, "misguard_requests_total", outcome=outcome)
                   for outcome in ("allowed", "blocked", "error")}
        fail_open = {rail: metric(service, "misguard_fail_open_total", rail=rail) for rail in ("input", "output")}
    assert text == UNSAFE_REPLY
    assert (guard["decision"], guard["fail_open"]) == ("allow", True)
    assert {rail: v["status"] for rail, v in guard["rails"].items()} == {"input": "error", "output": "error"}
    [record] = audit_records(audit)
    assert (record["decision"], record["status_code"], record["fail_open"]) == ("allow", 200, True)
    assert record["request_id"] == guard["request_id"]
    assert counted == {"allowed": 1, "blocked": 0, "error": 0} and fail_open == {"input": 1, "output": 1}


# --- authentication ---------------------------------------------------------------------------------------------

def test_with_a_key_metrics_and_health_details_need_it_and_livez_stays_open(replay_url):
    with guarded(FixedScoreJudge(0.1), replay_url, api_key="s3cret") as (url, _):
        base = url.removesuffix("/v1")
        key = {"authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401
        assert httpx.get(f"{base}/metrics", headers={"authorization": "Bearer s3cre"}, timeout=30).status_code == 401
        assert b"misguard_requests_total" in httpx.get(f"{base}/metrics", headers=key, timeout=30).content
        anonymous = httpx.get(f"{base}/healthz", timeout=30)
        assert anonymous.status_code == 200 and anonymous.json() == {"status": "ok"}
        detailed = httpx.get(f"{base}/healthz", headers=key, timeout=30).json()
        assert detailed["upstream"] == replay_url and "guard" in detailed
        live = httpx.get(f"{base}/livez", timeout=30)
        assert live.status_code == 200 and live.json() == {"status": "ok"}
        assert httpx.get(f"{url}/models", timeout=30).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client(url).chat.completions.create(model="replay", messages=two_image_messages("Hi"))


def serve(*args: str, **env: str):
    return CliRunner().invoke(cli_app, ["serve", *args], env={"MISGUARD_SERVE_API_KEY": None, **env})


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.20", "::", "guard.example.org"])
def test_serve_refuses_to_expose_the_guard_without_a_key(host, tmp_path):
    # No judge there: the refusal comes before anything is loaded.
    result = serve("--judge", str(tmp_path / "no-judge"), "--upstream", "http://127.0.0.1:9/v1", "--host", host)
    assert isinstance(result.exception, MisguardError), result.output
    message = str(result.exception)
    assert "\n" not in message and "--insecure-no-auth" in message and "--client-api-key-file" in message


def test_serve_takes_no_key_on_the_command_line(tmp_path):
    result = serve("--judge", str(tmp_path), "--upstream", "http://127.0.0.1:9/v1", "--client-api-key", "s3cret")
    assert result.exit_code == 2 and "No such option" in result.output


@pytest.fixture
def served(monkeypatch):
    """What `misguard serve` would run: the app and the address, captured instead of served forever."""
    calls = []
    monkeypatch.setattr("misguard.cli.serve.run_server", lambda app, host, port: calls.append((app, host)))
    return calls


@pytest.mark.parametrize("source", ["file", "env"])
def test_serve_on_all_interfaces_with_a_key_from_a_file_or_the_environment(tiny_judge, replay_url, served,
                                                                         tmp_path, source):
    key_file = tmp_path / "client.key"
    key_file.write_text("k3y-from-a-file\n")
    args = ["--judge", str(tiny_judge), "--upstream", replay_url, "--host", "0.0.0.0"]
    if source == "file":
        result = serve(*args, "--client-api-key-file", str(key_file))
        key = "k3y-from-a-file"
    else:
        result = serve(*args, MISGUARD_SERVE_API_KEY="k3y-from-the-env")
        key = "k3y-from-the-env"
    assert result.exit_code == 0, result.output
    [(app, host)] = served
    with running_server(app) as base:
        assert host == "0.0.0.0"
        assert httpx.get(f"{base}/metrics", timeout=30).status_code == 401
        assert httpx.get(f"{base}/metrics", headers={"authorization": f"Bearer {key}"}, timeout=30).status_code == 200


def test_serve_without_a_key_beyond_loopback_only_when_asked(tiny_judge, replay_url, served):
    result = serve("--judge", str(tiny_judge), "--upstream", replay_url, "--host", "0.0.0.0", "--insecure-no-auth")
    assert result.exit_code == 0 and "without a key" in result.output
    [(app, _)] = served
    with running_server(app) as base:
        assert httpx.get(f"{base}/metrics", timeout=30).status_code == 200


# --- connections held open --------------------------------------------------------------------------------------

def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_a_body_that_trickles_in_gets_408_and_its_connection_closed(replay_url):
    policy = Policy(server=Server(body_read_timeout_s=0.5))
    with guarded(FixedScoreJudge(0.1), replay_url, policy) as (url, service):
        host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 4000\r\n\r\n{\"model\": \"x\", ")  # ... and nothing more
            answer = read_until_closed(sock)  # returns only when the guard closes the connection
        assert metric(service, "misguard_errors_total", kind="request_timeout") == 1
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_connections_over_the_limit_get_503_from_uvicorn(replay_url):
    policy = Policy(server=Server(limit_concurrency=4))
    with guarded(FixedScoreJudge(0.1), replay_url, policy) as (url, _):
        base = url.removesuffix("/v1")
        host, port = base.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=20) for _ in range(4)]
        try:
            time.sleep(0.2)  # the server has accepted them all
            assert httpx.get(f"{base}/metrics", timeout=20).status_code == 503
        finally:
            for sock in idle:
                sock.close()
        deadline = time.monotonic() + 10
        while (status := httpx.get(f"{base}/metrics", timeout=20).status_code) == 503 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the server has seen them close
        assert status == 200


# --- the audit log ----------------------------------------------------------------------------------------------

def test_audit_log_by_default_keeps_no_text_and_only_its_owner_may_read_it(replay_url, tmp_path):
    audit = tmp_path / "logs" / "audit.jsonl"
    policy = Policy(input_rail=RailPolicy(threshold=1.0), output_rail=RailPolicy(threshold=0.0),
                    audit=Audit(path=audit))  # redact_text left at its default
    with guarded(FixedScoreJudge(0.3), replay_url, policy) as (url, _):
        client(url).chat.completions.create(model="replay", messages=two_image_messages("A secret question"))
    [record] = audit_records(audit)
    assert record["decision"] == "block" and record["question"]["chars"] == len("A secret question")
    assert "secret" not in audit.read_text() and "powders" not in audit.read_text()
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600


def test_audit_log_rotates_by_size_between_records(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2000, backups=2)
    records = [AuditRecord(request_id=f"r{i:02d}", time="2026-12-01T00:00:00.000+00:00", judge="j",
                           decision="allow", question={"sha256": "0" * 64, "chars": i}) for i in range(30)]
    for record in records:
        log.write(record)
    log.close()
    kept = [path.with_name("audit.jsonl.2"), path.with_name("audit.jsonl.1"), path]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in kept)
    read = [r.request_id for p in kept for r in read_audit_log(p)]  # every line a whole record
    assert read == [r.request_id for r in records[-len(read):]] and len(read) < len(records)
    for file in kept:
        assert file.stat().st_size <= 2000 and stat.S_IMODE(file.stat().st_mode) == 0o600


# --- bodies nested or long beyond reason ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quick_guard(replay_url):
    """A guard with a judge that costs nothing, for what is refused before any judge runs."""
    upstream = replay_app(lambda body: "Fine.")
    with running_server(upstream) as upstream_url, \
            guarded(FixedScoreJudge(0.1), f"{upstream_url}/v1", Policy(limits=Limits(max_messages=8))) as (url, _):
        yield url, upstream


HI = [{"role": "user", "content": "hi"}]


def nested(depth: int):
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize("body, param, code", [
    (b"[" * 100_000 + b"]" * 100_000, None, "json_too_deep"),
    (b'{"model": "x", "messages": ' + b"[" * 100_000, None, "json_too_deep"),
    (json.dumps({"model": "x", "messages": HI, "metadata": nested(100)}).encode(), "metadata" + ".0" * 63,
     "json_too_deep"),
    (b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "logit_bias": {"1": NaN}}', None,
     "invalid_json"),
    (b'{"model": "x", "messages": [{"role": "user", "content": "hi"}], "top_k": Infinity}', None, "invalid_json"),
])
def test_bodies_nested_too_deep_too_many_messages_or_not_json_are_400(quick_guard, body, param, code):
    url, upstream = quick_guard
    forwarded = upstream.state.requests
    response = httpx.post(f"{url}/chat/completions", content=body, timeout=30,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert upstream.state.requests == forwarded


def test_messages_are_served_up_to_the_limit_and_refused_over_it(quick_guard):
    url, _ = quick_guard
    assert client(url).chat.completions.create(model="x", messages=HI * 8).choices[0].message.content == "Fine."
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).chat.completions.create(model="x", messages=HI * 9)
    assert (caught.value.body["code"], caught.value.body["param"]) == ("too_many_messages", "messages")


# --- fuzzing the guard's OpenAPI schema -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed_guard(tiny_judge, replay_url):
    """The guard on the tiny VLM judge in front of the replay upstream: (its base URL, its app)."""
    with VLMJudge(tiny_judge) as judge:
        app = create_app(GuardService(Guard(judge, Policy()), replay_url))
        with running_server(app) as url:
            yield url, app


@pytest.fixture(scope="module")
def guard_schema(fuzzed_guard):
    _, app = fuzzed_guard
    return schemathesis.openapi.from_dict(app.openapi())


UPSTREAM_OR_JUDGE_ERRORS = {502, 503, 504}
OPERATIONS = [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/healthz"), ("GET", "/livez"),
              ("GET", "/metrics")]


@pytest.mark.parametrize("method, path", OPERATIONS)
@settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_request_the_schema_allows_is_a_500(guard_schema, fuzzed_guard, method, path, data):
    url, _ = fuzzed_guard
    case = data.draw(guard_schema[path][method].as_strategy())
    response = case.call(base_url=url, timeout=60)
    assert response.status_code < 500 or response.status_code in UPSTREAM_OR_JUDGE_ERRORS, (
        f"{case.method} {case.path}: {response.status_code} {response.text[:500]}")
    assert "Traceback" not in response.text


def test_the_schema_describes_the_chat_request_body(fuzzed_guard):
    """Without the body's schema, schemathesis would send the chat route no body at all."""
    _, app = fuzzed_guard
    paths = app.openapi()["paths"]
    body = paths["/v1/chat/completions"]["post"]["requestBody"]
    assert set(body["content"]["application/json"]["schema"]["required"]) == {"model", "messages"}
    assert {"/v1/chat/completions", "/v1/models", "/healthz", "/livez", "/metrics"} <= set(paths)


# --- headers that trickle in (slowloris) ------------------------------------------------------------------------

SLOW_REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: guard\r\nX-Slow: "


def trickle_headers(socks: list[socket.socket], seconds: float) -> list[bytes | None]:
    """Send SLOW_REQUEST on each connection, then one more header byte every 0.3 s, never ending the headers, for
    at most `seconds`: what the guard sent on each before closing it (None: still open at the end)."""
    answers: list[bytes | None] = [None] * len(socks)
    received = [b""] * len(socks)
    for sock in socks:
        sock.sendall(SLOW_REQUEST)
        sock.setblocking(False)
    deadline = time.monotonic() + seconds
    while None in answers and time.monotonic() < deadline:
        time.sleep(0.3)
        for i, sock in enumerate(socks):
            if answers[i] is not None:
                continue
            try:
                while chunk := sock.recv(65536):
                    received[i] += chunk
                answers[i] = received[i]  # end of file: the guard closed it
            except BlockingIOError:  # still open: one more byte
                try:
                    sock.send(b"a")
                except OSError:
                    answers[i] = received[i]
            except ConnectionResetError:
                answers[i] = received[i]
    return answers


def guard_address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").removesuffix("/v1").split(":")
    return host, int(port)


def assert_header_timeout(answer: bytes | None) -> None:
    assert answer is not None, "the guard kept a connection whose headers never ended"
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"


def test_headers_that_trickle_in_get_408_and_their_connection_closed(replay_url):
    policy = Policy(server=Server(header_read_timeout_s=1.0))
    with guarded(FixedScoreJudge(0.1), replay_url, policy) as (url, service):
        with socket.create_connection(guard_address(url), timeout=20) as sock:
            [answer] = trickle_headers([sock], seconds=3)
        metrics = httpx.get(f"{url.removesuffix('/v1')}/metrics", timeout=30).text
    assert_header_timeout(answer)
    # Counted as a body's 408 is: an invalid request, error kind request_timeout.
    assert 'misguard_errors_total{kind="request_timeout"} 1.0' in metrics
    assert 'misguard_requests_total{outcome="invalid"} 1.0' in metrics


def test_many_slow_or_silent_connections_are_all_closed_and_the_guard_serves_again(replay_url):
    policy = Policy(server=Server(header_read_timeout_s=1.0, limit_concurrency=8))
    with guarded(FixedScoreJudge(0.1), replay_url, policy) as (url, _):
        address = guard_address(url)
        silent = [socket.create_connection(address, timeout=5) for _ in range(4)]  # never send a byte
        slow = [socket.create_connection(address, timeout=20) for _ in range(20)]
        try:
            answers = trickle_headers(slow, seconds=5)
            closed_silently = [sock.recv(1) for sock in silent]  # b"": closed with nothing said
        finally:
            for sock in silent + slow:
                sock.close()
        for answer in answers:
            assert_header_timeout(answer)
        assert closed_silently == [b""] * len(silent)
        reply = client(url).chat.completions.create(model="replay", messages=two_image_messages("How?"))
    assert reply.choices[0].message.content == UNSAFE_REPLY


LIVE = b'{"status":"ok"}'


def get_livez(sock: socket.socket) -> bytes:
    """One GET /livez on an open connection: the whole response; fails if the guard closes the connection."""
    sock.sendall(b"GET /livez HTTP/1.1\r\nHost: guard\r\n\r\n")
    response = b""
    while not response.endswith(LIVE):
        chunk = sock.recv(65536)
        assert chunk, f"the guard closed a keep-alive connection: {response!r}"
        response += chunk
    return response


def test_a_keep_alive_connection_gets_a_header_deadline_per_request_not_per_connection(replay_url):
    policy = Policy(server=Server(header_read_timeout_s=1.0, timeout_keep_alive_s=5.0))
    with guarded(FixedScoreJudge(0.1), replay_url, policy) as (url, _):
        with socket.create_connection(guard_address(url), timeout=20) as sock:
            responses = []
            for _ in range(3):  # 1.2 s on one connection in all: each pause within both deadlines
                responses.append(get_livez(sock))
                time.sleep(0.6)
            [answer] = trickle_headers([sock], seconds=3)  # the next request's deadline runs again
    assert all(response.startswith(b"HTTP/1.1 200 ") for response in responses)
    assert_header_timeout(answer)
