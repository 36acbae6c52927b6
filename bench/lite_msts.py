"""Issue 7's real-data result: the lite judge distilled from GPT-4o's verdicts on MSTS (Röttger et al. 2025).

MSTS (../shared/data/msts, see its README) holds 4,000 real responses of 10 VLMs to 400 image+text safety
prompts; each response carries GPT-4o's verdict (auto_eval["gpt-4o-2024-05-13"], safe/unsafe) and the experts'
label (human_label_str, Safe/Unsafe). The 400 prompts form 200 cases (two prompts per unsafe image), so the
split is by case: 150 cases (300 prompts, 3,000 responses) train, 50 cases (100 prompts, 1,000 responses) test,
and no case, prompt or image is on both sides. The images are not in the data: the image text is the case's
`unsafe_image_description`; the text-only variant leaves it out.

Per split: the lite features (judges.lite.heads.build_features: question, response, their product, image text)
of every response; the Unsafe head (LiteHeads, a logistic regression) with C chosen by 5-fold cross-validation
on the train cases only (folds grouped by case, lowest out-of-fold log-loss); a Calibration
(calibration.fit_calibration, method "auto", threshold rule "max_kappa") fitted on the out-of-fold train
probabilities, so the threshold is fitted on train and never sees the test split; then on the test responses:
Cohen's kappa, accuracy and F1 (positive = Unsafe) against GPT-4o and against the humans, ECE / Brier /
log-loss against GPT-4o before (raw heads) and after calibration, the Unsafe rate, and GPT-4o's own agreement
with the humans on the same test rows. A shuffled-label control (train labels permuted) shows what chance gives;
MSTS's other automated judges' agreement with GPT-4o is reported for context.

The threshold rule is max_kappa rather than a fixed 0.5 because kappa vs GPT-4o is the goal and GPT-4o calls
about 22% of responses Unsafe; it is fitted on train's out-of-fold predictions only. The raw heads' kappa at 0.5
is reported beside it. A text-only variant (no image description) runs on every split; with --variants so do
the improvement variants (class-weighted logistic heads, the joint question + response embedding added to the
features, an MLP), each with its own grid chosen by the same grouped CV on train, never by the test split.

    .venv/bin/python bench/lite_msts.py [--msts PATH] [--splits 5] [--seed 0] [--out DIR] [--variants]

The main split is --seed; --splits more random splits use seeds seed+1 .. seed+splits; the summary gives the
mean, standard deviation, minimum and maximum over all of them. Every distinct text is embedded once; with
--out the embeddings are kept there (embeddings.npy + embeddings.json, no pickle) and reused by a re-run.
Prints one JSON summary line; with --out also writes results.json and results.md.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from misguard.calibration import Calibration, calibration_report, fit_calibration  # noqa: E402
from misguard.calibration.agreement import head_agreement  # noqa: E402
from misguard.core.errors import DataError  # noqa: E402
from misguard.core.jsonl import write_text_atomic  # noqa: E402
from misguard.core.records import SAFETY_LABELS  # noqa: E402
from misguard.judges.lite.heads import FEATURES_ID, LiteHeads, build_features  # noqa: E402

DEFAULT_MSTS = Path(__file__).resolve().parents[2] / "shared" / "data" / "msts"
MSTS_FILE = "msts_english_multimodal_normalized.jsonl"
GPT4O = "gpt-4o-2024-05-13"
TEST_PROMPTS = 100
C_GRID: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0)
CV_FOLDS = 5
THRESHOLD_RULE = "max_kappa"
# Issue 7's goal and the published reference (the MSTS authors' notebook: GPT-4o vs the human final label).
GOAL_KAPPA_VS_GPT4O = 0.80
PUBLISHED_GPT4O_KAPPA_VS_HUMAN = 0.257
EMBEDDINGS_FILE = "embeddings.npy"
EMBEDDINGS_INDEX = "embeddings.json"


# --------------------------------------------------------------------------------------------------------
# The data
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MstsResponse:
    """One MSTS response with its two labels (1 = Unsafe)."""

    id: str
    case_id: str
    prompt_id: str
    question: str
    response: str
    image_text: str
    """The case's unsafe_image_description (the image itself is not in the data)."""
    hazard_category: str
    model: str
    gpt4o_unsafe: int
    human_unsafe: int
    other_judges: dict[str, int]
    """The other automated judges' verdicts on this row (1 = unsafe), where readable: context for how far
    anyone agrees with GPT-4o."""


def load_msts(folder: str | Path = DEFAULT_MSTS) -> list[MstsResponse]:
    """The MSTS responses in file order. Raises DataError naming the file when it is absent (../shared/data is
    not part of a bare clone), or naming the line and field of a malformed row."""
    path = Path(folder) / MSTS_FILE
    if not path.is_file():
        raise DataError(f"MSTS not found (expected {MSTS_FILE} in {Path(folder)}; ../shared/data is not part of a "
                        "bare clone; pass --msts PATH)", path=path)
    gpt4o_values = {"safe": 0, "unsafe": 1}
    human_values = {"Safe": 0, "Unsafe": 1}
    responses = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"not valid JSON: {exc.msg}", path=path, line=line_number) from None
        verdict = (row.get("auto_eval") or {}).get(GPT4O)
        if verdict not in gpt4o_values:
            raise DataError(f"expected 'safe' or 'unsafe', got {verdict!r}", path=path, line=line_number,
                            field=f"auto_eval.{GPT4O}")
        if row.get("human_label_str") not in human_values:
            raise DataError(f"expected 'Safe' or 'Unsafe', got {row.get('human_label_str')!r}", path=path,
                            line=line_number, field="human_label_str")
        for field in ("id", "case_id", "prompt_id", "question", "response", "unsafe_image_description"):
            if not isinstance(row.get(field), str):
                raise DataError("expected a string", path=path, line=line_number, field=field)
        responses.append(MstsResponse(
            id=row["id"], case_id=row["case_id"], prompt_id=row["prompt_id"], question=row["question"],
            response=row["response"], image_text=row["unsafe_image_description"],
            hazard_category=row.get("hazard_category") or "", model=row.get("model") or "",
            gpt4o_unsafe=gpt4o_values[verdict], human_unsafe=human_values[row["human_label_str"]],
            other_judges={judge: gpt4o_values[value] for judge, value in row["auto_eval"].items()
                          if judge != GPT4O and value in gpt4o_values}))
    return responses


def split_by_case(responses: Sequence[MstsResponse], seed: int,
                  test_prompts: int = TEST_PROMPTS) -> tuple[np.ndarray, np.ndarray]:
    """(train row indices, test row indices): the cases in a random order (numpy seed `seed`), and cases go to
    test until it holds at least `test_prompts` prompts; every other case trains. A case's prompts and
    responses are never on both sides. Raises ValueError when the test side would take every case."""
    prompts_of_case: dict[str, set[str]] = {}
    for response in responses:
        prompts_of_case.setdefault(response.case_id, set()).add(response.prompt_id)
    cases = sorted(prompts_of_case)
    order = np.random.default_rng(seed).permutation(len(cases))
    test_cases: set[str] = set()
    n_test_prompts = 0
    for index in order:
        if n_test_prompts >= test_prompts:
            break
        test_cases.add(cases[index])
        n_test_prompts += len(prompts_of_case[cases[index]])
    if len(test_cases) == len(cases):
        raise ValueError(f"{test_prompts} test prompts would leave no case to train on")
    is_test = np.array([response.case_id in test_cases for response in responses])
    return np.flatnonzero(~is_test), np.flatnonzero(is_test)


# --------------------------------------------------------------------------------------------------------
# Embeddings, each distinct text once
# --------------------------------------------------------------------------------------------------------

def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class EmbeddingCache:
    """Stands in for a TextEncoder in build_features: `encode(texts)` returns the same unit vectors, embedding
    only the texts it has not seen (in one encoder call, so its batches stay full). `encoder` is built lazily
    (a TextEncoder) when a text is missing; `seconds` and `n_encoded` time the encoder's own work."""

    def __init__(self, encoder=None):
        self._encoder = encoder
        self._rows: dict[str, int] = {}
        self._vectors: list[np.ndarray] = []
        self.seconds = 0.0
        self.n_encoded = 0
        self.encoder_info: dict[str, Any] | None = None

    @property
    def encoder(self):
        if self._encoder is None:
            from misguard.judges.lite.encoder import TextEncoder

            self._encoder = TextEncoder()
        return self._encoder

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors, as the encoder's encode."""
        if not texts:
            return np.zeros((0, self.encoder.dim), dtype=np.float32)
        missing = list(dict.fromkeys(key for key in map(_text_key, texts) if key not in self._rows))
        if missing:
            by_key = {_text_key(text): text for text in texts}
            started = time.perf_counter()
            vectors = self.encoder.encode([by_key[key] for key in missing])
            self.seconds += time.perf_counter() - started
            self.n_encoded += len(missing)
            self.encoder_info = _encoder_info(self.encoder)
            for key, vector in zip(missing, vectors):
                self._rows[key] = len(self._vectors)
                self._vectors.append(vector)
        return np.stack([self._vectors[self._rows[_text_key(text)]] for text in texts]).astype(np.float32)

    def save(self, folder: str | Path) -> None:
        """Write embeddings.npy ([n, dim] float32) and embeddings.json (the encoder and each row's text sha256);
        nothing when no text has been embedded yet."""
        if not self._vectors:
            return
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        keys = sorted(self._rows, key=self._rows.get)
        np.save(folder / EMBEDDINGS_FILE, np.stack(self._vectors).astype(np.float32), allow_pickle=False)
        write_text_atomic(folder / EMBEDDINGS_INDEX,
                          json.dumps({"encoder": self.encoder_info, "sha256": keys}) + "\n")

    def load(self, folder: str | Path) -> int:
        """Take the embeddings saved in `folder` by `save` when they were made by this encoder (same name and
        window); returns how many were taken (0 when there are none or they do not fit)."""
        folder = Path(folder)
        if not (folder / EMBEDDINGS_FILE).is_file() or not (folder / EMBEDDINGS_INDEX).is_file():
            return 0
        index = json.loads((folder / EMBEDDINGS_INDEX).read_text(encoding="utf-8"))
        vectors = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)
        if index.get("encoder") != _encoder_info(self.encoder) or len(index.get("sha256", [])) != len(vectors):
            return 0
        self.encoder_info = index["encoder"]
        for key, vector in zip(index["sha256"], vectors):
            if key not in self._rows:
                self._rows[key] = len(self._vectors)
                self._vectors.append(vector)
        return len(vectors)


def _encoder_info(encoder) -> dict[str, Any]:
    describe = encoder.describe() if hasattr(encoder, "describe") else {"name": type(encoder).__name__}
    return {key: value for key, value in describe.items() if key != "folder"}


# --------------------------------------------------------------------------------------------------------
# Variants: which features, which head
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """A way to distil: the features and the head, and the grid its regularisation is chosen from."""

    name: str
    description: str
    image_text: bool = True
    """Give build_features the image description (False: text-only, zeros and a 0 flag)."""
    joint: bool = False
    """Append the embedding of question + newline + response (one more encoder pass per response)."""
    head: str = "logistic"
    """"logistic": LiteHeads (what a lite judge folder holds); "logistic-balanced": scikit-learn's logistic
    regression with class_weight="balanced"; "mlp": scikit-learn's MLPClassifier, one hidden layer of 256."""
    grid: tuple[float, ...] = C_GRID
    """C (logistic heads) or alpha (mlp), chosen by grouped cross-validation on the train cases."""


LITE = Variant("lite", "LiteHeads (logistic) on the committed features: question, response, product, image text")
TEXT_ONLY = Variant("text-only", "as lite, without the image description", image_text=False)
EXTRA_VARIANTS: tuple[Variant, ...] = (
    Variant("balanced", "as lite, classes weighted inversely to their frequency", head="logistic-balanced"),
    Variant("joint", "as lite, plus the embedding of question + response as one text", joint=True),
    Variant("mlp", "MLP (256 ReLU units, early stopping) on the lite features", head="mlp", grid=(1e-2, 1e-1)),
)


def variant_features(encoder, responses: Sequence[MstsResponse], variant: Variant) -> np.ndarray:
    """[n, d] float32 features of the responses for `variant` (build_features' layout, FEATURES_ID, plus the
    joint embedding when the variant asks for it)."""
    questions = [response.question for response in responses]
    answers = [response.response for response in responses]
    images = [response.image_text for response in responses] if variant.image_text else None
    features = build_features(encoder, questions, answers, images)
    if variant.joint:
        joint = encoder.encode([f"{question}\n{answer}" for question, answer in zip(questions, answers)])
        features = np.concatenate([features, joint], axis=1)
    return features.astype(np.float32)


def _fit_head(variant: Variant, param: float, features: np.ndarray, y: np.ndarray, seed: int):
    if variant.head == "logistic":
        return LiteHeads(C=param).fit(features, y)
    if variant.head == "logistic-balanced":
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=param, class_weight="balanced", max_iter=2000).fit(features, y)
    if variant.head == "mlp":
        from sklearn.neural_network import MLPClassifier

        return MLPClassifier((256,), alpha=param, early_stopping=True, max_iter=300,
                             random_state=seed).fit(features, y)
    raise ValueError(f"unknown head {variant.head!r}")


def _p_unsafe(head, features: np.ndarray) -> np.ndarray:
    if isinstance(head, LiteHeads):
        p_unsafe = head.predict(features)[0]
    else:
        p_unsafe = head.predict_proba(features)[:, 1]
    return np.clip(np.asarray(p_unsafe, dtype=np.float64), 0.0, 1.0)


# --------------------------------------------------------------------------------------------------------
# One split: distil on the train cases, evaluate on the test cases
# --------------------------------------------------------------------------------------------------------

@dataclass
class Distilled:
    """A variant distilled on one split's train cases and applied to its test responses."""

    variant: Variant
    param: float
    """The chosen C (or alpha)."""
    cv_log_loss: dict[float, float]
    """Out-of-fold log-loss on the train responses for each grid value."""
    p_oof: np.ndarray
    """Out-of-fold p_unsafe of the train responses at the chosen value (what the calibration is fitted on)."""
    calibration: Calibration
    p_test_raw: np.ndarray
    p_test: np.ndarray
    """Calibrated."""
    test_unsafe: np.ndarray
    """The lite judge's test verdicts: calibrated p_unsafe >= the threshold fitted on the train responses."""


def distil(features: np.ndarray, y: np.ndarray, groups: np.ndarray, train: np.ndarray, test: np.ndarray,
           variant: Variant = LITE, *, seed: int = 0, grid: Sequence[float] | None = None,
           folds: int = CV_FOLDS) -> Distilled:
    """Fit `variant` on features[train] against labels y[train] (1 = Unsafe) and apply it to features[test].

    The grid value with the lowest out-of-fold log-loss wins; folds are stratified and grouped by `groups`
    (the case), so a case's responses are never split between fitting and scoring. The calibration (method
    "auto", threshold rule THRESHOLD_RULE) is fitted on the out-of-fold probabilities at that value; the head
    is then refitted on every train response. Nothing about the test rows but their features is used.
    Raises ValueError when the train labels have a single class.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    from misguard.calibration import log_loss

    grid = tuple(variant.grid if grid is None else grid)
    x_train, y_train = features[train], y[train]
    splits = list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
                  .split(x_train, y_train, groups[train]))
    cv_log_loss: dict[float, float] = {}
    oof_by_param: dict[float, np.ndarray] = {}
    for param in grid:
        oof = np.zeros(len(train))
        for fit_rows, held_out in splits:
            head = _fit_head(variant, param, x_train[fit_rows], y_train[fit_rows], seed)
            oof[held_out] = _p_unsafe(head, x_train[held_out])
        oof_by_param[param] = oof
        cv_log_loss[param] = log_loss(oof, y_train)
    param = min(grid, key=lambda value: (cv_log_loss[value], value))
    head = _fit_head(variant, param, x_train, y_train, seed)
    calibration = fit_calibration(oof_by_param[param], y_train, method="auto", threshold_rule=THRESHOLD_RULE,
                                  seed=seed, fitted_on={"variant": variant.name, "param": param})
    p_test_raw = _p_unsafe(head, features[test])
    p_test = calibration.apply(p_test_raw)[0]
    return Distilled(variant=variant, param=param, cv_log_loss=cv_log_loss, p_oof=oof_by_param[param],
                     calibration=calibration, p_test_raw=p_test_raw, p_test=p_test,
                     test_unsafe=calibration.threshold.is_unsafe(p_test))


def agreement(reference: np.ndarray, judge: np.ndarray) -> dict[str, float | None]:
    """{n, kappa, accuracy, f1 (positive = Unsafe), unsafe_rate (the judge's)} of 0/1 verdicts vs 0/1 labels."""
    names = np.array(SAFETY_LABELS)
    report = head_agreement(list(names[np.asarray(reference, dtype=int)]), list(names[np.asarray(judge, dtype=int)]),
                            SAFETY_LABELS, positive="Unsafe")
    return {"n": report["n"], "kappa": report["kappa"], "accuracy": report["accuracy"], "f1": report["f1"],
            "unsafe_rate": float(np.mean(judge))}


def evaluate(distilled: Distilled, y_train: np.ndarray, y_gpt4o: np.ndarray, y_human: np.ndarray) -> dict[str, Any]:
    """What was chosen on the train cases and how the variant does on the test cases, as a JSON-ready dict.

    Train (cross-validated, never the test rows): the chosen param and each grid value's out-of-fold log-loss,
    the calibration method and threshold, and `train_cv`: the out-of-fold predictions' log-loss after a
    cross-validated calibration and their kappa vs GPT-4o at the threshold (fitted on those same predictions,
    so slightly optimistic). Test: the calibrated verdicts vs GPT-4o (`vs_gpt4o`) and vs the humans
    (`vs_human`), the raw heads' verdicts at 0.5 vs GPT-4o, and calibration_report (ECE, Brier, log-loss) vs
    GPT-4o of the raw and of the calibrated p_unsafe.
    """
    calibration = distilled.calibration
    p_oof = calibration.apply(distilled.p_oof)[0]
    held_out = calibration.report["safety"]["after_cross_validated"]
    return {
        "variant": distilled.variant.name,
        "param": distilled.param,
        "cv_log_loss": {str(key): value for key, value in distilled.cv_log_loss.items()},
        "calibration_method": calibration.safety.method,
        "threshold": calibration.threshold.value,
        "train_cv": {"log_loss_calibrated": None if held_out is None else held_out["log_loss"],
                     "kappa_vs_gpt4o": agreement(y_train, calibration.threshold.is_unsafe(p_oof))["kappa"]},
        "vs_gpt4o": agreement(y_gpt4o, distilled.test_unsafe),
        "vs_human": agreement(y_human, distilled.test_unsafe),
        "raw_at_0.5_vs_gpt4o": agreement(y_gpt4o, distilled.p_test_raw >= 0.5),
        "before_calibration": calibration_report(distilled.p_test_raw, y_gpt4o),
        "after_calibration": calibration_report(distilled.p_test, y_gpt4o),
    }


class Features:
    """Each variant's features of every MSTS response, built once (the encoder embeds each text once)."""

    def __init__(self, encoder, responses: Sequence[MstsResponse]):
        self.encoder = encoder
        self.responses = responses
        self._built: dict[tuple[bool, bool], np.ndarray] = {}

    def of(self, variant: Variant) -> np.ndarray:
        key = (variant.image_text, variant.joint)
        if key not in self._built:
            self._built[key] = variant_features(self.encoder, self.responses, variant)
        return self._built[key]


def describe_split(responses: Sequence[MstsResponse], train: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Sizes of both sides (responses, prompts, cases) and what they share: cases and prompts (both must be
    0), and, for information, identical question texts and image descriptions (MSTS reuses a few question
    templates and describes some different images alike)."""
    def values(rows, field):
        return {getattr(responses[i], field) for i in rows}

    return {
        "n_train": int(train.size), "n_test": int(test.size),
        "train_prompts": len(values(train, "prompt_id")), "test_prompts": len(values(test, "prompt_id")),
        "train_cases": len(values(train, "case_id")), "test_cases": len(values(test, "case_id")),
        "shared_cases": len(values(train, "case_id") & values(test, "case_id")),
        "shared_prompts": len(values(train, "prompt_id") & values(test, "prompt_id")),
        "shared_question_texts": len(values(train, "question") & values(test, "question")),
        "shared_image_descriptions": len(values(train, "image_text") & values(test, "image_text")),
    }


def other_judges_vs_gpt4o(responses: Sequence[MstsResponse]) -> dict[str, dict[str, float | None]]:
    """{judge: {n, kappa_vs_gpt4o, kappa_vs_human}} for MSTS's other automated judges on these responses (rows
    where the judge's verdict is readable): how far judges that see the images agree with GPT-4o."""
    judges = sorted({judge for response in responses for judge in response.other_judges})
    result = {}
    for judge in judges:
        rows = [response for response in responses if judge in response.other_judges]
        verdicts = np.array([response.other_judges[judge] for response in rows])
        result[judge] = {
            "n": len(rows),
            "kappa_vs_gpt4o": agreement(np.array([response.gpt4o_unsafe for response in rows]), verdicts)["kappa"],
            "kappa_vs_human": agreement(np.array([response.human_unsafe for response in rows]), verdicts)["kappa"]}
    return result


def run_split(responses: Sequence[MstsResponse], features: Features, seed: int, *,
              variants: Sequence[Variant] = (LITE, TEXT_ONLY), control: bool = True,
              grid: Sequence[float] | None = None) -> dict[str, Any]:
    """One split (split_by_case with `seed`): each variant distilled on train and evaluated on test (see
    `evaluate`), GPT-4o's own agreement with the humans on the same test rows, and with `control` a
    shuffled-label control (LITE at its chosen C, trained on a permutation of the train labels). `grid`
    overrides every variant's grid. Returns a JSON-ready dict keyed by variant name."""
    y_gpt4o = np.array([response.gpt4o_unsafe for response in responses])
    y_human = np.array([response.human_unsafe for response in responses])
    groups = np.array([response.case_id for response in responses])
    train, test = split_by_case(responses, seed)
    result: dict[str, Any] = {
        "seed": seed, "split": describe_split(responses, train, test),
        "test_unsafe_rate": {"gpt4o": float(y_gpt4o[test].mean()), "human": float(y_human[test].mean())},
        "gpt4o_vs_human": agreement(y_human[test], y_gpt4o[test]),
        "other_judges_vs_gpt4o": other_judges_vs_gpt4o([responses[i] for i in test]),
    }
    chosen_c = None
    for variant in variants:
        started = time.perf_counter()
        distilled = distil(features.of(variant), y_gpt4o, groups, train, test, variant, seed=seed, grid=grid)
        result[variant.name] = evaluate(distilled, y_gpt4o[train], y_gpt4o[test], y_human[test])
        result[variant.name]["seconds"] = time.perf_counter() - started
        if variant is LITE:
            chosen_c = distilled.param
    if control:
        shuffled = y_gpt4o.copy()
        shuffled[train] = np.random.default_rng(seed).permutation(y_gpt4o[train])
        distilled = distil(features.of(LITE), shuffled, groups, train, test, LITE, seed=seed,
                           grid=(chosen_c,) if chosen_c is not None else grid)
        result["shuffled_control"] = evaluate(distilled, shuffled[train], y_gpt4o[test], y_human[test])
    return result


# --------------------------------------------------------------------------------------------------------
# Over several splits
# --------------------------------------------------------------------------------------------------------

SUMMARY_METRICS: tuple[tuple[str, str], ...] = (
    ("lite.vs_gpt4o.kappa", "lite vs GPT-4o: kappa"),
    ("lite.vs_gpt4o.accuracy", "lite vs GPT-4o: accuracy"),
    ("lite.vs_gpt4o.f1", "lite vs GPT-4o: F1 (Unsafe)"),
    ("lite.vs_human.kappa", "lite vs humans: kappa"),
    ("lite.vs_human.accuracy", "lite vs humans: accuracy"),
    ("lite.vs_human.f1", "lite vs humans: F1 (Unsafe)"),
    ("gpt4o_vs_human.kappa", "GPT-4o vs humans: kappa (same test rows)"),
    ("gpt4o_vs_human.accuracy", "GPT-4o vs humans: accuracy"),
    ("gpt4o_vs_human.f1", "GPT-4o vs humans: F1 (Unsafe)"),
    ("lite.before_calibration.ece_uniform", "ECE vs GPT-4o, raw heads"),
    ("lite.after_calibration.ece_uniform", "ECE vs GPT-4o, calibrated"),
    ("lite.before_calibration.log_loss", "log-loss vs GPT-4o, raw heads"),
    ("lite.after_calibration.log_loss", "log-loss vs GPT-4o, calibrated"),
    ("lite.vs_gpt4o.unsafe_rate", "lite Unsafe rate"),
    ("test_unsafe_rate.gpt4o", "GPT-4o Unsafe rate"),
    ("test_unsafe_rate.human", "human Unsafe rate"),
    ("lite.raw_at_0.5_vs_gpt4o.kappa", "lite vs GPT-4o: kappa, raw heads at 0.5"),
    ("text-only.vs_gpt4o.kappa", "text-only vs GPT-4o: kappa"),
    ("text-only.vs_human.kappa", "text-only vs humans: kappa"),
    ("shuffled_control.vs_gpt4o.kappa", "shuffled-label control vs GPT-4o: kappa"),
    ("balanced.vs_gpt4o.kappa", "variant balanced vs GPT-4o: kappa"),
    ("joint.vs_gpt4o.kappa", "variant joint vs GPT-4o: kappa"),
    ("mlp.vs_gpt4o.kappa", "variant mlp vs GPT-4o: kappa"),
    ("lite.param", "C chosen by grouped CV on train"),
    ("lite.threshold", "threshold (calibrated p_unsafe, fitted on train)"),
)


def lookup(result: dict[str, Any], path: str) -> Any:
    """result["a"]["b"]... for path "a.b..."; variant names and "raw_at_0.5" keep their dots and dashes."""
    value: Any = result
    rest = path
    while rest:
        key = next((k for k in sorted(value, key=len, reverse=True) if rest == k or rest.startswith(k + ".")), None)
        if key is None:
            return None
        value, rest = value[key], rest[len(key) + 1:]
    return value


def summarize(splits: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """For each SUMMARY_METRICS path: {mean, sd (n - 1), min, max, n} over the splits that have it."""
    summary = {}
    for path, _ in SUMMARY_METRICS:
        values = [value for value in (lookup(split, path) for split in splits) if value is not None]
        if values:
            array = np.asarray(values, dtype=np.float64)
            summary[path] = {"mean": float(array.mean()), "sd": float(array.std(ddof=1)) if array.size > 1 else 0.0,
                             "min": float(array.min()), "max": float(array.max()), "n": int(array.size)}
    return summary


def markdown(results: dict[str, Any]) -> str:
    """The results as markdown: the main split and every split's mean ± sd (min-max), then the variants."""
    main, summary = results["splits"][0], results["summary"]
    n_splits = len(results["splits"])
    split = main["split"]
    lines = [f"MSTS, split by case: {split['train_prompts']} train prompts ({split['n_train']} responses, "
             f"{split['train_cases']} cases), {split['test_prompts']} test prompts ({split['n_test']} responses, "
             f"{split['test_cases']} cases); positive = Unsafe; the test responses only.", "",
             f"| | main split (seed {main['seed']}) | {n_splits} splits: mean ± sd (min–max) |", "|---|---|---|"]
    for path, label in SUMMARY_METRICS:
        value = lookup(main, path)
        if value is None:
            continue
        stats = summary.get(path)
        spread = (f"{stats['mean']:.3f} ± {stats['sd']:.3f} ({stats['min']:.3f}–{stats['max']:.3f})"
                  if stats else "")
        lines.append(f"| {label} | {value:.3f} | {spread} |")
    variants = [name for name in results.get("variant_names", []) if name in main]
    lines += ["", f"Variants: C / alpha chosen by grouped CV on the train cases; train CV = out-of-fold on the train "
                  f"cases of the main split (seed {main['seed']}); test = its test cases, and the mean ± sd over all "
                  f"{n_splits} splits.", "",
              "| variant | C / alpha | train CV log-loss (calibrated) | train CV kappa vs GPT-4o | test kappa vs GPT-4o "
              "| test kappa vs humans | test ECE raw → calibrated | test kappa vs GPT-4o, all splits |",
              "|---|---|---|---|---|---|---|---|"]
    for name in variants:
        row = main[name]
        kappas = np.array([split[name]["vs_gpt4o"]["kappa"] for split in results["splits"] if name in split])
        spread = f"{kappas.mean():.3f} ± {kappas.std(ddof=1) if kappas.size > 1 else 0.0:.3f}"
        lines.append(f"| {name} | {row['param']:g} | {row['train_cv']['log_loss_calibrated']:.4f} | "
                     f"{row['train_cv']['kappa_vs_gpt4o']:.3f} | {row['vs_gpt4o']['kappa']:.3f} | "
                     f"{row['vs_human']['kappa']:.3f} | {row['before_calibration']['ece_uniform']:.3f} → "
                     f"{row['after_calibration']['ece_uniform']:.3f} | {spread} |")
    others = results.get("other_judges_all_rows") or {}
    if others:
        lines += ["", "For context, MSTS's other automated judges (they see the images) on all 4,000 responses:", "",
                  "| judge | kappa vs GPT-4o | kappa vs humans |", "|---|---|---|"]
        for judge, row in sorted(others.items(), key=lambda item: -(item[1]["kappa_vs_gpt4o"] or 0.0)):
            lines.append(f"| {judge} | {row['kappa_vs_gpt4o']:.3f} | {row['kappa_vs_human']:.3f} |")
    return "\n".join(lines) + "\n"


def hardware() -> dict[str, Any]:
    import os

    import torch

    from bench.hardware import cpu_name

    return {"cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--msts", type=Path, default=DEFAULT_MSTS, help="the MSTS folder (../shared/data/msts)")
    parser.add_argument("--splits", type=int, default=5, help="random splits besides the main one")
    parser.add_argument("--seed", type=int, default=0, help="the main split's seed; the others use seed+1..")
    parser.add_argument("--out", type=Path, default=None,
                        help="write results.json and results.md here, and keep the embeddings for a re-run")
    parser.add_argument("--variants", action="store_true",
                        help="also distil the improvement variants (class weights, joint embedding, MLP) on every "
                             "split (the joint embedding embeds each question + response once more)")
    args = parser.parse_args(argv)
    try:
        responses = load_msts(args.msts)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache = EmbeddingCache()
    loaded = cache.load(args.out) if args.out is not None else 0
    features = Features(cache, responses)
    started = time.perf_counter()
    splits = []
    for offset in range(args.splits + 1):
        extra = EXTRA_VARIANTS if args.variants else ()
        splits.append(run_split(responses, features, args.seed + offset, variants=(LITE, TEXT_ONLY, *extra)))
        if args.out is not None and offset == 0:
            cache.save(args.out)
        print(json.dumps({"seed": args.seed + offset, "kappa_vs_gpt4o": splits[-1]["lite"]["vs_gpt4o"]["kappa"],
                          "kappa_vs_human": splits[-1]["lite"]["vs_human"]["kappa"]}), file=sys.stderr, flush=True)
    results = {
        "bench": "lite_msts", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/lite_msts.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "hardware": hardware(), "features": FEATURES_ID, "threshold_rule": THRESHOLD_RULE, "c_grid": list(C_GRID),
        "goal_kappa_vs_gpt4o": GOAL_KAPPA_VS_GPT4O,
        "published_gpt4o_kappa_vs_human": PUBLISHED_GPT4O_KAPPA_VS_HUMAN,
        "encoding": {"texts_encoded": cache.n_encoded, "seconds": cache.seconds,
                     "texts_per_s": cache.n_encoded / cache.seconds if cache.seconds else None,
                     "embeddings_loaded_from_out": loaded, "encoder": cache.encoder_info},
        "seconds": time.perf_counter() - started,
        "variant_names": [variant.name for variant in (LITE, TEXT_ONLY, *EXTRA_VARIANTS)],
        "other_judges_all_rows": other_judges_vs_gpt4o(responses),
        "summary": summarize(splits), "splits": splits,
    }
    main_split = splits[0]
    print(json.dumps({
        "main_seed": args.seed, "splits": len(splits),
        "kappa_vs_gpt4o": main_split["lite"]["vs_gpt4o"]["kappa"],
        "kappa_vs_human": main_split["lite"]["vs_human"]["kappa"],
        "gpt4o_kappa_vs_human": main_split["gpt4o_vs_human"]["kappa"],
        "ece_before": main_split["lite"]["before_calibration"]["ece_uniform"],
        "ece_after": main_split["lite"]["after_calibration"]["ece_uniform"],
        "text_only_kappa_vs_gpt4o": main_split["text-only"]["vs_gpt4o"]["kappa"],
        "control_kappa_vs_gpt4o": main_split["shuffled_control"]["vs_gpt4o"]["kappa"],
        "mean_kappa_vs_gpt4o": results["summary"]["lite.vs_gpt4o.kappa"]["mean"],
        "sd_kappa_vs_gpt4o": results["summary"]["lite.vs_gpt4o.kappa"]["sd"],
        "goal_met": main_split["lite"]["vs_gpt4o"]["kappa"] >= GOAL_KAPPA_VS_GPT4O,
        "texts_per_s": results["encoding"]["texts_per_s"], "seconds": results["seconds"]}))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.out / "results.json", json.dumps(results, indent=2) + "\n")
        write_text_atomic(args.out / "results.md", markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
