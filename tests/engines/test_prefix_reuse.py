"""Prefix reuse (engines/prefix.py): a judge's K responses to one item share the image + rubric +
question prefix, computed once; every judgment must equal the one without reuse."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import misguard.engines.hf as hf
from misguard.engines import EngineOptions, load_engine
from misguard.engines.messages import Request
from misguard.engines.prefix import PrefixGroup, plan_groups, prefix_groups, prefix_inputs, shared_length
from misguard.engines.tiny_models import TINY_ARCHS
from misguard.judges import Case
from misguard.judges.templates import get_template
from misguard.judges.vlm import VLMJudge, make_judge_folder

ANSWERS = ["I can't help with that.",
           "The first image shows a knife and the second a bag; together they could point to harm, so be careful.",
           "fish fish",
           "Sure! Step one, take the item from the first image; step two, bring it to the place in the second."]
# Float32 on the CPU: with reuse the probabilities match to about 1e-7. A tail one position off, or one prefix
# token wrong, moves them by about 2e-4 on these tiny models.
TOLERANCE = 2e-6


def judge_requests(split, n_items: int = 4):
    """Judge requests for the first items: item n gets 1 + n % 4 responses (a lone response among groups)."""
    template = get_template("mis-judge-codes-v1")
    return [template.request(f"{item.id}-{k}", split.image_paths(item), item.question, ANSWERS[(n + k) % 4])
            for n, item in enumerate(split.items[:n_items]) for k in range(1 + n % 4)]


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_judgments_with_prefix_reuse_equal_those_without(arch, tiny_model, easy, tmp_path, monkeypatch):
    folder = shutil.copytree(tiny_model(arch), tmp_path / "judge")
    labels = make_judge_folder(folder).label_set()
    requests = judge_requests(easy)
    shared_members = []
    real_score_tails = hf.score_tails

    def counting_score_tails(net, prefix, groups, *args):
        shared_members.extend(m for g in groups for m in g.members)
        return real_score_tails(net, prefix, groups, *args)

    monkeypatch.setattr(hf, "score_tails", counting_score_tails)
    probs = {}
    for reuse in (False, True):
        engine = load_engine("transformers", str(folder), EngineOptions(prefix_reuse=reuse, batch_size=2))
        probs[reuse] = np.array([p.probs for p in engine.label_probs(requests, labels)])
        engine.close()
    # Items with 2, 3 and 4 responses went through the shared prefix; the lone response the plain way.
    assert sorted(shared_members) == list(range(1, len(requests)))
    np.testing.assert_allclose(probs[True], probs[False], rtol=0, atol=TOLERANCE)
    assert np.allclose(probs[True].sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("arch", ["qwen2_vl", "llava"])
def test_in_bfloat16_prefix_reuse_stays_within_bfloat16s_own_error(arch, tiny_model, easy, tmp_path):
    """bfloat16 is the GPU's dtype: there, "identical" means to bfloat16's tolerance. With reuse its
    probabilities are no further from float32's than bfloat16's are without it (here on the CPU: on these tiny
    models bfloat16 alone moves them by about 5e-4)."""
    folder = shutil.copytree(tiny_model(arch), tmp_path / "judge")
    labels = make_judge_folder(folder).label_set()
    requests = judge_requests(easy)
    probs = {}
    for dtype, reuse in (("float32", False), ("bfloat16", False), ("bfloat16", True)):
        engine = load_engine("transformers", str(folder), EngineOptions(prefix_reuse=reuse, batch_size=2,
                                                                         dtype=dtype))
        probs[dtype, reuse] = np.array([p.probs for p in engine.label_probs(requests, labels)])
        engine.close()
    reference = probs["float32", False]
    own_error = np.abs(probs["bfloat16", False] - reference).max()
    assert 0 < own_error < 1e-2
    assert np.abs(probs["bfloat16", True] - reference).max() <= 2 * own_error


def test_a_judge_with_prefix_reuse_labels_as_without(tiny_judge, easy):
    cases = [Case(id=f"{item.id}/{k}", images=easy.image_paths(item), question=item.question, response=ANSWERS[k])
             for item in easy.items[:3] for k in range(4)]
    judged = {}
    for reuse in (False, True):
        with VLMJudge(tiny_judge, options=EngineOptions(prefix_reuse=reuse)) as judge:
            judged[reuse] = judge.judge(cases)
    assert [a.label for a in judged[True]] == [a.label for a in judged[False]]
    assert [a.perception for a in judged[True]] == [a.perception for a in judged[False]]
    np.testing.assert_allclose([a.p_unsafe for a in judged[True]], [a.p_unsafe for a in judged[False]],
                               atol=TOLERANCE)


def test_shared_length_leaves_every_prompt_a_token_of_its_own():
    assert shared_length([[1, 2, 3, 4], [1, 2, 3, 5]]) == 3
    assert shared_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert shared_length([[1, 2, 3], [1, 2, 3, 4, 5]]) == 2
    assert shared_length([[7, 2], [1, 2]]) == 0


def test_requests_group_by_their_images_in_order():
    def request(*images):
        return Request(id="r", messages=({"role": "user", "content": [
            *({"type": "image", "image": im} for im in images), {"type": "text", "text": "q"}]},))

    requests = [request("a.png", "b.png"), request("c.png"), request("a.png", "b.png"), request("b.png", "a.png"),
                request("c.png")]
    assert prefix_groups(requests) == [[0, 2], [1, 4], [3]]


class WordTokenizer:
    """Whitespace tokens: enough to check how groups are planned."""

    def __call__(self, texts):
        vocab: dict[str, int] = {}
        return {"input_ids": [[vocab.setdefault(w, len(vocab)) for w in t.split()] for t in texts]}


def test_only_groups_with_a_long_enough_common_prefix_are_shared():
    rubric = " ".join(f"w{i}" for i in range(20))
    prompts = [f"{rubric} answer one", f"{rubric} answer two", "short a", "short b", f"{rubric} alone"]
    shared, alone = plan_groups(WordTokenizer(), prompts, [[0, 1], [2, 3], [4]])
    assert [g.members for g in shared] == [[0, 1]] and shared[0].shared == 21
    assert alone == [2, 3, 4]
    # An image placeholder after the shared prefix would run without its pixels: not shared.
    image_token = WordTokenizer()([f"{rubric} answer one"])["input_ids"][0][-1]  # "one"
    shared, alone = plan_groups(WordTokenizer(), prompts, [[0, 1]], frozenset({image_token}))
    assert shared == [] and alone == [0, 1]


def test_the_prefix_is_cut_from_the_processor_row_and_a_group_that_does_not_line_up_is_refused():
    # Two groups, left-padded processor rows (pad 0); image placeholder 9 expanded to three 9s by the processor.
    processor_out = {"input_ids": torch.tensor([[0, 5, 9, 9, 9, 6, 7, 8], [5, 9, 9, 9, 6, 7, 3, 4]]),
                     "attention_mask": torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1]]),
                     "pixel_values": torch.ones(2, 3)}
    fits_group = PrefixGroup(members=[0, 1], tokens=[[5, 9, 6, 7, 8], [5, 9, 6, 7, 2]], shared=4)
    wrong_group = PrefixGroup(members=[2, 3], tokens=[[5, 9, 6, 7, 1], [5, 9, 6, 7, 2]], shared=4)
    inputs, fits = prefix_inputs(processor_out, [fits_group, wrong_group], pad_id=0)
    assert fits == [True, False]
    assert inputs["input_ids"][0].tolist() == [5, 9, 9, 9, 6, 7]
    assert inputs["attention_mask"][0].tolist() == [1] * 6 and inputs["attention_mask"][1].tolist() == [0] * 6
    assert inputs["pixel_values"] is processor_out["pixel_values"]
