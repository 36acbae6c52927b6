"""The transformers engine: multi-image chat through the model's own processor and chat template.

Requests are sorted by size so a batch holds prompts of similar length (less padding), padded on the left, and
run with `generate` in bfloat16 on GPU or float32 on CPU. The batch size is given or automatic; on a CUDA
out-of-memory error the batch is halved and retried.
"""
from __future__ import annotations

import logging
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

from guard.engines.base import Engine, EngineOptions
from guard.engines.prefix import (
    PrefixGroup,
    image_token_ids,
    plan_groups,
    prefix_groups,
    prefix_inputs,
    score_tails,
    uses_mrope,
)
from guard.families import family_for
from guard.messages import (
    Generation,
    GenerationParams,
    LabelProbs,
    LabelSet,
    Request,
    image_loader,
    label_probs_from_logprobs,
    load_image,
)
from guard.offline import enforce_offline
from mis.errors import MisguardError

log = logging.getLogger("misguard")

AUTO_BATCH_SIZE = {"cuda": 32, "cpu": 8}
PREPARED_AHEAD = 2
"""Batches the preprocessing workers keep ready ahead of the one on the device."""
TAILS_PER_PREFIX = 4
"""With prefix reuse, a pass over tails holds this many times the batch size: a tail is a few hundred tokens
against a whole prompt's thousand or more."""


def check_model_folder(model: str) -> Path:
    """The local model folder as a Path. Raises MisguardError when it is not a save_pretrained folder: misguard
    never downloads, so a hub name is an error, not a fetch."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise MisguardError(f"{model}: not a local model folder (no config.json); misguard loads models from "
                            "local folders saved with save_pretrained, never from a hub")
    return path


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


def prompt_size(prepared: tuple[str, list[Any]]) -> tuple[int, int]:
    """A sort key that puts prompts of similar size together, so a batch holds fewer pad tokens: the images'
    area (standing in for their token count), then the prompt's length."""
    prompt, images = prepared
    return sum(im.width * im.height for im in images), len(prompt)


def answer_logits(model, inputs) -> Any:
    """The float32 next-token logits at the last prompt position, [batch, vocab]: the position a judge's answer
    token is read at (and trained on)."""
    # Only the last position: the full [batch, length, vocab] tensor is gigabytes for a 7B model.
    return model(**inputs, logits_to_keep=1).logits[:, -1, :].float()


def resolve_device_dtype(device: str, dtype: str):
    """(device string, torch dtype): 'auto' means cuda + bfloat16 when a GPU is present, else cpu + float32."""
    import torch

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
    enforce_offline()
    path = check_model_folder(model)
    from transformers import AutoModelForImageTextToText, AutoProcessor

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

    @property
    def chunk_size(self) -> int:
        return self.batch_size

    def prepare(self, request: Request, load=load_image) -> tuple[str, list[Any]]:
        """(prompt text from the model's chat template, the request's images opened with `load`)."""
        return render_prompt(self.processor, self.family, request, load)

    def prepare_all(self, requests: Sequence[Request]) -> list[tuple[str, list[Any]]]:
        """`prepare` for every request (in the preprocessing workers when there are some), each distinct image
        opened once."""
        load = image_loader()
        if self._workers is None:
            return [self.prepare(r, load) for r in requests]
        return list(self._workers.map(lambda r: self.prepare(r, load), requests))

    def generate(self, requests: Sequence[Request], params: GenerationParams) -> list[Generation]:
        results: list[Generation | None] = [None] * len(requests)
        for index, generation in self.stream(requests, params):
            results[index] = generation
        return results  # type: ignore[return-value]

    @property
    def label_chunk_size(self) -> int:
        if self.options.prefix_reuse:
            return self.batch_size * TAILS_PER_PREFIX
        return self.batch_size

    def stream(self, requests: Sequence[Request], params: GenerationParams) -> Iterator[tuple[int, Generation]]:
        prepared = self.prepare_all(requests)
        return self._batched(prepared, range(len(prepared)), lambda inputs: self._generate_batch(inputs, params))

    def label_probs(self, requests: Sequence[Request], labels: LabelSet) -> list[LabelProbs | None]:
        results: list[LabelProbs | None] = [None] * len(requests)
        prepared = self.prepare_all(requests)
        alone: Sequence[int] = range(len(requests))
        if self.options.prefix_reuse:
            groups, alone = plan_groups(self.tokenizer, [prompt for prompt, _ in prepared], prefix_groups(requests),
                                        image_token_ids(self.net.config))
            for index, probs in self._shared_prefix_batches(prepared, groups, labels.ids):
                results[index] = probs
        for index, probs in self._batched(prepared, alone, lambda inputs: self._label_batch(inputs, labels.ids)):
            results[index] = probs
        return results

    def _batched(self, prepared: Sequence[tuple[str, list[Any]]], indices: Sequence[int], forward,
                 ) -> Iterator[tuple[int, Any]]:
        """Yield (index, result) for the prepared requests at `indices`: the processor's inputs for size-sorted
        batches, each run by `forward` (one result per request)."""
        order = sorted(indices, key=lambda i: prompt_size(prepared[i]))
        return self._pipeline(order, lambda batch: processor_inputs(self.processor, [prepared[i] for i in batch]),
                              forward)

    def _pipeline(self, order: Sequence[Any], prepare, forward) -> Iterator[tuple[Any, Any]]:
        """Yield (unit, result) for every unit of `order`, in batches of `batch_size` units: `prepare(batch)`
        builds a batch's inputs on the CPU (image preprocessing, tokens), `forward(inputs)` runs them on the
        device and returns one result per unit. With preprocessing workers the next batches are prepared in
        threads while the device runs the current one. On CUDA out of memory the batch size is halved, the
        batches prepared ahead are dropped, and the batch is retried."""
        ahead: deque[tuple[Sequence[Any], Future]] = deque()
        start = planned = 0
        while start < len(order):
            while self._workers is not None and len(ahead) < PREPARED_AHEAD and planned < len(order):
                batch = order[planned:planned + self.batch_size]
                ahead.append((batch, self._workers.submit(prepare, batch)))
                planned += len(batch)
            if ahead:
                batch, future = ahead.popleft()
                inputs = future.result()
            else:
                batch = order[start:start + self.batch_size]
                inputs = prepare(batch)
                planned = start + len(batch)
            try:
                results = forward(inputs)
            except Exception as exc:
                if not _is_cuda_oom(exc) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                log.warning("CUDA out of memory; retrying with batch size %d", self.batch_size)
                for _, pending in ahead:
                    pending.cancel()
                ahead.clear()
                planned = start
                _empty_cuda_cache()
                continue
            yield from zip(batch, results)
            start += len(batch)

    def _shared_prefix_batches(self, prepared: Sequence[tuple[str, list[Any]]], groups: Sequence[PrefixGroup],
                               token_ids: Sequence[int]) -> Iterator[tuple[int, LabelProbs]]:
        """Yield (index, label probabilities) for every member of `groups`: up to `batch_size` groups' prefixes
        per pass, their tails against the prefixes' cache. A group whose prefix cannot be cut cleanly is scored
        the plain way."""
        order = sorted(groups, key=lambda g: prompt_size(prepared[g.members[0]]))
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        mrope = uses_mrope(self.net)

        def prepare(batch: Sequence[PrefixGroup]):
            first = processor_inputs(self.processor, [prepared[g.members[0]] for g in batch])
            if mrope and "mm_token_type_ids" not in first:  # no way to place the tails: the plain way
                return None, batch, [False] * len(batch)
            prefix, fits = prefix_inputs(first, batch, pad_id)
            fitting = [g for g, fit in zip(batch, fits) if fit]
            if fitting and len(fitting) < len(batch):  # cut again without the others' images
                prefix, _ = prefix_inputs(processor_inputs(self.processor,
                                                           [prepared[g.members[0]] for g in fitting]), fitting, pad_id)
            return prefix, batch, fits

        def forward(inputs) -> list[list[LabelProbs] | None]:
            import torch

            prefix, batch, fits = inputs
            fitting = [g for g, fit in zip(batch, fits) if fit]
            if not fitting:
                return [None] * len(batch)
            with torch.inference_mode():
                logits = score_tails(self.net, {k: v.to(self.device) for k, v in prefix.items()}, fitting, pad_id,
                                     self.batch_size * TAILS_PER_PREFIX)
            rows = iter(label_probs_from_logprobs(row) for row in
                        torch.log_softmax(logits, dim=-1)[:, list(token_ids)].tolist())
            return [[next(rows) for _ in g.members] if fit else None for g, fit in zip(batch, fits)]

        plain: list[int] = []
        for group, probs in self._pipeline(order, prepare, forward):
            if probs is None:
                plain.extend(group.members)
            else:
                yield from zip(group.members, probs)
        yield from self._batched(prepared, plain, lambda inputs: self._label_batch(inputs, token_ids))

    def _label_batch(self, inputs, token_ids: Sequence[int]) -> list[LabelProbs]:
        import torch

        with torch.inference_mode():
            logits = answer_logits(self.net, inputs.to(self.device))
        logprobs = torch.log_softmax(logits, dim=-1)[:, list(token_ids)].tolist()
        return [label_probs_from_logprobs(row) for row in logprobs]

    def _generate_batch(self, inputs, params: GenerationParams) -> list[Generation]:
        import torch

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


def _is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _empty_cuda_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
