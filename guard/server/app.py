"""The FastAPI routes of `misguard serve`, and running them (uvicorn).

POST /v1/chat/completions, GET /v1/models, GET /healthz, GET /metrics, GET /livez. Every error, ours or
FastAPI's, is an OpenAI-style body `{"error": {"message", "type", "param", "code"}}`; never a stack trace.

With an API key, everything but the liveness probe /livez needs it: the /v1 routes and /metrics answer 401
without it, /healthz answers only its status (no upstream URL, no policy). Against clients that hold connections
open, uvicorn serves at most the policy's `server.limit_concurrency` connections (beyond: 503) and closes idle
keep-alive connections after `server.timeout_keep_alive_s`; headers that have not arrived within
`server.header_read_timeout_s` (of the connection's opening, or of the previous response) close the connection,
and a body that has not arrived within `server.body_read_timeout_s` is answered 408 and its connection closed.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from misguard.guard.policy import Server
from misguard.guard.server.protocol import ChatCompletionRequest, GuardHTTPError
from misguard.guard.server.service import GuardService, Reply

log = logging.getLogger("misguard.serve")


CHAT_REQUEST_BODY = {"required": True, "content": {"application/json": {
    "schema": ChatCompletionRequest.model_json_schema()}}}
"""The chat route reads its body itself (size limit, read deadline); its OpenAPI schema describes the body."""


def create_app(service: GuardService, *, api_key: str | None = None) -> FastAPI:
    """The guard's FastAPI app around `service` (started and closed with the app). With `api_key`, clients
    must send `Authorization: Bearer API_KEY` to every route but /livez (/healthz without it: status only).
    Its OpenAPI schema is `app.openapi()`; it is not served."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(title="misguard guard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server_policy = service.policy.server
    app.state.metrics = service.metrics  # the header deadline (in the protocol, below the app) counts there too
    limit = service.policy.limits.max_request_bytes
    body_deadline_s = service.policy.server.body_read_timeout_s
    expected = f"Bearer {api_key}".encode() if api_key is not None else None

    def authorized(request: Request) -> bool:
        if expected is None:
            return True
        # Constant time: how much of a guessed key matched must not show in how long the answer takes.
        return hmac.compare_digest(request.headers.get("authorization", "").encode(), expected)

    @app.post("/v1/chat/completions", openapi_extra={"requestBody": CHAT_REQUEST_BODY})
    async def chat_completions(request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _refused(service, 413, f"the request body is larger than {limit} bytes", "request_too_large")
        raw = bytearray()
        try:
            async with asyncio.timeout(body_deadline_s):
                async for piece in request.stream():
                    raw += piece
                    if len(raw) > limit:
                        return _refused(service, 413, f"the request body is larger than {limit} bytes",
                                        "request_too_large")
        except TimeoutError:
            return _refused(service, 408, f"the request body did not arrive within {body_deadline_s:g} s",
                            "request_timeout")
        return _send(await service.chat_completion(bytes(raw)))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        return _send(await service.models())

    @app.get("/healthz")
    async def healthz(request: Request) -> Response:
        return _send(await service.health(details=authorized(request)))

    @app.get("/livez")
    async def livez() -> Response:
        """Liveness: the process answers. Open without the API key; it says nothing else."""
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        if not authorized(request):
            return _unauthorized()
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(GuardHTTPError(exc.status_code, str(exc.detail), type=kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse(GuardHTTPError(400, "invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(GuardHTTPError(500, "internal guard error; see the guard's log",
                                           type="server_error").body(), status_code=500)

    return app


def _send(reply: Reply) -> Response:
    return Response(reply.content(), status_code=reply.status_code, media_type=reply.media_type,
                    headers=reply.headers)


def _unauthorized() -> Response:
    return _send(Reply(401, GuardHTTPError(401, "missing or wrong API key", type="authentication_error",
                                           code="invalid_api_key").body()))


def _refused(service: GuardService, status: int, message: str, code: str) -> Response:
    """A body the guard will not read (further): counted, answered, and its connection closed, so the rest of
    the body is never read as a next request."""
    service.metrics.requests.labels("invalid").inc()
    service.metrics.errors.labels("request_timeout" if status == 408 else "invalid_request").inc()
    return _send(Reply(status, GuardHTTPError(status, message, code=code).body(), headers={"connection": "close"}))


class _HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with the deadline on request headers that uvicorn lacks: its keep-alive timer starts
    only after a response, and limit_concurrency answers 503 only once headers are in, so clients trickling their
    headers in (slowloris) would hold every connection. h11 rather than httptools: uvicorn always has it."""

    header_read_timeout_s = Server().header_read_timeout_s
    metrics: Any = None  # the app's GuardMetrics, where a 408 for headers is counted as a body's is
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow_header_deadline()

    def handle_events(self) -> None:  # uvicorn's hook for data received, and for the end of each response
        super().handle_events()
        self._follow_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self._header_deadline is not None:
            self._header_deadline.cancel()

    def _follow_header_deadline(self) -> None:
        # h11 has the client IDLE from the connection's opening, and again from the end of each request/response
        # cycle, until a request's headers are parsed: the deadline runs exactly then.
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._header_deadline is None:
            self._header_deadline = self.loop.call_later(self.header_read_timeout_s, self._headers_too_slow)
        elif not waiting and self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why the connection closes
            if self.metrics is not None:
                self.metrics.requests.labels("invalid").inc()
                self.metrics.errors.labels("request_timeout").inc()
            body = json.dumps(GuardHTTPError(408, f"the request headers did not arrive within "
                                                  f"{self.header_read_timeout_s:g} s", code="request_timeout").body())
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            for event in (h11.Response(status_code=408, reason=b"Request Timeout", headers=headers),
                          h11.Data(data=body.encode()), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        self.transport.close()


def _uvicorn_limits(app: FastAPI, server: Server | None) -> dict[str, Any]:
    """uvicorn's connection limits and HTTP protocol (with the header deadline) from `server`, else the policy the
    app was made with, else the defaults."""
    server = server or getattr(app.state, "server_policy", None) or Server()
    # uvicorn makes a protocol per connection from a class: the deadline travels as a class attribute.
    protocol = type("H11Protocol", (_HeaderDeadlineProtocol,), {"header_read_timeout_s": server.header_read_timeout_s,
                                                                "metrics": getattr(app.state, "metrics", None)})
    return {"limit_concurrency": server.limit_concurrency, "timeout_keep_alive": server.timeout_keep_alive_s,
            "http": protocol}


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
               server: Server | None = None) -> None:
    """Serve `app` with uvicorn until interrupted, within `server`'s connection limits and header deadline
    (default: those of the policy the app was made with)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10,
                **_uvicorn_limits(app, server))


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, server: Server | None = None,
                   startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `app` on a thread (uvicorn) and yield its base URL, http://HOST:PORT (port 0: a free one); stopped
    on exit. Connection limits as in run_server. For tests, benchmarks and embedding the guard in another
    program. Raises RuntimeError when the server does not start within `startup_timeout_s`."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            **_uvicorn_limits(app, server))
    uvicorn_server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(uvicorn_server.serve())
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="misguard-guard-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not uvicorn_server.started:
        if failure or not thread.is_alive() or time.monotonic() > deadline:
            uvicorn_server.should_exit = True
            raise RuntimeError(f"the guard server did not start: {failure[0] if failure else 'timeout'}")
        time.sleep(0.02)
    bound: Any = uvicorn_server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        uvicorn_server.should_exit = True
        thread.join(timeout=30)
