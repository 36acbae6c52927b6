"""Progress of a long run: what engines and judges report as their work finishes, and the bars that show it.

Results are saved a chunk at a time (core.jsonl.append_as_they_come), but a chunk can take minutes; so the
pipelines hand engines and judges a `Progress` callback, which they call as each forward batch or request
finishes, and the bar moves with the work, not with the saves. `silence_library_bars` is what --quiet adds on
top of misguard's own bars: those of transformers, huggingface_hub and datasets (and vLLM's weight loading).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from tqdm import tqdm

Progress = Callable[[int], Any]
"""Called with how many requests (or cases) have just finished, each one counted once over a run: by a forward
batch, a request a server answered, a cascade's stage. An engine may call it from its own thread while the caller
waits on that engine."""


def progress_bar(total: int, done: int, *, desc: str, unit: str, enabled: bool) -> tqdm:
    """A bar over `total` items that starts at `done` (what a resumed run finds finished) and shows the rate and
    the time left; it shows nothing when not `enabled`."""
    return tqdm(total=total, initial=done, unit=unit, desc=desc, disable=not enabled, dynamic_ncols=True)


def library_bars_shown() -> bool:
    """Whether the libraries' progress bars are on (until `silence_library_bars`); vLLM's weight-loading bar
    follows it."""
    from transformers.utils import logging as transformers_logging

    return transformers_logging.is_progress_bar_enabled()


def silence_library_bars() -> None:
    """Turn off, for the rest of the process, the progress bars of transformers (loading weights, ...),
    huggingface_hub and, where the `train` extra installed it, datasets (map, ...). A Trainer's own bars are its
    `disable_tqdm` argument, which the training code sets from `progress`."""
    from transformers.utils import logging as transformers_logging  # here: a module that imports this starts fast

    transformers_logging.disable_progress_bar()  # huggingface_hub's too
    if importlib.util.find_spec("datasets") is not None:
        import datasets

        datasets.disable_progress_bars()
