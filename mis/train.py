"""`misguard train`: responses + GPT-4o verdicts -> examples -> split by item -> a judge folder: a fine-tuned VLM
(judge_training.vlm) or a lite judge (judge_training.lite), from the same examples and the same split."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from misguard.core.jsonl import write_jsonl_atomic
from misguard.core.rows import BadRows
from misguard.core.settings import setting
from misguard.judge_training.data import build_examples, data_hashes, label_counts, split_by_item
from misguard.judge_training.examples import TrainingExample
from misguard.judge_training.lite import LiteTrainConfig, LiteTrainResult, train_lite_judge
from misguard.judge_training.vlm import TrainConfig, TrainResult, train_judge

log = logging.getLogger("misguard")

VALIDATION_REFERENCE = "validation_reference.jsonl"
"""In the judge folder: the held-out responses' reference labels, for `misguard calibrate --reference` (the
judge never trained on them) and `misguard agree`."""


@dataclass
class TrainData:
    """Where the training data comes from. Each field is one CLI option."""

    responses: list[Path] = setting(help="Responses files from `misguard infer` (the target models' answers); "
                                         "repeatable.")
    labels: list[Path] = setting(help="GPT-4o's verdicts on them: gpt_eval.py files (one per target model) or "
                                      "misguard judgments.jsonl files; repeatable.")
    data: Path = setting(help="The MIS test directory the responses were made on.")
    label_model_names: Sequence[str] | None = setting(
        None, flag="--label-model-name", help="The target model of each --labels file, in order (default: the "
                                              "file names).")
    val_frac: float = setting(0.1, help="Share of MIS items held out for validation (all responses to an item on "
                                        "one side).")
    split_seed: int = setting(0, help="Seed of the train / validation split.")
    skip_bad: bool = setting(False, help="Log and count bad rows instead of stopping at the first.")


@dataclass(frozen=True)
class TrainRun:
    result: TrainResult | LiteTrainResult
    counts: dict
    """label_counts of the train and validation sides: {"train": ..., "validation": ...}."""
    left_out: dict
    """Responses without a verdict and verdicts without a response (counted, not trained on)."""


def run_train(data: TrainData, config: TrainConfig | LiteTrainConfig, *, progress: bool = True) -> TrainRun:
    """Build the examples, split them by MIS item, and train the judge the config is for (a TrainConfig: the VLM
    judge; a LiteTrainConfig: the lite judge), then write the held-out labels beside it. Returns the TrainRun.
    Raises DataError for bad or unmatched inputs (before any training), MisguardError for bad settings."""
    built = build_examples(data.responses, data.labels, data.data, label_model_names=data.label_model_names,
                           bad=BadRows(skip=data.skip_bad))
    train, val = split_by_item(built.examples, val_frac=data.val_frac, seed=data.split_seed)
    counts = {"train": label_counts(train), "validation": label_counts(val)}
    log.info("training on %d responses (%d items), validating on %d (%d items)", len(train),
             counts["train"]["items"], len(val), counts["validation"]["items"])
    hashes = data_hashes([*data.responses, *data.labels])
    if isinstance(config, LiteTrainConfig):
        result = train_lite_judge(config, train, val, data_hashes=hashes)
    else:
        result = train_judge(config, train, val, data_hashes=hashes, progress=progress)
    reference = Path(config.out).expanduser() / VALIDATION_REFERENCE
    if val:
        write_validation_reference(val, reference)
    elif reference.exists():
        # From an earlier run with another split: calibrating on it would calibrate on training data.
        reference.unlink()
    return TrainRun(result=result, counts=counts,
                    left_out={"responses_without_label": built.responses_without_label,
                              "labels_without_response": built.labels_without_response,
                              "unscored_labels": built.unscored_labels, "skipped_rows": built.skipped_rows})


def write_validation_reference(examples: Sequence[TrainingExample], path: Path) -> Path:
    """The held-out examples' reference verdicts as a label file with ids (the gpt_eval.py fields plus id, split,
    model, sub_category; image paths absolute, so it joins by id), written atomically. Returns the path."""
    write_jsonl_atomic(path, [{
        "label_perception": e.label_perception, "label_str": e.label_str, "category": e.category,
        "question": e.question, "response": e.response, "image_path1": e.images[0],
        "image_path2": e.images[1], "id": e.id, "split": e.split, "model": e.model,
        "sub_category": e.sub_category} for e in examples])
    return path
