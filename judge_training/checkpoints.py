"""Resuming a training run: its checkpoints are continued only when they come from the same settings and examples."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

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
