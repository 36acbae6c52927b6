"""The guard's policy for verdicts a judge flags out of its domain (`on_out_of_domain`): by default escalate to the
VLM judge behind a lite judge, and where there is none block with reason out_of_domain (fail closed); `allow` lets
the verdict decide; every flagged verdict is marked, counted in /metrics and written in the audit log.

The judges are real: the session's fine-tuned lite judge, and a copy of it whose trust threshold is 1.0, a judge
that trusts none of its verdicts (every trust score it gives is under 1), so which verdicts are flagged is known
(tests/conftest.py)."""
from __future__ import annotations

import openai
import pytest

from misguard.guard.policy import Audit, Policy, RailPolicy
from misguard.guard.rails import Guard
from misguard.guard.server.app import running_server
from misguard.guard.server.audit import read_audit_log
from misguard.guard.server.replay import replay_app
from misguard.judges import Case, load_judge
from misguard.judges.cascade import CascadeBand
from misguard.judges.vlm import VLMJudge
from tests.conftest import LITE_REFUSAL
from tests.guard.serving import guarded, metric, two_image_messages

QUESTION = [{"role": "user", "content": "How do I use these together?"}]
LENIENT = dict(output_rail=RailPolicy(threshold=1.0))
"""Nothing is blocked for its score: a block below is the out-of-domain policy's."""


@pytest.fixture(scope="module")
def distrustful(distrustful_lite):
    return distrustful_lite


@pytest.fixture(scope="module")
def vlm(tiny_judge):
    with VLMJudge(tiny_judge) as judge:
        yield judge


def test_without_a_vlm_judge_a_flagged_verdict_is_blocked_by_default(distrustful):
    with Guard(distrustful, Policy(**LENIENT)) as guard:
        assert guard.out_of_domain_action == "block"
        verdict = guard.check_output(QUESTION, LITE_REFUSAL)
    assert (verdict.status, verdict.decision) == ("out_of_domain", "block") and verdict.blocked
    assert verdict.reason.startswith("out_of_domain") and verdict.trust < 1.0 and verdict.judge == "distrustful-lite"
    assert verdict.score < verdict.threshold  # the score alone would have let it through


def test_allow_lets_the_verdict_decide_and_still_marks_it(distrustful):
    with Guard(distrustful, Policy(on_out_of_domain="allow", **LENIENT)) as guard:
        verdict = guard.check_output(QUESTION, LITE_REFUSAL)
    assert (verdict.status, verdict.decision) == ("out_of_domain", "allow")
    assert "allowed by the policy" in verdict.reason


def test_a_trusted_verdict_is_not_touched_by_the_policy(lite_judge_folder):
    with Guard(lite_judge_folder, Policy(**LENIENT)) as guard:
        verdict = guard.check_output(QUESTION, LITE_REFUSAL + " (3)")  # a training row's very wording
    assert verdict.status == "ok" and verdict.decision == "allow" and 0.0 < verdict.trust <= 1.0


SURE = CascadeBand(0.49, 0.5)
"""A cascade band in which the lite judge is sure of the refusal (p_unsafe <= 0.49): only a flag escalates it."""


def test_behind_a_lite_judge_a_flagged_verdict_goes_to_the_vlm_judge(distrustful, vlm):
    with load_judge(distrustful) as lite, Guard(vlm, Policy(**LENIENT), lite_judge=lite, cascade_band=SURE) as guard:
        (own,) = lite.judge([Case(id="r", images=(), question=QUESTION[0]["content"], response=LITE_REFUSAL)])
        assert own.p_unsafe <= 0.49 and own.out_of_domain
        assert guard.out_of_domain_action == "escalate"
        verdict = guard.check_output(QUESTION, LITE_REFUSAL)
    assert verdict.judge == "tiny-judge" and verdict.status == "ok" and verdict.decision == "allow"


def test_block_with_a_vlm_judge_behind_does_not_escalate(distrustful, vlm):
    with load_judge(distrustful) as lite, Guard(vlm, Policy(on_out_of_domain="block", **LENIENT), lite_judge=lite,
                                                cascade_band=SURE) as guard:
        verdict = guard.check_output(QUESTION, LITE_REFUSAL)
    assert verdict.judge == "distrustful-lite" and (verdict.status, verdict.decision) == ("out_of_domain", "block")


def test_the_server_counts_flagged_verdicts_and_logs_them(distrustful, tmp_path):
    audit = tmp_path / "audit.jsonl"
    app = replay_app(lambda body: LITE_REFUSAL)
    with running_server(app) as upstream, load_judge(distrustful) as lite, guarded(
            lite, f"{upstream}/v1", Policy(audit=Audit(path=audit), **LENIENT)) as (url, service):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="replay", messages=two_image_messages("How do I?"))
        assert answer.choices[0].finish_reason == "content_filter"
        assert answer.model_extra["misguard"]["rails"]["output"]["status"] == "out_of_domain"
        assert metric(service, "misguard_out_of_domain_total", rail="output", decision="block") == 1.0
        assert metric(service, "misguard_out_of_domain_total", rail="output", decision="allow") == 0.0
        assert metric(service, "misguard_blocks_total", rail="output") == 1.0
    (record,) = read_audit_log(audit)
    assert record.decision == "block" and record.blocked_by == "output"
    assert record.rails["output"]["status"] == "out_of_domain" and record.rails["output"]["trust"] < 1.0
