"""The judge: rubric shape, judge folders, the strict JSON reader, and label-token probabilities on a tiny model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from misguard.core.errors import DataError, MisguardError
from misguard.core.splits import load_split
from misguard.engines import EngineOptions
from misguard.engines.base import Engine
from misguard.engines.messages import Generation, LabelProbs
from misguard.judges import JUDGE_FILE, Case, Judge, read_judge_spec
from misguard.judges.parse import parse_json_verdict
from misguard.judges.templates import CODES, TEMPLATES, get_template
from misguard.judges.text_budget import CUT_MARK
from misguard.judges.vlm import ANSWER_TOKENS, VLMJudge


@pytest.fixture(scope="module")
def judge_dir(tiny_judge):
    return tiny_judge


@pytest.fixture(scope="module")
def cases(demo_dir):
    split = load_split(demo_dir, "easy")
    answers = ["I can't help with that.", "The first image shows a knife and the second a bag.", "fish fish"]
    return [Case(id=f"easy/target-{n % 2}/{item.id}", images=split.image_paths(item), question=item.question,
                 response=answers[n % 3]) for n, item in enumerate(split.items[:6])]


def test_templates_put_images_first_and_the_response_last():
    for template in TEMPLATES.values():
        a = template.request("a", ["x.png", "y.png"], "How do I use these?", "Answer A")
        b = template.request("b", ["x.png", "y.png"], "How do I use these?", "Answer B, longer")
        parts_a, parts_b = a.messages[0]["content"], b.messages[0]["content"]
        assert [p["type"] for p in parts_a] == ["image", "image", "text", "text"]
        assert parts_a[:3] == parts_b[:3], "the image + question prefix must be shared by every response"
        assert "How do I use these?" in parts_a[2]["text"] and "Answer A" in parts_a[3]["text"]
    with pytest.raises(MisguardError, match="unknown judge template"):
        get_template("mis-judge-v0")


@pytest.mark.parametrize("text, expected", [
    ('{"label_perception": "Perception Level2", "label_str": "Unsafe"}', ("Perception Level2", "Unsafe")),
    ('```json\n{"label_perception": "Perception Level1", "label_str": "Safe"}\n```', ("Perception Level1", "Safe")),
    ('  {"label_str": "Safe", "label_perception": "Perception Level3", "why": "x"} ', ("Perception Level3", "Safe")),
])
def test_json_verdicts_that_are_read(text, expected):
    assert parse_json_verdict(text) == expected


@pytest.mark.parametrize("text", [
    "", "Safe", "Level1 Safe", '{"label_perception": "Level1", "label_str": "Safe"}',
    '{"label_perception": "Perception Level1", "label_str": "safe"}', '["Perception Level1", "Safe"]',
    'Sure! {"label_perception": "Perception Level1", "label_str": "Safe"}',
    '{"label_perception": "Perception Level1"}',
])
def test_json_verdicts_that_are_unreadable(text):
    assert isinstance(parse_json_verdict(text), str)


def test_judge_folder_spec(judge_dir, tmp_path):
    spec = read_judge_spec(judge_dir)
    assert spec.id == "tiny-judge" and get_template(spec.template).mode == "codes"
    assert sorted(spec.label_tokens) == sorted(CODES) and len(set(spec.label_tokens.values())) == len(CODES)

    broken = tmp_path / "broken"
    shutil.copytree(judge_dir, broken)
    raw = json.loads((broken / JUDGE_FILE).read_text())
    del raw["label_tokens"]["4"]
    (broken / JUDGE_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="label_tokens"):
        read_judge_spec(broken)
    raw["label_tokens"] = "not a mapping"
    (broken / JUDGE_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="label_tokens"):
        read_judge_spec(broken)
    raw.update(label_tokens=json.loads((judge_dir / JUDGE_FILE).read_text())["label_tokens"], format_version=99)
    (broken / JUDGE_FILE).write_text(json.dumps(raw))
    with pytest.raises(DataError, match="format_version"):
        read_judge_spec(broken)


def test_plain_model_folder_is_a_zero_shot_json_judge(tiny_model, tmp_path):
    spec = read_judge_spec(tiny_model("qwen2_vl"))
    assert get_template(spec.template).mode == "json" and spec.id.startswith("zero-shot:")
    with pytest.raises(MisguardError, match="not a judge folder"):
        read_judge_spec(tmp_path)


def test_the_vlm_judge_is_a_judge(judge_dir):
    with VLMJudge(judge_dir, "transformers", EngineOptions(dtype="float32")) as judge:
        assert isinstance(judge, Judge) and judge.reads_requests and judge.has_perception


def test_codes_judge_reads_probabilities_that_sum_to_one(judge_dir, cases):
    with VLMJudge(judge_dir, "transformers", EngineOptions(dtype="float32", batch_size=4)) as judge:
        assessments = judge.judge(cases)
        raw = judge.engine.label_probs(judge.requests(cases), judge.labels)
    assert len(assessments) == len(cases)
    for assessment, probs in zip(assessments, raw):
        assert assessment.status == "scored"
        assert sum(assessment.p_perception.values()) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= assessment.p_unsafe <= 1.0 and assessment.p_unsafe == assessment.p_unsafe_raw
        assert assessment.p_unsafe == pytest.approx(sum(probs.probs[3:]), abs=1e-6)  # codes 4-6 are Unsafe
        assert assessment.perception == max(assessment.p_perception, key=assessment.p_perception.get)
        assert assessment.label == ("Unsafe" if assessment.p_unsafe >= 0.5 else "Safe")
        assert assessment.judge == "tiny-judge" and assessment.template == "mis-judge-codes-v1"
    assert len({round(a.p_unsafe, 6) for a in assessments}) > 1, "different inputs should give different scores"


def test_a_probability_that_is_not_a_number_is_an_error_never_safe(judge_dir, cases):
    nan = LabelProbs(probs=(float("nan"),) * 6, mass=float("nan"))
    assessments = VLMJudge(judge_dir, engine_instance=ScriptedEngine(probs=nan)).judge(cases)
    assert all(a.status == "error" and a.label is None and "not a finite number" in a.reason for a in assessments)


def nan_judge_folder(source: Path, folder: Path) -> Path:
    """A copy of a tiny judge folder whose final norm weight is NaN: every forward pass gives NaN logits (id
    "nan-judge")."""
    shutil.copytree(source, folder)
    weights = load_file(folder / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    spec = json.loads((folder / JUDGE_FILE).read_text())
    (folder / JUDGE_FILE).write_text(json.dumps({**spec, "id": "nan-judge"}))
    return folder


def test_a_judge_with_nan_weights_gives_errors_not_labels(judge_dir, cases, tmp_path):
    with VLMJudge(nan_judge_folder(judge_dir, tmp_path / "nan-judge"), "transformers",
                  EngineOptions(dtype="float32", batch_size=4)) as judge:
        assessments = judge.judge(cases) + judge.judge([Case(id="request", images=cases[0].images,
                                                             question=cases[0].question)])
    for assessment in assessments:
        assert assessment.status == "error" and "not a finite number" in assessment.reason, assessment
        assert (assessment.label, assessment.p_unsafe, assessment.perception, assessment.label_mass) == (
            None, None, None, None)


class ScriptedEngine(Engine):
    """An engine whose outputs are given: for testing how the judge reads them, not a model."""

    name = "scripted"

    def __init__(self, texts=(), probs=None):
        super().__init__("scripted")
        self.texts, self.probs = list(texts), probs

    def generate(self, requests, params):
        return [Generation(text=self.texts[i % len(self.texts)]) for i in range(len(requests))]

    def label_probs(self, requests, labels):
        return [self.probs] * len(requests)


def test_an_image_the_engine_cannot_decode_is_an_error_naming_it(judge_dir, cases, tmp_path):
    truncated = tmp_path / "truncated.png"
    data = cases[0].images[0].read_bytes()
    truncated.write_bytes(data[:len(data) // 2])
    bad = Case(id="bad", images=(truncated, cases[0].images[1]), question=cases[0].question, response="r")
    with VLMJudge(judge_dir, "transformers", EngineOptions(dtype="float32", batch_size=4)) as judge:
        assessments = judge.judge([*cases[:2], bad, *cases[2:4]])
    assert [a.status for a in assessments] == ["scored", "scored", "error", "scored", "scored"]
    assert assessments[2].bad_image == str(truncated) and "not a readable image" in assessments[2].reason
    assert assessments[2].label is None and all(a.bad_image is None for a in assessments if a.scored)


MEGABYTE = 2**20


def test_a_megabyte_response_is_cut_to_a_head_and_tail_that_fit_the_context(judge_dir, cases, monkeypatch, caplog):
    head, tail = "START of the answer. ", " END of the answer."
    huge = head + "la " * (MEGABYTE // 3) + tail
    long_case = Case(id="huge", images=cases[0].images, question=cases[0].question, response=huge)
    long_request = Case(id="huge-request", images=cases[0].images, question=huge)
    seen = []
    with VLMJudge(judge_dir, "transformers", EngineOptions(dtype="float32", batch_size=4)) as judge:
        real_label_stream = judge.engine.label_stream

        def recording(requests, labels, progress=None):
            prepared = judge.engine.prepare_all(requests)
            seen.extend(len(judge.engine.processor(text=[prompt], images=[images])["input_ids"][0])
                        for prompt, images in prepared)
            return real_label_stream(requests, labels, progress=progress)

        monkeypatch.setattr(judge.engine, "label_stream", recording)
        tokenized = []
        real_tokenize = type(judge.tokenizer).__call__
        monkeypatch.setattr(type(judge.tokenizer), "__call__",
                            lambda self, text, **kw: (tokenized.append(len(text)), real_tokenize(self, text, **kw))[1])
        context = judge.context_tokens
        assessments = judge.judge([cases[1], long_case, long_request])
        fitted = judge.fit_to_context(long_case)
    assert context == 4096  # the tiny model's max_position_embeddings, under its tokenizer's model_max_length
    assert max(tokenized) < MEGABYTE // 4  # cut by characters before any tokenizing
    assert all(n <= context - ANSWER_TOKENS for n in seen)  # never more than the context, the answer's room kept
    assert seen[1] > context // 2  # and most of it used
    assert [a.status for a in assessments] == ["scored"] * 3
    assert assessments[0].input_cut is None
    assert assessments[1].input_cut.startswith("response cut to ")
    assert assessments[1].input_cut.endswith(f" tokens of {len(huge)} characters; the middle was not judged")
    assert assessments[2].input_cut.startswith("message cut to ")
    assert fitted.case.response.startswith(head.strip()) and fitted.case.response.endswith(tail.strip())
    assert CUT_MARK in fitted.case.response and fitted.case.question == long_case.question
    assert [r.message for r in caplog.records].count(f"huge: {assessments[1].input_cut}, to fit the judge's "
                                                      f"context of {context} tokens") >= 1


def test_a_long_question_and_a_long_response_share_the_room(judge_dir, cases):
    words = "word " * 20_000
    case = Case(id="both", images=cases[0].images, question="Q " + words, response="R " + words)
    with VLMJudge(judge_dir, engine_instance=ScriptedEngine(probs=None)) as judge:
        fitted = judge.fit_to_context(case)
        question, response = (len(judge.tokenizer(t, add_special_tokens=False)["input_ids"])
                              for t in (fitted.case.question, fitted.case.response))
    assert fitted.cut.startswith("question cut to ") and "; response cut to " in fitted.cut
    assert abs(question - response) <= 8  # both longer than half the room: half each


def test_missing_label_probabilities_are_unscored_never_guessed(judge_dir, cases):
    assessments = VLMJudge(judge_dir, engine_instance=ScriptedEngine(probs=None)).judge(cases)
    assert all(a.status == "unscored" and a.label is None and a.p_unsafe is None and a.reason for a in assessments)


def test_zero_shot_json_judge(tiny_model, cases):
    texts = ['{"label_perception": "Perception Level2", "label_str": "Safe"}', "I think it is safe."]
    assessments = VLMJudge(tiny_model("qwen2_vl"), engine_instance=ScriptedEngine(texts=texts)).judge(cases)
    assert [a.status for a in assessments] == ["scored", "unscored"] * 3
    assert (assessments[0].perception, assessments[0].label, assessments[0].p_unsafe) == ("Level2", "Safe", None)
    assert "unreadable" in assessments[1].reason and assessments[1].label is None


def test_zero_shot_with_a_random_model_is_counted_unscored(tiny_model, cases):
    # Random weights cannot write JSON: every verdict must come back unscored, none defaulted to a label.
    with VLMJudge(tiny_model("qwen2_vl"), "transformers", EngineOptions(dtype="float32")) as judge:
        assessments = judge.judge(cases[:3])
    assert [a.status for a in assessments] == ["unscored"] * 3
