"""The transformers engine's batch pipeline: preprocessing workers prepare the next batches while the model
runs, and a CUDA out-of-memory error halves the batch; neither may change a result or its place."""
from __future__ import annotations

import numpy as np
import pytest

import misguard.engines.hf as hf
from misguard.engines import EngineOptions
from misguard.engines.hf import TransformersEngine
from misguard.engines.messages import GenerationParams, user_request
from tests.engines.test_prefix_reuse import judge_requests


def label_probs(tiny_judge, requests, labels, **options):
    engine = TransformersEngine(str(tiny_judge), EngineOptions(**options))
    try:
        return np.array([p.probs for p in engine.label_probs(requests, labels)]), engine
    finally:
        engine.close()


@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_preprocessing_workers_change_no_result(tiny_judge, easy, labels, prefix_reuse):
    requests = judge_requests(easy, n_items=8)
    serial, _ = label_probs(tiny_judge, requests, labels, batch_size=2, preprocess_workers=0,
                            prefix_reuse=prefix_reuse)
    threaded, _ = label_probs(tiny_judge, requests, labels, batch_size=2, preprocess_workers=2,
                              prefix_reuse=prefix_reuse)
    np.testing.assert_allclose(threaded, serial, rtol=0, atol=1e-6)


def test_preprocessing_workers_keep_generations_in_place(tiny_judge, easy):
    requests = [user_request(item.id, easy.image_paths(item), item.question) for item in easy.items[:5]]
    # Seeded sampling: a random tiny model's greedy text is the same for every prompt, sampled text is not, so
    # a generation put in another request's place would show.
    params = GenerationParams(max_new_tokens=6, temperature=1.0, seed=3)
    texts = {}
    for workers in (0, 2):
        with TransformersEngine(str(tiny_judge), EngineOptions(batch_size=2, preprocess_workers=workers)) as engine:
            texts[workers] = [g.text for g in engine.generate(requests, params)]
    assert len(set(texts[0])) > 1
    assert texts[2] == texts[0]


class FakeOutOfMemory(RuntimeError):
    """Stands in for torch.cuda.OutOfMemoryError, which a CPU cannot raise."""


@pytest.mark.parametrize("prefix_reuse", [False, True])
def test_out_of_memory_halves_the_batch_and_loses_nothing(tiny_judge, easy, labels, monkeypatch, prefix_reuse):
    requests = judge_requests(easy, n_items=8)
    expected, _ = label_probs(tiny_judge, requests, labels, batch_size=8, preprocess_workers=0,
                              prefix_reuse=prefix_reuse)
    monkeypatch.setattr(hf, "_is_cuda_oom", lambda exc: isinstance(exc, FakeOutOfMemory))
    real_forward = hf.TransformersEngine._label_batch
    real_score_tails = hf.score_tails

    def at_most_two_rows(rows: int):
        if rows > 2:
            raise FakeOutOfMemory(f"{rows} rows")

    def label_batch(self, inputs, token_ids):
        at_most_two_rows(len(inputs["input_ids"]))
        return real_forward(self, inputs, token_ids)

    def score_tails(net, prefix, groups, *args):
        at_most_two_rows(len(prefix["input_ids"]))
        return real_score_tails(net, prefix, groups, *args)

    monkeypatch.setattr(hf.TransformersEngine, "_label_batch", label_batch)
    monkeypatch.setattr(hf, "score_tails", score_tails)
    got, engine = label_probs(tiny_judge, requests, labels, batch_size=8, preprocess_workers=2,
                              prefix_reuse=prefix_reuse)
    assert engine.batch_size == 2
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
