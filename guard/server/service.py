"""The guard service: one chat completion through input rail -> upstream -> output rail, with the policy's
answers to blocks and failures, the audit record and the metrics. The FastAPI routes (app.py) only carry bytes
in and out of it.

Streaming: the upstream's stream is read whole, then the output rail judges the full text, then the buffered
events are released (or a refusal stream is sent instead). The client therefore sees its first token only when
the upstream has finished; in exchange nothing unsafe ever reaches it, and the stream is always valid SSE ending
in `data: [DONE]`. Errors found before anything is sent (all of them, since the stream is buffered) are plain
HTTP errors with an OpenAI-style body.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx
from pydantic import ValidationError

from misguard.guard.chat_input import ChatInput, InputError, parse_chat_messages
from misguard.guard.rails import Guard, Rail, RailCheck, RailScore, Verdict
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
        self.audit = AuditLog(self.policy.audit.path, redact_text=self.policy.audit.redact_text)
        batching = self.policy.batching
        self.requests_in_flight = 0
        """Chat completions between arrival and reply: each may still submit a check to the batcher."""
        self.batcher = MicroBatcher(guard.score, max_batch_size=batching.max_batch_size,
                                    max_wait_s=batching.max_wait_ms / 1000, on_batch=self.metrics.on_batch,
                                    others_in_flight=lambda batched: self.requests_in_flight > batched)
        self.client = None

    async def start(self) -> None:
        self.batcher.start()
        headers = {"Authorization": f"Bearer {self.upstream_api_key}"} if self.upstream_api_key else {}
        self.client = httpx.AsyncClient(
            base_url=self.upstream_url, headers=headers, timeout=self.policy.timeouts.upstream_s,
            # Enough pooled connections for every request the guard may hold at once.
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256))

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
            reply = await self._chat_completion(raw, request_id, record)
        except GuardHTTPError as error:
            reply = Reply(error.status_code, error.body())
            record.decision = record.decision or "error"
            record.error = error.message
        except Exception as exc:  # a bug: logged with its traceback here, one line for the client
            log.exception("request %s failed", request_id)
            self.metrics.errors.labels("internal").inc()
            reply = Reply(500, GuardHTTPError(500, f"internal guard error ({exc.__class__.__name__}); see the "
                                              "guard's log", type="server_error").body())
            record.decision, record.error = "error", f"internal: {exc.__class__.__name__}: {exc}"
        finally:
            self.requests_in_flight -= 1
        seconds = time.perf_counter() - started
        record.latency_ms["total"] = round(seconds * 1000, 3)
        record.status_code = reply.status_code
        record.decision = record.decision or "error"
        reply.headers["x-request-id"] = request_id
        outcome = {"allow": "allowed", "block": "blocked"}.get(record.decision, "error")
        if record.invalid:
            outcome = "invalid"
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

        verdicts["input"] = await self.check(RailCheck("input", chat.images, chat.question, id=request_id))
        self._note(record, "input", verdicts["input"])
        if verdicts["input"].blocked:
            return self._blocked(request_id, request, verdicts, "input", record)

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
            return self._blocked(request_id, request, verdicts, "output", record)

        record.decision = "allow"
        extension = self._extension(request_id, verdicts, None)
        if not request.stream:
            return Reply(200, {**upstream.completion, EXTENSION_FIELD: extension})
        chunks = list(upstream.chunks)
        if chunks:
            chunks[-1] = {**chunks[-1], EXTENSION_FIELD: extension}
        return Reply(200, "".join(sse_event(c) for c in chunks) + SSE_DONE, media_type="text/event-stream")

    def _read_request(self, raw: bytes, record: AuditRecord) -> tuple[dict[str, Any], ChatCompletionRequest,
                                                                          ChatInput]:
        """The body as JSON, its typed view and its checked messages; GuardHTTPError (4xx) otherwise."""
        try:
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
                raise GuardHTTPError(400, f"the request body is not valid JSON{where}", code="invalid_json")
            if not isinstance(body, dict):
                raise GuardHTTPError(400, "the request body must be a JSON object", code="invalid_json")
            try:
                request = ChatCompletionRequest.model_validate(body)
            except ValidationError as exc:
                error = exc.errors()[0]
                param = ".".join(str(x) for x in error["loc"])
                raise GuardHTTPError(400, f"{param}: {error['msg']}", param=param, code="invalid_field") from None
            try:
                chat = parse_chat_messages(body["messages"], self.policy.limits)
            except InputError as exc:
                raise GuardHTTPError(exc.status_code, exc.message, param=exc.param, code=exc.code) from None
        except GuardHTTPError:
            record.invalid = True
            self.metrics.errors.labels("invalid_request").inc()
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

    def _extension(self, request_id: str, verdicts: dict[Rail, Verdict], blocked_by: Rail | None) -> dict[str, Any]:
        return {"request_id": request_id, "decision": "block" if blocked_by else "allow", "blocked_by": blocked_by,
                "fail_open": any(v.fail_open for v in verdicts.values()),
                "rails": {rail: {k: v for k, v in verdict.to_dict().items() if k != "rail"}
                          for rail, verdict in verdicts.items()}}

    def _blocked(self, request_id: str, request: ChatCompletionRequest, verdicts: dict[Rail, Verdict], rail: Rail,
                 record: AuditRecord) -> Reply:
        """A rail said block: a refusal (or the policy's error); a judge failure under fail-closed: HTTP 503."""
        verdict = verdicts[rail]
        extension = self._extension(request_id, verdicts, rail)
        if verdict.failed:
            record.decision = "error"
            raise GuardHTTPError(
                503, f"the {rail} rail could not judge this request ({verdict.reason}); the guard fails closed",
                type="guard_unavailable", code="judge_timeout" if verdict.status == "timeout" else "judge_error",
                extension=extension)
        record.decision, record.blocked_by = "block", rail
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
            completion = response.json()
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
                    chunk = json.loads(data)
                except json.JSONDecodeError:
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

    async def health(self) -> Reply:
        """200 when the judge's batcher runs and the upstream answers GET /models; 503 otherwise."""
        judge_ok = self.batcher.running
        try:
            upstream_ok = (await self.client.get("/models", timeout=2.0)).status_code == 200
        except httpx.HTTPError:
            upstream_ok = False
        ok = judge_ok and upstream_ok
        return Reply(200 if ok else 503, {"status": "ok" if ok else "unavailable", "judge": self.guard.judge_id,
                                          "judge_ready": judge_ok, "upstream": self.upstream_url,
                                          "upstream_ready": upstream_ok, "guard": self.guard.describe()})


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
