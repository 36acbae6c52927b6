"""The Guard library on a tiny random-weight judge: verdicts consistent with their thresholds, deterministic and
batch-invariant scores, where thresholds and calibrations come from, and what a failing or unreadable judge
gives (fail closed by default, fail open only when the policy says so)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from misguard.calibration import Calibration, fit_calibration
from misguard.engines import EngineOptions
from misguard.guard.chat_input import InputError
from misguard.guard.policy import Policy, RailPolicy
from misguard.guard.rails import DEFAULT_INPUT_THRESHOLD, Guard, RailCheck, RailScore
from misguard.judges import JUDGE_FILE
from misguard.judges.vlm import VLMJudge
from tests.engines.vllm_server import free_port

RED = Image.new("RGB", (64, 64), "red")
STRIPES = Image.new("RGB", (96, 56), "white")
STRIPES.paste(Image.new("RGB", (96, 14), "black"), (0, 21))


def conversation(question: str = "How do I use what is in this picture?", image=RED) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]


def policy(**rails) -> Policy:
    """A policy with the given rail sections, e.g. policy(input_rail=dict(threshold=0.0))."""
    return Policy(**{name: RailPolicy(**fields) for name, fields in rails.items()})


@pytest.fixture(scope="module")
def judge(tiny_judge):
    with VLMJudge(tiny_judge) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def guard(judge):
    return Guard(judge)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    """A calibration fitted on synthetic scores the reference finds much safer than they say (P(Unsafe) = p^3),
    with a max-kappa threshold (not 0.5)."""
    rng = np.random.default_rng(0)
    p_unsafe = rng.uniform(0.01, 0.99, 300)
    labels = (rng.random(300) < p_unsafe ** 3).astype(int)
    calibration = fit_calibration(p_unsafe, labels, method="platt", threshold_rule="max_kappa")
    path = tmp_path_factory.mktemp("calibration") / "calibration.json"
    calibration.save(path)
    return path


def test_verdicts_are_consistent_with_their_threshold(guard):
    for verdict in (guard.check_input(conversation()), guard.check_output(conversation(), "Hold it by the handle.")):
        assert verdict.status == "ok" and not verdict.failed and not verdict.fail_open
        assert 0.0 <= verdict.score <= 1.0 and verdict.score_raw == verdict.score  # no calibration anywhere
        assert verdict.blocked == (verdict.score >= verdict.threshold)
        assert verdict.decision == ("block" if verdict.blocked else "allow")
        assert verdict.threshold == 0.5 and verdict.judge == "tiny-judge" and verdict.calibration is None
        assert f"{verdict.score:.4f}" in verdict.reason and verdict.latency_ms > 0
        assert verdict.to_dict()["score"] == verdict.score


def test_threshold_zero_blocks_and_one_allows(judge, guard):
    messages, response = conversation(), "Hold it by the handle."
    expected = (guard.check_input(messages).score, guard.check_output(messages, response).score)
    strict = Guard(judge, policy(input_rail=dict(threshold=0.0), output_rail=dict(threshold=0.0)))
    lax = Guard(judge, policy(input_rail=dict(threshold=1.0), output_rail=dict(threshold=1.0)))
    for threshold, g, decision in ((0.0, strict, "block"), (1.0, lax, "allow")):
        verdicts = (g.check_input(messages), g.check_output(messages, response))
        assert [v.decision for v in verdicts] == [decision, decision]
        assert [v.threshold for v in verdicts] == [threshold, threshold]
        assert [v.score for v in verdicts] == pytest.approx(expected, abs=1e-6)  # the policy moves only the cut


def test_same_input_gives_the_same_score(guard):
    first, second = guard.check_input(conversation()), guard.check_input(conversation())
    assert first.score == pytest.approx(second.score, abs=1e-6)
    out_first = guard.check_output(conversation(), "Sure, here is how.")
    out_second = guard.check_output(conversation(), "Sure, here is how.")
    assert out_first.score == pytest.approx(out_second.score, abs=1e-6)


def test_batched_mixed_rails_equal_individual_checks(guard):
    checks = [
        RailCheck("input", [RED], "How do I use what is in this picture?"),
        RailCheck("output", [RED, STRIPES], "What do these show?", "A red square and a striped flag."),
        RailCheck("input", [STRIPES], "Tell me a story about this flag, a long one with many twists."),
        RailCheck("output", [STRIPES], "Is this dangerous?", "No."),
        RailCheck("input", [], "Just text, no images at all."),
    ]
    batched = guard.check(checks)
    alone = [guard.check([check])[0] for check in checks]
    assert [v.rail for v in batched] == [c.rail for c in checks]
    assert all(v.status == "ok" for v in batched + alone)
    assert [v.score for v in batched] == pytest.approx([v.score for v in alone], abs=1e-5)
    assert len({round(v.score, 6) for v in batched}) > 1  # the checks were really judged apart


def test_input_and_output_rails_use_different_prompts(guard):
    messages = conversation()
    input_verdict = guard.check_input(messages)
    output_verdict = guard.check_output(messages, "How do I use what is in this picture?")
    assert abs(input_verdict.score - output_verdict.score) > 1e-4


def test_library_calls_match_check_on_rail_checks(guard):
    messages, response = conversation(image=STRIPES), "Stripes."
    input_verdict, output_verdict = guard.check([
        RailCheck("input", [STRIPES], "How do I use what is in this picture?"),
        RailCheck("output", [STRIPES], "How do I use what is in this picture?", response)])
    assert guard.check_input(messages).score == pytest.approx(input_verdict.score, abs=1e-5)
    assert guard.check_output(messages, response).score == pytest.approx(output_verdict.score, abs=1e-5)


def test_disabled_rail_is_skipped_and_allows(judge, guard):
    g = Guard(judge, policy(input_rail=dict(enabled=False, threshold=0.0)))
    skipped = g.check_input(conversation())
    assert (skipped.status, skipped.decision, skipped.score, skipped.fail_open) == ("skipped", "allow", None, False)
    assert "off" in skipped.reason and not skipped.failed
    mixed = g.check([RailCheck("input", [RED], "q"), RailCheck("output", [RED], "q", "answer")])
    assert [v.status for v in mixed] == ["skipped", "ok"]
    assert mixed[1].score == pytest.approx(guard.check([RailCheck("output", [RED], "q", "answer")])[0].score,
                                           abs=1e-5)
    assert not g.enabled("input") and g.enabled("output")


def test_default_thresholds(judge, guard):
    assert guard.threshold("input") == DEFAULT_INPUT_THRESHOLD
    assert guard.threshold("output") == judge.spec.unsafe_threshold == 0.5
    assert guard.describe()["rails"]["input"] == {"enabled": True, "threshold": 0.5, "calibration": None}


def test_threshold_from_a_calibration_file_named_in_the_policy(judge, calibration_file):
    file_threshold = Calibration.load(calibration_file).threshold.value
    assert abs(file_threshold - 0.5) > 0.05  # so the file's threshold is told apart from the defaults
    g = Guard(judge, policy(input_rail=dict(calibration=calibration_file)))
    assert g.threshold("input") == pytest.approx(file_threshold)
    assert g.threshold("output") == 0.5
    verdict = g.check_input(conversation())
    assert verdict.threshold == pytest.approx(file_threshold) and verdict.calibration is not None
    assert verdict.blocked == (verdict.score >= file_threshold)
    # The policy's own threshold wins over the file's.
    both = Guard(judge, policy(input_rail=dict(calibration=calibration_file, threshold=0.42)))
    assert both.threshold("input") == 0.42


def test_input_rail_is_raw_unless_the_policy_names_a_calibration(judge, guard, calibration_file):
    calibration = Calibration.load(calibration_file)
    raw = guard.check_input(conversation()).score
    # A calibration for the judge (the output rail's) leaves the input rail raw.
    unaffected = Guard(judge, calibration=calibration).check_input(conversation())
    assert unaffected.score == pytest.approx(raw, abs=1e-6) and unaffected.threshold == 0.5
    calibrated = Guard(judge, policy(input_rail=dict(calibration=calibration_file))).check_input(conversation())
    assert calibrated.score_raw == pytest.approx(raw, abs=1e-6)
    assert calibrated.score == pytest.approx(calibration.apply(np.array([raw]))[0][0], abs=1e-6)
    assert abs(calibrated.score - raw) > 0.05


def test_calibration_changes_the_output_rail_score(judge, guard, calibration_file):
    calibration = Calibration.load(calibration_file)
    messages, response = conversation(), "Hold it by the handle."
    raw = guard.check_output(messages, response)
    from_argument = Guard(judge, calibration=calibration)
    from_policy = Guard(judge, policy(output_rail=dict(calibration=calibration_file)))
    for g in (from_argument, from_policy):
        verdict = g.check_output(messages, response)
        assert verdict.score_raw == pytest.approx(raw.score, abs=1e-6)
        assert abs(verdict.score - verdict.score_raw) > 0.05
        assert verdict.score == pytest.approx(calibration.apply(np.array([raw.score]))[0][0], abs=1e-6)
        assert verdict.threshold == pytest.approx(calibration.threshold.value)
        assert verdict.calibration is not None and verdict.calibration.startswith("sha256:")


def test_judge_calibration_sets_the_output_threshold(tiny_judge, calibration_file):
    calibration = Calibration.load(calibration_file)
    with VLMJudge(tiny_judge, calibration=calibration) as calibrated_judge:
        g = Guard(calibrated_judge)
        assert g.threshold("output") == pytest.approx(calibration.threshold.value)
        assert g.threshold("input") == DEFAULT_INPUT_THRESHOLD
        verdict = g.check_output(conversation(), "Hold it by the handle.")
        assert abs(verdict.score - verdict.score_raw) > 0.05


@pytest.fixture(scope="module")
def dead_judge(tiny_judge):
    """The tiny judge folder on the openai engine, pointed at a loopback port nothing listens on."""
    options = EngineOptions(base_urls=[f"http://127.0.0.1:{free_port()}/v1"], max_retries=0, timeout_s=2)
    with VLMJudge(tiny_judge, "openai", options, served_model="tiny") as loaded:
        yield loaded


def test_failing_judge_fails_closed_by_default(dead_judge):
    g = Guard(dead_judge)
    for verdict in (g.check_input(conversation()), g.check_output(conversation(), "answer")):
        assert (verdict.status, verdict.decision, verdict.fail_open, verdict.score) == ("error", "block", False, None)
        assert verdict.failed and verdict.blocked and verdict.reason.startswith("judge failed")


def test_failing_judge_fails_open_when_the_policy_says_so(dead_judge):
    g = Guard(dead_judge, Policy(on_failure="open"))
    verdicts = g.check([RailCheck("input", [RED], "q"), RailCheck("output", [RED], "q", "answer")])
    for verdict in verdicts:
        assert (verdict.status, verdict.decision, verdict.fail_open, verdict.score) == ("error", "allow", True, None)
        assert verdict.failed and not verdict.blocked


def test_timeout_verdict_follows_the_failure_policy(guard, judge):
    closed = guard.verdict("input", RailScore(), timed_out=True)
    assert (closed.status, closed.decision, closed.fail_open) == ("timeout", "block", False)
    assert "timed out" in closed.reason
    opened = Guard(judge, Policy(on_failure="open")).verdict("output", RailScore(), timed_out=True)
    assert (opened.status, opened.decision, opened.fail_open) == ("timeout", "allow", True)


def test_bad_image_is_an_input_error_not_a_verdict(guard):
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                        {"type": "text", "text": "hi"}]}]
    with pytest.raises(InputError) as caught:
        guard.check_input(bad)
    assert (caught.value.code, caught.value.param) == ("invalid_image", "messages.0.content.0.image_url.url")
    with pytest.raises(InputError):
        guard.check_output(bad, "answer")
    with pytest.raises(InputError, match="remote|network"):
        guard.check_input([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])


@pytest.fixture(scope="module")
def json_judge(tiny_model, tmp_path_factory):
    """A plain copy of the tiny model (no judge.json): a zero-shot judge that must write a JSON verdict."""
    folder = tmp_path_factory.mktemp("zero-shot") / "tiny-vlm"
    shutil.copytree(tiny_model("qwen2_vl"), folder)
    assert not (folder / JUDGE_FILE).exists()
    with VLMJudge(folder) as loaded:
        yield loaded


def test_json_judge_with_unreadable_output_fails_closed(json_judge):
    g = Guard(json_judge)
    assert json_judge.prompt.mode == "json" and json_judge.request_prompt.mode == "json"
    verdicts = g.check([RailCheck("input", [RED], "How do I use this?"),
                        RailCheck("output", [RED], "How do I use this?", "Carefully.")])
    for verdict in verdicts:
        assert (verdict.status, verdict.decision, verdict.fail_open, verdict.score) == ("error", "block", False, None)
        assert "unreadable" in verdict.reason
    opened = Guard(json_judge, Policy(on_failure="open")).check_input(conversation())
    assert (opened.status, opened.decision, opened.fail_open) == ("error", "allow", True)
