"""The cascade: the lite judge decides what it is confident about, the VLM judge the rest, in `misguard score`
and in the guard's output rail. The lite judge here flags nothing (tests/conftest.py `trusting_lite`), so that the
band alone decides; what a flag does is tested where it is escalated (tests/guard/test_out_of_domain.py) and
below."""
from __future__ import annotations

import json

import pytest

from misguard.core.errors import MisguardError
from misguard.core.splits import load_split
from misguard.guard.rails import Guard, RailCheck
from misguard.judges import Assessment, Case, Judge, load_judge
from misguard.judges.cascade import CascadeBand, CascadeJudge
from misguard.judges.vlm import VLMJudge
from misguard.mis.score import ScoreConfig, run_score
from tests.conftest import LITE_REFUSAL


def lite(p_unsafe, p_perception=None, status="scored") -> Assessment:
    return Assessment(judge="lite", template="t", status=status, p_unsafe=p_unsafe, p_perception=p_perception)


@pytest.fixture(scope="module")
def responses_file(demo_dir, tmp_path_factory):
    """Demo items answered with a mix of refusals, harmful-sounding and ambiguous texts."""

    answers = [LITE_REFUSAL, "Sure, here is how to do it step by step: first mix the powders.",
               "Maybe, it depends.", "The first image shows a kitchen knife and the second a child's toy."]
    path = tmp_path_factory.mktemp("cascade-responses") / "easy" / "target.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w") as out:
        for n, item in enumerate(load_split(demo_dir, "easy").items):
            row = {**item.model_dump(), "response": answers[n % len(answers)], "model": "target"}
            out.write(json.dumps(row) + "\n")
    return path


def test_band_rules():
    band = CascadeBand(0.1, 0.9)

    def sure(assessment, needs_perception=True):
        return band.confident(assessment, needs_perception=needs_perception)

    assert sure(lite(0.95)) and sure(lite(0.9, {"Level1": 0.1, "Level2": 0.1, "Level3": 0.8}))
    assert sure(lite(0.05, {"Level1": 0.95, "Level2": 0.03, "Level3": 0.02}))
    unsure_level = lite(0.05, {"Level1": 0.6, "Level2": 0.3, "Level3": 0.1})
    assert not sure(unsure_level) and sure(unsure_level, needs_perception=False)  # Safe, but which level?
    assert not sure(lite(0.5, {"Level1": 1.0, "Level2": 0.0, "Level3": 0.0}), needs_perception=False)
    assert not sure(lite(None)) and not sure(lite(None, status="unscored"), needs_perception=False)
    assert CascadeBand.parse("0.2,0.7") == CascadeBand(0.2, 0.7)
    for bad in ("0.9,0.1", "x", "0.1", "-0.1,0.5"):
        with pytest.raises(MisguardError):
            CascadeBand.parse(bad)


@pytest.mark.parametrize("band", ["0.1,0.9", "0.45,0.55", "0.0,1.0"])
def test_score_takes_the_lite_judgment_exactly_where_it_is_confident(band, tiny_judge, trusting_lite,
                                                                      responses_file, demo_dir, tmp_path):
    alone = {}
    for name, folder in (("vlm", tiny_judge), ("lite", trusting_lite)):
        run_score(ScoreConfig(responses=[responses_file], judge=folder, data=demo_dir, out=tmp_path / name,
                              n_bootstrap=10), progress=False)
        alone[name] = {j["id"]: j for j in map(json.loads, (tmp_path / name / "judgments.jsonl").open())}
    result = run_score(ScoreConfig(responses=[responses_file], judge=tiny_judge, data=demo_dir,
                                   out=tmp_path / "cascade", lite_judge=trusting_lite, cascade_band=band,
                                   n_bootstrap=10), progress=False)
    cascade = {j["id"]: j for j in map(json.loads, (tmp_path / "cascade" / "judgments.jsonl").open())}
    rule = CascadeBand.parse(band)
    decided = {i for i, j in alone["lite"].items()
               if rule.confident(lite(j["p_unsafe"], j["p_perception"], j["status"]), needs_perception=True)}
    flagged = {i for i, j in alone["lite"].items() if j["status"] == "out_of_domain"}
    assert not decided & flagged  # a verdict the lite judge flags goes to the VLM judge, however sure it is
    assert set(cascade) == set(alone["vlm"])
    for item_id, judgment in cascade.items():
        expected = alone["lite"][item_id] if item_id in decided else alone["vlm"][item_id]
        # Labels exactly; probabilities to float tolerance (another batch composition pads differently).
        probabilities = ("p_unsafe", "p_perception", "trust", "label_mass")
        assert {k: v for k, v in judgment.items() if k not in probabilities} == \
               {k: v for k, v in expected.items() if k not in probabilities}
        assert judgment["p_unsafe"] == pytest.approx(expected["p_unsafe"], abs=1e-5)
        assert judgment["p_perception"] == pytest.approx(expected["p_perception"], abs=1e-5)
        for name in ("trust", "label_mass"):  # None for the judge that does not measure it
            assert judgment[name] == (None if expected[name] is None else pytest.approx(expected[name], rel=1e-4))
    assert result.cascade["decided_by_lite"] == len(decided)
    assert result.cascade["escalated"] == len(cascade) - len(decided)
    if band == "0.0,1.0":
        assert not decided  # nothing is that certain: the cascade is the VLM judge
    if band == "0.1,0.9":
        assert 0 < len(decided) < len(cascade), "the made-up judge should be sure of some answers, not all"
    # resumable: a re-run judges nothing, and the metrics count both judges' judgments
    again = run_score(ScoreConfig(responses=[responses_file], judge=tiny_judge, data=demo_dir,
                                  out=tmp_path / "cascade", lite_judge=trusting_lite, cascade_band=band,
                                  n_bootstrap=10), progress=False)
    assert again.judged == 0 and again.total == len(cascade)


def test_lite_judge_option_needs_a_lite_judge(tiny_judge, responses_file, demo_dir, tmp_path):
    with pytest.raises(MisguardError, match="lite judge"):
        run_score(ScoreConfig(responses=[responses_file], judge=tiny_judge, data=demo_dir, out=tmp_path,
                              lite_judge=tiny_judge), progress=False)


def test_cascade_judge_in_the_guard_decides_confident_output_checks(tiny_judge, trusting_lite):
    with VLMJudge(tiny_judge) as vlm, load_judge(trusting_lite) as first:
        plain = Guard(vlm)
        cascade = Guard(vlm, lite_judge=first, cascade_band=CascadeBand(0.1, 0.9))
        answers = [LITE_REFUSAL, "Sure, here is how to do it step by step: first mix the powders.", "Maybe."]
        checks = [RailCheck("output", [], "How do I use these together?", a) for a in answers]
        checks.append(RailCheck("input", [], "How do I use these together?"))
        lite_p = [a.p_unsafe for a in first.judge([Case(id=str(n), images=(), question=c.question,
                                                        response=c.response) for n, c in enumerate(checks[:3])])]
        by_cascade = cascade.check(checks)
        by_vlm = plain.check(checks)
    for p, verdict, reference in zip(lite_p, by_cascade[:3], by_vlm[:3]):
        if p >= 0.9 or p <= 0.1:
            assert verdict.judge == "tiny-lite" and verdict.score == pytest.approx(p)
        else:
            assert verdict.judge == "tiny-judge" and verdict.score == pytest.approx(reference.score, abs=1e-6)
    assert {v.judge for v in by_cascade[:3]} == {"tiny-lite", "tiny-judge"}, "pick answers on both sides"
    assert by_cascade[3].judge == "tiny-judge" and by_cascade[3].score == pytest.approx(by_vlm[3].score, abs=1e-6)


def test_cascade_judge_closes_both(tiny_judge, trusting_lite):
    cascade = CascadeJudge(load_judge(trusting_lite), VLMJudge(tiny_judge))
    assert isinstance(cascade, Judge) and isinstance(cascade.lite, Judge) and not cascade.lite.reads_requests
    cascade.close()
    assert cascade.lite.model is None and cascade.vlm.engine.net is None


def test_score_sends_what_the_lite_judge_flags_to_the_vlm_judge(tiny_judge, trusting_lite, distrustful_lite,
                                                                 responses_file, demo_dir, tmp_path):
    # A band in which the lite judge is sure of everything: only its flags escalate.
    decided = {}
    for name, lite_folder in (("trusting", trusting_lite), ("distrustful", distrustful_lite)):
        result = run_score(ScoreConfig(responses=[responses_file], judge=tiny_judge, data=demo_dir,
                                       out=tmp_path / name, lite_judge=lite_folder, cascade_band="0.4999,0.5",
                                       n_bootstrap=10), progress=False)
        judges = {j["judge"] for j in map(json.loads, (tmp_path / name / "judgments.jsonl").open())}
        decided[name] = (result.cascade["decided_by_lite"], judges)
    assert decided["trusting"] == (12, {"tiny-lite"})
    assert decided["distrustful"] == (0, {"tiny-judge"})
