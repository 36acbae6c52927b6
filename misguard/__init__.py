"""misguard: an offline judge and guardrail for vision-language models on the MIS multi-image safety benchmark.

The package's subpackages are the folders at the repository root, in layers whose imports point one way (README,
Layout): `core` <- `engines`, `calibration` <- `judges` <- `judge_training` <- `guard`, `mis` <- `cli`.
`import misguard` is light: the names below are imported when first used, so it never loads torch. Importing it
switches Hugging Face and vLLM to offline mode for the process (misguard never downloads).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from misguard.core.offline import enforce_offline
from misguard.core.version import __version__

# Air-gapped from the first import of any misguard module: Hugging Face and vLLM read these switches when they are
# imported, and every misguard module is imported after this package.
enforce_offline()

_PUBLIC: dict[str, str] = {
    # name: the module that defines it
    "MisguardError": "misguard.core.errors",
    "DataError": "misguard.core.errors",
    "Item": "misguard.core.records",
    "Response": "misguard.core.records",
    "Judgment": "misguard.core.records",
    "load_split": "misguard.core.splits",
    "load_engine": "misguard.engines",
    "EngineOptions": "misguard.engines.base",
    "Calibration": "misguard.calibration",
    "load_judge": "misguard.judges",
    "Judge": "misguard.judges",
    "Case": "misguard.judges",
    "Assessment": "misguard.judges",
    "Guard": "misguard.guard.rails",
    "load_policy": "misguard.guard.policy",
    "Policy": "misguard.guard.policy",
}

__all__ = [  # the names of _PUBLIC, spelt out for tools that read __all__ without running the module
    "__version__", "Assessment", "Calibration", "Case", "DataError", "EngineOptions", "Guard", "Item", "Judge",
    "Judgment", "MisguardError", "Policy", "Response", "load_engine", "load_judge", "load_policy", "load_split",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time `__getattr__` imports on first use
    from misguard.calibration import Calibration
    from misguard.core.errors import DataError, MisguardError
    from misguard.core.records import Item, Judgment, Response
    from misguard.core.splits import load_split
    from misguard.engines import load_engine
    from misguard.engines.base import EngineOptions
    from misguard.guard.policy import Policy, load_policy
    from misguard.guard.rails import Guard
    from misguard.judges import Assessment, Case, Judge, load_judge


def __getattr__(name: str) -> Any:
    """A public name, imported from its module when first asked for (PEP 562)."""
    try:
        module = _PUBLIC[name]
    except KeyError:
        raise AttributeError(f"module 'misguard' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
