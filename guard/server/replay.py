"""A replay upstream: an OpenAI-compatible chat server that answers from recorded responses, instantly.

For trying a guard policy on recorded data (e.g. MIS or MOSSBench responses) without a VLM, and for measuring
the guard's own latency with an upstream that costs nothing (bench/guard_latency.py). The answer to a request
is `responder(body)`; `replay_app(responses)` answers by the request's `user` field.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from misguard.guard.server.protocol import SSE_DONE, sse_event


def replay_app(responses: Mapping[str, str] | Callable[[dict[str, Any]], str], *,
               model: str = "replay") -> FastAPI:
    """The replay server. `responses` maps a request's `user` field to its answer (a missing key is HTTP 404),
    or is a function of the request body."""
    app = FastAPI(title="misguard replay upstream", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.requests = 0
    app.state.last_body = None

    def answer(body: dict[str, Any]) -> str | None:
        if callable(responses):
            return responses(body)
        return responses.get(str(body.get("user")))

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model, "object": "model", "owned_by": "misguard"}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        app.state.requests += 1
        body = await request.json()
        app.state.last_body = body
        text = answer(body)
        if text is None:
            return JSONResponse({"error": {"message": f"no recorded response for user={body.get('user')!r}",
                                           "type": "not_found", "param": "user", "code": None}}, status_code=404)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not body.get("stream"):
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": len(text.split()), "total_tokens": 0}})
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        words = text.split(" ")
        events = [sse_event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "finish_reason": None}]})]
        events += [sse_event({**base, "choices": [{"index": 0, "delta": {"content": (" " if i else "") + word},
                                                   "finish_reason": None}]}) for i, word in enumerate(words)]
        events.append(sse_event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        return Response("".join(events) + SSE_DONE, media_type="text/event-stream")

    return app
