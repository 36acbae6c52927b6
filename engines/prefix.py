"""Prefix reuse for the transformers engine's label scoring: requests that share a prompt prefix are scored
against one computation of it.

A judge's prompt puts the two images, the rubric and the question first and the target's response last
(judges/templates.py), so the K responses to one item share everything up to the response. For such a group
the prefix (the vision tower and every prefix token) runs once; its KV cache is expanded over the K members and
only each member's own tail runs after it. The tail's positions continue the prefix's (Qwen2-VL's 3-axis
M-RoPE from the model's own `get_rope_index`; plain positions from the cache for the other families), so each
member's answer logits equal those of its whole prompt run alone, to float tolerance
(tests/guard/test_prefix_reuse.py).

The shared prefix is the longest common prefix of the members' token ids from the tokenizer on the rendered
prompts (images as their placeholder tokens), so it always ends on a token boundary of every member's own
tokenization. Groups are requests with the same images (the same paths, or the same image objects); a group
whose images do not all lie in the shared prefix, or whose processor output does not line up with the text
tokens, is scored the plain way, never guessed.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from misguard.engines.messages import Request, images_key

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
"""Processor outputs laid out [batch, sequence]: cut to the prefix. Every other output (pixel values, image
grids, pixel masks) belongs to the images, which all lie in the prefix, and is passed on whole."""
MIN_SHARED_TOKENS = 16
"""A shared prefix shorter than this is not worth a second forward pass."""


def prefix_groups(requests: Sequence[Request]) -> list[list[int]]:
    """Indices of `requests` grouped by their images (same images in the same order), groups in order of first
    appearance. Only groups of two or more can share a prefix."""
    groups: dict[tuple, list[int]] = {}
    for i, request in enumerate(requests):
        groups.setdefault(images_key(request.messages), []).append(i)
    return list(groups.values())


def shared_length(token_lists: Sequence[Sequence[int]]) -> int:
    """The length of the token lists' longest common prefix, leaving every list at least one token of its own
    (the answer is read at a member's last token, which must run after the prefix)."""
    limit = min(len(tokens) for tokens in token_lists) - 1
    first = token_lists[0]
    n = 0
    while n < limit and all(tokens[n] == first[n] for tokens in token_lists[1:]):
        n += 1
    return n


@dataclass
class PrefixGroup:
    """Requests that share a prompt prefix: their indices in the caller's list, each one's text tokens (the
    tokenizer on the rendered prompt, images as placeholders) and the length of their common text prefix."""

    members: list[int]
    tokens: list[list[int]]
    shared: int

    @property
    def tails(self) -> list[list[int]]:
        """Each member's own tokens after the shared prefix."""
        return [tokens[self.shared:] for tokens in self.tokens]


def plan_groups(tokenizer, prompts: Sequence[str], groups: Sequence[list[int]],
                image_token_ids: frozenset[int] = frozenset()) -> tuple[list[PrefixGroup], list[int]]:
    """(groups worth sharing: two or more members with at least MIN_SHARED_TOKENS common text tokens and no
    image token after them, the indices of every other request) for `groups` from prefix_groups over requests
    with these rendered `prompts`. An image placeholder in a tail would run without its pixels, so such a group
    is not shared."""
    shared, alone = [], []
    for members in groups:
        if len(members) > 1:
            tokens = tokenizer([prompts[i] for i in members])["input_ids"]
            n = shared_length(tokens)
            if n >= MIN_SHARED_TOKENS and not any(image_token_ids.intersection(t[n:]) for t in tokens):
                shared.append(PrefixGroup(members, tokens, n))
                continue
        alone.extend(members)
    return shared, alone


def prefix_inputs(processor_out, groups: Sequence[PrefixGroup], pad_id: int):
    """The model inputs of each group's shared prefix, one left-padded row per group, cut from
    `processor_out`: the processor's padded output for each group's first member's whole prompt (which holds
    the images' pixels and expands their placeholders).

    Returns (inputs: a dict of tensors; fits: for each group whether the processor's tokens end with the
    member's text tail, i.e. the cut is right; a group that does not fit gets an empty row and must be scored
    the plain way)."""
    input_ids = processor_out["input_ids"]
    width_in = input_ids.shape[1]
    fits: list[bool] = []
    cuts: list[tuple[int, int]] = []  # (first real token, end of the prefix) in each padded processor row
    for g, group in enumerate(groups):
        real = int(processor_out["attention_mask"][g].sum())
        row = input_ids[g, width_in - real:].tolist()
        tail = group.tails[0]
        fit = len(row) > len(tail) and row[len(row) - len(tail):] == tail
        fits.append(fit)
        cuts.append((width_in - real, width_in - len(tail) if fit else width_in - real))
    width = max(end - start for start, end in cuts)
    inputs = {key: value for key, value in processor_out.items() if key not in SEQUENCE_KEYS}
    for key in SEQUENCE_KEYS:
        if key not in processor_out:
            continue
        value = processor_out[key]
        rows = torch.full((value.shape[0], width), pad_id if key == "input_ids" else 0, dtype=value.dtype)
        for g, (start, end) in enumerate(cuts):
            if end > start:
                rows[g, width - (end - start):] = value[g, start:end]
        inputs[key] = rows
    return inputs, fits


def image_token_ids(config) -> frozenset[int]:
    """The model's image placeholder token ids, from its config (the names differ between families)."""
    ids = {getattr(config, name, None) for name in ("image_token_id", "image_token_index", "video_token_id")}
    return frozenset(i for i in ids if isinstance(i, int))


def uses_mrope(net) -> bool:
    """Whether the model places tokens with Qwen2-VL's 3-axis M-RoPE (its positions come from
    `get_rope_index`, which needs the processor's mm_token_type_ids)."""
    core = net.get_base_model() if hasattr(net, "get_base_model") else net
    return hasattr(core.model, "get_rope_index")


def score_tails(net, prefix, groups: Sequence[PrefixGroup], pad_id: int, max_rows: int):
    """The answer logits ([members, vocab], float32) of every member of `groups`, in group then member order:
    one forward pass over the prefixes (`prefix` from prefix_inputs, on the model's device, one row per group),
    then the members' tails against the prefixes' KV cache, at most `max_rows` tails per pass."""
    device = prefix["input_ids"].device
    core = net.get_base_model() if hasattr(net, "get_base_model") else net  # under a PEFT adapter: its model
    model, head = core.model, core.get_output_embeddings()
    mrope = uses_mrope(net)
    positions = None
    if mrope:
        positions, _ = model.get_rope_index(
            input_ids=prefix["input_ids"], mm_token_type_ids=prefix["mm_token_type_ids"],
            image_grid_thw=prefix.get("image_grid_thw"), video_grid_thw=prefix.get("video_grid_thw"),
            attention_mask=prefix["attention_mask"])
    cache = model(**prefix, position_ids=positions, use_cache=True).past_key_values
    prefix_mask = prefix["attention_mask"]
    if mrope:  # each prefix's last position: its tail continues from the next one
        next_position = positions.masked_fill(prefix_mask[None] == 0, -1).amax(dim=(0, 2)) + 1

    rows = [(g, tail) for g, group in enumerate(groups) for tail in group.tails]
    logits = []
    for start in range(0, len(rows), max_rows):
        chunk = rows[start:start + max_rows]
        last = start + max_rows >= len(rows)
        groups = torch.tensor([g for g, _ in chunk], device=device)
        width = max(len(tail) for _, tail in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=prefix_mask.dtype)
        for r, (_, tail) in enumerate(chunk):  # right-padded: a tail's pads come after its answer position
            ids[r, :len(tail)] = torch.tensor(tail)
            mask[r, :len(tail)] = 1
        ids, mask = ids.to(device), mask.to(device)
        rows_cache = cache if last else copy.deepcopy(cache)
        rows_cache.batch_select_indices(groups)
        tail_positions = None
        if mrope:
            tail_positions = (next_position[groups][:, None] + torch.arange(width, device=device)[None])
            tail_positions = tail_positions[None].expand(3, -1, -1)
        hidden = model(input_ids=ids, attention_mask=torch.cat([prefix_mask[groups], mask], dim=1),
                       past_key_values=rows_cache, position_ids=tail_positions, use_cache=True).last_hidden_state
        answer = hidden[torch.arange(len(chunk), device=device), mask.sum(dim=1) - 1]
        logits.append(head(answer).float())
        del rows_cache, hidden
    return torch.cat(logits)
