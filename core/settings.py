"""Config dataclasses whose fields are also command-line options (TRL's SFTConfig + HfArgumentParser): a field made
with `setting` carries its help string and the range of its values, and the CLI turns it into one option of every
command that takes the config. Each option is therefore declared once, beside what it sets, and the range holds for
the option (typer's min/max, checked at parse time) and for the record built in Python (`check_settings`) alike."""
from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from misguard.core.errors import MisguardError


@dataclass(frozen=True)
class Range:
    """The values a number may take: `low` / `high` bounds (None: unbounded), each closed or open. A float must
    also be finite: NaN compares False with every bound, so unchecked it would pass any of them."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def complaint(self, value: Any) -> str | None:
        """Why `value` is outside the range, e.g. "must be at least 1, got 0"; None when it is inside (or is not a
        number: types are the record's business, not the range's)."""
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return None
        if not math.isfinite(value):
            return f"must be a finite number, got {value}"
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return f"must be {'above' if self.low_open else 'at least'} {self.low}, got {value}"
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return f"must be {'below' if self.high_open else 'at most'} {self.high}, got {value}"
        return None


def number_range(*, at_least: float | None = None, above: float | None = None, at_most: float | None = None,
                 below: float | None = None) -> Range:
    """The Range with these bounds (at most one lower and one upper). Raises ValueError for two of one side."""
    if at_least is not None and above is not None or at_most is not None and below is not None:
        raise ValueError("give one lower bound (at_least or above) and one upper bound (at_most or below)")
    return Range(low=above if above is not None else at_least, high=below if below is not None else at_most,
                 low_open=above is not None, high_open=below is not None)


def check_number(name: str, value: Any, **bounds: float | None) -> None:
    """Raise MisguardError "NAME must be ..., got VALUE" when `value` (None passes: a default) is outside the
    bounds (`number_range`'s keywords) or a float that is not finite."""
    complaint = None if value is None else number_range(**bounds).complaint(value)
    if complaint:
        raise MisguardError(f"{name} {complaint}")


def setting(default: Any = dataclasses.MISSING, *, help: str, flag: str | None = None, envvar: str | None = None,
            default_factory: Callable[[], Any] | Any = dataclasses.MISSING, at_least: float | None = None,
            above: float | None = None, at_most: float | None = None, below: float | None = None) -> Any:
    """A dataclass field that is a command-line option: `help` is its one help string; `flag` its option name
    when not --field-name (e.g. "--lora/--full" for a boolean pair); `envvar` an environment variable that sets
    it (for secrets, so they stay out of `ps`); `at_least` / `above` and `at_most` / `below` the range of a
    number (closed / open bounds), which the option and `check_settings` enforce."""
    metadata = {"help": help, "flag": flag, "envvar": envvar,
                "range": number_range(at_least=at_least, above=above, at_most=at_most, below=below)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def is_setting(field: dataclasses.Field) -> bool:
    """Whether a dataclass field is a command-line option (made with `setting`)."""
    return "help" in field.metadata


def setting_range(field: dataclasses.Field) -> Range:
    """The range of a setting's values (unbounded, finite numbers only, where it declares none)."""
    return field.metadata.get("range") or Range()


def check_settings(record: Any) -> None:
    """Raise MisguardError naming the first setting of the dataclass `record` whose value is outside its range
    (a count below 1, a share above 1, a NaN or infinite float), e.g. "EngineOptions.batch_size must be at least
    1, got 0". Call it from the record's __post_init__, so the library refuses what the CLI refuses."""
    for field in dataclasses.fields(record):
        if not is_setting(field):
            continue
        value = getattr(record, field.name)
        complaint = None if value is None else setting_range(field).complaint(value)
        if complaint:
            raise MisguardError(f"{type(record).__name__}.{field.name} {complaint}")


def read_key(file: Path | None, envvar: str, option: str) -> str | None:
    """The secret key in `file` (surrounding whitespace stripped), else in the environment variable `envvar`; None
    when neither has one. Keys come from files or the environment, never from argv, which any user sees in `ps`.
    Raises MisguardError naming `option` (the flag that gave the file) for a file that cannot be read, is empty or
    holds more than one word."""
    if file is None:
        return os.environ.get(envvar, "").strip() or None
    try:
        key = Path(file).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise MisguardError(f"{option}: cannot read {file} ({exc})") from None
    if not key or len(key.split()) != 1:
        raise MisguardError(f"{option}: {file} must hold the key alone, on one line")
    return key


T = TypeVar("T")


def per_file(values: Sequence[T] | None, n_files: int, flag: str, files: str = "files") -> list[T | None]:
    """An option given once for every file or once per file, in order, as a value for each of `n_files` files:
    None for each when it was not given. Raises MisguardError naming `flag` for any other count."""
    if not values:
        return [None] * n_files
    if len(values) == 1:
        return list(values) * n_files
    if len(values) != n_files:
        raise MisguardError(f"{flag} is given {len(values)} times for {n_files} {files}: give it once for all, or "
                            "once per file in order")
    return list(values)
