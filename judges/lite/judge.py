"""A lite judge folder: a fine-tuned cross-encoder (model.safetensors, config.json and its tokenizer), judge.json
(kind "lite": the windows, the heads, the threshold, the trust model's settings, an optional calibration),
trust.safetensors and judge_card.json. It reads the question, the response and, where the data has one, an image
description; it never sees the images themselves (no registry package ships real image-encoder weights), as its
card says. Every verdict carries a trust score; one below the trust threshold is `out_of_domain` (trust.py).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import BertConfig

from misguard.calibration import Calibration
from misguard.core.errors import DataError, MisguardError
from misguard.core.progress import Progress
from misguard.core.records import PERCEPTION_LEVELS
from misguard.judges.lite.model import (
    TRUST_LAYERS,
    CrossEncoder,
    EncodedItem,
    WindowSpec,
    batch_tensors,
    encode_items,
    load_tokenizer,
)
from misguard.judges.lite.onednn import pack_linears
from misguard.judges.lite.trust import Readings, TrustModel
from misguard.judges.protocol import Assessment, Case, assessments
from misguard.judges.spec import JUDGE_FILE, FolderJudge

LITE_TEMPLATE = "lite-cross-encoder-v2"
"""Judgments by a lite judge carry this as their template id."""
LITE_FORMAT = 2
"""judge.json's lite section: 2 = the fine-tuned cross-encoder (1 was frozen embeddings + logistic heads)."""
WEIGHTS_FILE = "model.safetensors"
READS_RESPONSES_ONLY = "the lite judge reads responses only: it does not judge a request alone"
WINDOWS_PER_PASS = 32
"""Most windows in one forward pass when judging many items (batch throughput without a memory spike)."""


class LiteJudge(FolderJudge):
    """A lite judge folder, ready to judge responses on the CPU (or `device`). A request case (no response) is
    unscored: the lite judge has no request head. Raises DataError for a malformed folder."""

    reads_requests = False
    chunk_size = 256
    image_pixels = None
    """It reads no pixels (an image description at most): the guard checks images' headers and decodes none."""

    def __init__(self, folder: str | Path, *, calibration: Calibration | None = None, device: str = "cpu"):
        super().__init__(folder, calibration=calibration)
        if self.spec.kind != "lite":
            raise MisguardError(f"{self.folder}: not a lite judge (judge.json kind is {self.spec.kind!r})")
        lite = self.spec.heads or {}
        if lite.get("format") != LITE_FORMAT:
            raise DataError(f"a lite judge of format {lite.get('format')!r}; this misguard reads format "
                            f"{LITE_FORMAT} (retrain it with `misguard train --kind lite`)",
                            path=self.folder / JUDGE_FILE, field="heads.format")
        self.windows = WindowSpec(**(self.spec.encoder or {}).get("windows", {}))
        self.has_perception = bool(lite.get("perception"))
        self.sources: list[str] = list(lite.get("sources") or [])
        self.tokenizer = load_tokenizer(self.folder)
        self.model = load_model(self.folder, n_sources=len(self.sources)).to(device).eval()
        self.device = device
        if torch.device(device).type == "cpu":
            pack_linears(self.model)
        self.trust = TrustModel.load(self.folder, lite["trust"]) if lite.get("trust") else None

    @property
    def text_tokens(self) -> int:
        """The most tokens of a case's text its windows read: the question's share and the response's windows."""
        return self.windows.question_tokens + self.windows.response_tokens

    def judge(self, cases: Sequence[Case], progress: Progress | None = None) -> list[Assessment]:
        """One Assessment per case, in order, from the question, the image description and the response; a
        verdict whose trust score is under the threshold has status "out_of_domain" (its label and probabilities
        kept). `progress` is told of the cases as each forward pass (WINDOWS_PER_PASS windows) finishes."""
        out: list[Any] = [Assessment.unscored(self.id, self.template, READS_RESPONSES_ONLY)] * len(cases)
        responses = [i for i, case in enumerate(cases) if not case.is_request]
        if progress is not None and len(responses) < len(cases):
            progress(len(cases) - len(responses))  # requests: unscored, nothing to run
        if not responses:
            return out
        chosen = [cases[i] for i in responses]
        readings, raw_perception = self.read(
            [c.question for c in chosen], [c.response or "" for c in chosen], [c.image_description for c in chosen],
            progress)
        judged = assessments(self.id, self.template, readings.p_unsafe,
                             raw_perception if self.has_perception else None, calibration=self.calibration,
                             calibration_id=self.calibration_id, threshold=self.unsafe_threshold)
        trust = self.trust.score(readings) if self.trust is not None else None
        flagged = self.trust.flagged(trust) if self.trust is not None else None
        for row, (i, assessment) in enumerate(zip(responses, judged)):
            if trust is not None and assessment.scored:
                assessment = assessment.with_trust(float(trust[row]), bool(flagged[row]), self.trust.threshold_)
            out[i] = assessment
        return out

    def judge_chunk(self, cases: Sequence[Case], progress: Progress | None) -> list[Assessment]:
        return self.judge(cases, progress)

    def read(self, questions: Sequence[str], responses: Sequence[str],
             image_descriptions: Sequence[str | None] | None = None, progress: Progress | None = None,
             ) -> tuple[Readings, np.ndarray]:
        """(what the model reads off each pair: raw p_unsafe, the source heads' and the trust features; raw
        p_perception [n, 3]); `progress` told of the pairs as each forward pass finishes."""
        items = encode_items(self.tokenizer, questions, responses, image_descriptions, self.windows)
        return predict(self.model, items, self.tokenizer.pad_token_id, self.device, progress=progress)

    def describe(self) -> dict[str, Any]:
        return {"judge": self.spec.model_dump(), "engine": {"engine": "lite", "windows": self.windows.to_dict(),
                                                            "device": self.device},
                "calibration": self.calibration_id, "unsafe_threshold": self.unsafe_threshold}

    def close(self) -> None:
        self.model = None


def load_model(folder: str | Path, n_sources: int = 0) -> CrossEncoder:
    """The fine-tuned cross-encoder saved in `folder` (config.json + model.safetensors). Raises DataError naming
    the file when the weights are missing, not safetensors, or do not fit the architecture."""
    folder = Path(folder)
    try:
        config = BertConfig.from_json_file(str(folder / "config.json"))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read the encoder's config ({exc})", path=folder / "config.json") from None
    model = CrossEncoder.from_config(config, n_sources)
    path = folder / WEIGHTS_FILE
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as exc:
        raise DataError(f"cannot read the lite judge's weights ({exc})", path=path) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"the weights do not fit the model: missing {sorted(missing)[:3]}, unexpected "
                        f"{sorted(unexpected)[:3]}", path=path)
    return model


def predict(model: CrossEncoder, items: Sequence[EncodedItem], pad_id: int, device: str = "cpu",
            windows_per_pass: int = WINDOWS_PER_PASS, progress: Progress | None = None,
            ) -> tuple[Readings, np.ndarray]:
    """(the Readings of the items: p_unsafe, the source heads' p_unsafe, trust features; p_perception [n, 3]), in
    order: items sorted by length into passes of at most `windows_per_pass` windows (an item's windows in one),
    `progress` told of each pass's items as it finishes."""
    order = sorted(range(len(items)), key=lambda i: items[i].tokens)
    p_unsafe = np.zeros(len(items))
    p_perception = np.zeros((len(items), len(PERCEPTION_LEVELS)))
    source_p = np.zeros((len(items), model.n_sources)) if model.sources is not None else None
    features = None
    start = 0
    with torch.inference_mode():
        while start < len(order):
            end, windows = start, 0
            while end < len(order) and (end == start or windows + len(items[order[end]].windows) <= windows_per_pass):
                windows += len(items[order[end]].windows)
                end += 1
            chosen = order[start:end]
            batch = {k: v.to(device) for k, v in batch_tensors([items[i] for i in chosen], pad_id).items()}
            out = model(**batch, with_features=True)
            p_unsafe[chosen] = torch.sigmoid(out["unsafe_logit"].float()).cpu().numpy()
            p_perception[chosen] = torch.softmax(out["perception_logits"].float(), dim=-1).cpu().numpy()
            if source_p is not None:
                source_p[chosen] = torch.sigmoid(out["source_logits"].float()).cpu().numpy()
            if features is None:
                features = np.zeros((len(items), *out["features"].shape[1:]), dtype=np.float32)
            features[chosen] = out["features"].float().cpu().numpy()
            if progress is not None:
                progress(len(chosen))
            start = end
    if features is None:
        features = np.zeros((0, len(TRUST_LAYERS), model.encoder.config.hidden_size), dtype=np.float32)
    return Readings(p_unsafe, source_p, features), p_perception
