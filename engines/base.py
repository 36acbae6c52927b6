"""The engine interface: batched generation over a list of requests. Batching is the engine's job."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Sequence, TypeVar

from misguard.core.errors import MisguardError
from misguard.core.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImageLimits
from misguard.core.progress import Progress
from misguard.core.settings import check_settings, setting
from misguard.engines.messages import (
    Generation,
    GenerationParams,
    ImageFileError,
    LabelProbs,
    LabelSet,
    Request,
    images_key,
)

T = TypeVar("T")


def runs(items: Sequence[T], size: int, key: Callable[[T], Any] | None = None) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of `size` (at least one item); with a `key`, each slice is extended so that
    items side by side with the same key stay together (e.g. a judge's K responses to one item, which share
    their prompt's prefix)."""
    start = 0
    while start < len(items):
        end = min(start + max(1, size), len(items))
        while key is not None and end < len(items) and key(items[end]) == key(items[end - 1]):
            end += 1
        yield items[start:end]
        start = end


def check_model_folder(model: str) -> Path:
    """The local model folder as a Path. Raises MisguardError when it is not a save_pretrained folder: misguard
    never downloads, so a hub name is an error, not a fetch."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise MisguardError(f"{model}: not a local model folder (no config.json); misguard loads models from "
                            "local folders saved with save_pretrained, never from a hub")
    return path


@dataclass
class EngineOptions:
    """Settings for every engine; each engine reads the ones that apply to it. Defaults suit one machine. Every
    field but `api_key` is a command-line option of the commands that run a model (infer, score, serve)."""

    batch_size: int | None = setting(None, at_least=1, help="Requests per forward batch (transformers) or per chunk "
                                                            "handed to the engine; default: automatic.")
    dtype: str = setting("auto", help="auto (bfloat16 on a GPU, float32 on the CPU) | float32 | bfloat16 | float16.")
    device: str = setting("auto", help="transformers: auto (cuda if available, else cpu) | cpu | cuda | cuda:N.")
    preprocess_workers: int | None = setting(
        None, at_least=0, help="transformers: threads that decode the next batches' images and build their inputs "
                               "while the device runs the current one; 0 = none; default: up to 8 on a GPU, none "
                               "on the CPU.")
    prefix_reuse: bool = setting(
        True, help="transformers label scoring: run the image + question prefix that a judge's responses to one "
                   "item share once, not per response.")
    trust_remote_code: bool = setting(False, help="Run code shipped inside the model folder (untrusted code).")
    # Image files the engine decodes (infer and score: the data directory's); the guard's policy has its own limits.
    max_image_bytes: int = setting(DEFAULT_MAX_IMAGE_BYTES, at_least=1,
                                   help="Largest image file read; a larger one makes its item a bad row.")
    max_image_pixels: int = setting(DEFAULT_MAX_IMAGE_PIXELS, at_least=1,
                                    help="Largest width x height of an image, read from its header before any pixel "
                                         "is decoded; a larger one makes its item a bad row.")
    # vLLM
    tensor_parallel_size: int = setting(1, at_least=1, help="vLLM: GPUs per model replica.")
    pipeline_parallel_size: int = setting(1, at_least=1, help="vLLM: pipeline stages (multi-node with ray).")
    distributed_executor_backend: str | None = setting(None, help="vLLM: mp | ray (multi-node through vLLM's own "
                                                                  "Ray support).")
    max_model_len: int | None = setting(None, at_least=1, help="vLLM: context length.")
    gpu_memory_utilization: float | None = setting(None, above=0.0, at_most=1.0, help="vLLM: share of GPU memory.")
    vllm_args: dict[str, Any] = setting(
        default_factory=dict, flag="--vllm-arg",
        help="vLLM: any further LLM() argument as KEY=VALUE (VALUE read as JSON if it parses), repeatable; e.g. "
             "kv_cache_memory_bytes=2147483648.")
    # OpenAI-compatible HTTP
    base_urls: list[str] = setting(default_factory=list, flag="--base-url",
                                   help="openai: server URL ending in /v1; repeat for round-robin over several.")
    api_key_file: Path | None = setting(None, help="openai: file holding the servers' API key (else "
                                                   "MISGUARD_API_KEY, else OPENAI_API_KEY).")
    concurrency: int = setting(16, at_least=1, help="openai: requests in flight at once, over all servers.")
    timeout_s: float = setting(600.0, above=0.0, help="openai: seconds before a request times out.")
    max_retries: int = setting(5, at_least=0, help="openai: retries with exponential backoff on 429, 5xx, timeouts "
                                                   "and connection errors.")
    # Not a setting: a key on the command line is visible to every user in `ps`. Library callers may pass one; it
    # wins over api_key_file and the environment, and never reaches a manifest.
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self):
        check_settings(self)  # the library refuses what the command line refuses

    def image_limits(self, target_pixels: int | None = None) -> ImageLimits:
        """The limits on one image file: max_image_bytes, max_image_pixels, decoded to about `target_pixels`."""
        return ImageLimits(max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels,
                           target_pixels=target_pixels)

    def to_dict(self) -> dict[str, Any]:
        """The options as a plain dict for run manifests, without `api_key`."""
        d = asdict(self)
        d.pop("api_key")  # never written into manifests
        return d


class Engine(ABC):
    """A model behind one interface. Subclasses set `name` and implement `generate`."""

    name: ClassVar[str]

    def __init__(self, model: str, options: EngineOptions | None = None):
        self.model = model
        self.options = options or EngineOptions()

    @property
    def chunk_size(self) -> int:
        """How many requests a caller should hand over at once: results are written after each chunk, so
        this bounds what a crash loses while keeping the engine's batches full."""
        return self.options.batch_size or 8

    @property
    def label_chunk_size(self) -> int:
        """As chunk_size, for label scoring (an engine that shares prompt prefixes takes more at once)."""
        return self.chunk_size

    reports_progress: bool = False
    """Whether generate and label_probs take a `progress` and tell it of each request as it finishes (vLLM, a
    server); otherwise stream and label_stream report each chunk when it has run."""

    @abstractmethod
    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[Generation | ImageFileError]:
        """Run every request; returns one Generation per request, in the order given, or the ImageFileError of a
        request whose image cannot be used (missing, over a limit, not decodable): it costs its own request only."""

    def label_probs(self, requests: Sequence[Request], labels: LabelSet,
                    ) -> list[LabelProbs | ImageFileError | None]:
        """For each request, the probability of each label token as the first token of the model's answer
        (one forward pass, no sampling). None for a request whose label tokens the engine could not see (e.g. an
        HTTP server that returns only a few top logprobs); such items are unscored, never guessed. A request whose
        image cannot be used gets its ImageFileError, as in `generate`."""
        raise MisguardError(f"the {self.name} engine cannot score label tokens")

    def stream(self, requests: Sequence[Request], params: GenerationParams, progress: Progress | None = None,
               ) -> Iterator[tuple[int, Generation | ImageFileError]]:
        """Run every request, yielding (index into `requests`, Generation or ImageFileError) as results become
        available, so a caller can save them as it goes; `progress` is told of the requests as they finish (a
        caller's bar moves within a chunk where the engine sees them finish sooner). This default hands the engine
        `chunk_size` requests at a time, reports a chunk when it has run, and yields a chunk's ImageFileErrors
        after its other results; an engine that `reports_progress` tells `progress` of each request itself."""
        if self.reports_progress:
            return in_chunks(requests, self.chunk_size, lambda chunk: self.generate(chunk, params, progress))
        return in_chunks(requests, self.chunk_size, lambda chunk: self.generate(chunk, params), progress=progress)

    def label_stream(self, requests: Sequence[Request], labels: LabelSet, progress: Progress | None = None,
                     ) -> Iterator[tuple[int, LabelProbs | ImageFileError | None]]:
        """label_probs for every request, yielding (index into `requests`, probabilities) as they become
        available, `progress` told of them as in `stream`. This default hands the engine `label_chunk_size`
        requests at a time, never splitting requests with the same images, and yields a chunk's ImageFileErrors
        after its other results."""
        if self.reports_progress:
            return in_chunks(requests, self.label_chunk_size, lambda chunk: self.label_probs(chunk, labels, progress),
                             same_images_together=True)
        return in_chunks(requests, self.label_chunk_size, lambda chunk: self.label_probs(chunk, labels),
                         same_images_together=True, progress=progress)

    def close(self) -> None:
        """Free the model's memory and any workers."""

    def describe(self) -> dict[str, Any]:
        """What went into this engine, for run manifests."""
        return {"engine": self.name, "model": self.model, "options": self.options.to_dict()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def collect(results: Iterator[tuple[int, T]], n: int) -> list[T]:
    """The results of a stream (index, result) as a list in index order."""
    out: list[Any] = [None] * n
    for index, result in results:
        out[index] = result
    return out


def usable_only(requests: Sequence[Request], build: Callable[[Request], Any],
                run: Callable[[list[Any]], Sequence[T]], progress: Progress | None = None) -> list[T | ImageFileError]:
    """`build` each request (its conversation or payload, images opened), then `run` every built one at once; the
    results in request order, with the ImageFileError of each request `build` could not make in its place (left out
    of `run`: it costs its own request, not the chunk). `run` is not called when nothing was built. `progress` is
    told of the requests left out (finished: their error is their result); reporting those `run` runs is `run`'s
    part."""
    results: list[Any] = [None] * len(requests)
    built, kept = [], []
    for i, request in enumerate(requests):
        try:
            built.append(build(request))
        except ImageFileError as error:
            results[i] = error
            continue
        kept.append(i)
    if progress is not None and len(built) < len(requests):
        progress(len(requests) - len(built))
    if built:
        for i, result in zip(kept, run(built)):
            results[i] = result
    return results


def in_chunks(requests: Sequence[Request], size: int, run: Callable[[Sequence[Request]], list], *,
              same_images_together: bool = False, progress: Progress | None = None) -> Iterator[tuple[int, Any]]:
    """(index, result) of `run` over the requests `size` at a time (`runs`; with `same_images_together`, a chunk
    never splits requests with the same images), each chunk reported to `progress` once it has run (an engine whose
    `run` reports its requests itself passes none). A chunk's ImageFileErrors come after its other results: a caller
    that stops at the first one (infer or score without --skip-bad) has saved the rest of the chunk by then."""
    start = 0
    key = (lambda request: images_key(request.messages)) if same_images_together else None
    for chunk in runs(requests, size, key):
        results = list(enumerate(run(chunk), start))
        if progress is not None:
            progress(len(chunk))
        yield from (result for result in results if not isinstance(result[1], ImageFileError))
        yield from (result for result in results if isinstance(result[1], ImageFileError))
        start += len(chunk)
