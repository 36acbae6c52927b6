"""The published MIS split files: `mis_easy.json`, `mis_hard.json`, `mis_real.json` (JSON arrays, or JSON Lines)
with their image folders, found under an MIS directory (or its `mis_test/` parent) and checked item by item.

An item's images are checked through core.images: their paths must stay inside the directory (also once symbolic
links are followed), their headers must read and be within the byte and pixel limits; with `decode_images` their
pixels must decode too (a truncated file passes the header check). An image that fails later, when a run decodes
it, is reported through `SplitData.image_error`, at the item's line, as a bad row like these.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from misguard.core.errors import DataError
from misguard.core.images import ImageError, ImageLimits, open_image, read_header
from misguard.core.jsonl import iter_jsonl_text, read_text, validate_record
from misguard.core.records import SPLITS, Item
from misguard.core.rows import BadRows

ITEM_FIELDS: tuple[str, ...] = ("id", "question", "category", "sub_category", "image_path1", "image_path2")
IMAGE_FIELDS: tuple[str, ...] = ("image_path1", "image_path2")

_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")



@dataclass(frozen=True)
class SplitData:
    """One loaded MIS split: its valid items, the items skipped as bad, and where the images live."""

    root: Path
    """Absolute directory the items' image paths are relative to (the split file's folder)."""
    split: str
    items: list[Item]
    skipped: list[DataError] = field(default_factory=list)
    """One DataError per bad item left out (only when bad rows are skipped)."""
    path: Path | None = None
    """The split file that was read."""
    lines: dict[str, int] = field(default_factory=dict)
    """Each item's 1-based line in the split file, by id."""

    def image_paths(self, item: Item) -> tuple[Path, Path]:
        """Return the absolute paths of the item's first and second image."""
        return self.root / item.image_path1, self.root / item.image_path2

    def image_error(self, item: Item, image: str | Path, reason: str) -> DataError:
        """The bad-row error of an item whose image (an absolute path from `image_paths`) could not be used when a
        run decoded it: the split file, the item's line and the image's field, the item's id and why."""
        return item_image_error(item, image, reason, self.root, path=self.path, line=self.lines.get(item.id))


def item_image_error(item: Item, image: str | Path, reason: str, root: Path, *, path: str | Path | None,
                     line: int | None) -> DataError:
    """A DataError at `path`:`line` naming the field of `item` whose image (`root` / its relative path) is
    `image`, the item's id and `reason`."""
    field_name = next((f for f in IMAGE_FIELDS if str(root / getattr(item, f)) == str(image)), None)
    relative = getattr(item, field_name) if field_name else str(image)
    return DataError(f"item {item.id}: image '{relative}': {reason}", path=path, line=line, field=field_name)


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


def load_split(mis_dir: str | Path, split: str, *, bad: BadRows | None = None, check_images: bool = True,
               limits: ImageLimits | None = None, decode_images: bool = False) -> SplitData:
    """Load and validate one MIS split (JSON array or JSON Lines) from an MIS directory.

    A row without an `id` (the published dataset card lists none) gets its 0-based position in the file: the
    index of the array element, or of the non-blank line, counting bad rows too, as the MIS scripts' `enumerate`
    over the loaded list does; so the id is stable whatever is skipped. Ids keep the file's type (an integer
    written as one stays one, see core.records.IntegerId); a position is an integer.
    Each item is checked for: valid JSON, being an object, every field present, non-blank and of the right
    type, a unique id, image paths that stay inside the directory (symbolic links followed) and, with
    check_images, images whose header reads and is within `limits` (default: core.images' limits); with
    decode_images, also whose pixels decode (slower: every image is decoded once, JPEGs at 1/8 scale).

    Returns a SplitData whose `root` is the split file's folder (absolute).
    Raises DataError (file, 1-based line, field) for the first problem; with `bad` skipping, a bad item is
    left out, reported and listed in `skipped` instead. Problems with the file as a whole (missing, empty, not
    UTF-8, or a broken JSON array, after which no later element can be located) raise even then.
    """
    path = find_split_file(mis_dir, split)
    root = path.parent.absolute()
    bad = bad if bad is not None else BadRows()
    text = read_text(path)
    if path.suffix == ".json" and _first_char(text) == "[":
        entries: Iterable[tuple[int, Any]] = _iter_json_array(text, path)
    else:
        # A `.json` that holds one object per line is JSON Lines under the wrong name; read it as such.
        entries = iter_jsonl_text(text, path, allow_torn_tail=False)

    items: list[Item] = []
    skipped: list[DataError] = []
    first_line_of_id: dict[str, int] = {}
    image_problems: dict[Path, str | None] = {}  # the same image may serve several items: check it once

    for position, (line, entry) in enumerate(entries):
        try:
            if isinstance(entry, DataError):
                raise entry
            if isinstance(entry, dict) and "id" not in entry:
                entry = {**entry, "id": position}
            item = validate_record(Item, entry, path, line)
            if item.id in first_line_of_id:
                raise DataError(f"duplicate id '{item.id}' (first at line {first_line_of_id[item.id]}, again at "
                                f"line {line})", path=path, line=line, field="id")
            for image_field in IMAGE_FIELDS:
                _check_image_path(root, item, image_field, path, line, image_problems if check_images else None,
                                  limits or ImageLimits(), decode_images)
        except DataError as error:
            bad.reject(error)
            skipped.append(error)
            continue
        first_line_of_id[item.id] = line
        items.append(item)
    if not items and not skipped:
        raise DataError("the split file holds no items", path=path)
    return SplitData(root=root, split=split, items=items, skipped=skipped, path=path, lines=first_line_of_id)


def _check_image_path(root: Path, item: Item, image_field: str, path: Path, line: int,
                      cache: dict[Path, str | None] | None, limits: ImageLimits, decode: bool) -> None:
    """Raise DataError when an item's image path escapes `root` (as written, or once symbolic links are followed),
    or (cache given) the image cannot be used."""
    relative = getattr(item, image_field)
    posix = PurePosixPath(relative.replace("\\", "/"))
    if posix.is_absolute() or PureWindowsPath(relative).drive or ".." in posix.parts:
        raise DataError(f"item {item.id}: image path '{relative}' must be relative to the MIS directory, without "
                        "'..'", path=path, line=line, field=image_field)
    image_path = root / posix
    # A symbolic link inside the directory may point anywhere: what counts is where it leads.
    try:
        target = image_path.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a loop of symbolic links
        raise DataError(f"item {item.id}: image '{relative}' cannot be resolved ({exc})", path=path, line=line,
                        field=image_field) from None
    if not target.is_relative_to(root.resolve()):
        raise DataError(f"item {item.id}: image '{relative}' leads outside the MIS directory (to {target}) through "
                        "a symbolic link", path=path, line=line, field=image_field)
    if cache is None:
        return
    if image_path not in cache:
        cache[image_path] = _image_problem(image_path, limits, decode)
    problem = cache[image_path]
    if problem is not None:
        raise DataError(f"item {item.id}: image '{relative}': {problem}", path=path, line=line, field=image_field)


def _image_problem(image_path: Path, limits: ImageLimits, decode: bool) -> str | None:
    """Why the image cannot be used (missing, not an image, over a limit; with `decode`, its pixels do not
    decode), or None."""
    try:
        if decode:  # a target of one pixel: JPEGs decode at 1/8 scale, which still reads every byte of the file
            open_image(image_path, ImageLimits(limits.max_bytes, limits.max_pixels, target_pixels=1))
        else:
            read_header(image_path, limits)
    except ImageError as error:
        return error.message
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
