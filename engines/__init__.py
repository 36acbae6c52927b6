"""Engines chosen by name; each is imported only when asked for, so `misguard --help` stays light."""
from __future__ import annotations

import importlib

from misguard.core.errors import MisguardError, MissingExtraError
from misguard.engines.base import Engine, EngineOptions

ENGINES: dict[str, tuple[str, str, str]] = {
    # name: (module, class, extra that brings its dependencies)
    "transformers": ("misguard.engines.hf", "TransformersEngine", "misguard"),
    "vllm": ("misguard.engines.vllm", "VLLMEngine", "vllm"),
    "openai": ("misguard.engines.openai_http", "OpenAIEngine", "misguard"),
}


def load_engine(name: str, model: str, options: EngineOptions | None = None) -> Engine:
    """Build the engine called `name` for `model`. Raises MisguardError for an unknown name and
    MissingExtraError when the engine's library is not installed."""
    try:
        module_name, class_name, extra = ENGINES[name]
    except KeyError:
        raise MisguardError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)}") from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"vllm", "torch", "transformers", "openai"}:
            raise MissingExtraError(exc.name.split(".")[0], extra) from None
        raise
    return getattr(module, class_name)(model, options)


__all__ = ["ENGINES", "Engine", "EngineOptions", "load_engine"]
