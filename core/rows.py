"""The two rules every reader and join of input rows follows.

- Bad rows: a row that is malformed, or matches nothing it must match, stops the run with one line naming the
  file, line and field (a DataError); with skip (`--skip-bad`) it is left out, logged and listed in the run's
  report instead.
- Duplicates: the first row for a key is kept; a later row with the same key is a bad row that names both places.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

from misguard.core.errors import DataError

log = logging.getLogger("misguard")
Row = TypeVar("Row")


class BadRows:
    """The bad-row policy of one run: stop at the first (the default), or with `skip` leave each bad row out,
    log it and keep it for the report."""

    def __init__(self, skip: bool = False):
        self.skip = skip
        self.skipped: list[DataError] = []
        """Every bad row left out, in the order found."""

    def reject(self, error: DataError) -> None:
        """Raise `error`, or with `skip` log it and keep it. Callers leave the row out after this returns."""
        if not self.skip:
            raise error
        log.warning("skipping bad row: %s", error)
        self.skipped.append(error)

    def report(self) -> list[str]:
        """Each skipped row as one line: file:line: field 'name': why."""
        return [str(error) for error in self.skipped]


def first_of_each(rows: Iterable[Row], key: Callable[[Row], Hashable], *, where: Callable[[Row], tuple[str, int]],
                  describe: Callable[[Row], str], bad: BadRows | None = None,
                  field_name: str | None = "id") -> dict[Hashable, Row]:
    """`rows` by key, in order, under the duplicates rule: the first row for a key is kept; a later one goes to
    `bad` (a DataError naming both places, or left out and reported when skipping). `where(row)` is the row's
    (file, 1-based line); `describe(row)` says what its key is, for the message."""
    bad = bad if bad is not None else BadRows()
    kept: dict[Hashable, Row] = {}
    for row in rows:
        k = key(row)
        if k in kept:
            path, line = where(row)
            first_path, first_line = where(kept[k])
            first = f"line {first_line}" if str(first_path) == str(path) else f"{first_path}:{first_line}"
            bad.reject(DataError(f"duplicate: a second row for {describe(row)} (first at {first}, again at line "
                                 f"{line})", path=path, line=line, field=field_name))
            continue
        kept[k] = row
    return kept
