"""The engine interface: batched generation over a list of requests. Batching is the engine's job."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Sequence, TypeVar

from misguard.engines.messages import Generation, GenerationParams, LabelProbs, LabelSet, Request, images_key
from misguard.core.errors import MisguardError

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


@dataclass
class EngineOptions:
    """Settings for every engine; each engine reads the ones that apply to it. Defaults suit one machine."""

    batch_size: int | None = None
    """Requests per forward batch (transformers) or per chunk handed to the engine; None = automatic."""
    dtype: str = "auto"
    """'auto' = bfloat16 on GPU, float32 on CPU; or float32 / bfloat16 / float16."""
    device: str = "auto"
    """transformers only: 'auto' = cuda if available, else cpu."""
    preprocess_workers: int | None = None
    """transformers: threads that decode the next batches' images, while a thread of their own builds those
    batches' inputs, as the device runs the current one; 0 = all on the calling thread, between batches; None =
    automatic (up to 8 on a GPU, none on the CPU, whose cores run the model)."""
    prefix_reuse: bool = True
    """transformers label scoring: requests with the same images and a common prompt prefix (a judge's K
    responses to one item) run that prefix once and only their own tails after it (guard/engines/prefix.py)."""
    trust_remote_code: bool = False
    """Run code shipped inside a model folder. Off unless the user asks: it executes untrusted code."""
    # vLLM
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    """vLLM's 'mp' or 'ray' (multi-node through vLLM's own Ray support)."""
    max_model_len: int | None = None
    gpu_memory_utilization: float | None = None
    vllm_args: dict[str, Any] = field(default_factory=dict)
    """Any further vllm.LLM keyword arguments, passed through as given."""
    # OpenAI-compatible HTTP
    base_urls: list[str] = field(default_factory=list)
    """One or more server URLs ending in /v1; requests go round-robin."""
    api_key: str = "EMPTY"
    concurrency: int = 16
    """Requests in flight at once, over all base URLs."""
    timeout_s: float = 600.0
    max_retries: int = 5
    """Retries with exponential backoff on 429, 5xx, timeouts and connection errors."""

    def to_dict(self) -> dict[str, Any]:
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

    @abstractmethod
    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[Generation]:
        """Run every request; returns one Generation per request, in the order given."""

    def label_probs(self, requests: Sequence[Request], labels: LabelSet) -> list[LabelProbs | None]:
        """For each request, the probability of each label token as the first token of the model's answer
        (one forward pass, no sampling). None for a request whose label tokens the engine could not see (e.g. an
        HTTP server that returns only a few top logprobs); such items are unscored, never guessed."""
        raise MisguardError(f"the {self.name} engine cannot score label tokens")

    def stream(self, requests: Sequence[Request], params: GenerationParams) -> Iterator[tuple[int, Generation]]:
        """Run every request, yielding (index into `requests`, Generation) as results become available, so a
        caller can save them as it goes. This default hands the engine `chunk_size` requests at a time."""
        return _in_chunks(requests, self.chunk_size, lambda chunk: self.generate(chunk, params))

    def label_stream(self, requests: Sequence[Request], labels: LabelSet,
                     ) -> Iterator[tuple[int, LabelProbs | None]]:
        """label_probs for every request, yielding (index into `requests`, probabilities) as they become
        available. This default hands the engine `label_chunk_size` requests at a time, never splitting requests
        with the same images."""
        return _in_chunks(requests, self.label_chunk_size, lambda chunk: self.label_probs(chunk, labels),
                          key=lambda request: images_key(request.messages))

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


def _in_chunks(requests: Sequence[Request], size: int, run: Callable[[Sequence[Request]], list],
               key: Callable[[Request], Any] | None = None) -> Iterator[tuple[int, Any]]:
    start = 0
    for chunk in runs(requests, size, key):
        yield from enumerate(run(chunk), start)
        start += len(chunk)
