"""Config dataclasses whose fields are also command-line options (TRL's SFTConfig + HfArgumentParser): a field made
with `setting` carries its help string, and the CLI turns it into one option of every command that takes the
config. Each option is therefore declared once, beside what it sets."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, envvar: str | None = None,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING) -> Any:
    """A dataclass field that is a command-line option: `help` is its one help string; `flag` its option name
    when not --field-name (e.g. "--lora/--full" for a boolean pair); `envvar` an environment variable that sets
    it (for secrets, so they stay out of `ps`)."""
    metadata = {"help": help, "flag": flag, "envvar": envvar}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_setting(field: dataclasses.Field) -> bool:
    """Whether a dataclass field is a command-line option (made with `setting`)."""
    return "help" in field.metadata
