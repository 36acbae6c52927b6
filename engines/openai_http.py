"""Any OpenAI-compatible chat server as an engine: a fleet of `vllm serve` endpoints, or one server.

Requests go round-robin over the base URLs with at most `options.concurrency` in flight over all of them.
Retries are the `openai` client's own: it retries 408, 409, 429, 5xx, timeouts and connection errors with
exponential backoff (0.5 s doubling to 8 s, with jitter, or the server's Retry-After), `options.max_retries`
times. Nothing but the given base URLs is ever contacted.

The API key (a vLLM server started with --api-key) never comes from the command line, which any user sees in
`ps`: it is `options.api_key` when a library caller passes one, else the one in `options.api_key_file`
(--api-key-file), else MISGUARD_API_KEY, else OPENAI_API_KEY (as the openai client itself would read), else
"EMPTY" (vLLM's placeholder for a server without a key).

Images are sent as the files' own bytes in data URLs, after they are decoded here within the options' byte and
pixel limits, as the server will decode them: a request whose image cannot be used (missing, over a limit,
truncated) is not sent, and gets its ImageFileError as its result; the chunk's other requests go on. A caller's
progress hears of each request as its answer comes back.

Label scoring asks for one token with logprobs. The first label request to each base URL also sends vLLM's own
request fields, `logprob_token_ids` (the labels' logprobs, whatever their rank) and `return_tokens_as_token_ids`
(tokens named "token_id:N", matched by id). A server that rejects them (HTTP 400 or 422, as OpenAI's API does for
unknown fields) gets that request again without them, and every later one too, and its labels are matched by text
among the top 20 logprobs; a server that ignores them answers by text as well. A label that is not among what
came back leaves that request unscored (None), never guessed. Probing by request rather than by asking the server
what it is also works through proxies that pass vLLM's fields on. A vLLM server that refuses the ids themselves
(not in its vocabulary: a judge.json for another tokenizer) falls back the same way; the warning logged says why.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import openai

from misguard.core.errors import MisguardError
from misguard.core.progress import Progress
from misguard.core.settings import read_key
from misguard.engines.base import Engine, EngineOptions, usable_only
from misguard.engines.messages import (
    Generation,
    GenerationParams,
    ImageFileError,
    LabelProbs,
    LabelSet,
    Request,
    content_parts,
    image_data_url,
    label_probs_from_logprobs,
    once_per_image,
)

log = logging.getLogger("misguard")

DEFAULT_API_KEY = "EMPTY"
API_KEY_ENV = "MISGUARD_API_KEY"
TOP_LOGPROBS = 20
"""Top logprobs asked for when scoring labels by text: the OpenAI API's maximum and vLLM's default max_logprobs."""
TOKEN_ID_PREFIX = "token_id:"
"""How vLLM names a token when asked for return_tokens_as_token_ids."""


class ServerRequestError(MisguardError):
    """A request the server still refused after the client's retries; `status_code` is its HTTP status."""

    def __init__(self, message: str, status_code: int):
        super().__init__(message)
        self.status_code = status_code


class OpenAIEngine(Engine):
    """Chat completions over HTTP. `model` is the served model name (vLLM's --served-model-name).
    Raises MisguardError when no base URL is given, or when the API key file cannot be read, is empty or holds more
    than one word."""

    name = "openai"
    reports_progress = True

    def __init__(self, model: str, options: EngineOptions | None = None):
        super().__init__(model, options)
        opts = self.options
        if not opts.base_urls:
            raise MisguardError("the openai engine needs at least one server URL: pass --base-url "
                                "(e.g. http://127.0.0.1:8000/v1; repeat it for several servers)")
        if opts.concurrency < 1:
            raise MisguardError(f"concurrency must be at least 1, got {opts.concurrency}")
        self._openai = openai
        self.base_urls = [url.rstrip("/") for url in opts.base_urls]
        self.sent_per_base_url = [0] * len(self.base_urls)
        """Requests sent to each base URL (same order as base_urls), for round-robin checks and diagnostics."""
        self._next_url = 0
        self.sends_token_ids: list[bool | None] = [None] * len(self.base_urls)
        """Per base URL: whether label requests carry vLLM's logprob_token_ids (None until the first one)."""
        api_key = (opts.api_key or read_key(opts.api_key_file, API_KEY_ENV, "--api-key-file")
                   or os.environ.get("OPENAI_API_KEY", "").strip() or DEFAULT_API_KEY)
        # One event loop on a thread of our own: `generate` stays a plain call from any thread, with or without
        # a running loop of its own, and the clients keep their pooled connections between chunks.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="misguard-openai-engine", daemon=True)
        self._thread.start()
        self._clients = self._run(self._open_clients(api_key))

    async def _open_clients(self, api_key: str) -> list[Any]:
        self._semaphore = asyncio.Semaphore(self.options.concurrency)
        self._probe_locks = [asyncio.Lock() for _ in self.base_urls]
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
    def _chat_messages(request: Request, data_url: Callable[[Any], str]) -> list[dict[str, Any]]:
        """One request in the OpenAI chat format, images inlined by `data_url` (base64 data URLs). Raises
        ImageFileError for an image `data_url` cannot use and MisguardError for an unknown part type."""
        messages = []
        for message in request.messages:
            parts = []
            for part in content_parts(message):
                if part["type"] == "image":
                    parts.append({"type": "image_url", "image_url": {"url": data_url(part["image"])}})
                elif part["type"] == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise MisguardError(f"request {request.id}: unknown message part type '{part['type']}'")
            messages.append({"role": message["role"], "content": parts})
        return messages

    def generate(self, requests: Sequence[Request], params: GenerationParams, progress: Progress | None = None,
                 ) -> list[Generation | ImageFileError]:
        """Send every request; returns one Generation per request, in the order given, or the ImageFileError of a
        request whose image cannot be used (that request is not sent); `progress` is told of each request as its
        answer comes back (on the engine's own thread). Raises MisguardError naming the base URL when a request
        still fails after the client's retries (HTTP status and reason, timeout, or connection error) or the
        server returns no text."""
        return self._send_all(requests, lambda request_id, messages, url_index:
                              self._complete(request_id, messages, url_index, params), progress)

    def label_probs(self, requests: Sequence[Request], labels: LabelSet, progress: Progress | None = None,
                    ) -> list[LabelProbs | ImageFileError | None]:
        """For each request, the label tokens' probabilities as the first token of the answer, renormalized over
        the labels, from a one-token completion with logprobs (see the module docstring for how labels are
        matched). None for a request whose label tokens did not all come back; an ImageFileError, `progress` and
        MisguardError as in `generate`."""
        return self._send_all(requests, lambda request_id, messages, url_index:
                              self._score(request_id, messages, url_index, labels), progress)

    def _send_all(self, requests: Sequence[Request], send: Callable[[str, list, int], Coroutine],
                  progress: Progress | None = None) -> list:
        """`send(request id, chat messages, base URL index)` for every request whose images can be used,
        round-robin over the base URLs, concurrently; the results in the order given, with the ImageFileError of
        each request that was not sent in its place; `progress` told of each request as it finishes."""
        if not requests:
            return []
        limits = self.options.image_limits()
        data_url = once_per_image(lambda image: image_data_url(image, limits))

        def send_built(built: list[tuple[str, list]]) -> list:
            payloads = []
            for request_id, messages in built:  # round-robin over the requests actually sent
                payloads.append((request_id, messages, self._next_url))
                self._next_url = (self._next_url + 1) % len(self.base_urls)
            return self._run(self._gather(payloads, send, progress))

        return usable_only(requests, lambda request: (request.id, self._chat_messages(request, data_url)), send_built,
                           progress)

    @staticmethod
    async def _gather(payloads, send, progress: Progress | None = None) -> list:
        async def answered(payload):
            result = await send(*payload)
            if progress is not None:
                progress(1)
            return result

        tasks = [asyncio.ensure_future(answered(payload)) for payload in payloads]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One failure fails the chunk; stop the rest instead of leaving them running on the servers.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _create(self, request_id: str, url_index: int, **body):
        """The server's chat completion for one request (`body`: the create() arguments besides the model).
        Raises ServerRequestError for an HTTP error status and MisguardError for a timeout or connection error,
        each naming the base URL, after the client's retries."""
        openai = self._openai
        url = self.base_urls[url_index]
        async with self._semaphore:
            self.sent_per_base_url[url_index] += 1
            try:
                return await self._clients[url_index].chat.completions.create(model=self.model, **body)
            except openai.APIStatusError as exc:
                reason = exc.response.reason_phrase if exc.response is not None else ""
                raise ServerRequestError(
                    f"{url}: request {request_id} failed with HTTP {exc.status_code} {reason} "
                    f"(after up to {self.options.max_retries} retries): {exc.message}", exc.status_code) from None
            except openai.APITimeoutError:
                raise MisguardError(
                    f"{url}: request {request_id} timed out after {self.options.timeout_s:g} s "
                    f"(after up to {self.options.max_retries} retries)") from None
            except openai.APIConnectionError as exc:
                cause = exc.__cause__ or exc
                raise MisguardError(
                    f"{url}: request {request_id} could not connect (after {self.options.max_retries} retries): "
                    f"{cause.__class__.__name__}: {cause}") from None

    async def _complete(self, request_id: str, messages, url_index: int, params: GenerationParams) -> Generation:
        url = self.base_urls[url_index]
        response = await self._create(request_id, url_index, messages=messages, max_tokens=params.max_new_tokens,
                                       temperature=params.temperature, top_p=params.top_p, seed=params.seed)
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

    async def _score(self, request_id: str, messages, url_index: int, labels: LabelSet) -> LabelProbs | None:
        body: dict[str, Any] = {"messages": messages, "max_tokens": 1, "temperature": 0.0, "logprobs": True,
                                "top_logprobs": TOP_LOGPROBS}
        vllm_fields = {"extra_body": {"logprob_token_ids": list(labels.ids), "return_tokens_as_token_ids": True}}
        if self.sends_token_ids[url_index] is None:
            # The first label request to a server finds out whether it takes vLLM's fields; the others for that
            # server wait for the answer rather than each being refused once.
            async with self._probe_locks[url_index]:
                if self.sends_token_ids[url_index] is None:
                    try:
                        response = await self._create(request_id, url_index, **body, **vllm_fields)
                    except ServerRequestError as exc:
                        if exc.status_code not in (400, 422):
                            raise
                        response = await self._create(request_id, url_index, **body)
                        self.sends_token_ids[url_index] = False
                        log.warning("%s does not take vLLM's logprob_token_ids (%s); matching label tokens by "
                                    "text among the top %d logprobs", self.base_urls[url_index], exc, TOP_LOGPROBS)
                    else:
                        self.sends_token_ids[url_index] = True
                    return label_probs_from_response(response, labels)
        extra = vllm_fields if self.sends_token_ids[url_index] else {}
        response = await self._create(request_id, url_index, **body, **extra)
        return label_probs_from_response(response, labels)

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


def label_probs_from_response(response, labels: LabelSet) -> LabelProbs | None:
    """LabelProbs from the logprobs of a chat completion's first token, or None when any label is missing from
    them or named twice with different values. Tokens come back as vLLM's "token_id:N" (matched to `labels.ids`)
    or as text (matched to `labels.texts`)."""
    choice = response.choices[0] if response.choices else None
    content = choice.logprobs.content if choice is not None and choice.logprobs is not None else None
    if not content:
        return None
    first = content[0]
    # The sampled token counts too: a server need not repeat it among its top logprobs.
    entries = [(first.token, first.logprob), *((top.token, top.logprob) for top in first.top_logprobs or ())]
    by_id = all(token.startswith(TOKEN_ID_PREFIX) for token, _ in entries)
    seen: dict[Any, set[float]] = {}
    for token, logprob in entries:
        key = int(token[len(TOKEN_ID_PREFIX):]) if by_id else token
        seen.setdefault(key, set()).add(logprob)
    found = [seen.get(key, set()) for key in (labels.ids if by_id else labels.texts)]
    # Missing, or two tokens with the label's text and different logprobs (e.g. an undecodable byte "\ufffd"):
    # either way the label's probability is not known.
    if any(len(values) != 1 for values in found):
        return None
    return label_probs_from_logprobs([values.pop() for values in found])
