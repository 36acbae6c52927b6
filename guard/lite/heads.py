"""The lite judge's features and heads.

Features of one response: the embeddings of the question, of the response, their element-wise product (how the
response relates to the question), and of the image text when the data has one (an image description; zeros and
a 0 flag when not): 4 x 384 + 1 numbers. The heads are scikit-learn logistic regressions on them, one for
Unsafe (binary) and one for the perception level (multinomial, three levels; absent when the labels have no
perception level). Saved as safetensors (coefficients) plus JSON (classes, settings): nothing is pickled.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mis.errors import DataError
from mis.records import PERCEPTION_LEVELS

HEADS_FILE = "heads.safetensors"
FEATURES_ID = "minilm-q-r-qr-img-v1"
"""Names the feature layout; a judge folder's heads only fit features built the same way."""


def build_features(encoder, questions: Sequence[str], responses: Sequence[str],
                   image_texts: Sequence[str | None] | None = None) -> np.ndarray:
    """[n, 4 * dim + 1] float32 features (see the module docstring). All texts go through the encoder in one
    call, so its batches stay full."""
    n = len(questions)
    if len(responses) != n or (image_texts is not None and len(image_texts) != n):
        raise ValueError("questions, responses and image_texts must have the same length")
    image_texts = list(image_texts) if image_texts is not None else [None] * n
    with_image = [i for i, text in enumerate(image_texts) if text]
    embedded = encoder.encode([*questions, *responses, *(image_texts[i] for i in with_image)])
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
        """Fit the heads: y_unsafe 0/1; y_perception level indices 0..2 (all three levels must occur), or None.
        Returns self. Raises ValueError when a head's labels have a single class."""
        from sklearn.linear_model import LogisticRegression

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
            if set(levels.tolist()) != {0, 1, 2}:
                raise ValueError(f"the perception head needs all three levels, got {sorted(set(levels.tolist()))}")
            perception = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(X, levels)
            self.perception_coef_ = perception.coef_.astype(np.float32)
            self.perception_intercept_ = perception.intercept_.astype(np.float32)
        return self

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(p_unsafe [n], p_perception [n, 3] or None)."""
        X = np.asarray(features, dtype=np.float32)
        p_unsafe = 1.0 / (1.0 + np.exp(-(X @ self.safety_coef_ + self.safety_intercept_)))
        if self.perception_coef_ is None:
            return p_unsafe.astype(np.float64), None
        logits = X @ self.perception_coef_.T + self.perception_intercept_
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return p_unsafe.astype(np.float64), (weights / weights.sum(axis=1, keepdims=True)).astype(np.float64)

    def save(self, folder: str | Path) -> dict:
        """Write heads.safetensors into `folder`; returns the JSON settings judge.json keeps beside it."""
        from safetensors.numpy import save_file

        tensors = {"safety.coef": self.safety_coef_,
                   "safety.intercept": np.array([self.safety_intercept_], dtype=np.float32)}
        if self.perception_coef_ is not None:
            tensors["perception.coef"] = self.perception_coef_
            tensors["perception.intercept"] = self.perception_intercept_
        save_file(tensors, str(Path(folder) / HEADS_FILE))
        return {"file": HEADS_FILE, "features": FEATURES_ID, "C": self.C, "dim": int(self.safety_coef_.shape[0]),
                "perception_levels": list(PERCEPTION_LEVELS) if self.perception_coef_ is not None else None}

    @classmethod
    def load(cls, folder: str | Path, settings: dict) -> LiteHeads:
        """The heads saved in `folder` with these judge.json settings. Raises DataError naming the file for a
        missing or malformed heads file."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

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
            heads.perception_coef_ = tensors.get("perception.coef")
            heads.perception_intercept_ = tensors.get("perception.intercept")
        except KeyError as exc:
            raise DataError(f"tensor {exc} is missing", path=path) from None
        return heads
