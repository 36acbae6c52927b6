"""The engine interface: batched generation over a list of requests. Batching is the engine's job."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

from guard.messages import Generation, GenerationParams, LabelProbs, LabelSet, Request
from mis.errors import MisguardError


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
    """transformers: threads that open images and run the processor for the next batches while the device
    runs the current one; None = automatic (up to 8 on a GPU, none on the CPU, whose cores run the model)."""
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
        for start in range(0, len(requests), self.chunk_size):
            chunk = requests[start:start + self.chunk_size]
            for offset, generation in enumerate(self.generate(chunk, params)):
                yield start + offset, generation

    def close(self) -> None:
        """Free the model's memory and any workers."""

    def describe(self) -> dict[str, Any]:
        """What went into this engine, for run manifests."""
        return {"engine": self.name, "model": self.model, "options": self.options.to_dict()}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
