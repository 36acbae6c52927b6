"""The transformers engine: multi-image chat through the model's own processor and chat template.

Requests are taken a window of WINDOW_BATCHES batches at a time and sorted by size, so a batch holds prompts of
similar length (less padding), padded on the left, and run in bfloat16 on GPU or float32 on CPU; results are
handed back as each batch finishes. Label scoring runs a judge's K responses to one item against one computation
of their shared prefix (engines/prefix.py). With preprocessing workers (automatic on a GPU) images are
decoded and the processor's inputs built in a thread, batches ahead of the device and across windows, so the GPU
does not wait on the CPU. Images are decoded within the options' byte and pixel limits, straight to about the size
the processor resizes them to where it says (Qwen2-VL's max_pixels). A request whose image cannot be used (missing,
over a limit, not decodable) is left out of its batch and handed back as an ImageFileError after the batch's other
results. The batch size is given or automatic; on a CUDA out-of-memory error the batch is halved and retried. A
caller's progress hears of each batch's requests as the batch finishes.
"""
from __future__ import annotations

import gc
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from misguard.core.errors import MisguardError
from misguard.core.progress import Progress
from misguard.engines.base import Engine, EngineOptions, check_model_folder, collect, runs
from misguard.engines.families import family_for, processor_pixels
from misguard.engines.messages import (
    Generation,
    GenerationParams,
    ImageFileError,
    LabelProbs,
    LabelSet,
    Request,
    image_area,
    image_key,
    images_key,
    label_probs_from_logprobs,
    load_image,
)
from misguard.engines.prefix import image_token_ids, plan_groups, prefix_groups, prefix_inputs, score_tails, uses_mrope

log = logging.getLogger("misguard")
T = TypeVar("T")

AUTO_BATCH_SIZE = {"cuda": 32, "cpu": 8}
WINDOW_BATCHES = 8
"""Requests are sorted by size and planned into batches this many batches' worth at a time: a wider window
pads less; its results are handed back (and saved by `misguard score` / `infer`) as they come."""
PREPARED_AHEAD = 2
"""Batches the preprocessing thread keeps ready ahead of the one on the device."""
TAILS_PER_PREFIX = 4
"""With prefix reuse, a pass over tails holds this many times the batch size: a tail is a few hundred tokens
against a whole prompt's thousand or more."""


def render_prompt(processor, family, request: Request, load=load_image) -> tuple[str, list[Any]]:
    """(prompt text, loaded images) for one request: the family adapter's conversation through the processor's
    chat template, with the generation prompt (the engine's and judge training's one prompt format); images
    opened with `load`. Raises DataError for an unreadable image."""
    conversation, images = family.hf_conversation(request.messages, load)
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False), images


def processor_inputs(processor, prepared: Sequence[tuple[str, list[Any]]]):
    """The processor's padded tensors (BatchFeature, on CPU) for (prompt, images) pairs from `render_prompt`."""
    kwargs: dict[str, Any] = {"text": [p for p, _ in prepared], "return_tensors": "pt", "padding": True}
    images = [imgs for _, imgs in prepared]
    if any(images):
        kwargs["images"] = images
    return processor(**kwargs)


def answer_logits(model, inputs) -> Any:
    """The float32 next-token logits at the last prompt position, [batch, vocab]: the position a judge's answer
    token is read at (and trained on)."""
    # Only the last position: the full [batch, length, vocab] tensor is gigabytes for a 7B model.
    return model(**inputs, logits_to_keep=1).logits[:, -1, :].float()


def resolve_device_dtype(device: str, dtype: str):
    """(device string, torch dtype): 'auto' means cuda + bfloat16 when a GPU is present, else cpu + float32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        return device, (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    try:
        return device, {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise MisguardError(f"unknown dtype '{dtype}'; choose auto, float32, bfloat16 or float16") from None


def load_processor_and_model(model: str, options: EngineOptions):
    """(processor, model, device) for a local folder, weights from safetensors only, in eval mode. Raises
    MisguardError when the folder is not a loadable model."""
    path = check_model_folder(model)

    device, dtype = resolve_device_dtype(options.device, options.dtype)
    try:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        net = AutoModelForImageTextToText.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=options.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise MisguardError(f"{model}: cannot load the model: {str(exc).splitlines()[0]}") from exc
    net.to(device).eval()
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"  # generation continues from the right end of every row
    return processor, net, device


class TransformersEngine(Engine):
    """A local VLM folder run with Hugging Face transformers."""

    name = "transformers"

    def __init__(self, model: str, options: EngineOptions | None = None):
        super().__init__(model, options)
        self.processor, self.net, self.device = load_processor_and_model(model, self.options)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.family = family_for(self.net.config.model_type)
        self.batch_size = self.options.batch_size or AUTO_BATCH_SIZE["cuda" if self.device.startswith("cuda")
                                                                    else "cpu"]
        eos = self.net.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        workers = self.options.preprocess_workers
        if workers is None:  # a GPU waits on the CPU's preprocessing; on the CPU it would take the model's cores
            workers = min(8, (os.cpu_count() or 1) - 1) if self.device.startswith("cuda") else 0
        self._workers = ThreadPoolExecutor(workers, thread_name_prefix="misguard-preprocess") if workers else None
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        image_processor = getattr(self.processor, "image_processor", None)
        self.image_pixels = processor_pixels(image_processor.to_dict()) if image_processor is not None else None
        """The most pixels the processor keeps of one image, where it says; None: it does not."""
        # core.images never decodes below this target: the processor still sets the final size.
        self.image_limits = self.options.image_limits(self.image_pixels)

    @property
    def chunk_size(self) -> int:
        return self.batch_size * WINDOW_BATCHES

    @property
    def label_chunk_size(self) -> int:
        return self.chunk_size * (TAILS_PER_PREFIX if self.options.prefix_reuse else 1)

    def prepare(self, request: Request, load=None) -> tuple[str, list[Any]]:
        """(prompt text from the model's chat template, the request's images opened with `load`; default: decoded
        within the engine's image limits)."""
        return render_prompt(self.processor, self.family, request, load or self._load)

    def prepare_all(self, requests: Sequence[Request]) -> list[tuple[str, list[Any]]]:
        """`prepare` for every request, each distinct image opened once. Raises ImageFileError for the first
        image that cannot be used."""
        staged = self._stage(requests, range(len(requests)))
        opened, unusable = self._open(staged.values())
        for error in unusable.values():
            raise error
        return [(s.prompt, [opened[image_key(im)] for im in s.images]) for s in staged.values()]

    def _load(self, image: Any):
        return load_image(image, self.image_limits)

    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[Generation]:
        return collect(self.stream(requests, params), len(requests))

    def label_probs(self, requests: Sequence[Request], labels: LabelSet) -> list[LabelProbs | None]:
        return collect(self.label_stream(requests, labels), len(requests))

    def stream(self, requests: Sequence[Request], params: GenerationParams, progress: Progress | None = None,
               ) -> Iterator[tuple[int, Generation]]:
        return self._run(requests, self.chunk_size, self._plain_batches,
                         lambda inputs: self._generate_batch(inputs, params), progress=progress)

    def label_stream(self, requests: Sequence[Request], labels: LabelSet, progress: Progress | None = None,
                     ) -> Iterator[tuple[int, LabelProbs | None]]:
        plan = self._shared_batches if self.options.prefix_reuse else self._plain_batches
        return self._run(requests, self.label_chunk_size, plan, lambda inputs: self._label_batch(inputs, labels.ids),
                         labels.ids, progress)

    def _run(self, requests: Sequence[Request], window: int, plan, forward, token_ids: Sequence[int] = (),
             progress: Progress | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (index, result) for every request, each batch's results as the batch finishes (and reported to
        `progress` then). The requests are staged a window of about `window` at a time (never splitting requests
        with the same images) and `plan` cuts each window into batches; each batch's images are opened and its
        processor inputs built, then `forward` runs a plain batch (one result per request) and score_tails a
        shared one. With preprocessing workers all of that is done in a thread, PREPARED_AHEAD batches ahead of
        the device, across windows. A request whose image cannot be used gets its ImageFileError as its result:
        after its batch's others (decoding failed), or after its window's (the header: missing, not an image, over
        a limit), so what was run is handed back before it."""
        def batches() -> Iterator[tuple[_Batch, Any]]:
            for indices in runs(range(len(requests)), window, key=lambda i: images_key(requests[i].messages)):
                staged = self._stage(requests, indices)
                for batch in plan(requests, {i: s for i, s in staged.items() if s.unusable is None}):
                    yield self._prepare(batch)
                unusable = {i: s.unusable for i, s in staged.items() if s.unusable is not None}
                if unusable:
                    yield _Batch([], staged, unusable=unusable), None

        for batch, inputs in prefetched(batches(), PREPARED_AHEAD if self._workers is not None else 0):
            finished = list(self._forward(batch, inputs, forward, token_ids))
            if progress is not None:
                progress(len(finished))
            yield from finished

    def _stage(self, requests: Sequence[Request], indices: Sequence[int]) -> dict[int, _Staged]:
        """Each request's prompt and image parts, with the images' area read from their headers (each image's
        once): what sorting and prefix planning need, without decoding any pixels. A request with an image whose
        header cannot be read or is over a limit is staged with that error."""
        areas: dict[Any, int | ImageFileError] = {}
        staged = {}
        for i in indices:
            prompt, images = self.prepare(requests[i], load=lambda image: image)
            for im in images:
                if image_key(im) not in areas:
                    try:
                        areas[image_key(im)] = image_area(im, self.image_limits)
                    except ImageFileError as error:
                        areas[image_key(im)] = error
            found = [areas[image_key(im)] for im in images]
            unusable = next((a for a in found if isinstance(a, ImageFileError)), None)
            staged[i] = _Staged(prompt, tuple(images), 0 if unusable else sum(found), unusable)
        return staged

    def _plain_batches(self, requests: Sequence[Request], staged: dict[int, _Staged]) -> list[_Batch]:
        """The staged requests sorted by size (fewer pad tokens) in batches of `batch_size`."""
        order = sorted(staged, key=lambda i: staged[i].size)
        return [_Batch(list(units), staged) for units in runs(order, self.batch_size)]

    def _shared_batches(self, requests: Sequence[Request], staged: dict[int, _Staged]) -> list[_Batch]:
        """Groups of requests that share a prompt prefix, `batch_size` groups a batch, then the others plain."""
        window = list(staged)
        local = prefix_groups([requests[i] for i in window])
        groups, alone = plan_groups(self.tokenizer, {i: staged[i].prompt for i in window},
                                    [[window[j] for j in members] for members in local],
                                    image_token_ids(self.net.config))
        groups.sort(key=lambda g: staged[g.members[0]].size)
        shared = [_Batch(list(units), staged, shared=True) for units in runs(groups, self.batch_size)]
        return shared + self._plain_batches(requests, {i: staged[i] for i in alone})

    def _open(self, staged: Iterable[_Staged]) -> tuple[dict[Any, Any], dict[Any, ImageFileError]]:
        """(the staged requests' images decoded within the image limits, in the preprocessing workers when there
        are some, by image_key, each distinct image once; the ImageFileError of each one that could not be)."""
        distinct = {image_key(im): im for s in staged for im in s.images}
        decode = self._workers.map if self._workers is not None else map
        opened, unusable = {}, {}
        for key, image in zip(distinct, decode(_decoded(self.image_limits), distinct.values())):
            (unusable if isinstance(image, ImageFileError) else opened)[key] = image
        return opened, unusable

    def _inputs(self, staged: Sequence[_Staged], opened: dict[Any, Any]):
        return processor_inputs(self.processor, [(s.prompt, [opened[image_key(im)] for im in s.images])
                                                 for s in staged])

    def _prepare(self, batch: _Batch) -> tuple[_Batch, Any]:
        """(the batch, less the requests whose images could not be decoded, which it keeps in `unusable`; its
        inputs on the CPU: the processor's for a plain batch; for a shared one (prefix inputs or None, whether each
        group's prefix could be cut from the processor's tokens); None when no request is left)."""
        opened, unusable = self._open(batch.staged[i] for i in batch.requests())
        if unusable:
            batch = batch.without(unusable)
        if not batch.units:
            return batch, None
        if not batch.shared:
            return batch, self._inputs([batch.staged[i] for i in batch.units], opened)
        first = self._inputs([batch.staged[g.members[0]] for g in batch.units], opened)
        if uses_mrope(self.net) and "mm_token_type_ids" not in first:  # no way to place the tails
            return batch, (None, [False] * len(batch.units))
        prefix, fits = prefix_inputs(first, batch.units, self._pad_id)
        fitting = [g for g, fit in zip(batch.units, fits) if fit]
        if fitting and len(fitting) < len(batch.units):  # cut again without the others' images
            prefix, _ = prefix_inputs(self._inputs([batch.staged[g.members[0]] for g in fitting], opened), fitting,
                                      self._pad_id)
        return batch, (prefix, fits)

    def _forward(self, batch: _Batch, inputs, forward, token_ids: Sequence[int]) -> Iterator[tuple[int, Any]]:
        """Yield (index, result) for the batch's requests, then (index, ImageFileError) for those left out of it.
        On CUDA out of memory the batch size is halved until it is below the batch's (a batch prepared before at a
        larger size is only cut to the current one) and the batch run in pieces."""
        if batch.units:
            yield from self._run_batch(batch, inputs, forward, token_ids)
        yield from batch.unusable.items()

    def _run_batch(self, batch: _Batch, inputs, forward, token_ids: Sequence[int]) -> Iterator[tuple[int, Any]]:
        try:
            results = self._score_shared(batch, inputs, token_ids) if batch.shared else forward(inputs)
        except Exception as exc:
            if not _is_cuda_oom(exc) or len(batch.units) == 1:
                raise
            if len(batch.units) <= self.batch_size:
                while self.batch_size >= len(batch.units):
                    self.batch_size //= 2
                log.warning("CUDA out of memory; retrying with batch size %d", self.batch_size)
            _empty_cuda_cache()
            for piece in batch.split(self.batch_size):
                yield from self._forward(*self._prepare(piece), forward, token_ids)
            return
        if not batch.shared:
            yield from zip(batch.units, results)
            return
        for group, probs in zip(batch.units, results):
            if probs is not None:
                yield from zip(group.members, probs)
                continue
            for piece in _Batch(group.members, batch.staged).split(self.batch_size):  # the plain way
                yield from self._forward(*self._prepare(piece), forward, token_ids)

    def _score_shared(self, batch: _Batch, inputs, token_ids: Sequence[int]) -> list[list[LabelProbs] | None]:
        """Label probabilities of each group's members from their tails against the prefixes' cache; None for a
        group whose prefix could not be cut."""
        prefix, fits = inputs
        fitting = [g for g, fit in zip(batch.units, fits) if fit]
        if not fitting:
            return [None] * len(batch.units)
        with torch.inference_mode():
            logits = score_tails(self.net, {k: v.to(self.device) for k, v in prefix.items()}, fitting,
                                 self._pad_id, self.batch_size * TAILS_PER_PREFIX)
        rows = iter(_label_rows(logits, token_ids))
        return [[next(rows) for _ in g.members] if fit else None for g, fit in zip(batch.units, fits)]

    def _label_batch(self, inputs, token_ids: Sequence[int]) -> list[LabelProbs]:
        with torch.inference_mode():
            return _label_rows(answer_logits(self.net, inputs.to(self.device)), token_ids)

    def _generate_batch(self, inputs, params: GenerationParams) -> list[Generation]:
        inputs = inputs.to(self.device)
        sampling = params.temperature > 0
        if sampling:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            output = self.net.generate(
                **inputs, max_new_tokens=params.max_new_tokens, do_sample=sampling,
                temperature=params.temperature if sampling else None, top_p=params.top_p if sampling else None,
                # Neutral sampling, as vLLM's: a model folder's generation_config (e.g. repetition_penalty
                # 1.05 in Qwen2-VL-Instruct) would otherwise make the engines disagree on the same params.
                top_k=None, repetition_penalty=1.0, pad_token_id=self.tokenizer.pad_token_id)
        new_tokens = output[:, inputs["input_ids"].shape[1]:].tolist()
        return [self._to_generation(row, params) for row in new_tokens]

    def _to_generation(self, token_ids: list[int], params: GenerationParams) -> Generation:
        end = next((i for i, t in enumerate(token_ids) if t in self.eos_ids), None)
        content = token_ids if end is None else token_ids[:end]
        text = self.tokenizer.decode(content, skip_special_tokens=True)
        reason = "stop" if end is not None else "length"
        return Generation(text=text, n_tokens=len(content), finish_reason=reason)

    def close(self) -> None:
        if self._workers is not None:
            self._workers.shutdown(cancel_futures=True)
        self.net = None
        _empty_cuda_cache()


@dataclass(frozen=True)
class _Staged:
    """A request's prompt text and image parts (paths or images, decoded only when its batch is prepared),
    with the images' area in pixels; `unusable`: why one of its images cannot be used, read from its header."""

    prompt: str
    images: tuple
    area: int
    unusable: ImageFileError | None = None

    @property
    def size(self) -> tuple[int, int]:
        """A sort key that puts prompts of similar size together, so a batch holds fewer pad tokens: the images'
        area (standing in for their token count), then the prompt's length."""
        return self.area, len(self.prompt)


@dataclass
class _Batch:
    """One forward pass's worth: request indices run the plain way, or (shared) prefix groups whose members'
    tails run against one computation of their prefix. `staged` holds (at least) every member's _Staged."""

    units: list
    staged: dict[int, _Staged]
    shared: bool = False
    unusable: dict[int, ImageFileError] = field(default_factory=dict)
    """Requests left out of the batch because an image of theirs cannot be used, with the error."""

    def requests(self) -> list[int]:
        """The request indices the batch runs (a shared batch's groups' members)."""
        return [i for unit in self.units for i in (unit.members if self.shared else [unit])]

    def without(self, unusable: dict[Any, ImageFileError]) -> _Batch:
        """This batch less the units with an image in `unusable` (by image_key), moved to its `unusable`."""
        kept, left_out = [], dict(self.unusable)
        for unit in self.units:
            members = unit.members if self.shared else [unit]
            error = next((unusable[image_key(im)] for i in members for im in self.staged[i].images
                          if image_key(im) in unusable), None)
            if error is None:
                kept.append(unit)
            else:
                left_out.update((i, error) for i in members)
        return _Batch(kept, self.staged, self.shared, left_out)

    def split(self, size: int) -> list[_Batch]:
        return [_Batch(list(units), self.staged, self.shared) for units in runs(self.units, size)]


def prefetched(items: Iterable[T], ahead: int) -> Iterator[T]:
    """`items` as they are, or with `ahead` > 0 produced in a background thread up to `ahead` items before the
    consumer takes them (the next batches prepared while the device runs this one). An exception there is
    raised here, in its place; the thread stops when the consumer does."""
    if ahead <= 0:
        yield from items
        return
    done = object()
    ready: queue.Queue = queue.Queue(maxsize=ahead)
    stop = threading.Event()

    def put(entry) -> None:
        while not stop.is_set():
            try:
                return ready.put(entry, timeout=0.1)
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for item in items:
                put((item, None))
                if stop.is_set():
                    return
            put((done, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((done, exc))

    threading.Thread(target=produce, name="misguard-prepare", daemon=True).start()
    try:
        while True:
            item, exc = ready.get()
            if item is done:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()


def _decoded(limits):
    """load_image within `limits` that returns an image that cannot be used as its ImageFileError, so one bad
    image among a batch's (decoded in a pool of workers) does not stop the others."""
    def decode(image: Any) -> Any:
        try:
            return load_image(image, limits)
        except ImageFileError as error:
            return error

    return decode


def _label_rows(logits, token_ids: Sequence[int]) -> list[LabelProbs]:
    """Each row's label probabilities from its answer logits [rows, vocab]."""
    return [label_probs_from_logprobs(row) for row in torch.log_softmax(logits, dim=-1)[:, list(token_ids)].tolist()]


def _is_cuda_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _empty_cuda_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
