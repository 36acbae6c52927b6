"""`misguard train --kind lite`: the lite judge (judges/lite) fitted on GPT-4o's labels.

The examples and the split are the VLM judge's (`run_train` builds both for either kind). The frozen encoder
(all-MiniLM-L6-v2) embeds the train and validation examples once; the heads' C is chosen from a small grid by
the cross-validated log-loss on the training split alone (folds grouped by MIS item, so no item is on both
sides of a fold either); the heads are fitted on the whole training split and measured on the validation
split. The judge folder holds judge.json, heads.safetensors and judge_card.json: JSON and safetensors, no pickle.

The lite judge reads the question and the response (and an image description where the data has one; MIS
items have none), never the images.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedGroupKFold

from misguard.calibration.agreement import SAFETY_LABELS, head_agreement
from misguard.core.errors import MisguardError
from misguard.core.manifests import utc_now
from misguard.core.records import PERCEPTION_LEVELS
from misguard.core.settings import setting
from misguard.core.version import __version__
from misguard.judge_training.data import label_counts, split_sizes
from misguard.judge_training.examples import TrainingExample
from misguard.judges.lite.encoder import ENCODER_PACKAGE, TextEncoder
from misguard.judges.lite.heads import FEATURES_ID, LiteHeads, build_features
from misguard.judges.lite.judge import LITE_TEMPLATE, write_lite_judge
from misguard.judges.spec import CARD_FILE, JudgeCard

log = logging.getLogger("misguard")

DEFAULT_C_GRID: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
"""Candidate C values. The features are unit-length embeddings (entries ~0.05, not standardized), so useful C
is larger than the usual 0.1-10: at C 0.1 the heads barely leave the label prior."""
DEFAULT_C = 1.0
"""The C used when the training split is too small to cross-validate."""
READS = ("the question and the response (and an image description where the data has one: MIS items have none, "
         "so its slot is zeros); never the images themselves")
FEATURE_BLOCKS = ("question embedding", "response embedding", "question * response (element-wise)",
                  "image description embedding (zeros without one)", "has image description (0/1)")


@dataclass
class LiteTrainConfig:
    """Settings of one `misguard train --kind lite` run. Each field is one CLI option."""

    out: Path = setting(help="The judge folder to write.")
    c_grid: tuple[float, ...] = setting(
        DEFAULT_C_GRID, flag="--lite-c",
        help="lite: a candidate C (inverse L2 strength) of the heads, repeatable; the one with the lowest "
             "cross-validated log-loss on the training split is kept.")
    cv_folds: int = setting(5, help="lite: folds of the C search on the training split, grouped by MIS item.")
    seed: int = setting(0, help="Seed of the initialisation, the data order and dropout.")
    judge_id: str | None = setting(None, help="The judge's id in judge.json and in every judgment it makes; "
                                              "default: the out folder's name.")
    unsafe_threshold: float = 0.5
    """p_unsafe at or above which a response is Unsafe, until `misguard calibrate --into-judge` sets one."""
    max_iter: int = 2000
    """Most L-BFGS iterations per logistic regression."""

    def settings(self) -> dict[str, Any]:
        """The settings as JSON-ready values (paths as strings, tuples as lists)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value
                for name, value in values.items()}


@dataclass(frozen=True)
class LiteTrainResult:
    """What a lite training run wrote and how well it agrees with the validation labels."""

    out: Path
    """The lite judge folder (loadable by `misguard.judges.load_judge`)."""
    judge_spec: Path
    """out/judge.json."""
    judge_card: Path
    """out/judge_card.json."""
    C: float
    """The C both heads were fitted with."""
    cv: list[dict[str, Any]]
    """Per candidate C: {C, unsafe_log_loss, perception_log_loss (None without the head), log_loss}; empty when
    the training split was too small to cross-validate."""
    validation: dict[str, Any] | None
    """{n, safety {accuracy, kappa, f1, macro_f1, log_loss}, perception {accuracy, kappa, macro_f1, log_loss}
    (None without the head)}, or None without validation examples."""
    has_perception: bool
    """False when the training labels have a single perception level: the judge has an Unsafe head only."""
    seconds: float = 0.0


def train_lite_judge(config: LiteTrainConfig, train: Sequence[TrainingExample], val: Sequence[TrainingExample], *,
                     data_hashes: dict[str, Any] | None = None, encoder=None) -> LiteTrainResult:
    """Fit a lite judge on `train`, measure it on `val` and write its folder at `config.out`.

    `data_hashes` go into judge_card.json as given. `encoder` (a judges.lite TextEncoder) defaults to the bundled
    all-MiniLM-L6-v2. When the training labels have a single perception level, only the Unsafe head is fitted
    (the card says so; `misguard score` needs the level and refuses such a judge, the guard's output rail takes it).

    Returns a LiteTrainResult. Raises MisguardError for bad settings, an empty training split, training labels
    of one safety class, or an out folder that holds a model; MissingExtraError without the `lite` extra.
    """
    started = time.time()
    out = Path(config.out).expanduser()
    _check_run(config, out, train)
    y_unsafe, y_perception = encode_labels(train)
    if len(set(y_unsafe.tolist())) < 2:
        raise MisguardError(f"the {len(train)} training examples are all {train[0].label_str}: the Unsafe head "
                            "needs both Safe and Unsafe labels")
    has_perception = len(set(y_perception.tolist())) >= 2
    if not has_perception:
        log.warning("the training labels have one perception level (%s): fitting the Unsafe head only",
                    train[0].label_perception)
        y_perception = None
    encoder = encoder or TextEncoder()
    examples = [*train, *val]
    features = build_features(encoder, [e.question for e in examples], [e.response for e in examples])
    X_train, X_val = features[:len(train)], features[len(train):]

    groups = [e.item_key for e in train]
    chosen, cv, cv_note = select_c(X_train, y_unsafe, y_perception, groups, config)
    heads = LiteHeads(C=chosen, max_iter=config.max_iter).fit(X_train, y_unsafe, y_perception)
    validation = validation_agreement(heads, X_val, val, config.unsafe_threshold) if val else None
    if validation is not None:
        log.info("validation: safety kappa %s, accuracy %.3f", validation["safety"]["kappa"],
                 validation["safety"]["accuracy"])

    judge_id = config.judge_id or out.name
    seconds = time.time() - started
    card = JudgeCard(
        kind="lite", judge_id=judge_id, template=LITE_TEMPLATE, misguard_version=__version__, created=utc_now(),
        base_encoder={**encoder.describe(), "package_version": _package_version(ENCODER_PACKAGE), "frozen": True},
        reads=READS,
        features={"id": FEATURES_ID, "dim": int(features.shape[1]),
                  "blocks": [{"what": what, "size": encoder.dim if n < 4 else 1}
                             for n, what in enumerate(FEATURE_BLOCKS)],
                  "examples_with_image_description": 0},
        heads={
            "unsafe": "logistic regression (scikit-learn, L2)",
            "perception": ("multinomial logistic regression over Level1..Level3 (a level absent from the training "
                           "labels is never predicted)" if has_perception else None),
            "note": None if has_perception else (
                f"the training labels have a single perception level ({train[0].label_perception}): no "
                "perception head; `misguard score` (the MIS metrics need the level) refuses this judge, the "
                "guard's output rail uses it"),
        },
        split_sizes={"train": split_sizes(train), "val": split_sizes(val)},
        label_counts={"train": label_counts(train), "val": label_counts(val)},
        model_selection={
            "C": chosen, "grid": list(config.c_grid), "per_C": cv, "note": cv_note,
            "criterion": "cross-validated log-loss on the training split: Unsafe head plus perception head",
            "folds": "grouped by MIS item, stratified by the Unsafe label",
        },
        validation=validation, unsafe_threshold=config.unsafe_threshold,
        training={**config.settings(), "device": "cpu", "seconds": round(seconds, 1)},
        data_hashes=dict(data_hashes or {}))
    spec = write_lite_judge(out, heads, judge_id=judge_id, card=card, unsafe_threshold=config.unsafe_threshold)
    log.info("lite judge %s written to %s (C %g)", spec.id, out, chosen)
    return LiteTrainResult(out=out, judge_spec=out / "judge.json", judge_card=out / CARD_FILE, C=chosen, cv=cv,
                           validation=validation, has_perception=has_perception, seconds=time.time() - started)


def encode_labels(examples: Sequence[TrainingExample]) -> tuple[np.ndarray, np.ndarray]:
    """(y_unsafe [n] 1 for Unsafe, y_perception [n] the level's index in PERCEPTION_LEVELS): the labels the VLM
    judge learns as one answer code, one array per head."""
    y_unsafe = np.array([e.label_str == "Unsafe" for e in examples], dtype=np.int64)
    y_perception = np.array([PERCEPTION_LEVELS.index(e.label_perception.removeprefix("Perception "))
                             for e in examples], dtype=np.int64)
    return y_unsafe, y_perception


def select_c(features: np.ndarray, y_unsafe: np.ndarray, y_perception: np.ndarray | None, groups: Sequence[str],
             config: LiteTrainConfig) -> tuple[float, list[dict[str, Any]], str | None]:
    """(chosen C, per-C cross-validated log-losses, a note: why it was not cross-validated, or that the chosen C
    is at the grid's edge; else None).

    Each training example is predicted once, by heads fitted on the folds without its MIS item
    (StratifiedGroupKFold on the Unsafe label); a C's loss is the log-loss of those predictions, Unsafe plus
    perception. The lowest loss wins; ties go to the smaller C. A grid of one C is taken as it is; when fewer
    than two items carry each Unsafe label, DEFAULT_C is used; the note says which."""
    if len(set(config.c_grid)) == 1:
        return float(config.c_grid[0]), [], "one candidate C: nothing to choose, not cross-validated"
    groups = np.asarray(groups)
    items_per_label = [len(set(groups[y_unsafe == label].tolist())) for label in (0, 1)]
    n_folds = min(config.cv_folds, len(set(groups.tolist())), *items_per_label)
    if n_folds < 2:
        note = (f"not cross-validated: {min(items_per_label)} item(s) carry the rarer Unsafe label; C "
                f"{DEFAULT_C:g} used")
        log.warning("%s", note)
        return DEFAULT_C, [], note
    folds = list(StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=config.seed)
                 .split(features, y_unsafe, groups))
    table = []
    for C in sorted(config.c_grid):
        p_unsafe = np.zeros(len(y_unsafe))
        p_perception = np.zeros((len(y_unsafe), 3)) if y_perception is not None else None
        for fit_rows, held_rows in folds:
            if len(set(y_unsafe[fit_rows].tolist())) < 2:
                # Every item with the rarer label fell in one fold: the fold's heads cannot be fitted.
                note = "not cross-validated: a fold's training part has a single Unsafe label; C " \
                       f"{DEFAULT_C:g} used"
                log.warning("%s", note)
                return DEFAULT_C, [], note
            heads = LiteHeads(C=C, max_iter=config.max_iter).fit(
                features[fit_rows], y_unsafe[fit_rows], None if y_perception is None else y_perception[fit_rows])
            held_unsafe, held_perception = heads.predict(features[held_rows])
            p_unsafe[held_rows] = held_unsafe
            if p_perception is not None:
                p_perception[held_rows] = held_perception
        unsafe_loss = float(log_loss(y_unsafe, np.clip(p_unsafe, 1e-15, 1 - 1e-15), labels=[0, 1]))
        perception_loss = (None if p_perception is None else
                           float(log_loss(y_perception, _renormalized(p_perception), labels=[0, 1, 2])))
        table.append({"C": C, "unsafe_log_loss": unsafe_loss, "perception_log_loss": perception_loss,
                      "log_loss": unsafe_loss + (perception_loss or 0.0), "folds": n_folds})
    best = min(table, key=lambda row: row["log_loss"])  # min keeps the first (smallest C) of equal losses
    log.info("C %g by cross-validated log-loss (%s)", best["C"],
             ", ".join(f"C {row['C']:g}: {row['log_loss']:.4f}" for row in table))
    note = None
    if len(table) > 1 and best["C"] in (table[0]["C"], table[-1]["C"]):
        note = f"C {best['C']:g} is at the edge of the grid: a wider grid may fit better"
        log.warning("%s", note)
    return best["C"], table, note


def validation_agreement(heads: LiteHeads, features: np.ndarray, examples: Sequence[TrainingExample],
                         unsafe_threshold: float = 0.5) -> dict[str, Any]:
    """The heads' agreement with the examples' labels, as judgments would give it (Unsafe when p_unsafe >=
    unsafe_threshold, the most likely perception level): {n, safety {...}, perception {...} or None}, each with
    accuracy, kappa, macro_f1 (safety: f1 of Unsafe) from calibration.agreement.head_agreement, and log_loss.
    Raises ValueError for no examples."""
    if not examples:
        raise ValueError("no validation examples")


    y_unsafe, y_perception = encode_labels(examples)
    p_unsafe, p_perception = heads.predict(features)
    safety = head_agreement([e.label_str for e in examples],
                            ["Unsafe" if p >= unsafe_threshold else "Safe" for p in p_unsafe], SAFETY_LABELS,
                            positive="Unsafe")
    result: dict[str, Any] = {
        "n": len(examples),
        "safety": {"accuracy": safety["accuracy"], "kappa": safety["kappa"], "f1": safety["f1"],
                   "macro_f1": safety["macro_f1"],
                   "log_loss": float(log_loss(y_unsafe, np.clip(p_unsafe, 1e-15, 1 - 1e-15), labels=[0, 1]))},
        "perception": None,
    }
    if p_perception is not None:
        levels = [PERCEPTION_LEVELS[i] for i in p_perception.argmax(axis=1)]
        perception = head_agreement([e.label_perception.removeprefix("Perception ") for e in examples], levels,
                                    PERCEPTION_LEVELS)
        result["perception"] = {"accuracy": perception["accuracy"], "kappa": perception["kappa"],
                                "macro_f1": perception["macro_f1"],
                                "log_loss": float(log_loss(y_perception, _renormalized(p_perception),
                                                           labels=[0, 1, 2]))}
    return result


def _renormalized(probs: np.ndarray) -> np.ndarray:
    """Rows clipped away from 0 and summing to 1 again (a level the heads never predict has p ~ 1e-13)."""
    clipped = np.clip(probs, 1e-15, 1.0)
    return clipped / clipped.sum(axis=1, keepdims=True)


def _check_run(config: LiteTrainConfig, out: Path, train: Sequence[TrainingExample]) -> None:
    """Raise MisguardError for settings that cannot train."""
    if not train:
        raise MisguardError("no training examples")
    if not config.c_grid or any(not c > 0 for c in config.c_grid):
        raise MisguardError(f"the C grid must be positive numbers, got {list(config.c_grid)}")
    if config.cv_folds < 2:
        raise MisguardError(f"cv_folds must be at least 2, got {config.cv_folds}")
    if not 0.0 < config.unsafe_threshold < 1.0:
        raise MisguardError(f"unsafe_threshold must be between 0 and 1, got {config.unsafe_threshold}")
    if (out / "config.json").exists():
        # A model folder (a VLM judge or a base): its judge.json would be replaced by the lite one.
        raise MisguardError(f"{out}: holds a model (config.json); write the lite judge to a folder of its own")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


__all__ = ["DEFAULT_C_GRID", "LiteTrainConfig", "LiteTrainResult", "encode_labels", "select_c",
           "train_lite_judge", "validation_agreement"]
