"""Label files of any origin read into one shape, so that a local judge can be compared with a reference.

Three kinds of file are read by `read_labels`, all JSON Lines:
- misguard's judgments.jsonl (`label_str`, `label_perception`, `id`, `split`, `model`, `p_unsafe`,
  `p_perception`, `status`); an unscored judgment is kept with no labels (safety None);
- the seed's gpt_eval.py output: the same label fields and the item's content, but no id and no model (one file
  per target model), so its rows are keyed by content (image_path1, image_path2, question, response);
- third-party files such as MSTS, with other field names, nested verdicts (`auto_eval.gpt-4o-2024-05-13`) and
  other spellings of the labels (`safe`, `1 - safe`), mapped with `value_map`.

core.join pairs them with each other, with responses and with MIS items.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from misguard.core.errors import DataError
from misguard.core.jsonl import JsonObject, read_jsonl_numbered
from misguard.core.records import PERCEPTION_LEVELS, UNJUDGED, IntegerId
from misguard.core.rows import BadRows

logger = logging.getLogger("misguard")

SAFETY_VALUES: tuple[str, ...] = ("Safe", "Unsafe")
CONTENT_FIELDS: tuple[str, ...] = ("image_path1", "image_path2", "question", "response")
"""The fields of `core.records.content_key`, in its order: how id-less verdicts are matched."""

_PERCEPTION_PATTERN = re.compile(r"^(?:perception[\s_-]*)?(?:level[\s_-]*)?([123])$")
MISSING = object()
"""What `resolve_field` returns for a path that leads nowhere (a field may hold null, which is not missing)."""


@dataclass(frozen=True)
class LabelRecord:
    """One row's labels, whatever file it came from. `safety` is None only for an unscored judgment."""

    key: str
    """The row's id, or, for a row without one, its content key as a JSON array (see `content_key`)."""
    safety: str | None
    """"Safe" or "Unsafe"; None for an unscored judgment."""
    perception: str | None
    """"Level1", "Level2" or "Level3" (PERCEPTION_LEVELS); None when the file has no perception labels."""
    p_unsafe: float | None = None
    p_perception: tuple[float, float, float] | None = None
    """(p Level1, p Level2, p Level3), as misguard judgments carry them."""
    model: str | None = None
    """The target model that wrote the response."""
    category: str | None = None
    line: int = 0
    """1-based line in `path`."""
    image_path1: str | None = None
    image_path2: str | None = None
    question: str | None = None
    response: str | None = None
    id: str | None = None
    """The row's own id; None for gpt_eval.py rows."""
    split: str | None = None
    sub_category: str | None = None
    judge: str | None = None
    """Which judge gave the labels (misguard judgments name it)."""
    trust: float | None = None
    """The judge's trust in the verdict, where the judge measures it (misguard judgments carry it)."""
    label_mass: float | None = None
    """A VLM judge's answer codes' share of the next-token distribution, where the judgment carries it."""
    out_of_domain: bool = False
    """The judge flagged the verdict as out of its domain (a judgment with status out_of_domain): labelled, but
    under the judge's trust threshold."""
    error: bool = False
    """The judge failed on the row (a judgment with status error): no labels, counted apart from unscored."""
    path: str | None = None
    """The file the row was read from."""

    @property
    def scored(self) -> bool:
        """Whether the row has a safety label (False for an unscored judgment)."""
        return self.safety is not None

    @property
    def content_key(self) -> tuple[str, str, str, str] | None:
        """(image_path1, image_path2, question, response) as in core.records.content_key; None unless all four
        are present."""
        values = tuple(getattr(self, name) for name in CONTENT_FIELDS)
        return None if any(value is None for value in values) else values  # type: ignore[return-value]

    @property
    def where(self) -> str:
        """`path:line`, for messages."""
        return f"{self.path}:{self.line}" if self.path else f"line {self.line}"

    def describe(self, *, by_id: bool = True) -> str:
        """The row's model, split and id (or question), for messages."""
        parts = [f"model {self.model!r}"] if self.model is not None else []
        if self.split is not None:
            parts.append(f"split {self.split!r}")
        if by_id:
            parts.append(f"id {self.id!r}")
        else:
            question = self.question or ""
            parts.append(f"question {question[:60]!r}" + ("..." if len(question) > 60 else ""))
        return ", ".join(parts)


def resolve_field(row: dict[str, Any], dotted: str) -> Any:
    """Return the value at a dotted path in a nested object, or a private MISSING marker when there is none.

    Keys may themselves hold dots (MSTS's `auto_eval.gpt-4o-2024-05-13`, or a judge named `gpt-4.1`): at each
    level the longest run of remaining parts that is an existing key is taken, so `a.b.c` reads row["a.b.c"]
    if it exists, else row["a.b"]["c"], else row["a"]["b.c"], else row["a"]["b"]["c"].
    """
    parts = dotted.split(".")
    value: Any = row
    start = 0
    while start < len(parts):
        if not isinstance(value, dict):
            return MISSING
        for end in range(len(parts), start, -1):
            name = ".".join(parts[start:end])
            if name in value:
                value, start = value[name], end
                break
        else:
            return MISSING
    return value


def normalise_safety(value: Any, value_map: dict[str, str] | None = None) -> str:
    """Return "Safe" or "Unsafe" for a safety label in any case (after `value_map`).

    Raises ValueError naming the value when it is neither.
    """
    text = _mapped_text(value, value_map)
    folded = text.strip().casefold()
    for label in SAFETY_VALUES:
        if folded == label.casefold():
            return label
    raise ValueError(f"unrecognised safety label {value!r}; expected Safe or Unsafe (any case), or map it with "
                     f"value_map")


def normalise_perception(value: Any, value_map: dict[str, str] | None = None) -> str:
    """Return "Level1", "Level2" or "Level3" for "Perception Level1", "Level1", "level 1", "1" (any case) and so
    on (after `value_map`). Raises ValueError naming the value otherwise."""
    text = _mapped_text(value, value_map)
    match = _PERCEPTION_PATTERN.match(text.strip().casefold())
    if match is None:
        raise ValueError(f"unrecognised perception label {value!r}; expected Perception Level1/2/3, Level1/2/3 or "
                         f"1/2/3, or map it with value_map")
    return PERCEPTION_LEVELS[int(match.group(1)) - 1]


def _mapped_text(value: Any, value_map: dict[str, str] | None) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"expected a label as a string, got {json.dumps(value)}")  # noqa: TRY004 -- callers map ValueError to DataError
    text = str(value)
    if value_map:
        if text in value_map:
            return value_map[text]
        folded = {key.strip().casefold(): mapped for key, mapped in value_map.items()}
        return folded.get(text.strip().casefold(), text)
    return text


def read_labels(path: str | Path, *, safety_field: str = "label_str", perception_field: str | None = "label_perception",
                id_field: str = "id", value_map: dict[str, str] | None = None, model_field: str = "model",
                category_field: str = "category", split_field: str = "split", model_name: str | None = None,
                raw_probabilities: bool = False, bad: BadRows | None = None) -> list[LabelRecord]:
    """Read a JSON Lines label file (misguard judgments, gpt_eval.py output, MSTS, ...) as LabelRecords.

    Every field name may be a dotted path into nested objects (see `resolve_field`). Label values go through
    `value_map` (exact key first, then case-insensitively), then are normalised: safe/unsafe in any case →
    Safe/Unsafe; "Perception Level1", "Level1", "1" → Level1 (see `normalise_perception`).
    A row with `"status": "unscored"` or `"error"` (a misguard judgment the judge could not read, or failed on) is
    kept with safety and perception None. When no row has `perception_field` (or it is None), the file is
    binary-only and every perception is None. A row without an id is keyed by its content (CONTENT_FIELDS).
    `model_name` names the target model of rows that have no `model_field` (gpt_eval.py writes one file per target
    model).
    `p_unsafe` and `p_perception` are read when a row has them; with raw_probabilities=True, a calibrated
    judgment's `p_unsafe_raw` / `p_perception_raw` are read instead (what a calibration is fitted on).

    Returns the records in file order.
    Raises DataError (file, 1-based line, field) for a line that is not a JSON object, a missing or null safety
    label on a scored row, a missing perception label in a file that has them, an unrecognised label, bad
    probabilities, a row of another model than `model_name`, or a row with neither an id nor all content fields;
    with `bad` skipping, a bad row is left out and reported instead (lines that are not JSON objects too).
    and left out by core.jsonl.
    """
    path = Path(path)
    bad = bad if bad is not None else BadRows()
    rows = [(line, row.root) for line, row in read_jsonl_numbered(path, JsonObject, bad=bad)]
    has_perception = perception_field is not None and any(
        resolve_field(row, perception_field) is not MISSING for _, row in rows)
    records: list[LabelRecord] = []
    for line, row in rows:
        try:
            records.append(_record(row, path, line, safety_field=safety_field,
                                   perception_field=perception_field if has_perception else None,
                                   id_field=id_field, value_map=value_map, model_field=model_field,
                                   category_field=category_field, split_field=split_field, model_name=model_name,
                                   raw_probabilities=raw_probabilities))
        except DataError as error:
            bad.reject(error)
    unscored = sum(1 for record in records if not record.scored)
    if unscored:
        logger.info("%s: %d unscored row(s) kept without labels", path, unscored)
    return records


def _record(row: dict[str, Any], path: Path, line: int, *, safety_field: str, perception_field: str | None,
            id_field: str, value_map: dict[str, str] | None, model_field: str, category_field: str,
            split_field: str, model_name: str | None, raw_probabilities: bool = False) -> LabelRecord:
    def text(name: str) -> str | None:
        value = resolve_field(row, name)
        if value is MISSING or value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"must be a string (got {json.dumps(value)})", path=path, line=line, field=name)
        return str(value)

    def label(name: str, normalise) -> str:
        value = resolve_field(row, name)
        if value is MISSING or value is None:
            raise DataError("missing" if value is MISSING else "is null", path=path, line=line, field=name)
        try:
            return normalise(value, value_map)
        except ValueError as exc:
            raise DataError(str(exc), path=path, line=line, field=name) from None

    unscored = row.get("status") in UNJUDGED
    safety = perception = None
    if not unscored:
        safety = label(safety_field, normalise_safety)
        if perception_field is not None:
            perception = label(perception_field, normalise_perception)

    content = {name: text(name) for name in CONTENT_FIELDS}
    row_id = text(id_field)
    if row_id is not None and isinstance(resolve_field(row, id_field), int):
        row_id = IntegerId(row_id)  # written back as the integer it was (core.records.IntegerId)
    if row_id is not None:
        key = row_id
    elif all(value is not None for value in content.values()):
        key = json.dumps([content[name] for name in CONTENT_FIELDS], ensure_ascii=False)
    else:
        missing = [name for name in CONTENT_FIELDS if content[name] is None]
        raise DataError(f"no id and no {', '.join(missing)} to key the row by content", path=path, line=line,
                        field=id_field)
    model = text(model_field)
    if model is not None and model_name is not None and model != model_name:
        raise DataError(f"model {model!r}, but this file was named as labels for {model_name!r}", path=path,
                        line=line, field=model_field)
    return LabelRecord(
        key=key, safety=safety, perception=perception,
        p_unsafe=None if unscored else _probability(row, path, line, raw_probabilities),
        p_perception=None if unscored else _perception_probabilities(row, path, line, raw_probabilities),
        model=model or model_name, category=text(category_field), line=line, id=row_id, split=text(split_field),
        sub_category=text("sub_category"), judge=text("judge"), trust=_share(row, "trust", path, line),
        label_mass=_share(row, "label_mass", path, line),
        out_of_domain=row.get("status") == "out_of_domain", error=row.get("status") == "error", path=str(path),
        **content)


def _share(row: dict[str, Any], name: str, path: Path, line: int) -> float | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise DataError(f"must be a number from 0 to 1 (got {json.dumps(value)})", path=path, line=line,
                        field=name)
    return float(value)


def _probability(row: dict[str, Any], path: Path, line: int, raw: bool = False) -> float | None:
    return _share(row, "p_unsafe_raw" if raw and row.get("p_unsafe_raw") is not None else "p_unsafe", path, line)


def _perception_probabilities(row: dict[str, Any], path: Path, line: int,
                              raw: bool = False) -> tuple[float, float, float] | None:
    name = "p_perception_raw" if raw and row.get("p_perception_raw") is not None else "p_perception"
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, dict) and set(value) == set(PERCEPTION_LEVELS):
        values = [value[level] for level in PERCEPTION_LEVELS]
    elif isinstance(value, list) and len(value) == len(PERCEPTION_LEVELS):
        values = value
    else:
        raise DataError(f"must be an object with keys {', '.join(PERCEPTION_LEVELS)} (got {json.dumps(value)})",
                        path=path, line=line, field=name)
    if any(isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0 for p in values):
        raise DataError(f"probabilities must be numbers from 0 to 1 (got {json.dumps(value)})", path=path,
                        line=line, field=name)
    return tuple(float(p) for p in values)  # type: ignore[return-value]


@dataclass
class LabelSource:
    """Where a set of labels comes from and how to read it. Defaults read misguard judgments and gpt_eval.py
    files; the fields let third-party files be read without converting them (dotted paths reach into nested
    objects, e.g. MSTS's `auto_eval.gpt-4o-2024-05-13`)."""

    path: Path
    safety_field: str = "label_str"
    perception_field: str | None = "label_perception"
    """None for binary-only labels (Safe/Unsafe with no perception level)."""
    id_field: str = "id"
    value_map: dict[str, str] = field(default_factory=dict)
    """Raw value -> label before normalising, e.g. {"1 - safe": "Safe"}."""
    model_name: str | None = None
    """The target model of rows that do not name one (gpt_eval.py writes one file per target model)."""

    def read(self, *, raw_probabilities: bool = False, bad: BadRows | None = None) -> list[LabelRecord]:
        """The file's LabelRecords (see `read_labels`). Raises DataError (file, line, field) for bad rows,
        unless `bad` skips them."""
        return read_labels(self.path, safety_field=self.safety_field, perception_field=self.perception_field,
                           id_field=self.id_field, value_map=self.value_map or None, model_name=self.model_name,
                           raw_probabilities=raw_probabilities, bad=bad)


def label_files(paths: Iterable[str | Path]) -> list[Path]:
    """The label files named by `paths`, in order: a file as it is, a folder as the `*.jsonl` files in it (sorted
    by name; the GPT-4o verdicts come as one file per target model). Raises DataError for a path that does not
    exist or a folder without a `.jsonl` file."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.glob("*.jsonl") if p.is_file())
            if not found:
                raise DataError("folder holds no .jsonl label file", path=path)
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise DataError("no such file or folder", path=path)
    return files


def read_sources(sources: LabelSource | Sequence[LabelSource], *, raw_probabilities: bool = False,
                 bad: BadRows | None = None) -> list[LabelRecord]:
    """Every source's LabelRecords, in order (see `LabelSource.read`): one source, or several reference files (one
    per target model) read as one set. Raises DataError (file, line, field) for bad rows, unless `bad` skips
    them."""
    return [record for source in _each(sources)
            for record in source.read(raw_probabilities=raw_probabilities, bad=bad)]


def source_paths(sources: LabelSource | Sequence[LabelSource]) -> str | list[str]:
    """Where the sources' labels came from, for reports: the one path, or the list of them."""
    paths = [str(source.path) for source in _each(sources)]
    return paths[0] if len(paths) == 1 else paths


def _each(sources: LabelSource | Sequence[LabelSource]) -> tuple[LabelSource, ...]:
    return (sources,) if isinstance(sources, LabelSource) else tuple(sources)
