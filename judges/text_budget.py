"""A text within a token budget: its head and its tail, the middle left out and marked.

One cutter for every judge input that can be too long: the guard's per-rail budget (`limits.max_text_tokens`)
and the VLM judge's fit to its model's context both call `cut_text`. A long text is first cut by characters
(PRECUT_CHARS_PER_TOKEN a token of the budget), so a megabyte is never tokenized whole; the cut itself is made
at the tokenizer's own token offsets, so the head and tail are whole tokens of the original text.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CHARS_PER_TOKEN = 4
"""A judge without a (fast) tokenizer has its token budget counted as this many characters a token (English
text's average in BPE and WordPiece tokenizers). A caller that needs a bound rather than an estimate passes
chars_per_token=0.25: no tokenizer here makes more tokens than a text's UTF-8 bytes, at most 4 a character."""
PRECUT_CHARS_PER_TOKEN = 16
"""Characters one token covers at most in ordinary text: a text longer than this many times its budget is cut by
characters first (a text of very long "words" may then keep fewer tokens than the budget; it is cut either way)."""
CUT_MARK = "\n[...]\n"
"""Where a cut text's middle was: the judge reads that something is left out."""


@dataclass(frozen=True)
class CutText:
    """A text within a token budget: `text` as judged, the `tokens` it keeps (CUT_MARK not counted), and `note`
    saying how it was cut (None when it was not)."""

    text: str
    tokens: int
    note: str | None = None

    @property
    def cut(self) -> bool:
        return self.note is not None


def cut_text(text: str, max_tokens: int, tokenizer: Any | None = None, *, tail_share: float = 0.5,
             what: str = "text", chars_per_token: float = CHARS_PER_TOKEN) -> CutText:
    """`text` as it is when it has at most `max_tokens` tokens of `tokenizer` (a fast transformers tokenizer;
    None or a slow one: `chars_per_token` characters a token), else its first and last tokens, `tail_share` of
    the budget to the tail, joined by CUT_MARK, with a note naming `what` was cut. Never tokenizes more than
    PRECUT_CHARS_PER_TOKEN characters a token of the budget."""
    tail_tokens = min(max_tokens, round(max_tokens * tail_share))
    head_tokens = max_tokens - tail_tokens
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        # No token offsets to cut at (a slow tokenizer has none): the budget in characters.
        limit = int(max_tokens * chars_per_token)
        if len(text) <= limit:
            return CutText(text, math.ceil(len(text) / chars_per_token))
        head = int(head_tokens * chars_per_token)
        kept = text[:head] + CUT_MARK + text[len(text) - (limit - head):]
        return CutText(kept, max_tokens, f"{what} cut to its first {head} and last {limit - head} of "
                                         f"{len(text)} characters; the middle was not judged")
    precut = max_tokens * PRECUT_CHARS_PER_TOKEN
    if len(text) <= precut:
        spans = _token_spans(tokenizer, text)
        if len(spans) <= max_tokens:
            return CutText(text, len(spans))
        head_end = spans[head_tokens - 1][1] if head_tokens else 0
        tail_start = spans[len(spans) - tail_tokens][0] if tail_tokens else len(text)
        total = f"{len(spans)} tokens"
    else:
        head_text = text[:head_tokens * PRECUT_CHARS_PER_TOKEN]
        tail_offset = len(text) - tail_tokens * PRECUT_CHARS_PER_TOKEN
        head_spans = _token_spans(tokenizer, head_text) if head_tokens else []
        tail_spans = _token_spans(tokenizer, text[tail_offset:]) if tail_tokens else []
        head_end = head_spans[min(head_tokens, len(head_spans)) - 1][1] if head_spans else 0
        tail_start = (tail_offset + tail_spans[max(0, len(tail_spans) - tail_tokens)][0] if tail_spans
                      else len(text))
        total = f"{len(text)} characters"
    return CutText(text[:head_end] + CUT_MARK + text[tail_start:], max_tokens,
                   f"{what} cut to its first {head_tokens} and last {tail_tokens} tokens of {total}; the middle "
                   "was not judged")


def token_count(tokenizer: Any | None, text: str, *, chars_per_token: float = CHARS_PER_TOKEN) -> int:
    """The tokens of `text` as cut_text counts them (without special tokens; characters without a fast
    tokenizer)."""
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        return math.ceil(len(text) / chars_per_token)
    return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _token_spans(tokenizer: Any, text: str) -> list[tuple[int, int]]:
    """Each token's (start, end) character offsets in `text`."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return [tuple(span) for span in encoded["offset_mapping"]]
