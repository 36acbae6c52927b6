"""The guard service: one chat completion through input rail -> upstream -> output rail, with the policy's
answers to blocks and failures, the audit record and the metrics. The FastAPI routes (app.py) only carry bytes
in and out of it.

Streaming: the upstream's stream is read whole, then the output rail judges the full text, then the buffered
events are released (or a refusal stream is sent instead). The client therefore sees its first token only when
the upstream has finished; in exchange nothing unsafe ever reaches it, and the stream is always valid SSE ending
in `data: [DONE]`. Errors found before anything is sent (all of them, since the stream is buffered) are plain
HTTP errors with an OpenAI-style body.

What the guard did with a request is decided once (`decide`, from the rails' verdicts) and the reply is encoded
(strict JSON: no NaN or Infinity, which are not JSON) before the audit record and the metrics are written, so
the client, the audit log and /metrics always say the same thing.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import httpx
from pydantic import ValidationError

from misguard.guard.chat_input import ChatInput, InputError, PixelBudget, parse_chat_messages
from misguard.guard.rails import RAILS, Guard, Rail, RailCheck, RailScore, Verdict
from misguard.guard.server.audit import AuditLog, AuditRecord
from misguard.guard.server.batching import MicroBatcher
from misguard.guard.server.metrics import GuardMetrics
from misguard.guard.server.protocol import (
    EXTENSION_FIELD,
    SSE_DONE,
    ChatCompletionRequest,
    GuardHTTPError,
    refusal_completion,
    refusal_stream,
    sse_event,
)

log = logging.getLogger("misguard.serve")


@dataclass
class Reply:
    """What the route sends: a JSON body or an SSE text body, with its status and headers."""

    status_code: int
    body: dict[str, Any] | str
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    _content: bytes | None = field(default=None, init=False, repr=False)

    def content(self) -> bytes:
        """The body as sent: the SSE text, or the JSON body encoded strictly. Raises ValueError for a number
        that is not JSON (NaN, Infinity) rather than send it."""
        if self._content is None:
            text = self.body if isinstance(self.body, str) else json.dumps(
                self.body, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
            self._content = text.encode()
        return self._content


@dataclass(frozen=True)
class Decision:
    """What the guard did with one request. The response's `misguard` field, the audit record and the metrics
    all take it from here."""

    decision: Literal["allow", "block", "error"]
    """allow; block (a rail blocked it); error (a rail's judge failed and the policy fails closed: HTTP 503)."""
    blocked_by: Rail | None = None
    fail_open: bool = False
    """A judge failure was let through (on_failure: open)."""


def decide(verdicts: dict[Rail, Verdict]) -> Decision:
    """The request's decision from its rails' verdicts: the first rail (input, then output) whose verdict blocks
    decides (error when it blocks because its judge failed), else allow."""
    fail_open = any(v.fail_open for v in verdicts.values())
    for rail in RAILS:
        verdict = verdicts.get(rail)
        if verdict is not None and verdict.blocked:
            return Decision("error" if verdict.failed else "block", rail, fail_open)
    return Decision("allow", None, fail_open)


@dataclass
class _Upstream:
    """The upstream's answer: the completion (non-streaming) or its chunks (streaming), and the text judged."""

    text: str
    model: str | None
    completion: dict[str, Any] | None = None
    chunks: list[dict[str, Any]] = field(default_factory=list)


class GuardService:
    """A Guard in front of one upstream OpenAI-compatible server (`upstream_url` ends in /v1). Call `start()`
    inside the server's event loop and `aclose()` on shutdown."""

    def __init__(self, guard: Guard, upstream_url: str, *, upstream_api_key: str | None = None,
                 metrics: GuardMetrics | None = None):
        self.guard = guard
        self.policy = guard.policy
        self.upstream_url = upstream_url.rstrip("/")
        self.upstream_api_key = upstream_api_key
        self.metrics = metrics or GuardMetrics()
        audit = self.policy.audit
        self.audit = AuditLog(audit.path, redact_text=audit.redact_text, max_bytes=audit.max_bytes,
                              backups=audit.backups)
        batching = self.policy.batching
        self.requests_in_flight = 0
        """Chat completions between arrival and reply: each may still submit a check to the batcher."""
        self.image_budget = PixelBudget(self.policy.limits.max_decoded_pixels_in_flight)
        """Image pixels requests are decoding or holding (both rails judge them), held until each one's reply."""
        self.batcher = MicroBatcher(guard.score, max_batch_size=batching.max_batch_size,
                                    max_wait_s=batching.max_wait_ms / 1000, on_batch=self.metrics.on_batch,
                                    others_in_flight=lambda batched: self.requests_in_flight > batched)
        self.client = None

    async def start(self) -> None:
        self.batcher.start()
        headers = {"Authorization": f"Bearer {self.upstream_api_key}"} if self.upstream_api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.upstream_url, headers=headers, timeout=self.policy.timeouts.upstream_s,
            # Enough pooled connections for every request the guard may hold at once. An idle pooled connection is
            # dropped after 2 s, before a server's own keep-alive (uvicorn's default is 5 s) closes it under a
            # request just sent on it (a ReadError, answered 502).
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=2.0))

    async def aclose(self) -> None:
        await self.batcher.aclose()
        if self.client is not None:
            await self.client.aclose()
        self.audit.close()

    # ---- one chat completion ----

    async def chat_completion(self, raw: bytes) -> Reply:
        """The reply to one POST /v1/chat/completions body; never raises."""
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        record = AuditRecord(request_id=request_id, judge=self.guard.judge_id,
                             time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
        self.requests_in_flight += 1
        try:
            try:
                reply = await self._chat_completion(raw, request_id, record)
            except GuardHTTPError as error:
                reply = Reply(error.status_code, error.body())
                record.decision = record.decision or "error"
                record.error = error.message
            # Encoded now, before the record and the metrics are written: a body that cannot be sent is this
            # request's error in all three, not a 500 for the client after an "allow" in the audit log.
            reply.content()
        except Exception as exc:  # a bug: logged with its traceback here, one line for the client
            log.exception("request %s failed", request_id)
            self.metrics.errors.labels("internal").inc()
            reply = Reply(500, GuardHTTPError(500, f"internal guard error ({exc.__class__.__name__}); see the "
                                              "guard's log", type="server_error").body())
            record.decision, record.error = "error", f"internal: {exc.__class__.__name__}: {exc}"
        finally:
            self.requests_in_flight -= 1
            self.image_budget.release(request_id)  # both rails are done with its images
        if reply.status_code == 429 and reply.body["error"]["code"] == "images_in_flight":  # a GuardHTTPError body
            reply.headers["retry-after"] = str(self.image_budget.retry_after_s)
        seconds = time.perf_counter() - started
        record.latency_ms["total"] = round(seconds * 1000, 3)
        record.status_code = reply.status_code
        record.decision = record.decision or "error"
        reply.headers["x-request-id"] = request_id
        outcome = {"allow": "allowed", "block": "blocked"}.get(record.decision, "error")
        if record.invalid:
            outcome = "invalid"
        elif reply.status_code == 429:
            outcome = "busy"
        self.metrics.requests.labels(outcome).inc()
        self.metrics.request_latency.observe(seconds)
        self.audit.write(record)
        return reply

    async def _chat_completion(self, raw: bytes, request_id: str, record: AuditRecord) -> Reply:
        # Decoding and checking images is CPU work: off the event loop, so other requests' I/O goes on.
        body, request, chat = await asyncio.to_thread(self._read_request, raw, record)
        record.stream, record.model = request.stream, request.model
        record.question = self.audit.text(chat.question)
        record.images = [info.to_dict() for info in chat.image_info]
        verdicts: dict[Rail, Verdict] = {}

        verdicts["input"] = await self.check(RailCheck("input", chat.images, chat.conversation, id=request_id))
        self._note(record, "input", verdicts["input"])
        if verdicts["input"].blocked:
            return self._blocked(request_id, request, verdicts, record)

        forward = {**body, "messages": chat.forward_messages}
        upstream_started = time.perf_counter()
        upstream = await self._call_upstream(forward, request.stream, record)
        self.metrics.upstream_latency.observe(time.perf_counter() - upstream_started)
        record.latency_ms["upstream"] = round((time.perf_counter() - upstream_started) * 1000, 3)
        record.upstream_model = upstream.model
        record.response = self.audit.text(upstream.text)

        verdicts["output"] = await self.check(RailCheck("output", chat.images, chat.question, upstream.text,
                                                        id=request_id))
        self._note(record, "output", verdicts["output"])
        if verdicts["output"].blocked:
            return self._blocked(request_id, request, verdicts, record)

        extension = self._decided(request_id, verdicts, record)
        if not request.stream:
            return Reply(200, {**upstream.completion, EXTENSION_FIELD: extension})
        chunks = list(upstream.chunks)
        if chunks:
            chunks[-1] = {**chunks[-1], EXTENSION_FIELD: extension}
        return Reply(200, "".join(sse_event(c) for c in chunks) + SSE_DONE, media_type="text/event-stream")

    def _read_request(self, raw: bytes, record: AuditRecord) -> tuple[dict[str, Any], ChatCompletionRequest,
                                                                          ChatInput]:
        """The body as JSON, its typed view and its checked messages; GuardHTTPError (4xx) otherwise: not JSON
        (NaN and Infinity included), nested deeper than limits.max_json_depth, more than limits.max_messages
        messages, a field of the wrong type, or messages the guard refuses (parse_chat_messages)."""
        limits = self.policy.limits
        try:
            try:
                body = json.loads(raw, parse_constant=_not_json)
            except RecursionError:  # the parser's own stack ran out: far deeper than any limit
                raise GuardHTTPError(400, f"the request body nests deeper than {limits.max_json_depth} levels",
                                     code="json_too_deep") from None
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
                raise GuardHTTPError(400, f"the request body is not valid JSON{where}", code="invalid_json")
            except _NotJSON as exc:
                raise GuardHTTPError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
            too_deep = _too_deep(body, limits.max_json_depth)
            if too_deep is not None:
                raise GuardHTTPError(400, f"{'.'.join(too_deep) or 'the body'}: nested deeper than "
                                     f"{limits.max_json_depth} levels", param=".".join(too_deep) or None,
                                     code="json_too_deep")
            if not isinstance(body, dict):
                raise GuardHTTPError(400, "the request body must be a JSON object", code="invalid_json")
            messages = body.get("messages")
            if isinstance(messages, list) and len(messages) > limits.max_messages:
                raise GuardHTTPError(400, f"messages: {len(messages)} messages, more than the limit of "
                                     f"{limits.max_messages}", param="messages", code="too_many_messages")
            try:
                request = ChatCompletionRequest.model_validate(body)
            except ValidationError as exc:
                error = exc.errors()[0]
                param = ".".join(str(x) for x in error["loc"])
                raise GuardHTTPError(400, f"{param}: {error['msg']}", param=param, code="invalid_field") from None
            try:
                chat = parse_chat_messages(body["messages"], self.policy.limits,
                                           image_pixels=self.guard.judge.image_pixels, budget=self.image_budget,
                                           holder=record.request_id)
            except InputError as exc:
                raise GuardHTTPError(exc.status_code, exc.message, param=exc.param, code=exc.code) from None
        except GuardHTTPError as error:
            # 429: a well-formed request the guard is too busy to decode now (its pixel budget is spent), not an
            # invalid one: counted apart, so a dashboard tells load from bad clients.
            busy = error.status_code == 429
            record.invalid = not busy
            self.metrics.errors.labels("busy" if busy else "invalid_request").inc()
            raise
        return body, request, chat

    # ---- rails ----

    async def check(self, check: RailCheck) -> Verdict:
        """The rail's verdict through the micro-batcher, within the policy's judge timeout; failures and
        timeouts are verdicts too (the policy's failure mode decides them)."""
        if not self.guard.enabled(check.rail):
            return self.guard.skipped(check.rail)
        started = time.perf_counter()
        timed_out = False
        try:
            score = await asyncio.wait_for(self.batcher.submit(check), self.policy.timeouts.judge_s)
        except asyncio.TimeoutError:
            score, timed_out = RailScore(), True
        except Exception as exc:
            log.warning("judge failed on the %s rail: %s: %s", check.rail, exc.__class__.__name__, exc)
            score = RailScore(error=f"judge failed: {exc.__class__.__name__}: {exc}")
        seconds = time.perf_counter() - started
        self.metrics.judge_latency.labels(check.rail).observe(seconds)
        verdict = self.guard.verdict(check.rail, score, latency_ms=round(seconds * 1000, 3), timed_out=timed_out)
        if verdict.status == "out_of_domain":
            self.metrics.out_of_domain.labels(check.rail, verdict.decision).inc()
        if verdict.failed:
            self.metrics.errors.labels("judge_timeout" if timed_out else "judge_error").inc()
            if verdict.fail_open:
                self.metrics.fail_open.labels(check.rail).inc()
                log.warning("fail-open pass on the %s rail: %s", check.rail, verdict.reason)
        return verdict

    def _note(self, record: AuditRecord, rail: Rail, verdict: Verdict) -> None:
        record.rails[rail] = {k: v for k, v in verdict.to_dict().items() if k not in ("rail", "judge")}
        record.latency_ms[f"{rail}_rail"] = verdict.latency_ms
        record.fail_open = record.fail_open or verdict.fail_open

    def _decided(self, request_id: str, verdicts: dict[Rail, Verdict], record: AuditRecord) -> dict[str, Any]:
        """The request's Decision, written into its audit record, and the `misguard` field that carries it."""
        decision = decide(verdicts)
        record.decision, record.blocked_by = decision.decision, decision.blocked_by
        record.fail_open = decision.fail_open
        return {"request_id": request_id, "decision": "allow" if decision.decision == "allow" else "block",
                "blocked_by": decision.blocked_by, "fail_open": decision.fail_open,
                "rails": {rail: {k: v for k, v in verdict.to_dict().items() if k != "rail"}
                          for rail, verdict in verdicts.items()}}

    def _blocked(self, request_id: str, request: ChatCompletionRequest, verdicts: dict[Rail, Verdict],
                 record: AuditRecord) -> Reply:
        """A rail said block: a refusal (or the policy's error); a judge failure under fail-closed: HTTP 503."""
        extension = self._decided(request_id, verdicts, record)
        rail = record.blocked_by
        verdict = verdicts[rail]
        if verdict.failed:
            raise GuardHTTPError(
                503, f"the {rail} rail could not judge this request ({verdict.reason}); the guard fails closed",
                type="guard_unavailable", code="judge_timeout" if verdict.status == "timeout" else "judge_error",
                extension=extension)
        self.metrics.blocks.labels(rail).inc()
        on_block = self.policy.on_block
        if on_block.action == "error":
            raise GuardHTTPError(on_block.error_status, on_block.error_message, type="content_filter",
                                 code=f"blocked_by_{rail}_rail", extension=extension)
        if request.stream:
            events = refusal_stream(request_id, request.model, on_block.refusal_text, extension)
            return Reply(200, "".join(events), media_type="text/event-stream")
        return Reply(200, refusal_completion(request_id, request.model, on_block.refusal_text, extension))

    # ---- upstream ----

    async def _call_upstream(self, body: dict[str, Any], stream: bool, record: AuditRecord) -> _Upstream:
        try:
            return await asyncio.wait_for(self._stream(body) if stream else self._complete(body),
                                          self.policy.timeouts.upstream_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            self.metrics.errors.labels("upstream_timeout").inc()
            raise GuardHTTPError(504, f"the upstream did not answer within {self.policy.timeouts.upstream_s:g} s",
                                 type="upstream_error", code="upstream_timeout") from None
        except httpx.TransportError as exc:
            self.metrics.errors.labels("upstream_error").inc()
            raise GuardHTTPError(502, f"the upstream at {self.upstream_url} cannot be reached "
                                 f"({exc.__class__.__name__})", type="upstream_error",
                                 code="upstream_unreachable") from None
        except GuardHTTPError:
            self.metrics.errors.labels("upstream_error").inc()
            raise

    async def _complete(self, body: dict[str, Any]) -> _Upstream:
        response = await self.client.post("/chat/completions", json=body)
        if response.status_code != 200:
            raise _upstream_status_error(response.status_code, response.content)
        try:
            completion = json.loads(response.content, parse_constant=_not_json)
            message = completion["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise GuardHTTPError(502, "the upstream's answer is not a chat completion", type="upstream_error",
                                 code="upstream_invalid") from None
        return _Upstream(text=message.get("content") or "", model=completion.get("model"), completion=completion)

    async def _stream(self, body: dict[str, Any]) -> _Upstream:
        chunks: list[dict[str, Any]] = []
        text: list[str] = []
        async with self.client.stream("POST", "/chat/completions", json=body) as response:
            if response.status_code != 200:
                raise _upstream_status_error(response.status_code, await response.aread())
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and SSE comments
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    done = True
                    break
                try:
                    chunk = json.loads(data, parse_constant=_not_json)
                except ValueError:  # not JSON, or NaN / Infinity: nothing the guard could pass on
                    raise GuardHTTPError(502, "the upstream's stream has an event that is not JSON",
                                         type="upstream_error", code="upstream_invalid") from None
                if "error" in chunk:
                    raise GuardHTTPError(502, f"the upstream's stream failed: {_error_message(chunk)}",
                                         type="upstream_error", code="upstream_error")
                chunks.append(chunk)
                for choice in chunk.get("choices") or []:
                    content = (choice.get("delta") or {}).get("content")
                    if content:
                        text.append(content)
        if not done:
            raise GuardHTTPError(502, "the upstream's stream ended before data: [DONE]", type="upstream_error",
                                 code="upstream_invalid")
        model = next((c.get("model") for c in chunks if c.get("model")), None)
        return _Upstream(text="".join(text), model=model, chunks=chunks)

    async def models(self) -> Reply:
        """The upstream's GET /models, passed through."""
        try:
            response = await self.client.get("/models", timeout=min(10.0, self.policy.timeouts.upstream_s))
        except httpx.TimeoutException:
            return Reply(504, GuardHTTPError(504, "the upstream did not answer", type="upstream_error",
                                             code="upstream_timeout").body())
        except httpx.TransportError as exc:
            return Reply(502, GuardHTTPError(502, f"the upstream cannot be reached ({exc.__class__.__name__})",
                                             type="upstream_error", code="upstream_unreachable").body())
        if response.status_code != 200:
            return Reply(502, _upstream_status_error(response.status_code, response.content).body())
        return Reply(200, response.json())

    async def health(self, *, details: bool = True) -> Reply:
        """200 when the judge's batcher runs and the upstream answers GET /models; 503 otherwise. The body says
        which, and with `details` also the judge, the upstream's URL and the guard's rails and policy."""
        judge_ok = self.batcher.running
        try:
            upstream_ok = (await self.client.get("/models", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            upstream_ok = False
        ok = judge_ok and upstream_ok
        if not details:
            return Reply(200 if ok else 503, {"status": "ok" if ok else "unavailable"})
        return Reply(200 if ok else 503, {"status": "ok" if ok else "unavailable", "judge": self.guard.judge_id,
                                          "judge_ready": judge_ok, "upstream": self.upstream_url,
                                          "upstream_ready": upstream_ok, "guard": self.guard.describe()})


class _NotJSON(ValueError):
    pass


def _not_json(constant: str) -> Any:
    """json.loads' parse_constant: Python's parser reads NaN and Infinity, which are not JSON; refused."""
    raise _NotJSON(f"{constant} is not a JSON number")


def _too_deep(value: Any, limit: int) -> list[str] | None:
    """The path (keys and indices) to the first array or object nested deeper than `limit`, or None."""
    stack: list[tuple[Any, int, list[str]]] = [(value, 1, [])]
    while stack:  # iterative: the body's depth must not become the guard's recursion depth
        node, depth, path = stack.pop()
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
        if children is None:
            continue
        if depth > limit:
            return path
        stack.extend((child, depth + 1, [*path, str(key)]) for key, child in children
                     if isinstance(child, (dict, list)))
    return None


def _error_message(body: Any) -> str:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error if error is not None else body)[:500]


def _upstream_status_error(status: int, content: bytes) -> GuardHTTPError:
    """The upstream refused: its 4xx errors reach the client as they are (the client's request was at fault);
    5xx becomes 502 naming the upstream's status."""
    try:
        body = json.loads(content)
    except (json.JSONDecodeError, UnicodeDecodeError):
        body = content.decode(errors="replace")
    message = _error_message(body) if isinstance(body, dict) else str(body)[:500]
    if 400 <= status < 500:
        return GuardHTTPError(status, f"the upstream refused the request: {message}", type="upstream_error",
                              code=f"upstream_{status}")
    return GuardHTTPError(502, f"the upstream failed with HTTP {status}: {message}", type="upstream_error",
                          code="upstream_error")
