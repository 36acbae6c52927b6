"""Files of the MIS benchmark: the published split files with their images, and the JSON Lines every stage
reads and writes (responses, verdicts, and whatever later stages key by item).

Every problem in an input file is a DataError that names the file, the 1-based line and the field, so a user
can open the file at that line. Writers never leave a half-written file behind: whole files are replaced
atomically, and append-only files (for resume) get whole lines that are flushed to disk.
"""
from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Callable, Iterable, Iterator, TypeVar

from pydantic import BaseModel, ValidationError

from misguard.core.errors import DataError
from misguard.core.records import SPLITS, Item, Response, Verdict

logger = logging.getLogger("misguard")

ModelT = TypeVar("ModelT", bound=BaseModel)

ITEM_FIELDS: tuple[str, ...] = ("id", "question", "category", "sub_category", "image_path1", "image_path2")
# Exactly what the seed's gpt_eval.py writes per line (no id: it joins by content), in its order.
GPT_EVAL_FIELDS: tuple[str, ...] = (
    "label_perception", "label_str", "category", "question", "response", "image_path1", "image_path2",
)
IMAGE_FIELDS: tuple[str, ...] = ("image_path1", "image_path2")

_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")


# --------------------------------------------------------------------------------------------------------
# The published split files
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SplitData:
    """One loaded MIS split: its valid items, the items skipped as bad, and where the images live."""

    root: Path
    """Absolute directory the items' image paths are relative to (the split file's folder)."""
    split: str
    items: list[Item]
    skipped: list[DataError] = field(default_factory=list)
    """One DataError per bad item left out (only with skip_bad=True)."""
    path: Path | None = None
    """The split file that was read."""

    def image_paths(self, item: Item) -> tuple[Path, Path]:
        """Return the absolute paths of the item's first and second image."""
        return self.root / item.image_path1, self.root / item.image_path2


def split_file_candidates(mis_dir: str | Path, split: str) -> list[Path]:
    """Return, in the order they are tried, the paths where `split`'s file may lie under `mis_dir`."""
    mis_dir = Path(mis_dir)
    return [folder / f"mis_{split}{ext}" for folder in (mis_dir, mis_dir / "mis_test") for ext in (".json", ".jsonl")]


def find_split_file(mis_dir: str | Path, split: str) -> Path:
    """Locate a split's file: DIR/mis_<split>.json or .jsonl, also under a DIR/mis_test/ parent.

    Returns the first existing path of `split_file_candidates`.
    Raises DataError for an unknown split (listing SPLITS), a missing directory, or when no candidate exists
    (naming every path looked at).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; expected one of: {', '.join(SPLITS)}")
    mis_dir = Path(mis_dir)
    if not mis_dir.is_dir():
        raise DataError("MIS directory not found (or not a directory)", path=mis_dir)
    candidates = split_file_candidates(mis_dir, split)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise DataError(f"no file for split '{split}'; looked at: {looked}", path=mis_dir)


def load_split(mis_dir: str | Path, split: str, *, skip_bad: bool = False, check_images: bool = True) -> SplitData:
    """Load and validate one MIS split (JSON array or JSON Lines) from an MIS directory.

    Each item is checked for: valid JSON, being an object, every field present, non-blank and of the right
    type, a unique id, image paths that stay inside the directory and (with check_images) images that exist
    and that Pillow can read.

    Returns a SplitData whose `root` is the split file's folder (absolute).
    Raises DataError (file, 1-based line, field) for the first problem; with skip_bad=True a bad item is
    logged, collected in `skipped` and left out instead. Problems with the file as a whole (missing, empty,
    not UTF-8, or a broken JSON array, after which no later element can be located) raise even with
    skip_bad.
    """
    path = find_split_file(mis_dir, split)
    root = path.parent.absolute()
    text = _read_text(path)
    if path.suffix == ".json" and _first_char(text) == "[":
        entries: Iterable[tuple[int, Any]] = _iter_json_array(text, path)
    else:
        # A `.json` that holds one object per line is JSON Lines under the wrong name; read it as such.
        entries = _iter_jsonl_text(text, path, allow_torn_tail=False)

    items: list[Item] = []
    skipped: list[DataError] = []
    first_line_of_id: dict[str, int] = {}
    image_problems: dict[Path, str | None] = {}  # the same image may serve several items: check it once

    for line, entry in entries:
        try:
            if isinstance(entry, DataError):
                raise entry
            item = _validate(Item, entry, path, line)
            if item.id in first_line_of_id:
                raise DataError(f"duplicate id '{item.id}' (first at line {first_line_of_id[item.id]}, again at "
                                f"line {line})", path=path, line=line, field="id")
            for image_field in IMAGE_FIELDS:
                _check_image_path(root, getattr(item, image_field), path, line, image_field,
                                  image_problems if check_images else None)
        except DataError as error:
            if not skip_bad:
                raise
            logger.warning("skipping bad item: %s", error)
            skipped.append(error)
            continue
        first_line_of_id[item.id] = line
        items.append(item)
    if not items and not skipped:
        raise DataError("the split file holds no items", path=path)
    return SplitData(root=root, split=split, items=items, skipped=skipped, path=path)


def _check_image_path(root: Path, relative: str, path: Path, line: int, image_field: str,
                      cache: dict[Path, str | None] | None) -> None:
    """Raise DataError when an item's image path escapes `root`, or (cache given) the image is unreadable."""
    posix = PurePosixPath(relative.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(relative).drive or ".." in posix.parts:
        raise DataError(f"image path '{relative}' must be relative to the MIS directory, without '..'",
                        path=path, line=line, field=image_field)
    if cache is None:
        return
    image_path = root / posix
    if image_path not in cache:
        cache[image_path] = _image_problem(image_path)
    problem = cache[image_path]
    if problem is not None:
        raise DataError(f"image '{relative}' {problem}", path=path, line=line, field=image_field)


def _image_problem(image_path: Path) -> str | None:
    """Return why the image cannot be used (missing, unreadable), or None when Pillow reads it."""
    from PIL import Image

    if not image_path.is_file():
        return f"not found at {image_path}"
    try:
        # verify() checks the file's structure (PNG chunk CRCs, headers) without decoding pixels: fast.
        with Image.open(image_path) as image:
            image.verify()
    except Exception as exc:  # noqa: BLE001 -- Pillow raises OSError, SyntaxError, struct.error, ... for broken files
        return f"cannot be read as an image ({type(exc).__name__}: {exc})"
    return None


def _iter_json_array(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line where the element starts, element) for each element of a top-level JSON array.

    Decodes element by element so that each item can be reported at its own line. Raises DataError at the
    offending line for broken JSON: after it, the next element cannot be located reliably.
    """
    decoder = json.JSONDecoder()
    line_counter = _LineCounter(text)
    pos = _skip_whitespace(text, 0)
    if pos >= len(text) or text[pos] != "[":
        raise DataError("expected a JSON array of items", path=path, line=line_counter.line_at(pos))
    pos = _skip_whitespace(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        _expect_end(text, pos + 1, path, line_counter)
        return
    while True:
        if pos >= len(text):
            raise DataError("invalid JSON: the array is not closed", path=path, line=line_counter.line_at(pos))
        line = line_counter.line_at(pos)
        try:
            element, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", path=path, line=exc.lineno) from None
        yield line, element
        pos = _skip_whitespace(text, end)
        if pos >= len(text):
            raise DataError("invalid JSON: the array is not closed", path=path, line=line_counter.line_at(pos))
        if text[pos] == "]":
            _expect_end(text, pos + 1, path, line_counter)
            return
        if text[pos] != ",":
            raise DataError("invalid JSON: expected ',' or ']' after an array element", path=path,
                            line=line_counter.line_at(pos))
        pos = _skip_whitespace(text, pos + 1)
        if pos < len(text) and text[pos] == "]":
            raise DataError("invalid JSON: trailing comma before ']'", path=path, line=line_counter.line_at(pos))


def _expect_end(text: str, pos: int, path: Path, line_counter: _LineCounter) -> None:
    pos = _skip_whitespace(text, pos)
    if pos < len(text):
        raise DataError("invalid JSON: extra data after the array", path=path, line=line_counter.line_at(pos))


class _LineCounter:
    """1-based line of a character offset; offsets asked for in increasing order cost O(file) in total."""

    def __init__(self, text: str):
        self._text = text
        self._pos = 0
        self._line = 1

    def line_at(self, pos: int) -> int:
        if pos < self._pos:  # not expected, but stay correct
            self._pos, self._line = 0, 1
        self._line += self._text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line


def _skip_whitespace(text: str, pos: int) -> int:
    return _JSON_WHITESPACE.match(text, pos).end()


def _first_char(text: str) -> str:
    pos = _skip_whitespace(text, 0)
    return text[pos] if pos < len(text) else ""


# --------------------------------------------------------------------------------------------------------
# JSON Lines: reading
# --------------------------------------------------------------------------------------------------------

def read_jsonl(path: str | Path, model: type[ModelT], *, skip_bad: bool = False, allow_torn_tail: bool = False,
               skipped: list[DataError] | None = None) -> list[ModelT]:
    """Read a JSON Lines file of `model` records; blank lines are ignored.

    allow_torn_tail: ignore (with a warning) a last line that has no newline and is not valid JSON, as a
    process killed mid-write leaves it; see `iter_jsonl_lenient`.
    skipped: when given, each bad line's DataError is appended to it (with skip_bad=True).

    Returns the records in file order.
    Raises DataError (file, 1-based line, field) for a missing file, invalid JSON or UTF-8, a line that is not
    an object, or a record the model rejects; with skip_bad=True bad lines are logged and left out instead.
    """
    return [record for _, record in _read_jsonl_lines(path, model, skip_bad=skip_bad,
                                                      allow_torn_tail=allow_torn_tail, skipped=skipped)]


def iter_jsonl_lenient(path: str | Path, model: type[ModelT]) -> Iterator[ModelT]:
    """Yield the `model` records of an append-only JSON Lines file that a crash may have cut short.

    For resume: a torn LAST line (no newline, not valid JSON; what kill -9 during a write leaves) is ignored
    with a warning. Anything bad elsewhere is real corruption.
    Raises DataError (file, line, field) for a missing file or any other bad line.
    """
    for _, record in _read_jsonl_lines(path, model, skip_bad=False, allow_torn_tail=True, skipped=None):
        yield record


def read_responses(path: str | Path, skip_bad: bool = False, *, allow_torn_tail: bool = False) -> list[Response]:
    """Read a responses file (what `misguard infer` writes: item fields + response + model, one per line).

    Returns the responses in file order.
    Raises DataError like `read_jsonl`, and for the same (model, id) twice, naming both lines (a resumed run
    must never duplicate); with skip_bad=True the later duplicate is logged and left out.
    """
    responses: list[Response] = []
    first_line: dict[tuple[str, str], int] = {}
    for line, response in _read_jsonl_lines(path, Response, skip_bad=skip_bad, allow_torn_tail=allow_torn_tail,
                                            skipped=None):
        key = (response.model, response.id)
        if key in first_line:
            error = DataError(f"duplicate response for model '{response.model}' and id '{response.id}' (first at "
                              f"line {first_line[key]}, again at line {line})", path=path, line=line, field="id")
            if not skip_bad:
                raise error
            logger.warning("skipping bad line: %s", error)
            continue
        first_line[key] = line
        responses.append(response)
    return responses


def read_responses_lenient(path: str | Path) -> list[Response]:
    """Read a responses file for resume: `read_responses` that ignores a torn last line (see iter_jsonl_lenient).

    Returns the responses in file order. Raises DataError for any other bad line or a duplicate (model, id).
    """
    return read_responses(path, allow_torn_tail=True)


def read_verdicts(path: str | Path, skip_bad: bool = False) -> list[Verdict]:
    """Read a reference verdict file as the seed's gpt_eval.py writes it (no id; join by `content_key`).

    Returns the verdicts in file order. Raises DataError like `read_jsonl`.
    """
    return read_jsonl(path, Verdict, skip_bad=skip_bad)


def read_jsonl_numbered(path: str | Path, model: type[ModelT], *, skip_bad: bool = False) -> list[tuple[int, ModelT]]:
    """Like `read_jsonl`, with each record's 1-based line number, so a later check can name the line it
    refuses. Returns (line, record) pairs in file order; raises DataError like `read_jsonl`."""
    return list(_read_jsonl_lines(path, model, skip_bad=skip_bad, allow_torn_tail=False, skipped=None))


def _read_jsonl_lines(path: str | Path, model: type[ModelT], *, skip_bad: bool, allow_torn_tail: bool,
                      skipped: list[DataError] | None) -> Iterator[tuple[int, ModelT]]:
    path = Path(path)
    text = _read_text(path)
    for line, entry in _iter_jsonl_text(text, path, allow_torn_tail=allow_torn_tail):
        try:
            if isinstance(entry, DataError):
                raise entry
            record = _validate(model, entry, path, line)
        except DataError as error:
            if not skip_bad:
                raise
            logger.warning("skipping bad line: %s", error)
            if skipped is not None:
                skipped.append(error)
            continue
        yield line, record


def _iter_jsonl_text(text: str, path: Path, *, allow_torn_tail: bool) -> Iterator[tuple[int, Any]]:
    """Yield (1-based line, parsed value or the DataError saying why the line is bad) per non-blank line.

    Errors are yielded, not raised, so that callers with skip_bad can go on to the next line.
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
        yield line, value


def _validate(model: type[ModelT], value: Any, path: Path, line: int) -> ModelT:
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


def _read_text(path: Path) -> str:
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
# JSON Lines: writing
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
