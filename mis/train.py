"""`misguard train`: responses + GPT-4o verdicts -> examples -> split by item -> a judge folder: a fine-tuned VLM
(judge_training.vlm) or a lite judge (judge_training.lite), from the same examples and the same split."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from transformers.trainer_utils import get_last_checkpoint

from misguard.core.errors import MisguardError, require
from misguard.core.interrupts import saving
from misguard.core.jsonl import write_jsonl_atomic
from misguard.core.records import id_value
from misguard.core.rows import BadRows
from misguard.core.settings import check_settings, per_file, setting
from misguard.engines import check_engine
from misguard.judge_training.data import (
    TextSource,
    build_examples,
    data_hashes,
    label_counts,
    read_text_examples,
    split_by_group,
    split_by_item,
    text_counts,
)
from misguard.judge_training.examples import TextExample, TrainingExample
from misguard.judge_training.lite import LiteTrainConfig, LiteTrainResult, train_lite_judge
from misguard.judge_training.vlm import CHECKPOINTS, TrainConfig, TrainResult, train_judge

log = logging.getLogger("misguard")

VALIDATION_REFERENCE = "validation_reference.jsonl"
"""In the judge folder: the held-out responses' reference labels, for `misguard calibrate --reference` (the
judge never trained on them) and `misguard agree`."""


@dataclass
class TrainData:
    """Where the training data comes from. Each field is one CLI option."""

    data: list[Path] = setting(
        default_factory=list, help="The MIS test directory the --responses were made on; and, for --kind lite, "
                                   "JSON Lines files of labelled (question, response) rows; repeatable.")
    responses: list[Path] = setting(default_factory=list, help="Responses files from `misguard infer` (the "
                                                               "target models' answers); repeatable.")
    labels: list[Path] = setting(default_factory=list, help="GPT-4o's verdicts on them: gpt_eval.py files (one per "
                                                            "target model) or judgments.jsonl files; repeatable.")
    model_names: Sequence[str] | None = setting(
        None, flag="--model-name", help="The target model of --responses files whose rows have no `model` (the MIS "
                                        "inference scripts write none): once for all, or once per file in order "
                                        "(default: the file name's stem, as those scripts name their files).")
    label_model_names: Sequence[str] | None = setting(
        None, flag="--label-model-name", help="The target model of each --labels file, in order (default: the "
                                              "file names).")
    label_field: list[str] = setting(
        default_factory=list, help="lite, --data JSONL: the Safe/Unsafe label's field, a dotted path (e.g. "
                                   "auto_eval.gpt-4o-2024-05-13); once for every file or once per file, in order "
                                   "[default: label_str].")
    question_field: list[str] = setting(default_factory=list, help="lite, --data JSONL: the question's field, as "
                                                                   "--label-field [default: question].")
    response_field: list[str] = setting(default_factory=list, help="lite, --data JSONL: the response's field, as "
                                                                   "--label-field [default: response].")
    image_description_field: list[str] = setting(
        default_factory=list, help="lite, --data JSONL: a field with text about the images, as --label-field; "
                                   "'none' for none [default: image_description where present].")
    group_field: list[str] = setting(
        default_factory=list, help="lite, --data JSONL: rows with the same value never split between training and "
                                   "validation (e.g. case_id), as --label-field [default: the question].")
    source_name: list[str] = setting(
        default_factory=list, flag="--source", help="lite, --data JSONL: the source's name in figures, as "
                                                    "--label-field [default: each row's source field, else the "
                                                    "file name].")
    val_frac: float = setting(0.1, at_least=0.0, below=1.0, help="Share of MIS items (of each source's groups, for "
                                                                 "--kind lite) held out for validation.")
    split_seed: int = setting(0, at_least=0, help="Seed of the train / validation split.")
    skip_bad: bool = setting(False, help="Log and count bad rows instead of stopping at the first.")

    def __post_init__(self):
        check_settings(self)  # the library refuses what the command line refuses

    def mis_dir(self) -> Path | None:
        """The MIS directory among --data (a folder), or None. Raises MisguardError for more than one."""
        folders = [Path(p) for p in self.data if Path(p).is_dir()]
        if len(folders) > 1:
            raise MisguardError(f"--data names {len(folders)} folders; give one MIS directory")
        return folders[0] if folders else None

    def text_sources(self) -> list[TextSource]:
        """The --data JSONL files with how to read each. Raises MisguardError when a per-file option is given
        neither once nor once per file."""
        files = [Path(p) for p in self.data if not Path(p).is_dir()]

        def each(values: Sequence[str], flag: str) -> list[str | None]:
            return per_file(values, len(files), flag, "--data JSONL files")

        options = zip(files, each(self.label_field, "--label-field"),
                      each(self.question_field, "--question-field"),
                      each(self.response_field, "--response-field"),
                      each(self.image_description_field, "--image-description-field"),
                      each(self.group_field, "--group-field"), each(self.source_name, "--source"))
        sources = []
        for path, label, question, response, image, group, name in options:
            sources.append(TextSource(
                path=path, label_field=label or "label_str", question_field=question or "question",
                response_field=response or "response", group_field=group, source=name,
                image_description_field=None if (image or "").lower() == "none" else image or "image_description"))
        return sources


@dataclass(frozen=True)
class TrainRun:
    result: TrainResult | LiteTrainResult
    counts: dict
    """What each side holds: {"train": ..., "validation": ...} (MIS label counts; for the lite judge, rows per
    source and label too)."""
    left_out: dict
    """Responses without a verdict and verdicts without a response (counted, not trained on), bad rows skipped."""


def run_train(data: TrainData, config: TrainConfig | LiteTrainConfig, *, progress: bool = True) -> TrainRun:
    """Build the examples, split them into train and validation (by MIS item; by group within each source for the
    lite judge's JSONL rows), and train the judge the config is for (a TrainConfig: the VLM judge; a
    LiteTrainConfig: the lite judge), then write the held-out MIS labels beside it. Returns the TrainRun.
    Raises, before anything is written, DataError for bad or unmatched inputs, MisguardError for bad settings or a
    base that is not a loadable model folder (check_training), MissingExtraError when the `train` extra is not
    installed. Ctrl-C leaves a note of the last checkpoint (core.interrupts)."""
    check_training(config)
    bad = BadRows(skip=data.skip_bad)
    mis_dir, sources = data.mis_dir(), data.text_sources()
    lite = isinstance(config, LiteTrainConfig)
    if sources and not lite:
        raise MisguardError("--data JSONL files train the lite judge only (--kind lite): the VLM judge learns from "
                            "MIS responses and their images")
    if (data.responses or data.labels) and mis_dir is None:
        raise MisguardError("--responses and --labels need --data MIS_DIR (the MIS directory they were made on)")
    if not data.responses and not sources:
        raise MisguardError("nothing to train on: give --responses, --labels and --data MIS_DIR, or (--kind lite) "
                            "--data JSONL files")
    built = None
    mis_train: list[TrainingExample] = []
    mis_val: list[TrainingExample] = []
    if data.responses:
        built = build_examples(data.responses, data.labels, mis_dir, label_model_names=data.label_model_names,
                               response_model_names=data.model_names, bad=bad)
        mis_train, mis_val = split_by_item(built.examples, val_frac=data.val_frac, seed=data.split_seed)
    hashes = data_hashes([*data.responses, *data.labels, *(s.path for s in sources)])
    counts = {"train": label_counts(mis_train), "validation": label_counts(mis_val)}
    if lite:
        texts = [example for source in sources for example in read_text_examples(source, bad=bad)]
        text_train, text_val = split_by_group(texts, val_frac=data.val_frac, seed=data.split_seed)
        train = [TextExample.from_mis(e) for e in mis_train] + text_train
        val = [TextExample.from_mis(e) for e in mis_val] + text_val
        counts = {"train": text_counts(train), "validation": text_counts(val)}
    out = Path(config.out).expanduser()
    with saving(lambda: _checkpoint_saved(out)):
        if lite:
            log.info("training on %d rows, validating on %d", len(train), len(val))
            result = train_lite_judge(config, train, val, data_hashes=hashes, progress=progress)
        else:
            log.info("training on %d responses (%d items), validating on %d (%d items)", len(mis_train),
                     counts["train"]["items"], len(mis_val), counts["validation"]["items"])
            result = train_judge(config, mis_train, mis_val, data_hashes=hashes, progress=progress)
        reference = out / VALIDATION_REFERENCE
        if mis_val:
            write_validation_reference(mis_val, reference)
        elif reference.exists():
            # From an earlier run with another split: calibrating on it would calibrate on training data.
            reference.unlink()
    left_out = {"skipped_rows": bad.report()}
    if built is not None:
        left_out.update(responses_without_label=built.responses_without_label,
                        labels_without_response=built.labels_without_response, unscored_labels=built.unscored_labels)
    return TrainRun(result=result, counts=counts, left_out=left_out)


def check_training(config: TrainConfig | LiteTrainConfig) -> None:
    """Raise what stops the training before anything is written: MissingExtraError when the `train` extra's
    packages it imports are not installed (accelerate for the Trainer, peft for LoRA), MisguardError when a VLM
    judge's --base is not a model folder transformers loads as a VLM (engines.check_engine)."""
    require("accelerate", *(["peft"] if isinstance(config, TrainConfig) and config.lora else []))
    if isinstance(config, TrainConfig):
        check_engine("transformers", str(Path(config.base).expanduser()))


def _checkpoint_saved(out: Path) -> str:
    """What an interrupted training run leaves: its last checkpoint, which a re-run continues from."""
    last = get_last_checkpoint(str(out / CHECKPOINTS)) if (out / CHECKPOINTS).is_dir() else None
    return f"last checkpoint {last}" if last else f"no checkpoint yet (one is saved in {out / CHECKPOINTS} per epoch)"


def write_validation_reference(examples: Sequence[TrainingExample], path: Path) -> Path:
    """The held-out examples' reference verdicts as a label file with ids (the gpt_eval.py fields plus id, split,
    model, sub_category; image paths absolute, so it joins by id), written atomically. Returns the path."""
    write_jsonl_atomic(path, [{
        "label_perception": e.label_perception, "label_str": e.label_str, "category": e.category,
        "question": e.question, "response": e.response, "image_path1": e.images[0],
        "image_path2": e.images[1], "id": id_value(e.id), "split": e.split, "model": e.model,
        "sub_category": e.sub_category} for e in examples])
    return path
