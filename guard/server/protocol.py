"""What goes over the wire: the chat request the guard reads, OpenAI-style error bodies, and the completions
and SSE events the guard writes itself (refusals).

Every response the guard answers carries the documented extension field `misguard`:

    "misguard": {"request_id": "...", "decision": "allow" | "block", "blocked_by": null | "input" | "output",
                 "fail_open": false, "rails": {"input": VERDICT, "output": VERDICT}}

where VERDICT is a `guard.rails.Verdict` as a dict (decision, status, score, threshold, reason, score_raw,
fail_open, latency_ms, judge, calibration). The openai client keeps it: `completion.model_extra["misguard"]`.
In a stream it rides on the last chunk before `data: [DONE]`.
"""
from __future__ import annotations

import json
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

EXTENSION_FIELD = "misguard"
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_IMAGE_PART = {"type": "object", "required": ["type", "image_url"],
               "properties": {"type": {"const": "image_url"}, "image_url": {
                   "type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}}}}
MESSAGE_SCHEMA = {
    "type": "object", "required": ["role", "content"],
    "properties": {"role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
                   "content": {"anyOf": [{"type": "string"},
                                         {"type": "array", "items": {"anyOf": [_TEXT_PART, _IMAGE_PART]}}]}}}
"""An OpenAI chat message as the OpenAPI schema describes it. The guard checks messages itself
(guard.chat_input, naming the field of what is wrong), so the model reads them as they come."""


class ChatCompletionRequest(BaseModel):
    """The fields the guard reads; every other field is kept and forwarded to the upstream as sent."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Any] = Field(min_length=1, json_schema_extra={"items": MESSAGE_SCHEMA})
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    """The guard judges one choice per request."""
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream_options: dict[str, Any] | None = None


class GuardHTTPError(Exception):
    """An error answered to the client as an OpenAI-style error body with this status."""

    def __init__(self, status_code: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, extension: dict[str, Any] | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.extension = extension

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        if self.extension is not None:
            error[EXTENSION_FIELD] = self.extension
        return {"error": error}


def refusal_completion(request_id: str, model: str, text: str, extension: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion whose one choice is the refusal, finish_reason "content_filter"."""
    return {
        "id": f"chatcmpl-{request_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": "content_filter"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        EXTENSION_FIELD: extension,
    }


def refusal_stream(request_id: str, model: str, text: str, extension: dict[str, Any]) -> list[str]:
    """The refusal as SSE events: a role + content chunk, a finish chunk carrying the extension, [DONE]."""
    base = {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model}
    first = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                                  "logprobs": None, "finish_reason": None}]}
    last = {**base, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "content_filter"}],
            EXTENSION_FIELD: extension}
    return [sse_event(first), sse_event(last), SSE_DONE]


SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    """One SSE `data:` event. Raises ValueError for NaN or Infinity in `payload`: they are not JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'), allow_nan=False)}\n\n"
