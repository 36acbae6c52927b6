"""JSON Lines, the format of every stage's files: typed records read with precise errors, and written so that
nothing is ever half-written.

Every problem in an input file is a DataError that names the file, the 1-based line and the field, so a user can
open the file at that line; bad lines follow the run's bad-row policy (core.rows). Whole files are replaced
atomically; append-only files (for resume) get whole lines that are flushed to disk.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, RootModel, ValidationError

from misguard.core.errors import DataError
from misguard.core.records import Response, Verdict
from misguard.core.rows import BadRows, first_of_each

logger = logging.getLogger("misguard")

ModelT = TypeVar("ModelT", bound=BaseModel)


class JsonObject(RootModel[dict[str, Any]]):
    """One JSON line as a plain object, for rows whose fields are named by the user (a dotted path per field)."""

# Exactly what the seed's gpt_eval.py writes per line (no id: it joins by content), in its order.
GPT_EVAL_FIELDS: tuple[str, ...] = (
    "label_perception", "label_str", "category", "question", "response", "image_path1", "image_path2",
)


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, model: type[ModelT], *, bad: BadRows | None = None,
               allow_torn_tail: bool = False) -> list[ModelT]:
    """Read a JSON Lines file of `model` records; blank lines are ignored.

    allow_torn_tail: ignore (with a warning) a last line that has no newline and is not valid JSON, as a
    process killed mid-write leaves it; see `iter_jsonl_lenient`.

    Returns the records in file order.
    Raises DataError (file, 1-based line, field) for a missing file, invalid JSON or UTF-8, a line that is not
    an object, or a record the model rejects; with `bad` skipping, bad lines are left out and reported instead.
    """
    return [record for _, record in read_jsonl_numbered(path, model, bad=bad, allow_torn_tail=allow_torn_tail)]


def read_jsonl_numbered(path: str | Path, model: type[ModelT], *, bad: BadRows | None = None,
                        allow_torn_tail: bool = False) -> list[tuple[int, ModelT]]:
    """Like `read_jsonl`, with each record's 1-based line number, so a later check can name the line it
    refuses. Returns (line, record) pairs in file order; raises DataError like `read_jsonl`."""
    return list(_read_jsonl_lines(path, model, bad=bad if bad is not None else BadRows(),
                                  allow_torn_tail=allow_torn_tail))


def iter_jsonl_lenient(path: str | Path, model: type[ModelT]) -> Iterator[ModelT]:
    """Yield the `model` records of an append-only JSON Lines file that a crash may have cut short.

    For resume: a torn LAST line (no newline, not valid JSON; what kill -9 during a write leaves) is ignored
    with a warning. Anything bad elsewhere is real corruption.
    Raises DataError (file, line, field) for a missing file or any other bad line.
    """
    for _, record in _read_jsonl_lines(path, model, bad=BadRows(), allow_torn_tail=True):
        yield record


def read_responses(path: str | Path, *, bad: BadRows | None = None, allow_torn_tail: bool = False) -> list[Response]:
    """Read a responses file (what `misguard infer` writes: item fields + response + model, one per line).

    Returns the responses in file order.
    Raises DataError like `read_jsonl`, and for the same (model, id) twice, naming both lines (a resumed run
    must never duplicate); with `bad` skipping, the later duplicate is left out and reported.
    """
    rows = read_jsonl_numbered(path, Response, bad=bad, allow_torn_tail=allow_torn_tail)
    kept = first_of_each(rows, lambda row: (row[1].model, row[1].id), where=lambda row: (str(path), row[0]),
                         describe=lambda row: f"model '{row[1].model}' and id '{row[1].id}'", bad=bad)
    return [response for _, response in kept.values()]


def read_responses_lenient(path: str | Path) -> list[Response]:
    """Read a responses file for resume: `read_responses` that ignores a torn last line (see iter_jsonl_lenient).

    Returns the responses in file order. Raises DataError for any other bad line or a duplicate (model, id).
    """
    return read_responses(path, allow_torn_tail=True)


def read_verdicts(path: str | Path, *, bad: BadRows | None = None) -> list[Verdict]:
    """Read a reference verdict file as the seed's gpt_eval.py writes it (no id; join by `content_key`).

    Returns the verdicts in file order. Raises DataError like `read_jsonl`.
    """
    return read_jsonl(path, Verdict, bad=bad)


def _read_jsonl_lines(path: str | Path, model: type[ModelT], *, bad: BadRows,
                      allow_torn_tail: bool) -> Iterator[tuple[int, ModelT]]:
    path = Path(path)
    text = read_text(path)
    for line, entry in iter_jsonl_text(text, path, allow_torn_tail=allow_torn_tail):
        try:
            if isinstance(entry, DataError):
                raise entry
            record = validate_record(model, entry, path, line)
        except DataError as error:
            bad.reject(error)
            continue
        yield line, record


def iter_jsonl_text(text: str, path: Path, *, allow_torn_tail: bool) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line, parsed value or the DataError saying why the line is bad) per non-blank line.

    Errors are yielded, not raised, so that callers that skip bad rows can go on to the next line.
    """
    lines = text.split("\n")
    # The piece after the last newline is either "" (file ends with a newline) or an unterminated last line.
    last_is_unterminated = lines[-1].strip() != ""
    for index, raw in enumerate(lines):
        if not raw.strip():
            continue
        line = index + 1
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            if allow_torn_tail and last_is_unterminated and index == len(lines) - 1:
                logger.warning("%s:%d: ignoring a torn last line (no newline, invalid JSON), as an interrupted "
                               "write leaves it", path, line)
                return
            yield line, DataError(f"invalid JSON: {exc.msg} (column {exc.colno})", path=path, line=line)
            continue
        except (ValueError, RecursionError) as exc:
            yield line, DataError(f"invalid JSON: {unreadable_json(exc)}", path=path, line=line)
            continue
        yield line, value


def unreadable_json(exc: ValueError | RecursionError) -> str:
    """Why json.loads refused text that is valid JSON syntax: nesting deeper than Python's recursion limit, or an
    integer longer than Python converts (sys.get_int_max_str_digits). Both would otherwise escape as tracebacks."""
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return str(exc).split(":")[0]


def validate_record(model: type[ModelT], value: Any, path: Path, line: int) -> ModelT:
    """Return `value` as a `model` record, or raise DataError naming the first bad field."""
    if not isinstance(value, dict):
        raise DataError(f"expected a JSON object, got {json_type(value)}", path=path, line=line)
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        first = exc.errors()[0]
        field_name = ".".join(str(part) for part in first["loc"]) or None
        if first["type"] == "missing":
            message = "missing"
        elif first["type"] == "string_type":
            message = f"must be a string (got {json_type(first.get('input'))})"
        elif first["type"].endswith("_type"):
            message = f"{first['msg']} (got {json_type(first.get('input'))})"
        else:
            message = first["msg"].removeprefix("Value error, ")
        raise DataError(message, path=path, line=line, field=field_name) from None


def json_type(value: Any) -> str:
    """How a JSON value's type reads in an error message: "null", "a number", "an object", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def read_json_record(path: str | Path, model: type[ModelT], *, version_field: str, supported: int,
                     older: bool = True) -> ModelT:
    """A JSON file holding one versioned `model` record (a manifest, judge.json, a judge card), its version checked
    before its fields (a newer file may hold fields this misguard does not know; `older` False refuses older
    versions too). Raises DataError naming the file (and line, and field) when it cannot be read, is not a JSON
    object, has another version, or a field is missing, unknown or invalid."""
    path = Path(path)
    text = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON: {exc.msg} (column {exc.colno})", path=path, line=exc.lineno) from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"not valid JSON: {unreadable_json(exc)}", path=path) from None
    if not isinstance(data, dict):
        raise DataError(f"expected a JSON object, got {json_type(data)}", path=path)
    version = data.get(version_field, supported)
    if isinstance(version, bool) or not isinstance(version, int) or version > supported or (
            not older and version != supported):
        raise DataError(f"version {version!r}; this misguard reads {supported}" + (
            ": upgrade misguard" if isinstance(version, int) and version > supported else
            " (the file was written by another misguard version)"), path=path, field=version_field)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(x) for x in error["loc"]) or None
        message = {"missing": "missing", "extra_forbidden": "unknown field"}.get(error["type"], error["msg"])
        raise DataError(message, path=path, field=where) from None


def read_text(path: Path) -> str:
    """Return a file's text (UTF-8, a leading BOM dropped), or raise DataError naming the file (and line)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError("file not found", path=path) from None
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path=path) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(f"not valid UTF-8 ({exc.reason})", path=path, line=line) from None


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------

def to_json_line(record: BaseModel | dict[str, Any]) -> str:
    """Return one record as a single JSON line (with its newline); models are dumped with mode='json'.

    Raises TypeError for a record that is neither a pydantic model nor a dict, or holds non-JSON values.
    """
    if isinstance(record, BaseModel):
        payload = record.model_dump(mode="json")
    elif isinstance(record, dict):
        payload = record
    else:
        raise TypeError(f"cannot write a {type(record).__name__} as a JSON line; expected a pydantic model or dict")
    # json.dumps escapes newlines inside strings, so a record is always exactly one line.
    return json.dumps(payload, ensure_ascii=False) + "\n"


def append_jsonl(path: str | Path, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Append records to a JSON Lines file (created with its folder if missing), then flush and fsync.

    All records are serialised before anything is written, so a bad record appends nothing. A torn last line
    left by a crash (no newline, invalid JSON) is cut off first, and a valid last line without a newline gets
    one, so appended records always start on their own line.
    Returns the number of records appended. Raises TypeError for a record that cannot be serialised.
    """
    path = Path(path)
    payload = "".join(to_json_line(record) for record in records)
    if not payload:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        _mend_last_line(handle, path)
        handle.write(payload.encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())
    return payload.count("\n")


def append_as_they_come(path: str | Path, records: Iterable[BaseModel | dict[str, Any]], every: int,
                        on_saved: Callable[[int], Any] = lambda n: None) -> int:
    """Append `records` to a JSON Lines file as they are produced, `every` at a time (each append_jsonl'd, so
    fsynced), calling `on_saved(n)` after each append. If producing them fails or is interrupted, the records
    that came before are appended before the error goes on: a long run loses nothing it finished.
    Returns the number of records appended."""
    pending: list = []
    saved = 0

    def save() -> None:
        nonlocal pending, saved
        if pending:
            saved += append_jsonl(path, pending)
            on_saved(len(pending))
            pending = []

    try:
        for record in records:
            pending.append(record)
            if len(pending) >= every:
                save()
    finally:
        save()
    return saved


def _mend_last_line(handle, path: Path) -> None:
    """Make an append-mode file end with a newline, dropping a torn (invalid JSON) unterminated last line."""
    size = handle.seek(0, os.SEEK_END)
    if size == 0:
        return
    handle.seek(size - 1)
    if handle.read(1) == b"\n":
        return
    # Find where the unterminated last line starts, reading backwards in blocks.
    start, block = size, 1 << 16
    while start > 0:
        begin = max(0, start - block)
        handle.seek(begin)
        chunk = handle.read(start - begin)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            start = begin + newline + 1
            break
        start = begin
    handle.seek(start)
    tail = handle.read(size - start)
    try:
        json.loads(tail.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted write", path, size - start)
        handle.truncate(start)
        return
    handle.write(b"\n")


def write_jsonl_atomic(path: str | Path, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Replace a JSON Lines file with `records` atomically: a temp file in the same folder, fsync, os.replace.

    Readers see either the old file or the complete new one; if writing fails (e.g. a record cannot be
    serialised) the old file is left untouched and the temp file is removed.
    Returns the number of records written. Raises TypeError for a record that cannot be serialised, OSError
    if the file cannot be written.
    """
    count = 0

    def write(handle) -> None:
        nonlocal count
        for record in records:
            handle.write(to_json_line(record).encode("utf-8"))
            count += 1

    _write_atomic(Path(path), write)
    return count


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace a text file (UTF-8) atomically, as `write_jsonl_atomic` does. Raises OSError on failure."""
    _write_atomic(Path(path), lambda handle: handle.write(text.encode("utf-8")))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Replace a binary file atomically, as `write_jsonl_atomic` does. Raises OSError on failure."""
    _write_atomic(Path(path), lambda handle: handle.write(data))


def _write_atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file 0600; give the result the permissions an ordinary write would.
        os.chmod(temp_name, _file_mode(path))
        os.replace(temp_name, path)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _file_mode(path: Path) -> int:
    # Keep a replaced file's mode; a new one gets rw-r--r-- (reading the umask is not thread-safe).
    try:
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        return 0o644


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened, hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_verdicts(path: str | Path, verdicts: Iterable[Verdict]) -> int:
    """Write reference verdicts atomically with exactly gpt_eval.py's fields (GPT_EVAL_FIELDS, no id).

    Returns the number written. Raises TypeError for something that is not a Verdict.
    """
    def rows() -> Iterator[dict[str, Any]]:
        for verdict in verdicts:
            if not isinstance(verdict, Verdict):
                raise TypeError(f"expected a Verdict, got {type(verdict).__name__}")
            dumped = verdict.model_dump(mode="json")
            yield {name: dumped[name] for name in GPT_EVAL_FIELDS}

    return write_jsonl_atomic(path, rows())
