"""The lite judge's features and heads.

Features of one response: the embeddings of the question, of the response, their element-wise product (how the
response relates to the question), and of the image text when the data has one (an image description; zeros and
a 0 flag when not): 4 x 384 + 1 numbers. The heads are scikit-learn logistic regressions on them, one for
Unsafe (binary) and one for the perception level (multinomial, three levels; absent when the labels have no
perception level). A level the training labels never give keeps a probability below 1e-13. Saved as safetensors
(coefficients) plus JSON (classes, settings): nothing is pickled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save
from sklearn.linear_model import LogisticRegression

from misguard.core.errors import DataError
from misguard.core.jsonl import write_bytes_atomic
from misguard.core.records import PERCEPTION_LEVELS

HEADS_FILE = "heads.safetensors"
FEATURES_ID = "minilm-q-r-qr-img-v1"
"""Names the feature layout; a judge folder's heads only fit features built the same way."""
ABSENT_LEVEL_LOGIT = -30.0
"""The perception head's intercept for a level absent from its training labels (zero weights): its probability
stays below exp(-30) of the most likely level's, whatever the features."""


def build_features(encoder, questions: Sequence[str], responses: Sequence[str],
                   image_texts: Sequence[str | None] | None = None) -> np.ndarray:
    """[n, 4 * dim + 1] float32 features (see the module docstring). All texts go through the encoder in one
    call, so its batches stay full, and each distinct text once (the responses of several target models to one
    item share its question)."""
    n = len(questions)
    if len(responses) != n or (image_texts is not None and len(image_texts) != n):
        raise ValueError("questions, responses and image_texts must have the same length")
    image_texts = list(image_texts) if image_texts is not None else [None] * n
    with_image = [i for i, text in enumerate(image_texts) if text]
    texts = [*questions, *responses, *(image_texts[i] for i in with_image)]
    distinct = {text: row for row, text in enumerate(dict.fromkeys(texts))}
    embedded = encoder.encode(list(distinct))[[distinct[text] for text in texts]]
    q, r = embedded[:n], embedded[n:2 * n]
    image = np.zeros_like(q)
    image[with_image] = embedded[2 * n:]
    flag = np.zeros((n, 1), dtype=np.float32)
    flag[with_image] = 1.0
    return np.concatenate([q, r, q * r, image, flag], axis=1).astype(np.float32)


@dataclass
class LiteHeads:
    """Logistic-regression heads on lite features. `safety_coef_` [d], `safety_intercept_` scalar;
    `perception_coef_` [3, d] and `perception_intercept_` [3] or None (binary-only labels)."""

    C: float = 1.0
    """Inverse L2 strength of both regressions (scikit-learn's C)."""
    max_iter: int = 2000

    def fit(self, features: np.ndarray, y_unsafe: Sequence[int],
            y_perception: Sequence[int] | None = None) -> LiteHeads:
        """Fit the heads: y_unsafe 0/1; y_perception level indices 0..2, or None (no perception head). A level
        absent from y_perception gets zero weights and ABSENT_LEVEL_LOGIT (the head never predicts it); with
        one level only, the head gives that level whatever the features. Returns self. Raises ValueError when
        the Unsafe labels have a single class or a level index is not 0..2."""
        X = np.asarray(features, dtype=np.float64)
        y = np.asarray(y_unsafe)
        if len(set(y.tolist())) < 2:
            raise ValueError("the Unsafe head needs both Safe and Unsafe examples")
        safety = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(X, y)
        self.safety_coef_ = safety.coef_[0].astype(np.float32)
        self.safety_intercept_ = float(safety.intercept_[0])
        self.perception_coef_ = self.perception_intercept_ = None
        if y_perception is not None:
            levels = np.asarray(y_perception)
            present = sorted(set(levels.tolist()))
            if not set(present) <= {0, 1, 2}:
                raise ValueError(f"perception levels must be indices 0..2, got {present}")
            coef = np.zeros((len(PERCEPTION_LEVELS), X.shape[1]), dtype=np.float32)
            intercept = np.full(len(PERCEPTION_LEVELS), ABSENT_LEVEL_LOGIT, dtype=np.float32)
            intercept[present] = 0.0
            if len(present) == 2:
                # scikit-learn fits two classes as one logistic: logits (0, w.x + b) give the same softmax.
                perception = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(X, levels == present[1])
                coef[present[1]] = perception.coef_[0]
                intercept[present[1]] = perception.intercept_[0]
            elif len(present) == 3:
                perception = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(X, levels)
                coef[:] = perception.coef_
                intercept[:] = perception.intercept_
            self.perception_coef_ = coef
            self.perception_intercept_ = intercept
        return self

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(p_unsafe [n], p_perception [n, 3] or None)."""
        X = np.asarray(features, dtype=np.float32)
        # Products in float32, probabilities in float64: rows that sum to 1 as tightly as log-loss checks.
        p_unsafe = 1.0 / (1.0 + np.exp(-(X @ self.safety_coef_ + self.safety_intercept_).astype(np.float64)))
        if self.perception_coef_ is None:
            return p_unsafe, None
        logits = (X @ self.perception_coef_.T + self.perception_intercept_).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return p_unsafe, weights / weights.sum(axis=1, keepdims=True)

    def save(self, folder: str | Path) -> dict:
        """Write heads.safetensors into `folder` (atomically); returns the JSON settings judge.json keeps beside
        it."""
        tensors = {"safety.coef": self.safety_coef_,
                   "safety.intercept": np.array([self.safety_intercept_], dtype=np.float32)}
        if self.perception_coef_ is not None:
            tensors["perception.coef"] = self.perception_coef_
            tensors["perception.intercept"] = self.perception_intercept_
        write_bytes_atomic(Path(folder) / HEADS_FILE, save(tensors))
        return {"file": HEADS_FILE, "features": FEATURES_ID, "C": self.C, "dim": int(self.safety_coef_.shape[0]),
                "perception_levels": list(PERCEPTION_LEVELS) if self.perception_coef_ is not None else None}

    @classmethod
    def load(cls, folder: str | Path, settings: dict) -> LiteHeads:
        """The heads saved in `folder` with these judge.json settings. Raises DataError naming the file for a
        missing or malformed heads file."""
        path = Path(folder) / settings.get("file", HEADS_FILE)
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise DataError(f"cannot read the lite judge's heads ({exc})", path=path) from None
        if settings.get("features") != FEATURES_ID:
            raise DataError(f"heads built on features {settings.get('features')!r}; this misguard builds "
                            f"{FEATURES_ID!r}", path=Path(folder) / "judge.json", field="heads.features")
        heads = cls(C=float(settings.get("C", 1.0)))
        try:
            heads.safety_coef_ = tensors["safety.coef"]
            heads.safety_intercept_ = float(tensors["safety.intercept"][0])
        except (KeyError, IndexError) as exc:
            raise DataError(f"tensor {exc} is missing or empty", path=path) from None
        heads.perception_coef_ = tensors.get("perception.coef")
        heads.perception_intercept_ = tensors.get("perception.intercept")
        # Shapes are checked here, not found out as a matmul error at the first request.
        dim = settings.get("dim", heads.safety_coef_.shape[0] if heads.safety_coef_.ndim == 1 else None)
        expected = {"safety.coef": (dim,), "safety.intercept": (1,)}
        if heads.perception_coef_ is not None or heads.perception_intercept_ is not None:
            expected.update({"perception.coef": (len(PERCEPTION_LEVELS), dim),
                             "perception.intercept": (len(PERCEPTION_LEVELS),)})
        for name, shape in expected.items():
            if name not in tensors or tensors[name].shape != shape:
                found = tensors[name].shape if name in tensors else "missing"
                raise DataError(f"tensor {name} has shape {found}, expected {shape} (heads.dim {dim})", path=path)
        return heads
