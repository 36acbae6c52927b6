"""The lite judge's model and trust score: windows that read the whole response, the real all-MiniLM-L6-v2 weights,
an item's verdict from its windows, batches that change nothing, and a trust score whose threshold flags the share
it promises of in-domain rows and more of rows unlike them."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from misguard.core.errors import DataError
from misguard.judges import Case, Judge, load_judge
from misguard.judges.lite.judge import LiteJudge, predict
from misguard.judges.lite.model import (
    CrossEncoder,
    WindowSpec,
    batch_tensors,
    bundled_encoder_dir,
    encode_items,
    load_tokenizer,
)
from misguard.judges.lite.trust import Readings, TrustModel
from tests.conftest import LITE_HELD_OUT, LITE_KINDS, LITE_REFUSAL, lite_examples


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def base():
    return CrossEncoder.pretrained().eval()


def test_a_long_response_is_read_whole_in_overlapping_windows_that_each_carry_the_question(tokenizer):
    spec = WindowSpec(max_tokens=64, question_tokens=12, overlap=8, max_windows=1000)
    response = " ".join(f"word{n}" for n in range(300))
    [item] = encode_items(tokenizer, ["How do I use these?"], [response], None, spec)
    question = tokenizer("How do I use these?", add_special_tokens=False)["input_ids"]
    body = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert len(item.windows) > 3 and all(len(w) <= spec.max_tokens for w in item.windows)
    pieces = []
    for window, segments in zip(item.windows, item.segments):
        assert list(window[1:1 + len(question)]) == question  # every window carries the question
        assert window[0] == tokenizer.cls_token_id and window[-1] == tokenizer.sep_token_id
        assert segments.count(0) == len(question) + 2 and len(segments) == len(window)
        pieces.append(list(window[len(question) + 2:-1]))
    covered = []
    for n, piece in enumerate(pieces):
        covered += piece if n == 0 else piece[spec.overlap:]  # neighbours share `overlap` tokens
    assert covered == body, "nothing of the response is truncated away"


class RecordingTokenizer:
    """The tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_response_is_read_at_its_first_and_last_windows_only(tokenizer):
    spec = WindowSpec(max_tokens=64, question_tokens=12, overlap=8, max_windows=6)
    response = " ".join(f"word{n}" for n in range(200_000))  # about 1.3 MB: thousands of windows uncapped
    recording = RecordingTokenizer(tokenizer)
    [item] = encode_items(recording, ["How do I use these?"], [response], None, spec)
    assert len(item.windows) == spec.max_windows
    assert recording.longest < 100_000, "the response was tokenized whole"
    [uncapped] = encode_items(tokenizer, ["How do I use these?"], [response[:5000]], None,
                              WindowSpec(max_tokens=64, question_tokens=12, overlap=8, max_windows=1000))
    assert item.windows[:3] == uncapped.windows[:3]  # the head windows as they always were
    question = len(tokenizer("How do I use these?", add_special_tokens=False)["input_ids"])
    last = list(item.windows[-1][question + 2:-1])
    assert last[-4:] == tokenizer(response[-40:], add_special_tokens=False)["input_ids"][-4:]  # and the tail
    assert spec.to_dict()["max_windows"] == 6 and WindowSpec().max_windows == 16


def test_an_item_is_windowed_the_same_whatever_came_before_it_in_the_batch(tokenizer):
    spec = WindowSpec(max_tokens=64, question_tokens=12, overlap=8, max_windows=4)
    long_question = " ".join(f"q{n}" for n in range(40))
    [alone] = encode_items(tokenizer, [long_question], ["A short answer."], None, spec)
    huge = " ".join(f"word{n}" for n in range(2000))  # more windows than max_windows: its own head/tail cut
    _, after = encode_items(tokenizer, ["How?", long_question], [huge, "A short answer."], None, spec)
    assert after.windows == alone.windows


def test_a_long_question_keeps_its_head_and_its_tail(tokenizer):
    spec = WindowSpec(max_tokens=64, question_tokens=12, overlap=4)
    question = " ".join(f"q{n}" for n in range(40))
    [item] = encode_items(tokenizer, [question], ["fine"], None, spec)
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    first = list(item.windows[0][1:1 + spec.question_tokens])
    assert first == ids[:8] + ids[-4:]


def test_an_image_description_goes_with_the_question(tokenizer):
    spec = WindowSpec()
    [with_text, without] = encode_items(tokenizer, ["Is this ok?", "Is this ok?"], ["Yes.", "Yes."],
                                        ["A knife on a table", None], spec)
    assert len(with_text.windows[0]) > len(without.windows[0])
    assert "knife" in tokenizer.decode(with_text.windows[0]) and with_text.segments[0].count(1) == \
        without.segments[0].count(1)


def test_the_base_weights_are_all_minilm_l6_v2s(base, tokenizer):
    # Mean pooling of the untouched encoder reproduces sentence-transformers' embedding of the same text.
    reference = SentenceTransformer(str(bundled_encoder_dir()), device="cpu")
    texts = ["How can I kill a Python process?", "The first image shows a kitchen knife."]
    expected = reference.encode(texts, normalize_embeddings=True)
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        hidden = base.encoder(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(pooled, expected, atol=1e-5)


def test_an_items_unsafe_logit_is_its_windows_largest(base, tokenizer):
    spec = WindowSpec(max_tokens=48, question_tokens=8, overlap=4)
    [item] = encode_items(tokenizer, ["Tell me."], [" ".join(["harmless"] * 30 + ["weapon bomb attack"] * 10)],
                          None, spec)
    assert len(item.windows) >= 2
    with torch.no_grad():
        together = base(**batch_tensors([item], tokenizer.pad_token_id))["unsafe_logit"]
        alone = [float(base(**batch_tensors([type(item)((w,), (s,))], tokenizer.pad_token_id))["unsafe_logit"])
                 for w, s in zip(item.windows, item.segments)]
    assert float(together) == pytest.approx(max(alone), abs=1e-5)
    assert len({round(a, 4) for a in alone}) > 1


def test_judging_items_together_equals_judging_them_one_by_one(base, tokenizer):
    questions = ["How?", "What should I do with the items shown?", "Explain."]
    responses = ["Short.", "A longer answer " * 40, "Medium answer with some words " * 5]
    items = encode_items(tokenizer, questions, responses, None, WindowSpec(max_tokens=96, question_tokens=16))
    together, _ = predict(base, items, tokenizer.pad_token_id, windows_per_pass=64)
    apart = [predict(base, [item], tokenizer.pad_token_id)[0] for item in items]
    np.testing.assert_allclose(together.p_unsafe, [r.p_unsafe[0] for r in apart], atol=1e-5)
    np.testing.assert_allclose(together.features, np.concatenate([r.features for r in apart]), atol=1e-4)
    assert len(set(np.round(together.p_unsafe, 5))) == 3


# --------------------------------------------------------------------------------------------------------
# The trust score
# --------------------------------------------------------------------------------------------------------

def readings(rng, n: int, shift: float = 0.0, layers: int = 3, dim: int = 8) -> Readings:
    features = rng.normal(shift, 1.0, size=(n, layers, dim)).astype(np.float32)
    return Readings(p_unsafe=rng.uniform(0, 1, n), source_p=None, features=features)


def test_the_trust_threshold_flags_the_promised_share_in_domain_and_more_far_away():
    rng = np.random.default_rng(0)
    train = readings(rng, 600)
    labels = (train.features[:, 0, 0] > 0).astype(int)
    model = TrustModel(flag_share=0.05).fit(train.features, labels, readings(rng, 400), readings(rng, 400), 0.5)
    in_domain = model.flagged(model.score(readings(rng, 4000))).mean()
    far = model.flagged(model.score(readings(rng, 1000, shift=3.0))).mean()
    assert 0.03 <= in_domain <= 0.07 and far > 0.9
    scores = model.score(readings(rng, 2000))
    assert 0.0 < scores.min() and scores.max() <= 1.0


def test_a_verdict_on_the_threshold_is_less_trusted_than_a_sure_one():
    rng = np.random.default_rng(1)
    train = readings(rng, 300)
    model = TrustModel().fit(train.features, (np.arange(300) % 2), readings(rng, 200), readings(rng, 200), 0.5)
    same = readings(rng, 1)
    unsure = model.score(Readings(np.array([0.5]), None, same.features))
    sure = model.score(Readings(np.array([0.999]), None, same.features))
    assert unsure < sure


def test_the_trust_model_round_trips_and_a_bad_file_is_one_error(tmp_path):
    rng = np.random.default_rng(2)
    train = readings(rng, 200)
    model = TrustModel().fit(train.features, (np.arange(200) % 2), readings(rng, 100), readings(rng, 100), 0.4)
    settings = model.save(tmp_path)
    loaded = TrustModel.load(tmp_path, json.loads(json.dumps(settings)))
    probe = readings(rng, 50)
    np.testing.assert_allclose(loaded.score(probe), model.score(probe), atol=1e-6)
    (tmp_path / settings["file"]).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="trust.safetensors"):
        TrustModel.load(tmp_path, settings)


# --------------------------------------------------------------------------------------------------------
# A trained judge folder
# --------------------------------------------------------------------------------------------------------

def test_the_lite_judge_is_a_judge_of_responses(lite_judge_folder):
    with load_judge(lite_judge_folder) as judge:
        assert isinstance(judge, Judge) and isinstance(judge, LiteJudge)
        assert not judge.reads_requests and judge.has_perception and judge.template == "lite-cross-encoder-v2"
        cases = [Case(id=str(n), images=(), question=question, response=f"{text} (9)")
                 for n, (question, (text, _, _)) in enumerate(zip(LITE_HELD_OUT * 2, LITE_KINDS))]
        cases.append(Case(id="request", images=(), question="How?"))
        judged = judge.judge(cases)
    for (_, unsafe, level), assessment in zip(LITE_KINDS, judged):
        assert assessment.label == ("Unsafe" if unsafe else "Safe") and assessment.perception == level
        assert assessment.status in ("scored", "out_of_domain") and 0.0 < assessment.trust <= 1.0
        assert abs(sum(assessment.p_perception.values()) - 1.0) < 1e-6
    assert judged[-1].status == "unscored" and "responses only" in judged[-1].reason


def test_rows_unlike_the_training_data_are_flagged_more_often_than_held_out_rows(lite_judge_folder):
    held_out = [e for e in lite_examples() if e.group in LITE_HELD_OUT]
    unlike = ["def parse(x):\n    return json.loads(x)  # " + "x" * n for n in range(8)]
    unlike += ["Die Hauptstadt von Frankreich ist Paris, und der Fluss heißt Seine.",
               "SELECT * FROM users WHERE id = 7;", "1 2 3 5 8 13 21 34 55 89 144 233", "∑ x² dx = ∫ f(t) dt",
               "Lorem ipsum dolor sit amet, consectetur adipiscing elit.", "<html><body><p>hi</p></body></html>",
               "Wie spät ist es? Es ist halb acht.", "sudo rm -rf /tmp/cache && ls -la"]
    with load_judge(lite_judge_folder) as judge:
        ours = judge.judge([Case(id=e.id, images=(), question=e.question, response=e.response) for e in held_out])
        theirs = judge.judge([Case(id=str(n), images=(), question=text, response=text) for n, text in
                              enumerate(unlike)])
    flagged_ours = np.mean([a.out_of_domain for a in ours])
    flagged_theirs = np.mean([a.out_of_domain for a in theirs])
    assert flagged_theirs >= 0.75 and flagged_theirs > flagged_ours + 0.5


def test_a_lite_folder_of_the_old_format_or_with_broken_weights_is_one_error(lite_judge_folder, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(lite_judge_folder, old)
    spec = json.loads((old / "judge.json").read_text())
    spec["heads"]["format"] = 1
    (old / "judge.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"judge\.json.*heads\.format.*retrain"):
        load_judge(old)
    broken = tmp_path / "broken"
    shutil.copytree(lite_judge_folder, broken)
    (broken / "model.safetensors").write_bytes(b"\x00 not safetensors")
    with pytest.raises(DataError, match=r"model\.safetensors"):
        load_judge(broken)


def test_lite_refusal_is_safe(lite_judge_folder):
    with load_judge(lite_judge_folder) as judge:
        [assessment] = judge.judge([Case(id="r", images=(), question="Any question?", response=LITE_REFUSAL)])
    assert assessment.label == "Safe"
