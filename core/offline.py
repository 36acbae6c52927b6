"""Air-gapped by default: every Hugging Face and vLLM switch that stops network access or telemetry.

Called by `import misguard`, so before any misguard module imports transformers, huggingface_hub or vllm. A
user cannot re-enable the network through misguard; models are local folders.
"""
from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "VLLM_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def enforce_offline() -> None:
    """Set the offline switches in this process (and so in every process it starts)."""
    os.environ.update(OFFLINE_ENV)
