"""Resuming a training run: its checkpoints are continued only when they come from the same settings and examples,
and a checkpoint file that is not what a training run writes stops the run with one line naming the file."""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers.trainer_utils import get_last_checkpoint

from misguard.core.errors import MisguardError
from misguard.core.jsonl import write_text_atomic

log = logging.getLogger("misguard")
RUN_FILE = "misguard_run.json"
"""In OUT/checkpoints: the settings and data the checkpoints were trained with, checked before a resume."""


def resume_point(checkpoints: Path, fingerprint: dict[str, Any], *, resume: bool) -> str | None:
    """The checkpoint to continue from (None for a fresh run), after checking it comes from a run with this
    `fingerprint` ({"settings": {...}, "examples_sha256": ...}); records the fingerprint for the next resume.
    A fresh run (resume off, or no checkpoint) deletes old checkpoints. Raises MisguardError naming the settings
    that changed when the checkpoints come from another run."""
    run_file = checkpoints / RUN_FILE
    last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
    if last is not None:
        recorded = json.loads(run_file.read_text()) if run_file.exists() else None
        if recorded != fingerprint:
            changed = sorted(k for k in fingerprint["settings"]
                             if (recorded or {}).get("settings", {}).get(k) != fingerprint["settings"][k])
            what = f"settings {', '.join(changed)}" if changed else "training or validation examples"
            raise MisguardError(f"{checkpoints}: its checkpoints come from other {what}; "
                                "train with resume off or into another folder")
        log.info("resuming from %s", last)
    elif checkpoints.is_dir():
        shutil.rmtree(checkpoints)  # a fresh run: old checkpoints would be mistaken for this run's
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_file, json.dumps(fingerprint, indent=2) + "\n")
    return last


@contextmanager
def checkpoint_loading(checkpoints: Path) -> Iterator[None]:
    """Around a Trainer's train(): a checkpoint file under `checkpoints` that torch.load refuses becomes a
    MisguardError naming the file, not a traceback. transformers loads the optimizer, scheduler and RNG state with
    torch.load(weights_only=True), so a planted pickle (an rng_state.pth or optimizer.pt that would build objects
    or run code) is refused before anything in it runs; this only says which file it was. Other errors pass."""
    try:
        yield
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        file = _file_torch_was_loading(error)
        if file is None:
            raise
        why = ("a pickle that holds more than tensors (it would build objects or run code), never unpickled here"
               if isinstance(error, pickle.UnpicklingError) else "corrupt or cut short")
        raise MisguardError(f"{file}: cannot resume from this checkpoint file: {why}; delete {checkpoints} or "
                            "train with --no-resume to start over") from None


def _file_torch_was_loading(error: BaseException) -> str | None:
    """The path torch.load was reading when `error` was raised inside it, or None when it came from elsewhere."""
    traceback, found = error.__traceback__, None
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code is torch.serialization.load.__code__:
            source = frame.f_locals.get("f")
            found = os.fspath(source) if isinstance(source, (str, os.PathLike)) else found
        traceback = traceback.tb_next
    return found
