"""Where the lite judge's verdicts can be trusted: a trust score per verdict and a threshold under which the verdict
is flagged `out_of_domain`.

The score combines these signals, each measured against the judge's own held-out in-domain rows:
- how sure the verdict is: the distance of p_unsafe from the Unsafe threshold, in logits (a conformal
  prediction set that holds both labels is the same thing: a verdict too close to call);
- how far the training sources' own notions of Unsafe part ways on it: the spread of the per-source heads'
  p_unsafe (a judge trained on two sources or more);
- how unlike the training data the item reads, at three depths of the encoder: the Mahalanobis distance of its
  mean-pooled hidden states (TRUST_LAYERS) to the nearer of the two classes' Gaussians fitted on training rows
  (a shared covariance, shrunk by Ledoit-Wolf), as in Lee et al. 2018. An early layer keeps more of the text's
  domain; the last more of what the task made of it.
Each signal becomes an in-domain p-value against held-out in-domain rows ("reference"), the trust score is the
smallest of them and the threshold flags `flag_share` (5% by default) of other held-out in-domain rows
("calibration"): calibration/trust.py, which the VLM judge's trust shares. How many verdicts of a new kind of data
are flagged is what bench/lite_validity.py measures.

Saved beside the model as safetensors (the Gaussians, the reference samples) plus JSON (the settings): no pickle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save
from sklearn.covariance import LedoitWolf

from misguard.calibration.trust import DEFAULT_FLAG_SHARE, flag_threshold, margin_signal, trust_scores
from misguard.core.errors import DataError
from misguard.core.jsonl import write_bytes_atomic
from misguard.judges.lite.model import TRUST_LAYERS

TRUST_FILE = "trust.safetensors"


@dataclass(frozen=True)
class Readings:
    """What the judge read off some rows: raw p_unsafe [n], the source heads' p_unsafe [n, sources] (None without
    source heads) and the encoder's features [n, layers, dim]."""

    p_unsafe: np.ndarray
    source_p: np.ndarray | None
    features: np.ndarray

    def rows(self, index: np.ndarray) -> Readings:
        return Readings(self.p_unsafe[index], None if self.source_p is None else self.source_p[index],
                        self.features[index])


@dataclass
class TrustModel:
    """The fitted trust score of one judge (see the module docstring). Fit with `fit`, then `score` / `flagged`."""

    flag_share: float = DEFAULT_FLAG_SHARE

    def fit(self, train_features: np.ndarray, train_unsafe: np.ndarray, reference: Readings,
            calibration: Readings, unsafe_threshold: float) -> TrustModel:
        """Fit the Gaussians on training rows (features [n, layers, dim], their 0/1 Unsafe labels), the in-domain
        p-values on the `reference` rows and the threshold on the `calibration` rows (the judge's readings of
        each, raw p_unsafe). Returns self. Raises ValueError for fewer than two rows of a class or no held-out
        rows."""
        train_unsafe = np.asarray(train_unsafe).astype(int)
        if min(np.bincount(train_unsafe, minlength=2)) < 2:
            raise ValueError("the trust score needs at least two training rows of each class")
        if len(reference.p_unsafe) < 2 or len(calibration.p_unsafe) < 1:
            raise ValueError("the trust score needs held-out in-domain rows")
        n_layers = train_features.shape[1]
        self.means_ = np.zeros((n_layers, 2, train_features.shape[2]), dtype=np.float64)
        self.precisions_ = np.zeros((n_layers, train_features.shape[2], train_features.shape[2]), dtype=np.float64)
        for layer in range(n_layers):
            x = train_features[:, layer].astype(np.float64)
            centred = np.empty_like(x)
            for label in (0, 1):
                rows = train_unsafe == label
                self.means_[layer, label] = x[rows].mean(axis=0)
                centred[rows] = x[rows] - self.means_[layer, label]
            self.precisions_[layer] = LedoitWolf(assume_centered=True).fit(centred).precision_
        self.unsafe_threshold_ = float(unsafe_threshold)
        self.with_sources_ = reference.source_p is not None
        self.reference_ = np.sort(self.signals(reference), axis=0)
        self.threshold_ = flag_threshold(self.score(calibration), self.flag_share)
        return self

    def signal_names(self) -> list[str]:
        return ["margin", *(["source_spread"] if self.with_sources_ else []),
                *(f"layer{layer}" for layer in TRUST_LAYERS[:self.means_.shape[0]])]

    def signals(self, readings: Readings) -> np.ndarray:
        """[n, signals]: how unusual each row is, larger = more unusual: minus the verdict's margin in logits, the
        spread of the source heads' p_unsafe (with source heads), then each layer's Mahalanobis distance to the
        nearer class."""
        columns = [margin_signal(readings.p_unsafe, self.unsafe_threshold_)]
        if self.with_sources_:
            columns.append(np.asarray(readings.source_p, dtype=np.float64).std(axis=1))
        features = readings.features
        for layer in range(self.means_.shape[0]):
            x = features[:, layer].astype(np.float64)
            distances = []
            for label in (0, 1):
                d = x - self.means_[layer, label]
                distances.append(np.einsum("ij,jk,ik->i", d, self.precisions_[layer], d))
            columns.append(np.sqrt(np.maximum(np.minimum(*distances), 0.0)))
        return np.stack(columns, axis=1)

    def score(self, readings: Readings) -> np.ndarray:
        """[n] trust scores in [0, 1]: the smallest in-domain p-value of the row's signals (1: nothing unusual)."""
        return trust_scores(self.reference_, self.signals(readings))

    def flagged(self, trust: np.ndarray) -> np.ndarray:
        """Which trust scores fall below the threshold (out of domain)."""
        return np.asarray(trust) < self.threshold_

    # ---- files ----

    def save(self, folder: str | Path) -> dict[str, Any]:
        """Write trust.safetensors into `folder` (atomically); returns the JSON settings judge.json keeps."""
        write_bytes_atomic(Path(folder) / TRUST_FILE, save({
            "means": self.means_.astype(np.float32), "precisions": self.precisions_.astype(np.float32),
            "reference": self.reference_.astype(np.float64)}))
        return {"file": TRUST_FILE, "flag_share": self.flag_share, "threshold": self.threshold_,
                "unsafe_threshold": self.unsafe_threshold_, "signals": self.signal_names()}

    @classmethod
    def load(cls, folder: str | Path, settings: dict[str, Any]) -> TrustModel:
        """The trust model saved in `folder` with these judge.json settings. Raises DataError naming the file."""
        path = Path(folder) / settings.get("file", TRUST_FILE)
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as exc:
            raise DataError(f"cannot read the lite judge's trust model ({exc})", path=path) from None
        model = cls(flag_share=float(settings.get("flag_share", DEFAULT_FLAG_SHARE)))
        try:
            model.means_ = tensors["means"].astype(np.float64)
            model.precisions_ = tensors["precisions"].astype(np.float64)
            model.reference_ = tensors["reference"]
            model.threshold_ = float(settings["threshold"])
            model.unsafe_threshold_ = float(settings["unsafe_threshold"])
            model.with_sources_ = "source_spread" in settings["signals"]
        except KeyError as exc:
            raise DataError(f"{exc} is missing", path=path) from None
        if model.reference_.ndim != 2 or model.reference_.shape[1] != len(model.signal_names()):
            raise DataError(f"the reference holds {model.reference_.shape} signals; judge.json names "
                            f"{settings['signals']}", path=path)
        if not (math.isfinite(model.threshold_) and 0.0 <= model.threshold_ <= 1.0):
            raise DataError(f"trust threshold {model.threshold_} is not in [0, 1]", path=path, field="threshold")
        return model
