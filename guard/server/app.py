"""The FastAPI routes of `misguard serve`, and running them (uvicorn).

POST /v1/chat/completions, GET /v1/models, GET /healthz, GET /metrics. Every error, ours or FastAPI's, is an
OpenAI-style body `{"error": {"message", "type", "param", "code"}}`; never a stack trace.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from misguard.guard.server.protocol import GuardHTTPError
from misguard.guard.server.service import GuardService, Reply

log = logging.getLogger("misguard.serve")


def create_app(service: GuardService, *, api_key: str | None = None) -> FastAPI:
    """The guard's FastAPI app around `service` (started and closed with the app). With `api_key`, clients
    must send `Authorization: Bearer API_KEY` to the /v1 routes."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.aclose()

    app = FastAPI(title="misguard guard", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    limit = service.policy.limits.max_request_bytes

    def authorized(request: Request) -> bool:
        if api_key is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        if not authorized(request):
            return _send(Reply(401, GuardHTTPError(401, "missing or wrong API key", type="authentication_error",
                                                   code="invalid_api_key").body()))
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return _too_large(limit, service)
        raw = bytearray()
        async for piece in request.stream():
            raw += piece
            if len(raw) > limit:
                return _too_large(limit, service)
        return _send(await service.chat_completion(bytes(raw)))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        if not authorized(request):
            return _send(Reply(401, GuardHTTPError(401, "missing or wrong API key", type="authentication_error",
                                                   code="invalid_api_key").body()))
        return _send(await service.models())

    @app.get("/healthz")
    async def healthz() -> Response:
        return _send(await service.health())

    @app.get("/metrics")
    async def metrics() -> Response:
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
    if isinstance(reply.body, str):
        return Response(reply.body, status_code=reply.status_code, media_type=reply.media_type,
                        headers=reply.headers)
    return JSONResponse(reply.body, status_code=reply.status_code, headers=reply.headers)


def _too_large(limit: int, service: GuardService) -> Response:
    service.metrics.requests.labels("invalid").inc()
    service.metrics.errors.labels("invalid_request").inc()
    return _send(Reply(413, GuardHTTPError(413, f"the request body is larger than {limit} bytes",
                                           code="request_too_large").body()))


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info") -> None:
    """Serve `app` with uvicorn until interrupted."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


@contextmanager
def running_server(app: FastAPI, host: str = "127.0.0.1", port: int = 0, *,
                   startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve `app` on a thread (uvicorn) and yield its base URL, http://HOST:PORT (port 0: a free one); stopped
    on exit. For tests, benchmarks and embedding the guard in another program."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(server.serve())
        except BaseException as exc:  # surfaced to the caller below
            failure.append(exc)

    thread = threading.Thread(target=run, name="misguard-guard-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if failure or not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the guard server did not start: {failure[0] if failure else 'timeout'}")
        time.sleep(0.02)
    bound: Any = server.servers[0].sockets[0].getsockname()
    try:
        yield f"http://{bound[0]}:{bound[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
