"""The project's one exception type, turned into a one-line message and exit code 1 at the CLI edge."""
from __future__ import annotations

import importlib.util
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


EXTRAS: dict[str, str] = {
    # import name: the extra (pyproject.toml's optional-dependencies) that installs it
    "vllm": "vllm",
    "peft": "train", "datasets": "train", "accelerate": "train",
    "fastapi": "guard", "uvicorn": "guard", "prometheus_client": "guard", "yaml": "guard", "httpx": "guard",
}
"""The optional packages misguard imports, and the extra that brings each."""


class MissingExtraError(MisguardError):
    """An optional dependency is not installed; the message names the extra that brings it (`extra` None: a
    dependency of misguard itself, which a plain reinstall brings back)."""

    def __init__(self, package: str, extra: str | None):
        self.package = package
        self.extra = extra
        super().__init__(f"{package} is not installed; install it with: {self.install_command}")

    @property
    def install_command(self) -> str:
        """The pip command that installs the missing package."""
        return f"pip install 'misguard[{self.extra}]'" if self.extra else "pip install misguard"


def require(*packages: str) -> None:
    """Raise MissingExtraError for the first of `packages` (import names, keys of EXTRAS) that is not installed,
    found without importing any of them: a stage checks what it will import before it writes anything."""
    for package in packages:
        if importlib.util.find_spec(package) is None:
            raise MissingExtraError(package, EXTRAS[package])


def missing_extra(error: BaseException) -> MissingExtraError | None:
    """The MissingExtraError behind `error`: itself, or one made for the import of a package in EXTRAS that failed
    because it is not installed, found along the chain of causes (a library's lazy import may wrap the
    ModuleNotFoundError in its own); None when no optional package is missing (then `error` is a bug to show)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, MissingExtraError):
            return error
        if isinstance(error, ModuleNotFoundError) and error.name:
            package = error.name.split(".")[0]
            if package in EXTRAS:
                return MissingExtraError(package, EXTRAS[package])
        error = error.__cause__ or error.__context__
    return None

