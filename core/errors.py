"""The project's one exception type, turned into a one-line message and exit code 1 at the CLI edge."""
from __future__ import annotations

from pathlib import Path


class MisguardError(Exception):
    """Any error the user can act on: bad input, a missing model, a missing optional dependency."""


class DataError(MisguardError):
    """Bad input in a file, located by file, line (1-based, for JSON Lines or JSON arrays) and field."""

    def __init__(self, message: str, *, path: str | Path | None = None, line: int | None = None,
                 field: str | None = None):
        self.path = str(path) if path is not None else None
        self.line = line
        self.field = field
        self.reason = message
        where = ""
        if self.path:
            where = self.path + (f":{line}" if line is not None else "") + ": "
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}{what}{message}")


class MissingExtraError(MisguardError):
    """An optional dependency is not installed; the message names the extra that brings it."""

    def __init__(self, package: str, extra: str):
        super().__init__(f"{package} is not installed; install it with: pip install 'misguard[{extra}]'")

