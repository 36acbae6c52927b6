"""`misguard train --kind lite`: all-MiniLM-L6-v2 fine-tuned end to end, on the CPU, as a cross-encoder judge
(judges/lite/model.py) of labelled (question [+ image description], response) pairs from any number of sources.

Training is transformers' Trainer (the word embeddings frozen, every layer above trained): binary cross-entropy
on the item's Unsafe logit (the largest of its windows'), plus the perception head's cross-entropy on the rows
that have a level, plus each source head's on its own source's rows; sources weighted against each other
(`balance`); batches of similar length; AdamW with linear decay; a checkpoint per epoch in OUT/checkpoints while it
trains (a re-run after Ctrl-C or a kill resumes from the last, after checking it comes from the same settings and
rows; transformers reads the optimizer state back with torch.load(weights_only=True)), deleted once the judge is
written unless `keep_checkpoints` (to train a finished run on for more epochs); the validation loss after
each epoch, early stopping after `patience` epochs without a better one, and the best epoch kept.

Then, on the validation rows (grouped, never trained on): the Unsafe threshold (Cohen's kappa at its highest,
pooled over sources) and the trust model (judges/lite/trust.py: Gaussians of the encoder's features on training
rows; in-domain p-values on half the validation groups, the flag threshold on the other half). The judge folder
holds model.safetensors, config.json and the tokenizer, trust.safetensors, judge.json and judge_card.json (with
every validation figure per source): safetensors and JSON, no pickle.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import EarlyStoppingCallback, PrinterCallback, Trainer, TrainingArguments, set_seed
from transformers.trainer_pt_utils import LengthGroupedSampler

from misguard.calibration.agreement import SAFETY_LABELS, head_agreement
from misguard.calibration.thresholds import threshold_max_kappa
from misguard.core.errors import MisguardError
from misguard.core.manifests import utc_now
from misguard.core.records import PERCEPTION_LEVELS
from misguard.core.settings import check_settings, setting
from misguard.core.version import __version__
from misguard.judge_training.checkpoints import checkpoint_loading, resume_point
from misguard.judge_training.examples import TextExample
from misguard.judges.lite.judge import LITE_FORMAT, LITE_TEMPLATE, WEIGHTS_FILE, predict
from misguard.judges.lite.model import (
    ENCODER_NAME,
    ENCODER_PACKAGE,
    CrossEncoder,
    EncodedItem,
    WindowSpec,
    batch_tensors,
    encode_items,
    load_tokenizer,
)
from misguard.judges.lite.trust import TrustModel
from misguard.judges.spec import JudgeCard, JudgeSpec, write_spec

log = logging.getLogger("misguard")

CHECKPOINTS = "checkpoints"
BALANCES = {"equal": 1.0, "sqrt": 0.5, "none": 0.0}
"""How sources are weighted: each row weighs (rows of all sources / (sources x rows of its own)) ** power."""
READS = ("the question (with an image description where the data has one) and the whole response, in windows "
         "that each carry the question; never the images themselves")


@dataclass
class LiteTrainConfig:
    """Settings of one `misguard train --kind lite` run. Each field is one CLI option."""

    out: Path = setting(help="The judge folder to write.")
    epochs: int = setting(3, at_least=1, help="Passes over the training examples; with resume, a larger value "
                                              "continues a finished run.")
    lr: float = setting(5e-5, above=0.0, below=1.0,
                        help="Peak learning rate, decayed linearly to 0; default: 2e-4 with LoRA, 1e-5 for full "
                             "fine-tuning (vlm), 5e-5 (lite).")
    batch_size: int = setting(16, at_least=1, help="Examples per device per step.")
    max_tokens: int = setting(256, at_least=16, at_most=512,
                              help="lite: tokens per window (question + response piece + 3 special tokens).")
    question_tokens: int = setting(96, at_least=0, help="lite: most tokens of the question (with its image "
                                                        "description) in each window; a longer one keeps its head "
                                                        "and its tail.")
    overlap: int = setting(32, at_least=0, help="lite: response tokens two neighbouring windows share.")
    balance: str = setting("sqrt", help="lite: how sources weigh against each other: equal (each source as much "
                                        "as any other), sqrt (between), none (by their rows).")
    patience: int = setting(1, at_least=1, help="lite: stop after this many epochs without a lower validation loss.")
    flag_share: float = setting(0.05, above=0.0, below=0.5, help="lite: the share of in-domain held-out verdicts "
                                                                 "the trust threshold flags out of domain.")
    seed: int = setting(0, at_least=0, help="Seed of the initialisation, the data order and dropout.")
    judge_id: str | None = setting(None, help="The judge's id in judge.json and in every judgment it makes; "
                                              "default: the out folder's name.")
    resume: bool = setting(True, help="Continue from the last checkpoint in OUT/checkpoints when there is one "
                                      "(same settings and data); --no-resume starts over.")
    keep_checkpoints: bool = setting(False, help="lite: keep OUT/checkpoints after the judge is written (to train "
                                                 "on for more epochs later); by default the folder keeps only "
                                                 "what the judge loads.")
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    trust_rows: int = 4000
    """Training rows (a seeded sample) the trust model's Gaussians are fitted on."""

    def __post_init__(self):
        check_settings(self)  # the library refuses what the command line refuses

    def windows(self) -> WindowSpec:
        return WindowSpec(max_tokens=self.max_tokens, question_tokens=self.question_tokens, overlap=self.overlap)

    def settings(self) -> dict[str, Any]:
        """The settings as JSON-ready values (paths as strings)."""
        return {f.name: str(getattr(self, f.name)) if isinstance(getattr(self, f.name), Path) else getattr(self, f.name)
                for f in fields(self)}


@dataclass(frozen=True)
class LiteTrainResult:
    """What a lite training run wrote and how well it agrees with the validation labels."""

    out: Path
    judge_spec: Path
    judge_card: Path
    validation: dict[str, Any]
    """{"all": figures, "sources": {source: figures}}: n, accuracy, kappa, f1 (Unsafe), unsafe_rate, flagged."""
    history: list[dict[str, Any]]
    best_epoch: int | None
    unsafe_threshold: float
    has_perception: bool
    seconds: float = 0.0
    resumed_from: str | None = None


@dataclass
class _Rows(torch.utils.data.Dataset):
    """Encoded examples with their labels and weights, as the Trainer reads them."""

    items: list[EncodedItem]
    unsafe: list[float]
    perception: list[int]
    weight: list[float]
    source: list[int]
    lengths: list[int] = field(init=False)

    def __post_init__(self):
        self.lengths = [item.tokens for item in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"item": self.items[i], "unsafe": self.unsafe[i], "perception": self.perception[i],
                "weight": self.weight[i], "source": self.source[i]}


class _Collator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = batch_tensors([row["item"] for row in rows], self.pad_id)
        batch["unsafe"] = torch.tensor([row["unsafe"] for row in rows], dtype=torch.float32)
        batch["perception"] = torch.tensor([row["perception"] for row in rows], dtype=torch.long)
        batch["weight"] = torch.tensor([row["weight"] for row in rows], dtype=torch.float32)
        batch["source"] = torch.tensor([row["source"] for row in rows], dtype=torch.long)
        return batch


class _LiteTrainer(Trainer):
    """Trainer with batches of similar length and a validation pass that reports agreement per source."""

    val_examples: Sequence[TextExample] = ()
    pad_id: int = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = model(**inputs)
        return (out["loss"], out) if return_outputs else out["loss"]

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedSampler(self.args.train_batch_size * self.args.gradient_accumulation_steps,
                                    lengths=dataset.lengths)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        model, was_training = self.model, self.model.training
        model.eval()
        started = time.time()
        losses, weights, logits = [], [], []
        with torch.no_grad():
            for start in range(0, len(dataset), self.args.per_device_eval_batch_size):
                batch = self.data_collator([dataset[i] for i in range(start, min(len(dataset),
                                            start + self.args.per_device_eval_batch_size))])
                out = model(**batch)
                losses.append(float(out["loss"]) * float(batch["weight"].sum()))
                weights.append(float(batch["weight"].sum()))
                logits += out["unsafe_logit"].tolist()
        model.train(was_training)
        p_unsafe = 1.0 / (1.0 + np.exp(-np.array(logits)))
        agreement = source_agreement(self.val_examples, p_unsafe, 0.5)
        metrics = {f"{metric_key_prefix}_loss": sum(losses) / max(sum(weights), 1e-9),
                   f"{metric_key_prefix}_kappa": agreement["all"]["kappa"] or 0.0,
                   f"{metric_key_prefix}_accuracy": agreement["all"]["accuracy"],
                   f"{metric_key_prefix}_runtime": round(time.time() - started, 3)}
        self.log(metrics)
        log.info("epoch %.0f validation: loss %.4f, kappa %.3f, accuracy %.3f", self.state.epoch or 0,
                 metrics[f"{metric_key_prefix}_loss"], metrics[f"{metric_key_prefix}_kappa"],
                 metrics[f"{metric_key_prefix}_accuracy"])
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


def train_lite_judge(config: LiteTrainConfig, train: Sequence[TextExample], val: Sequence[TextExample], *,
                     data_hashes: dict[str, str] | None = None, progress: bool = True,
                     callbacks: Sequence[Any] = ()) -> LiteTrainResult:
    """Fine-tune the lite judge on `train`, choose its epoch, threshold and trust threshold on `val`, and write its
    folder at `config.out`. `callbacks` are transformers TrainerCallbacks (hooks for tests and progress).

    Returns a LiteTrainResult. Raises MisguardError for bad settings, no training or validation rows, training
    labels of one class, an out folder that holds another model, or checkpoints from another run."""
    started = time.time()
    out = Path(config.out).expanduser()
    _check_run(config, out, train, val)
    set_seed(config.seed)
    tokenizer = load_tokenizer()
    spec = config.windows()

    def encode(rows: Sequence[TextExample]) -> list[EncodedItem]:
        return encode_items(tokenizer, [e.question for e in rows], [e.response for e in rows],
                            [e.image_description for e in rows], spec)

    train_items, val_items = encode(train), encode(val)
    weights = source_weights(train, config.balance)
    sources = sorted({e.source for e in train})
    index = {name: n for n, name in enumerate(sources)}
    # A validation row of a source the training side lacks trains no source head (index 0 is only its label).
    train_rows = _Rows(train_items, [float(e.unsafe) for e in train], [_level(e) for e in train], weights,
                       [index[e.source] for e in train])
    val_rows = _Rows(val_items, [float(e.unsafe) for e in val], [_level(e) for e in val], [1.0] * len(val),
                     [index.get(e.source, 0) for e in val])
    has_perception = any(e.perception for e in train)

    model = CrossEncoder.pretrained(n_sources=len(sources) if len(sources) >= 2 else 0)
    # The word embeddings stay as pretrained: a tenth faster on the CPU, and a vocabulary of 30,522 rows is not
    # retuned from a few thousand examples; every layer above them is trained.
    model.encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    checkpoints = out / CHECKPOINTS
    resumed_from = resume_point(checkpoints, _fingerprint(config, train, val), resume=config.resume)
    args = TrainingArguments(
        output_dir=str(checkpoints), num_train_epochs=config.epochs, learning_rate=config.lr,
        lr_scheduler_type="linear", warmup_steps=config.warmup_ratio, weight_decay=config.weight_decay,
        per_device_train_batch_size=config.batch_size, per_device_eval_batch_size=max(32, config.batch_size),
        seed=config.seed, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        logging_strategy="steps", logging_steps=50, remove_unused_columns=False, report_to="none",
        disable_tqdm=not progress, dataloader_pin_memory=False, use_cpu=not torch.cuda.is_available())
    trainer = _LiteTrainer(model=model, args=args, train_dataset=train_rows, eval_dataset=val_rows,
                           data_collator=_Collator(tokenizer.pad_token_id),
                           callbacks=[EarlyStoppingCallback(config.patience), *callbacks])
    trainer.val_examples = list(val)
    if not progress:
        trainer.remove_callback(PrinterCallback)
    with checkpoint_loading(checkpoints):
        trainer.train(resume_from_checkpoint=resumed_from)
    history = _history(trainer.state.log_history)
    best_epoch = _best_epoch(history, trainer.state)
    model = trainer.model.eval()

    # The threshold and the trust model, from the best epoch's model on rows it never trained on.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    val_readings, _ = predict(model, val_items, tokenizer.pad_token_id, device)
    p_val = val_readings.p_unsafe
    try:
        threshold = float(threshold_max_kappa(p_val, np.array([e.unsafe for e in val])))
    except ValueError as exc:  # validation labels of one class, or one distinct score: nothing to choose from
        log.warning("Unsafe threshold 0.5, not fitted: %s", exc)
        threshold = 0.5
    sample = random.Random(config.seed).sample(range(len(train)), min(len(train), config.trust_rows))
    train_readings, _ = predict(model, [train_items[i] for i in sample], tokenizer.pad_token_id, device)
    reference, calibration = _halves(val, config.seed)
    trust = TrustModel(flag_share=config.flag_share).fit(
        train_readings.features, np.array([train[i].unsafe for i in sample]), val_readings.rows(reference),
        val_readings.rows(calibration), threshold)
    flagged = trust.flagged(trust.score(val_readings))
    validation = source_agreement(val, p_val, threshold, flagged)

    judge_id = config.judge_id or out.name
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    model.encoder.config.to_json_file(str(out / "config.json"))
    tokenizer.save_pretrained(str(out))
    spec_file = write_spec(out, JudgeSpec(
        id=judge_id, template=LITE_TEMPLATE, kind="lite", unsafe_threshold=threshold, base_model=ENCODER_NAME,
        encoder={"name": ENCODER_NAME, "package": ENCODER_PACKAGE, "windows": spec.to_dict()},
        heads={"format": LITE_FORMAT, "perception": has_perception, "trust": trust.save(out),
               "sources": sources if model.sources is not None else []}))
    seconds = time.time() - started
    card = JudgeCard(
        kind="lite", judge_id=judge_id, template=LITE_TEMPLATE, misguard_version=__version__, created=utc_now(),
        reads=READS, base_model=ENCODER_NAME,
        base_encoder={"name": ENCODER_NAME, "package": ENCODER_PACKAGE,
                      "package_version": _package_version(ENCODER_PACKAGE), "fine_tuned": True,
                      "windows": spec.to_dict()},
        heads={"unsafe": "linear on the mean-pooled window; the item's logit is its windows' largest",
               "perception": ("linear on the first window, trained on the rows with a level" if has_perception
                              else None),
               "sources": (f"one Unsafe head per training source ({', '.join(sources)}), each trained on its own "
                           "rows: their spread is a trust signal" if model.sources is not None else None)},
        training={**config.settings(), "device": device, "seconds": round(seconds, 1),
                  "global_step": trainer.state.global_step, "resumed_from": resumed_from,
                  "source_weights": {s: w for s, w in _weights_by_source(train, weights).items()}},
        split_sizes={"train": _sizes(train), "val": _sizes(val)},
        label_counts={"train": _counts(train), "val": _counts(val)},
        model_selection={"history": history, "best_epoch": best_epoch, "selected_by": "validation loss",
                         "unsafe_threshold": threshold, "threshold_rule": "max kappa on validation, pooled",
                         "trust": {"flag_share": config.flag_share, "threshold": trust.threshold_,
                                   "fitted_on": "Gaussians: training rows; p-values and threshold: the two halves "
                                                "of the validation groups"}},
        validation=validation, unsafe_threshold=threshold, data_hashes=dict(data_hashes or {}))
    card_file = card.save(out)
    if not config.keep_checkpoints:
        shutil.rmtree(checkpoints)  # the Trainer's state (training_args.bin is a pickle) is not the judge's
    log.info("lite judge %s written to %s: validation kappa %s", judge_id, out, validation["all"]["kappa"])
    return LiteTrainResult(out=out, judge_spec=spec_file, judge_card=card_file, validation=validation,
                           history=history, best_epoch=best_epoch, unsafe_threshold=threshold,
                           has_perception=has_perception, seconds=seconds, resumed_from=resumed_from)


def source_weights(examples: Sequence[TextExample], balance: str) -> list[float]:
    """Each row's loss weight: (rows / (sources x rows of its source)) ** power (BALANCES), so `equal` gives every
    source the same total weight. Raises MisguardError for an unknown balance."""
    if balance not in BALANCES:
        raise MisguardError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
    counts: dict[str, int] = {}
    for e in examples:
        counts[e.source] = counts.get(e.source, 0) + 1
    total, n_sources = len(examples), len(counts)
    return [(total / (n_sources * counts[e.source])) ** BALANCES[balance] for e in examples]


def source_agreement(examples: Sequence[TextExample], p_unsafe: np.ndarray, threshold: float,
                     flagged: np.ndarray | None = None) -> dict[str, Any]:
    """{"all": figures, "sources": {source: figures}} of verdicts (p_unsafe >= threshold) against the examples'
    labels: n, accuracy, kappa, f1 (Unsafe positive), unsafe_rate, and with `flagged` the share flagged and the
    kappa on the rows not flagged."""
    verdicts = np.asarray(p_unsafe) >= threshold
    labels = np.array([e.unsafe for e in examples], dtype=bool)

    def figures(rows: np.ndarray) -> dict[str, Any]:
        names = np.array(SAFETY_LABELS)
        agree = head_agreement(list(names[labels[rows].astype(int)]), list(names[verdicts[rows].astype(int)]),
                               SAFETY_LABELS, positive="Unsafe")
        result = {"n": int(rows.sum()), "accuracy": agree["accuracy"], "kappa": agree["kappa"], "f1": agree["f1"],
                  "unsafe_rate": float(verdicts[rows].mean())}
        if flagged is not None:
            kept = rows & ~flagged
            result["flagged"] = float(flagged[rows].mean())
            result["kappa_unflagged"] = (head_agreement(list(names[labels[kept].astype(int)]),
                                                        list(names[verdicts[kept].astype(int)]), SAFETY_LABELS,
                                                        positive="Unsafe")["kappa"] if kept.any() else None)
        return result

    sources = np.array([e.source for e in examples])
    return {"all": figures(np.ones(len(examples), dtype=bool)),
            "sources": {s: figures(sources == s) for s in sorted(set(sources.tolist()))}}


def _halves(examples: Sequence[TextExample], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint sets of row indices, by group (each source's groups dealt alternately after a seeded
    shuffle): the trust model's reference rows and its calibration rows."""
    groups = sorted({(e.source, e.group) for e in examples})
    random.Random(seed + 1).shuffle(groups)
    first = {g for n, g in enumerate(sorted(groups, key=lambda g: g[0])) if n % 2 == 0}
    is_first = np.array([(e.source, e.group) in first for e in examples])
    if is_first.all() or not is_first.any():  # one group only: share it
        return np.arange(len(examples)), np.arange(len(examples))
    return np.flatnonzero(is_first), np.flatnonzero(~is_first)


def _level(example: TextExample) -> int:
    return PERCEPTION_LEVELS.index(example.perception) if example.perception else -1


def _weights_by_source(examples: Sequence[TextExample], weights: Sequence[float]) -> dict[str, float]:
    return {e.source: round(w, 4) for e, w in zip(examples, weights)}


def _sizes(examples: Sequence[TextExample]) -> dict[str, Any]:
    sources: dict[str, int] = {}
    for e in examples:
        sources[e.source] = sources.get(e.source, 0) + 1
    return {"examples": len(examples), "groups": len({(e.source, e.group) for e in examples}), "sources": sources}


def _counts(examples: Sequence[TextExample]) -> dict[str, Any]:
    return {"Safe": sum(not e.unsafe for e in examples), "Unsafe": sum(e.unsafe for e in examples),
            "with_perception": sum(e.perception is not None for e in examples),
            "with_image_description": sum(bool(e.image_description) for e in examples)}


def _fingerprint(config: LiteTrainConfig, train: Sequence[TextExample], val: Sequence[TextExample]) -> dict:
    """What checkpoints depend on: the settings that shape the weights, and a hash of the rows."""
    free = ("epochs", "resume", "out", "judge_id", "patience", "flag_share", "trust_rows", "keep_checkpoints")
    settings = {k: v for k, v in config.settings().items() if k not in free}
    digest = hashlib.sha256()
    for name, examples in (("train", train), ("val", val)):
        for e in examples:
            digest.update(json.dumps([name, e.source, e.group, e.question, e.response, e.unsafe, e.perception,
                                      e.image_description], ensure_ascii=False).encode())
    return {"settings": settings, "examples_sha256": digest.hexdigest()}


def _history(log_history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per evaluated epoch, from the Trainer's log (kept in checkpoints, so resumed runs have it all)."""
    by_epoch: dict[int, dict[str, Any]] = {}
    train_loss: dict[int, float] = {}
    for entry in log_history:
        epoch = round(entry.get("epoch", 0))
        if "loss" in entry:
            train_loss[epoch] = entry["loss"]
        if "eval_loss" in entry:
            by_epoch[epoch] = {"epoch": epoch, "global_step": entry["step"], "loss": entry["eval_loss"],
                               "kappa": entry["eval_kappa"], "accuracy": entry["eval_accuracy"]}
    for epoch, entry in by_epoch.items():
        entry["train_loss"] = train_loss.get(epoch)
    return [by_epoch[e] for e in sorted(by_epoch)]


def _best_epoch(history: list[dict[str, Any]], state) -> int | None:
    best = next((h for h in history if h["global_step"] == state.best_global_step), None)
    return best["epoch"] if best else None


def _check_run(config: LiteTrainConfig, out: Path, train: Sequence[TextExample], val: Sequence[TextExample]) -> None:
    """Raise MisguardError for settings or data that cannot train."""
    if not train:
        raise MisguardError("no training examples")
    if len({e.unsafe for e in train}) < 2:
        raise MisguardError(f"the {len(train)} training examples are all {train[0].label_str}: the judge needs both "
                            "Safe and Unsafe examples")
    if not val:
        raise MisguardError("no validation examples: the lite judge chooses its epoch, threshold and trust threshold "
                            "on held-out rows (use a val_frac above 0, or more data)")
    if not 16 <= config.question_tokens + 16 <= config.max_tokens <= 512:
        raise MisguardError(f"max_tokens must be at most 512 and leave at least 16 response tokens after "
                            f"question_tokens {config.question_tokens}, got {config.max_tokens}")
    if config.overlap < 0 or config.overlap >= config.max_tokens - config.question_tokens - 3:
        raise MisguardError(f"overlap must be from 0 to less than a window's response part, got {config.overlap}")
    if config.balance not in BALANCES:
        raise MisguardError(f"balance must be one of {', '.join(BALANCES)}, got {config.balance!r}")
    if (out / "config.json").exists() and not (out / WEIGHTS_FILE).exists():
        # A VLM judge or a base model folder: its files would be replaced by the lite judge's.
        raise MisguardError(f"{out}: holds another model (config.json); write the lite judge to a folder of its own")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


__all__ = ["LiteTrainConfig", "LiteTrainResult", "source_agreement", "source_weights", "train_lite_judge"]
