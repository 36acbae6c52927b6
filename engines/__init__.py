"""Engines chosen by name; each is imported only when asked for, so `misguard --help` stays light."""
from __future__ import annotations

import importlib
import json
from types import ModuleType

from misguard.core.errors import MisguardError, MissingExtraError
from misguard.engines.base import Engine, EngineOptions, check_model_folder

ENGINES: dict[str, tuple[str, str, str | None]] = {
    # name: (module, class, extra that brings its dependencies; None: misguard's own dependencies)
    "transformers": ("misguard.engines.hf", "TransformersEngine", None),
    "vllm": ("misguard.engines.vllm", "VLLMEngine", "vllm"),
    "openai": ("misguard.engines.openai_http", "OpenAIEngine", None),
}
LOCAL_FOLDER_ENGINES = ("transformers", "vllm")
"""The engines whose model is a local folder (openai's is a name on a server)."""


def load_engine(name: str, model: str, options: EngineOptions | None = None) -> Engine:
    """Build the engine called `name` for `model`. Raises MisguardError for an unknown name and
    MissingExtraError when the engine's library is not installed."""
    return getattr(_engine_module(name), ENGINES[name][1])(model, options)


def check_engine(name: str, model: str, options: EngineOptions | None = None) -> None:
    """Raise, before anything is loaded or written, what makes `load_engine(name, model, options)` fail at once:
    an unknown engine name (MisguardError), its library not installed (MissingExtraError), and for an engine that
    loads a local folder a model that is not one (no config.json), a config.json that is not a JSON object with a
    model_type, or, for transformers, a model_type that transformers does not load as a vision-language model
    (unless --trust-remote-code runs the folder's own code)."""
    _engine_module(name)
    if name not in LOCAL_FOLDER_ENGINES:
        return
    config_path = check_model_folder(model) / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MisguardError(f"{config_path}: not a readable model config ({exc})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str):
        raise MisguardError(f"{config_path}: no model_type; not a config.json that save_pretrained writes")
    remote_code = (options or EngineOptions()).trust_remote_code and "auto_map" in config
    if name == "transformers" and not remote_code:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as KNOWN

        if model_type not in KNOWN:
            raise MisguardError(f"{model}: model_type '{model_type}' is not a vision-language model that "
                                "transformers loads (AutoModelForImageTextToText); misguard runs VLMs")


def _engine_module(name: str) -> ModuleType:
    """The engine's module, imported. Raises MisguardError for an unknown name, MissingExtraError when its library
    is not installed."""
    try:
        module_name, _, extra = ENGINES[name]
    except KeyError:
        raise MisguardError(f"unknown engine '{name}'; choose one of: {', '.join(ENGINES)}") from None
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in {"vllm", "torch", "transformers", "openai"}:
            raise MissingExtraError(exc.name.split(".")[0], extra) from None
        raise


__all__ = ["ENGINES", "Engine", "EngineOptions", "check_engine", "load_engine"]
