"""Training data for the judge: target responses joined with GPT-4o's verdicts, split by MIS item.

`build_examples` reads the responses files `misguard infer` writes and the label files, and pairs each response
with its verdict through core.join. Two kinds of label file are read (core.labels):
- the seed's gpt_eval.py output: one file per target model, no ids; a verdict is matched back to its MIS item
  by (image_path1, image_path2, question), and to the response by the target model (the file's) and the
  response text, so two models that answered one item word for word stay separate;
- misguard judgments.jsonl (a judge's own, or `misguard score --from-labels` output): rows carry id, split and
  model; unscored rows have no labels and are left out.

`split_by_item` splits examples into train and validation by MIS item, stratified by category;
`to_dataset` / `examples_from_dataset` convert to and from a `datasets.Dataset`; `label_counts` and
`data_hashes` describe the data for the judge card.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from misguard.core.errors import DataError, MisguardError
from misguard.core.join import ItemIndex, item_responses, labelled_responses, resolve_items
from misguard.core.jsonl import JsonObject, read_jsonl_numbered
from misguard.core.labels import (
    MISSING,
    LabelRecord,
    normalise_perception,
    normalise_safety,
    read_labels,
    resolve_field,
)
from misguard.core.records import CATEGORIES, PERCEPTION_LABELS, PERCEPTION_LEVELS, SAFETY_LABELS
from misguard.core.rows import BadRows, first_of_each
from misguard.judge_training.examples import TextExample, TrainingExample
from misguard.judges.templates import CODES

if TYPE_CHECKING:  # the `train` extra: imported where a Dataset is built
    import datasets

logger = logging.getLogger("misguard")

MAX_UNMATCHED_SHARE = 0.02
"""More than this share of label rows matching no response is an error (the wrong files or model names)."""
COLUMNS: tuple[str, ...] = ("item_key", "split", "id", "model", "category", "sub_category", "image1", "image2",
                            "question", "response", "label_str", "label_perception", "answer")
"""The columns of `to_dataset`, in order; all strings (image1/image2 are absolute paths)."""


# --------------------------------------------------------------------------------------------------------
# Joining responses with their verdicts
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuiltExamples:
    """What `build_examples` returns: the examples and what was left out on either side."""

    examples: list[TrainingExample]
    """One per labelled response, in the order of the responses files."""
    responses: int
    """Responses read."""
    labels: int
    """Label rows read (verdicts and judgments, unscored judgments included)."""
    unscored_labels: int
    """Unscored judgments: rows without labels, left out (their responses count as without a label)."""
    responses_without_label: int
    """Responses no label row matched: left out of the examples."""
    labels_without_response: int
    """Scored label rows that matched no response (no such MIS item, model, item or response text)."""
    skipped_rows: list[str] = field(default_factory=list)
    """Bad rows left out with skipping (file:line: field: why)."""


def build_examples(responses: Sequence[str | Path], labels: Sequence[str | Path], data: str | Path, *,
                   label_model_names: Sequence[str | None] | None = None,
                   response_model_names: Sequence[str] | None = None, bad: BadRows | None = None,
                   max_unmatched_share: float = MAX_UNMATCHED_SHARE) -> BuiltExamples:
    """Pair every target response with the reference verdict on it, as TrainingExamples (core.join).

    responses: files as `misguard infer` writes them (one or more target models each).
    labels: gpt_eval.py verdict files (one per target model) and/or misguard judgments.jsonl files.
    data: the MIS directory the responses were made on; the examples' image paths are absolute paths in it.
    label_model_names: one entry per labels file. For a gpt_eval.py file it names the target model (default,
    or None: the file's stem); it must equal the responses' `model` for the verdicts to match. For a
    judgments file, whose rows name their model, a given name must be the model of every row.
    response_model_names: the target model of responses files without `model` (core.join.item_responses).

    A response without a label is left out and counted (logged as a warning). A scored label row that matches
    no response (no MIS item with its question and image paths, no response by its model to its item, or a
    different response text) is counted, and is an error when more than `max_unmatched_share` of the scored
    label rows are such.

    Returns a BuiltExamples: the examples in the responses files' order, and the counts.
    Raises MisguardError when label_model_names does not give one entry per labels file; DataError for a bad
    line (file, line, field), a response to no MIS item, a second response or label for the same (model,
    split, id), a judgments row whose model is not its file's given name, no responses or no scored labels, a
    label without a perception level, or too many unmatched label rows (with up to 3 of them as examples); with
    `bad` skipping, bad rows are left out and reported instead.
    """
    if not 0.0 <= max_unmatched_share <= 1.0:
        raise ValueError(f"max_unmatched_share must be from 0 to 1, got {max_unmatched_share}")
    bad = bad if bad is not None else BadRows()
    label_files = [Path(p) for p in labels]
    if label_model_names is not None and len(label_model_names) != len(label_files):
        raise MisguardError(f"{len(label_model_names)} model names for {len(label_files)} label files")
    index = ItemIndex(Path(data), bad=bad)
    matched_responses = item_responses(responses, index, model_names=response_model_names, bad=bad)
    if not matched_responses:
        raise DataError(f"no responses in {', '.join(str(p) for p in responses) or '(no files)'}")

    records: list[LabelRecord] = []
    n_labels = n_unscored = 0
    for n, path in enumerate(label_files):
        name = label_model_names[n] if label_model_names is not None else None
        rows = read_labels(path, model_name=name if name is not None or _names_models(path) else path.stem,
                           bad=bad)
        n_labels += len(rows)
        n_unscored += sum(not row.scored for row in rows)
        for row in rows:
            if row.scored and row.perception is None:
                bad.reject(DataError("missing: the judge learns a perception level for every response", path=path,
                                     line=row.line, field="label_perception"))
            elif row.scored:
                records.append(row)
    if n_unscored:
        logger.info("%d unscored judgment(s) have no labels and are left out", n_unscored)
    if not records:
        raise DataError(f"no scored labels in {', '.join(str(p) for p in label_files) or '(no files)'}")
    # A label row that matches no MIS item counts as matching no response.
    placed = BadRows(skip=True)
    resolved = resolve_items(records, index, bad=placed)
    joined = labelled_responses(matched_responses, resolved, unplaced=placed.skipped, bad=bad,
                                max_unmatched_share=max_unmatched_share)
    unmatched = len(joined.unmatched_right) + len(placed.skipped)

    examples = [TrainingExample(
        item_key=f"{r.split}/{r.response.id}", split=r.split, id=r.response.id, model=r.response.model,
        category=r.item.category, sub_category=r.item.sub_category, images=(str(r.images[0]), str(r.images[1])),
        question=r.response.question, response=r.response.response, label_str=label.safety,
        label_perception=f"Perception {label.perception}") for r, label in joined.pairs]
    without = len(matched_responses) - len(examples)
    if without:
        logger.warning("%d of %d response(s) have no label and are left out", without, len(matched_responses))
    logger.info("%d training examples from %d responses and %d label rows", len(examples), len(matched_responses),
                n_labels)
    return BuiltExamples(examples=examples, responses=len(matched_responses), labels=n_labels,
                         unscored_labels=n_unscored, responses_without_label=without,
                         labels_without_response=unmatched, skipped_rows=bad.report())


def _names_models(path: Path) -> bool:
    """Whether a label file's first row names its target model (a misguard judgments file does; a gpt_eval.py
    file, one per target model, does not)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            for raw in handle:
                if raw.strip():
                    row = json.loads(raw)
                    return isinstance(row, dict) and "model" in row
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False  # read_labels names the problem
    return False


# --------------------------------------------------------------------------------------------------------
# Train / validation split
# --------------------------------------------------------------------------------------------------------

def split_by_item(examples: Sequence[TrainingExample], val_frac: float = 0.1,
                  seed: int = 0) -> tuple[list[TrainingExample], list[TrainingExample]]:
    """Split examples into (train, validation) by MIS item: all responses to one item land on the same side.

    round(val_frac * items) items go to validation, apportioned over categories in proportion to their items
    (largest remainders, ties broken by the seed) while every category keeps at least one item on the train
    side; only when that is impossible does a category go to validation whole (logged). Which items of a
    category go is drawn by `seed`. The result depends only on the examples, val_frac and seed, not on the
    examples' order; both lists keep the input order. val_frac=0 puts everything in train.

    Returns (train, validation).
    Raises ValueError for val_frac outside [0, 1), and, for val_frac > 0, when the items are too few for at
    least one validation item and one train item.
    """
    if isinstance(val_frac, bool) or not isinstance(val_frac, (int, float)) or not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac must be a number from 0 to less than 1, got {val_frac!r}")
    examples = list(examples)
    if val_frac == 0:
        return examples, []
    category_of: dict[str, str] = {}
    for example in examples:
        category_of.setdefault(example.item_key, example.category)
    n_items = len(category_of)
    n_val = math.floor(val_frac * n_items + 0.5)
    if n_val < 1 or n_val >= n_items:
        raise MisguardError(f"val_frac {val_frac} of {n_items} item(s) leaves "
                            f"{'no validation item' if n_val < 1 else 'no train item'}; use more data, another "
                            f"--val-frac, or (for a VLM judge) --val-frac 0")

    rng = random.Random(seed)
    by_category: dict[str, list[str]] = {}
    for key in sorted(category_of, key=_item_order):
        by_category.setdefault(category_of[key], []).append(key)
    categories = sorted(by_category)
    for category in categories:
        rng.shuffle(by_category[category])
    quota = _apportion({c: len(by_category[c]) for c in categories}, n_val, rng)
    val_items = {key for c in categories for key in by_category[c][:quota[c]]}
    train = [e for e in examples if e.item_key not in val_items]
    val = [e for e in examples if e.item_key in val_items]
    return train, val


def _apportion(sizes: dict[str, int], n_val: int, rng: random.Random) -> dict[str, int]:
    """Validation items per category: proportional to its size, largest remainders first, each category
    keeping one train item where the total allows."""
    total = sum(sizes.values())
    exact = {c: n_val * n / total for c, n in sizes.items()}
    tie = {c: rng.random() for c in sizes}
    quota = {c: min(math.floor(exact[c]), n - 1) for c, n in sizes.items()}
    left = n_val - sum(quota.values())
    # Largest remainder first, then (when keeping a train item per category capped some) the categories with
    # the most items still on the train side.
    for c in sorted(sizes, key=lambda c: (-(exact[c] - math.floor(exact[c])), tie[c])):
        if left and quota[c] < sizes[c] - 1:
            quota[c] += 1
            left -= 1
    while left:
        open_ = [c for c in sizes if quota[c] < sizes[c] - 1]
        if not open_:
            break
        c = max(open_, key=lambda c: (sizes[c] - quota[c], tie[c]))
        quota[c] += 1
        left -= 1
    if left:
        # Too many categories with a single item for every one to keep a train item.
        for c in sorted(sizes, key=lambda c: (sizes[c] - quota[c], tie[c])):
            if left and quota[c] < sizes[c]:
                logger.warning("category %r has all its items on the validation side", c)
                step = min(left, sizes[c] - quota[c])
                quota[c] += step
                left -= step
    return quota


def _item_order(item_key: str):
    split, _, item_id = item_key.partition("/")
    return (split, 0, int(item_id), "") if item_id.isdigit() else (split, 1, 0, item_id)


# --------------------------------------------------------------------------------------------------------
# Counts, datasets and hashes
# --------------------------------------------------------------------------------------------------------

def label_counts(examples: Iterable[TrainingExample]) -> dict:
    """What the examples hold, for logs and the judge card.

    Returns {"items": distinct MIS items, "responses": examples, "safety": {"Safe": n, "Unsafe": n},
    "perception": {"Level1": n, "Level2": n, "Level3": n}, "answer": {"1": n, ..., "6": n},
    "categories": {category: responses}}; every label and code appears, with 0 when absent; categories in
    core.records.CATEGORIES order, then any others sorted.
    """
    examples = list(examples)
    safety = Counter(e.label_str for e in examples)
    perception = Counter(e.label_perception.removeprefix("Perception ") for e in examples)
    answers = Counter(e.answer for e in examples)
    categories = Counter(e.category for e in examples)
    order = [c for c in CATEGORIES if c in categories] + sorted(set(categories) - set(CATEGORIES))
    return {
        "items": len({e.item_key for e in examples}),
        "responses": len(examples),
        "safety": {label: safety[label] for label in SAFETY_LABELS},
        "perception": {level: perception[level] for level in PERCEPTION_LEVELS},
        "answer": {code: answers[code] for code in CODES},
        "categories": {c: categories[c] for c in order},
    }


def split_sizes(examples: Sequence[TrainingExample]) -> dict[str, int]:
    """{examples, items (distinct MIS items), target_models}: one side of a split, for the judge card."""
    return {"examples": len(examples), "items": len({e.item_key for e in examples}),
            "target_models": len({e.model for e in examples})}


def to_dataset(examples: Iterable[TrainingExample]) -> datasets.Dataset:
    """The examples as a `datasets.Dataset` with COLUMNS (all strings; image1/image2 absolute paths, `answer`
    the judge's answer code). Raises KeyError for an example whose labels are not a known pair."""
    import datasets  # the `train` extra: only training builds a Dataset

    examples = list(examples)
    columns: dict[str, list[str]] = {name: [] for name in COLUMNS}
    for e in examples:
        row = {"item_key": e.item_key, "split": e.split, "id": e.id, "model": e.model, "category": e.category,
               "sub_category": e.sub_category, "image1": e.images[0], "image2": e.images[1],
               "question": e.question, "response": e.response, "label_str": e.label_str,
               "label_perception": e.label_perception, "answer": e.answer}
        for name in COLUMNS:
            columns[name].append(row[name])
    features = datasets.Features({name: datasets.Value("string") for name in COLUMNS})
    return datasets.Dataset.from_dict(columns, features=features)


def examples_from_dataset(dataset: datasets.Dataset) -> list[TrainingExample]:
    """The TrainingExamples of a dataset made by `to_dataset` (extra columns are ignored), in row order.

    Raises ValueError for missing columns, a label that is not "Safe"/"Unsafe" or "Perception Level1".."3",
    or an `answer` that disagrees with the labels (naming the row).
    """
    missing = [name for name in COLUMNS if name not in dataset.column_names]
    if missing:
        raise ValueError(f"dataset has no column(s) {', '.join(missing)}; expected {', '.join(COLUMNS)}")
    examples = []
    for n, row in enumerate(dataset):
        if row["label_str"] not in SAFETY_LABELS or row["label_perception"] not in PERCEPTION_LABELS:
            raise ValueError(f"row {n}: labels {row['label_str']!r}, {row['label_perception']!r} are not "
                             f"Safe/Unsafe and Perception Level1..3")
        example = TrainingExample(
            item_key=row["item_key"], split=row["split"], id=row["id"], model=row["model"],
            category=row["category"], sub_category=row["sub_category"], images=(row["image1"], row["image2"]),
            question=row["question"], response=row["response"], label_str=row["label_str"],
            label_perception=row["label_perception"])
        if row["answer"] != example.answer:
            raise ValueError(f"row {n}: answer {row['answer']!r} does not match {row['label_perception']} and "
                             f"{row['label_str']} (code {example.answer})")
        examples.append(example)
    return examples


def data_hashes(paths: Iterable[str | Path]) -> dict[str, str]:
    """SHA-256 of each file, for the judge card: {str(path): hex digest}. A directory's digest is the SHA-256
    of the lines "<relative path>\\0<file digest>\\n" of every file under it, in sorted order, so it changes
    when any file in it is added, removed, renamed or changed.

    Raises DataError for a path that does not exist.
    """
    hashes: dict[str, str] = {}
    for path in paths:
        path = Path(path)
        if path.is_dir():
            manifest = hashlib.sha256()
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                manifest.update(f"{file.relative_to(path).as_posix()}\0{_file_sha256(file)}\n".encode())
            hashes[str(path)] = manifest.hexdigest()
        elif path.is_file():
            hashes[str(path)] = _file_sha256(path)
        else:
            raise DataError("file not found", path=path)
    return hashes


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()



# --------------------------------------------------------------------------------------------------------
# Generic labelled text: any JSONL of (question, response, label)
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TextSource:
    """How to read one JSON Lines file of labelled (question, response) rows. Every field is a dotted path into
    the row (the spelling `agree --judge-field` uses), e.g. MSTS's `auto_eval.gpt-4o-2024-05-13`."""

    path: Path
    label_field: str | None = "label_str"
    """Safe / Unsafe, in any case (safe, UNSAFE, ...); None for unlabelled rows (to be judged, not trained on)."""
    question_field: str = "question"
    response_field: str = "response"
    image_description_field: str | None = "image_description"
    """Text about the images; a row without it has none."""
    group_field: str | None = None
    """Rows with the same value are never split between training and validation; default: the question."""
    source: str | None = None
    """The source's name in figures; default: each row's `source` field, else the file name's stem."""
    perception_field: str | None = None
    """A perception level (Level1..3), where the file has one."""
    id_field: str = "id"


def read_text_examples(source: TextSource, *, bad: BadRows | None = None) -> list[TextExample]:
    """The labelled rows of one file as TextExamples, in file order. Raises DataError (file, line, field) for a
    row without a question, response or readable label, or a second row with the same id; with `bad` skipping,
    such rows are left out and reported."""
    bad = bad if bad is not None else BadRows()
    path = Path(source.path)
    examples = []
    for line, row in read_jsonl_numbered(path, JsonObject, bad=bad):
        values = row.root
        try:
            examples.append(_text_example(values, source, path, line))
        except DataError as error:
            bad.reject(error)
    kept = first_of_each(examples, lambda e: e.id, where=lambda e: (str(path), int(e.where.rsplit(":", 1)[1])),
                         describe=lambda e: f"id {e.id!r}", bad=bad, field_name=source.id_field)
    return list(kept.values())


def _text_example(row: dict, source: TextSource, path: Path, line: int) -> TextExample:
    def text(name: str | None, *, required: bool) -> str | None:
        value = resolve_field(row, name) if name else MISSING
        if value is MISSING or value is None:
            if required:
                raise DataError("missing" if value is MISSING else "is null", path=path, line=line, field=name)
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataError(f"must be a string (got {json.dumps(value)})", path=path, line=line, field=name)
        return str(value)

    question = text(source.question_field, required=True)
    label = text(source.label_field, required=True) if source.label_field else None
    try:
        unsafe = None if label is None else int(normalise_safety(label) == "Unsafe")
        perception_text = text(source.perception_field, required=False)
        perception = normalise_perception(perception_text) if perception_text else None
    except ValueError as exc:
        raise DataError(str(exc), path=path, line=line, field=source.label_field) from None
    row_id = text(source.id_field, required=False) or f"{path.stem}:{line}"
    return TextExample(id=row_id, source=source.source or text("source", required=False) or path.stem,
                       group=text(source.group_field, required=True) if source.group_field else question,
                       question=question, response=text(source.response_field, required=True) or "",
                       unsafe=unsafe, perception=perception,
                       image_description=text(source.image_description_field, required=False),
                       where=f"{path}:{line}")


def split_by_group(examples: Sequence[TextExample], val_frac: float, seed: int = 0
                   ) -> tuple[list[TextExample], list[TextExample]]:
    """(train, validation): in every source, round(val_frac x its groups) groups drawn by `seed` go to
    validation (at least one where the source has two or more), every row of a group on one side. Both lists keep
    the input order; the result does not depend on it. Raises ValueError for val_frac outside [0, 1)."""
    if isinstance(val_frac, bool) or not isinstance(val_frac, (int, float)) or not 0.0 <= val_frac < 1.0:
        raise ValueError(f"val_frac must be a number from 0 to less than 1, got {val_frac!r}")
    groups: dict[str, list[str]] = {}
    for example in examples:
        groups.setdefault(example.source, [])
        if example.group not in groups[example.source]:
            groups[example.source].append(example.group)
    held_out: set[tuple[str, str]] = set()
    rng = random.Random(seed)
    for name in sorted(groups):
        names = sorted(groups[name])
        rng.shuffle(names)
        n_val = min(len(names) - 1, max(1 if val_frac > 0 and len(names) > 1 else 0,
                                        math.floor(val_frac * len(names) + 0.5)))
        held_out.update((name, group) for group in names[:n_val])
    train = [e for e in examples if (e.source, e.group) not in held_out]
    val = [e for e in examples if (e.source, e.group) in held_out]
    return train, val


def text_counts(examples: Sequence[TextExample]) -> dict:
    """What text examples hold, for logs and the CLI: {"responses": n, "items": groups, "safety": {"Safe": n,
    "Unsafe": n}, "perception": {level: n}, "sources": {source: n}}."""
    perception = Counter(e.perception for e in examples if e.perception)
    return {"responses": len(examples), "items": len({(e.source, e.group) for e in examples}),
            "safety": {"Safe": sum(not e.unsafe for e in examples), "Unsafe": sum(e.unsafe for e in examples)},
            "perception": {level: perception[level] for level in PERCEPTION_LEVELS},
            "sources": dict(sorted(Counter(e.source for e in examples).items()))}
