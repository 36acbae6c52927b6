"""Any OpenAI-compatible chat server as an engine: a fleet of `vllm serve` endpoints, or one server.

Requests go round-robin over the base URLs with at most `options.concurrency` in flight over all of them.
Retries are the `openai` client's own: it retries 408, 409, 429, 5xx, timeouts and connection errors with
exponential backoff (0.5 s doubling to 8 s, with jitter, or the server's Retry-After), `options.max_retries`
times. Nothing but the given base URLs is ever contacted.

The API key is `options.api_key`; when that is left at its default "EMPTY" and OPENAI_API_KEY is set, the
environment variable is used, as the openai client itself would (a vLLM server started with --api-key).
"""
from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Sequence
from typing import Any

from guard.engines.base import Engine, EngineOptions
from guard.messages import Generation, GenerationParams, Request, content_parts, image_data_url
from mis.errors import MisguardError, MissingExtraError

DEFAULT_API_KEY = "EMPTY"


class OpenAIEngine(Engine):
    """Chat completions over HTTP. `model` is the served model name (vLLM's --served-model-name).
    Raises MisguardError when no base URL is given and MissingExtraError when openai is not installed."""

    name = "openai"

    def __init__(self, model: str, options: EngineOptions | None = None):
        super().__init__(model, options)
        opts = self.options
        if not opts.base_urls:
            raise MisguardError("the openai engine needs at least one server URL: pass --base-url "
                                "(e.g. http://127.0.0.1:8000/v1; repeat it for several servers)")
        if opts.concurrency < 1:
            raise MisguardError(f"concurrency must be at least 1, got {opts.concurrency}")
        try:
            import openai
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] == "openai":
                raise MissingExtraError("openai", "misguard") from None
            raise
        self._openai = openai
        self.base_urls = [url.rstrip("/") for url in opts.base_urls]
        self.sent_per_base_url = [0] * len(self.base_urls)
        """Requests sent to each base URL (same order as base_urls), for round-robin checks and diagnostics."""
        self._next_url = 0
        api_key = opts.api_key
        if api_key == DEFAULT_API_KEY:
            api_key = os.environ.get("OPENAI_API_KEY") or DEFAULT_API_KEY
        # One event loop on a thread of our own: `generate` stays a plain call from any thread, with or without
        # a running loop of its own, and the clients keep their pooled connections between chunks.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="misguard-openai-engine", daemon=True)
        self._thread.start()
        self._clients = self._run(self._open_clients(api_key))

    async def _open_clients(self, api_key: str) -> list[Any]:
        self._semaphore = asyncio.Semaphore(self.options.concurrency)
        return [self._openai.AsyncOpenAI(base_url=url, api_key=api_key, max_retries=self.options.max_retries,
                                         timeout=self.options.timeout_s)
                for url in self.base_urls]

    def _run(self, coroutine):
        """Run a coroutine on the engine's loop and wait for it; Ctrl-C cancels what is in flight."""
        if self._loop.is_closed():
            coroutine.close()
            raise MisguardError("the openai engine is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    @property
    def chunk_size(self) -> int:
        """Enough requests to keep every concurrency slot busy several times over."""
        return self.options.batch_size or 4 * self.options.concurrency

    @staticmethod
    def _chat_messages(request: Request) -> list[dict[str, Any]]:
        """One request in the OpenAI chat format, images inlined as base64 data URLs."""
        messages = []
        for message in request.messages:
            parts = []
            for part in content_parts(message):
                if part["type"] == "image":
                    parts.append({"type": "image_url", "image_url": {"url": image_data_url(part["image"])}})
                elif part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise MisguardError(f"request {request.id}: unknown message part type '{part['type']}'")
            messages.append({"role": message["role"], "content": parts})
        return messages

    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[Generation]:
        """Send every request; returns one Generation per request, in the order given. Raises DataError for an
        unreadable image and MisguardError naming the base URL when a request still fails after the client's
        retries (HTTP status and reason, timeout, or connection error) or the server returns no text."""
        if not requests:
            return []
        payloads = []
        for request in requests:
            payloads.append((request.id, self._chat_messages(request), self._next_url))
            self._next_url = (self._next_url + 1) % len(self.base_urls)
        return self._run(self._generate_all(payloads, params))

    async def _generate_all(self, payloads, params: GenerationParams) -> list[Generation]:
        tasks = [asyncio.ensure_future(self._complete(request_id, messages, url_index, params))
                 for request_id, messages, url_index in payloads]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One failure fails the chunk; stop the rest instead of leaving them running on the servers.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _complete(self, request_id: str, messages, url_index: int, params: GenerationParams) -> Generation:
        openai = self._openai
        url = self.base_urls[url_index]
        async with self._semaphore:
            self.sent_per_base_url[url_index] += 1
            try:
                response = await self._clients[url_index].chat.completions.create(
                    model=self.model, messages=messages, max_tokens=params.max_new_tokens,
                    temperature=params.temperature, top_p=params.top_p, seed=params.seed)
            except openai.APIStatusError as exc:
                reason = exc.response.reason_phrase if exc.response is not None else ""
                raise MisguardError(
                    f"{url}: request {request_id} failed with HTTP {exc.status_code} {reason} "
                    f"(after up to {self.options.max_retries} retries): {exc.message}") from None
            except openai.APITimeoutError:
                raise MisguardError(
                    f"{url}: request {request_id} timed out after {self.options.timeout_s:g} s "
                    f"(after up to {self.options.max_retries} retries)") from None
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                raise MisguardError(
                    f"{url}: request {request_id} could not connect (after {self.options.max_retries} retries): "
                    f"{cause.__class__.__name__}: {cause}") from None
        if not response.choices or response.choices[0].message.content is None:
            raise MisguardError(f"{url}: request {request_id}: the server returned no message text "
                                f"(finish_reason={response.choices[0].finish_reason if response.choices else None})")
        choice = response.choices[0]
        completion_tokens = response.usage.completion_tokens if response.usage is not None else None
        n_tokens = completion_tokens
        if n_tokens and choice.finish_reason == "stop":
            # vLLM's usage counts the end-of-sequence token; misguard's engines count the answer's tokens. We send
            # no stop strings, so "stop" here always means an end token was generated.
            n_tokens -= 1
        return Generation(text=choice.message.content, n_tokens=n_tokens, finish_reason=choice.finish_reason,
                          extra={"base_url": url, "completion_tokens": completion_tokens})

    def close(self) -> None:
        """Close the HTTP clients and stop the engine's event loop. Safe to call twice."""
        if self._loop.is_closed():
            return

        async def close_clients():
            for client in self._clients:
                await client.close()

        try:
            self._run(close_clients())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
