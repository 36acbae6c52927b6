"""The one join: target responses, MIS items and label rows matched to each other, with one policy for bad rows
and one rule for duplicates. `score`, `calibrate`, `agree`, `train` and the benchmarks all join through here.

- Response -> item (`item_responses`): a response belongs to the item whose id, question and image paths are its
  own; the items are found by content, (image_path1, image_path2, question), over every split of the MIS
  directory (`ItemIndex`).
- Label row -> item (`resolve_items`): a row with an id and a split keeps them; a row without an id (the seed's
  gpt_eval.py writes none) is matched to its item by content, like a response.
- Row <-> row (`pair`, and `join_labels` for two label files): by (model, split, id) where every row on both
  sides has an id, else by the content key (image_path1, image_path2, question, response); model and split
  qualify the key where every row on both sides has them (ids repeat across target models and splits).

Bad rows and duplicates follow core.rows: a malformed row, or one that matches no item it must match, stops the
run with one line naming the file, line and field, or with `--skip-bad` is left out and reported; of two rows with
one key the first is kept and the second is a bad row naming both places. Rows of one side that match nothing on
the other are counted; more than `max_unmatched_share` of a side is an error that quotes up to three of them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

from misguard.core.errors import DataError
from misguard.core.images import ImageLimits
from misguard.core.jsonl import JsonObject, read_jsonl_numbered, validate_record
from misguard.core.labels import LabelRecord
from misguard.core.records import SPLITS, Item, Response
from misguard.core.rows import BadRows, first_of_each
from misguard.core.settings import per_file
from misguard.core.splits import find_split_file, load_split

log = logging.getLogger("misguard")

L = TypeVar("L")
R = TypeVar("R")
EXAMPLES_SHOWN = 3
"""Unmatched rows quoted in an error."""


class ItemIndex:
    """Every item of an MIS directory (all the splits it holds), findable by content: how responses and id-less
    label rows are matched back to their item and split. Raises DataError when the directory holds no split
    file, or for a bad item (see core.splits.load_split, which checks the images within `limits` and, with
    `decode_images`, decodes them; with `bad` skipping, bad items are left out)."""

    def __init__(self, data: str | Path, *, bad: BadRows | None = None, limits: ImageLimits | None = None,
                 decode_images: bool = False):
        self.data = Path(data)
        self.root: dict[str, Path] = {}
        self._by_content: dict[tuple[str, str, str], tuple[str, Item]] = {}
        for split in SPLITS:
            try:
                find_split_file(self.data, split)
            except DataError:
                continue  # a directory may hold only some splits
            loaded = load_split(self.data, split, bad=bad, limits=limits, decode_images=decode_images)
            self.root[split] = loaded.root
            for item in loaded.items:
                self._by_content[(item.image_path1, item.image_path2, item.question)] = (split, item)
        if not self.root:
            raise DataError("no MIS split file found (mis_easy.json, mis_hard.json, mis_real.json)", path=self.data)

    def find(self, image_path1: str, image_path2: str, question: str) -> tuple[str, Item] | None:
        """(split, item) with this content, or None."""
        return self._by_content.get((image_path1, image_path2, question))

    def images(self, split: str, item: Item) -> tuple[Path, Path]:
        """The absolute paths of the item's two images."""
        return self.root[split] / item.image_path1, self.root[split] / item.image_path2


# --------------------------------------------------------------------------------------------------------
# Responses and their items
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ItemResponse:
    """A target response matched to its MIS item: the split it is in and the absolute paths of its images."""

    response: Response
    split: str
    item: Item
    images: tuple[Path, Path]
    path: str
    line: int

    @property
    def key(self) -> tuple[str, str, str]:
        """(model, split, id): one response per target model and item."""
        return (self.response.model, self.split, self.response.id)

    @property
    def where(self) -> str:
        return f"{self.path}:{self.line}"


def item_responses(files: Iterable[str | Path], index: ItemIndex, *, model_names: Sequence[str] | None = None,
                   bad: BadRows | None = None) -> list[ItemResponse]:
    """Every response in the responses files, matched to its item, in file order (duplicates: the rule above).

    Files the MIS inference scripts wrote are read as they are: a row without `model` is by `model_names` (one
    name for all files, or one per file in order), else by the file name's stem (the scripts write
    `<output_dir>/<model_name>.jsonl`); a row without `id` takes its item's id, found by content.
    Raises DataError (file, line, field) for a bad line, a response that matches no item of `index`, or a
    second response of one model to one item; with `bad` skipping, such rows are left out and reported.
    Raises MisguardError when `model_names` has neither one name nor one per file."""
    bad = bad if bad is not None else BadRows()
    files = [Path(p) for p in files]
    given = per_file(model_names, len(files), "--model-name", "responses files")
    names = [name or path.stem for name, path in zip(given, files)]
    matched: list[ItemResponse] = []
    for path, model_name in zip(files, names):
        for line, row in read_jsonl_numbered(path, JsonObject, bad=bad):
            fields = {"model": model_name, **row.root}
            if "id" not in fields:
                content = tuple(fields.get(name) for name in ("image_path1", "image_path2", "question"))
                found = index.find(*content) if all(isinstance(value, str) for value in content) else None
                if found is None:
                    bad.reject(DataError(f"no id, and no item with this question and these image paths in "
                                         f"{index.data}", path=path, line=line, field="id"))
                    continue
                fields["id"] = found[1].id
            try:
                response = validate_record(Response, fields, path, line)
            except DataError as error:
                bad.reject(error)
                continue
            found = index.find(response.image_path1, response.image_path2, response.question)
            if found is None or found[1].id != response.id:
                bad.reject(DataError(f"no item with id {response.id}, this question and these image paths in "
                                     f"{index.data}", path=path, line=line, field="id"))
                continue
            split, item = found
            if type(response.id) is not type(item.id):  # e.g. "3" for the split's 3: written with the split's type
                response = response.model_copy(update={"id": item.id})
            matched.append(ItemResponse(response, split, item, index.images(split, item), str(path), line))
    kept = first_of_each(matched, lambda r: r.key, where=lambda r: (r.path, r.line), bad=bad,
                         describe=lambda r: f"model {r.response.model!r}, {r.split} item {r.response.id}")
    return list(kept.values())


def resolve_items(records: Iterable[LabelRecord], index: ItemIndex, *,
                  bad: BadRows | None = None) -> list[LabelRecord]:
    """Label rows with their item's split, id, category and sub-category: rows with an id and a split keep them;
    rows without an id are matched to their item by content. Raises DataError (file, line, field) for a row that
    matches no item; with `bad` skipping, it is left out and reported."""
    bad = bad if bad is not None else BadRows()
    resolved = []
    for record in records:
        if record.id is not None and record.split is not None:
            resolved.append(record)
            continue
        found = None
        if record.image_path1 is not None and record.image_path2 is not None and record.question is not None:
            found = index.find(record.image_path1, record.image_path2, record.question)
        if found is None or (record.id is not None and found[1].id != record.id):
            bad.reject(DataError(f"no item in {index.data} has this question and these image paths "
                                 f"({record.image_path1}, {record.image_path2})", path=record.path,
                                 line=record.line, field="question"))
            continue
        split, item = found
        resolved.append(replace(record, id=item.id, split=split, category=record.category or item.category,
                                sub_category=record.sub_category or item.sub_category))
    return resolved


# --------------------------------------------------------------------------------------------------------
# Rows with rows
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Joined(Generic[L, R]):
    """Rows of one side paired with the rows of the other that have the same key, and what matched nothing."""

    pairs: list[tuple[L, R]]
    """(left, right), in the left side's order."""
    unmatched_left: list[L]
    unmatched_right: list[R]
    key_fields: tuple[str, ...]
    """What the key is made of, e.g. ("model", "split", "id") or ("content",)."""
    skipped: list[DataError] = field(default_factory=list)
    """Bad rows left out (with skipping)."""

    @property
    def join_by(self) -> str:
        """"id" or "content"."""
        return self.key_fields[-1]

    @property
    def unmatched_judge(self) -> int:
        return len(self.unmatched_left)

    @property
    def unmatched_reference(self) -> int:
        return len(self.unmatched_right)


def pair(left: Sequence[L], right: Sequence[R], *, key_left: Callable[[L], Hashable],
         key_right: Callable[[R], Hashable], key_fields: tuple[str, ...], where_left: Callable[[L], tuple[str, int]],
         where_right: Callable[[R], tuple[str, int]], describe_left: Callable[[L], str],
         describe_right: Callable[[R], str], names: tuple[str, str] = ("judge", "reference"),
         max_unmatched_share: float = 0.02, max_unmatched_left_share: float | None = None,
         bad: BadRows | None = None,
         explain: Callable[[Joined[L, R]], tuple[str, str]] | None = None) -> Joined[L, R]:
    """Pair each left row with the right row of the same key (duplicates on either side: the rule above).

    Returns a Joined. Raises DataError for an empty side, a duplicate (unless skipped), or when more than
    `max_unmatched_share` of a side's rows match nothing (`max_unmatched_left_share` sets the left side's limit
    apart: 1.0 when the right side labels only a sample of the left), with up to three of them as examples and,
    with `explain` (the join -> why each side's rows are unmatched, as text), why."""
    left_limit = max_unmatched_share if max_unmatched_left_share is None else max_unmatched_left_share
    for limit in (max_unmatched_share, left_limit):
        if not 0.0 <= limit <= 1.0:
            raise ValueError(f"an unmatched share must be from 0 to 1, got {limit}")
    bad = bad if bad is not None else BadRows()
    for name, rows in zip(names, (left, right)):
        if not rows:
            raise DataError(f"no {name} rows to join")
    keys = " + ".join(key_fields)
    left_index = first_of_each(left, key_left, where=where_left, bad=bad, field_name=key_fields[-1],
                               describe=lambda row: f"{keys} on the {names[0]} side: {describe_left(row)}")
    right_index = first_of_each(right, key_right, where=where_right, bad=bad, field_name=key_fields[-1],
                                describe=lambda row: f"{keys} on the {names[1]} side: {describe_right(row)}")
    pairs = [(row, right_index[k]) for k, row in left_index.items() if k in right_index]
    unmatched_left = [row for k, row in left_index.items() if k not in right_index]
    unmatched_right = [row for k, row in right_index.items() if k not in left_index]
    joined = Joined(pairs, unmatched_left, unmatched_right, key_fields, skipped=list(bad.skipped))

    sides = ((names[0], names[1], unmatched_left, len(left), left_limit, where_left, describe_left),
             (names[1], names[0], unmatched_right, len(right), max_unmatched_share, where_right, describe_right))
    over = [len(unmatched) > limit * total for _, _, unmatched, total, limit, _, _ in sides]
    if any(over):
        why = explain(joined) if explain is not None else ("", "")
        problems = []
        for (name, other, unmatched, total, limit, where, describe), too_many, reasons in zip(sides, over, why):
            if too_many:
                examples = "; ".join(f"{_at(where(row))} ({describe(row)})" for row in unmatched[:EXAMPLES_SHOWN])
                problems.append(f"{len(unmatched)} of {total} {name} rows ({100.0 * len(unmatched) / total:.1f}%) "
                                f"have no {other} row{f' ({reasons})' if reasons else ''}, e.g. {examples} "
                                f"(limit {100.0 * limit:.1f}%)")
        raise DataError(f"joining by {keys}: " + "; and ".join(problems))
    if unmatched_left or unmatched_right:
        log.warning("joining by %s: %d %s and %d %s row(s) unmatched", keys, len(unmatched_left), names[0],
                    len(unmatched_right), names[1])
    return joined


def join_labels(judge: Sequence[LabelRecord], reference: Sequence[LabelRecord], *,
                max_unmatched_share: float = 0.02, max_unmatched_judge_share: float | None = None,
                bad: BadRows | None = None) -> Joined[LabelRecord, LabelRecord]:
    """Pair each judge label row with the reference row of the same response: by id when every row on both sides
    has one, else by content; qualified by model and split where every row on both sides has them.

    Returns a Joined. Raises DataError for an empty side, rows with neither ids nor content, a duplicate key, or
    too many unmatched rows (see `pair`)."""
    for name, rows in (("judge", judge), ("reference", reference)):
        if not rows:
            raise DataError(f"no {name} labels to join")
    both = [*judge, *reference]
    if all(record.id is not None for record in both):
        join_by = "id"
    elif all(record.content_key is not None for record in both):
        join_by = "content"
    else:
        raise DataError("cannot join: ids are missing on one side and image_path1, image_path2, question and "
                        "response on the other (or on some rows)")
    qualifiers = tuple(name for name in ("model", "split") if all(getattr(r, name) is not None for r in both))

    def key(record: LabelRecord) -> tuple:
        own = record.id if join_by == "id" else record.content_key
        return (*(getattr(record, name) for name in qualifiers), own)

    def describe(record: LabelRecord) -> str:
        return record.describe(by_id=join_by == "id")

    def explain(joined: Joined[LabelRecord, LabelRecord]) -> tuple[str, str]:
        report = unmatched_report(joined)
        return (_reasons_text(report["judge"], "reference", join_by),
                _reasons_text(report["reference"], "judge", join_by))

    return pair(judge, reference, key_left=key, key_right=key, key_fields=(*qualifiers, join_by),
                where_left=_record_where, where_right=_record_where, describe_left=describe,
                describe_right=describe, max_unmatched_share=max_unmatched_share,
                max_unmatched_left_share=max_unmatched_judge_share, bad=bad, explain=explain)


UNMATCHED_REASONS: dict[str, str] = {
    "unknown_item": "the other side has no row for this item (its id; for rows without ids, its image paths and "
                    "question)",
    "other_models_only": "the other side has this item, but only for other target models",
    "other_response": "the other side has this item for this target model, with another response text",
}
"""Why a label row of a join matched no row on the other side (`unmatched_report`)."""


def unmatched_report(joined: Joined[LabelRecord, LabelRecord], *,
                     names: tuple[str, str] = ("judge", "reference")) -> dict:
    """How many rows of each side of a `join_labels` join matched, and why the others did not (UNMATCHED_REASONS):
    the item is not on the other side at all, it is there for other target models only, or (rows joined by
    content) it is there for this model with another response text.

    Returns a JSON-ready {names[0]: side, names[1]: side}, each side {rows (after duplicates), matched, unmatched,
    by_reason: {reason: count}, examples: {reason: up to three "path:line (model, id)"}, other_models: the other
    side's models for the items of the other_models_only rows}."""
    left = [row for row, _ in joined.pairs] + joined.unmatched_left
    right = [row for _, row in joined.pairs] + joined.unmatched_right
    return {names[0]: _side_report(joined.unmatched_left, len(left), right, joined.key_fields),
            names[1]: _side_report(joined.unmatched_right, len(right), left, joined.key_fields)}


def _side_report(unmatched: list[LabelRecord], rows: int, other_side: list[LabelRecord],
                 key_fields: tuple[str, ...]) -> dict:
    by_model = "model" in key_fields
    models_of_item: dict[tuple, set] = {}
    for record in other_side:
        models_of_item.setdefault(_item_of(record, key_fields), set()).add(record.model)
    by_reason: dict[str, list[LabelRecord]] = {reason: [] for reason in UNMATCHED_REASONS}
    other_models: set[str] = set()
    for record in unmatched:
        models = models_of_item.get(_item_of(record, key_fields))
        if models is None:
            by_reason["unknown_item"].append(record)
        elif by_model and record.model not in models:
            by_reason["other_models_only"].append(record)
            other_models |= models
        else:
            by_reason["other_response"].append(record)
    by_id = key_fields[-1] == "id"
    return {"rows": rows, "matched": rows - len(unmatched), "unmatched": len(unmatched),
            "by_reason": {reason: len(records) for reason, records in by_reason.items()},
            "examples": {reason: [f"{record.where} ({record.describe(by_id=by_id)})"
                                  for record in records[:EXAMPLES_SHOWN]]
                         for reason, records in by_reason.items() if records},
            "other_models": sorted(map(str, other_models))}


def _item_of(record: LabelRecord, key_fields: tuple[str, ...]) -> tuple:
    """The join key without the model: which item (and split) the row is about."""
    split = (record.split,) if "split" in key_fields else ()
    if key_fields[-1] == "id":
        return (*split, record.id)
    return (*split, record.image_path1, record.image_path2, record.question)


def unmatched_lines(side: dict, name: str, other: str, join_by: str) -> list[str]:
    """One side of `unmatched_report` as lines for a person: its rows, how many matched, then one indented line
    per reason with its count and an example."""
    lines = [f"{name} rows: {side['rows']}, matched {side['matched']}, unmatched {side['unmatched']}"
             + (":" if side["unmatched"] else "")]
    for reason, examples in side["examples"].items():
        lines.append(f"  {side['by_reason'][reason]} {_reason_phrase(reason, other, join_by, side)}, "
                     f"e.g. {examples[0]}")
    return lines


def _reasons_text(side: dict, other: str, join_by: str) -> str:
    return ", ".join(f"{count} {_reason_phrase(reason, other, join_by, side)}"
                     for reason, count in side["by_reason"].items() if count)


def _reason_phrase(reason: str, other: str, join_by: str, side: dict) -> str:
    item = "an id" if join_by == "id" else "an item"
    if reason == "unknown_item":
        return f"with {item} the {other} has no row for"
    if reason == "other_models_only":
        models = side["other_models"]
        shown = ", ".join(models[:EXAMPLES_SHOWN]) + (", ..." if len(models) > EXAMPLES_SHOWN else "")
        return f"with {item} the {other} has for other models only ({shown})"
    return f"with an item the {other} has, but another response text"


def labelled_responses(responses: Sequence[ItemResponse], labels: Sequence[LabelRecord], *,
                       unplaced: Sequence[DataError] = (), max_unmatched_share: float = 0.02,
                       bad: BadRows | None = None) -> Joined[ItemResponse, LabelRecord]:
    """Each response paired with its label row by (model, split, id) (label rows resolved with `resolve_items`);
    a label row whose response text differs from the response's counts as unmatched. Responses without a label
    are expected (returned as unmatched). `unplaced` are the label rows that matched no MIS item (resolve_items'
    skipped rows): they count as unmatched too.

    Raises DataError when more than `max_unmatched_share` of the label rows (with `unplaced`) match no response,
    quoting up to three of them with why, and naming the model mismatch when the labels' models are not the
    responses' (a gpt_eval.py file's model is its file name unless named otherwise)."""
    joined = pair(responses, labels, key_left=lambda r: r.key, key_right=lambda r: (r.model, r.split, r.id),
                  key_fields=("model", "split", "id"), where_left=lambda r: (r.path, r.line),
                  where_right=_record_where, describe_left=lambda r: f"model {r.response.model!r}, {r.split} item "
                  f"{r.response.id}", describe_right=lambda r: r.describe(by_id=True), names=("response", "label"),
                  max_unmatched_share=1.0, bad=bad)
    by_key = {response.key: response for response in responses}
    # The same item and model but another response text: the label is for another run of the target model.
    differs = [label for response, label in joined.pairs
               if label.response is not None and label.response != response.response.response]
    pairs = [(response, label) for response, label in joined.pairs if label not in differs]
    unmatched_right = [*joined.unmatched_right, *differs]
    total = len(labels) + len(unplaced)
    unmatched = len(unmatched_right) + len(unplaced)
    if unmatched > max_unmatched_share * total:
        def why(label: LabelRecord) -> str:
            response = by_key.get((label.model, label.split, label.id))
            return (f"the response differs from the one at {response.where}" if response is not None
                    else "no response by this model to this item")

        examples = [str(error) for error in unplaced[:EXAMPLES_SHOWN]]
        examples += [f"{label.where} ({label.describe()}: {why(label)})"
                     for label in unmatched_right[:EXAMPLES_SHOWN - len(examples)]]
        message = (f"{unmatched} of {total} label rows ({100.0 * unmatched / total:.1f}%) match no response, e.g. "
                   f"{'; '.join(examples)} (limit {100.0 * max_unmatched_share:.1f}%)")
        label_models = {label.model for label in labels}
        response_models = {response.response.model for response in responses}
        if not label_models <= response_models:
            message += (f"; label files are for models {sorted(map(str, label_models))}, responses are by "
                        f"{sorted(response_models)} (a gpt_eval.py file's target model is its file name's stem "
                        "unless named otherwise)")
        raise DataError(message)
    if unmatched:
        log.warning("%d of %d label row(s) match no response", unmatched, total)
    return Joined(pairs, joined.unmatched_left, unmatched_right, joined.key_fields, skipped=joined.skipped)


def _record_where(record: LabelRecord) -> tuple[str, int]:
    return (record.path or "", record.line)


def _at(where: tuple[str, int]) -> str:
    path, line = where
    return f"{path}:{line}" if path else f"line {line}"
