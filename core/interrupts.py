"""What a resumable run had saved when Ctrl-C stopped it, for the one line the command line prints then.

A stage that resumes (infer, score, train) wraps its work in `saving(describe)`. When a KeyboardInterrupt leaves
the block, the stage's own cleanup has already saved what it finished (core.jsonl.append_as_they_come, a training
checkpoint), so `describe()` is called then, and what it says ("37 of 72 responses saved in ...") is kept; the CLI
edge reads it with `saved_when_interrupted()` and prints it beside the command that resumes.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from misguard.core.errors import MisguardError

log = logging.getLogger("misguard")
_saved: list[str] = []


@contextmanager
def saving(describe: Callable[[], str]) -> Iterator[None]:
    """Within the block, an interrupt records `describe()` (what is saved, where) before it goes on. A describe
    that fails (the file went away) records nothing: the interrupt is what the user should see."""
    try:
        yield
    except KeyboardInterrupt:
        try:
            _saved.append(describe())
        except (OSError, MisguardError) as exc:
            log.debug("interrupted; cannot say what was saved: %s", exc)
        raise


def saved_when_interrupted() -> str | None:
    """What the interrupted runs of this process had saved ("; "-joined, innermost first), or None when no run
    inside `saving` was interrupted."""
    return "; ".join(_saved) or None
