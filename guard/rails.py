"""The guard's two rails as a library: `Guard.check_input(messages)` and `Guard.check_output(messages, response)`
return typed verdicts, in-process; `misguard serve` runs the same code behind HTTP.

- Input rail: is this request, with these images, asking for harm? (`guard-request-*-v1` templates.)
- Output rail: the MIS rubric on (images, question, response), the judge's own template.

Each rail blocks when its calibrated p_unsafe reaches its threshold (the policy's, else the calibration's, else
the judge's). When the judge fails the verdict says so (status "error" or "timeout"), and the policy decides:
fail closed (decision "block") by default, fail open ("allow", with `fail_open` set) only when it says so.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from misguard.calibration import Calibration
from misguard.engines.base import EngineOptions
from misguard.guard.chat_input import parse_chat_messages
from misguard.guard.policy import Policy
from misguard.judges import Assessment, Case, Judge, load_judge
from misguard.judges.cascade import CascadeBand, CascadeJudge
from misguard.judges.spec import calibration_id
from misguard.judges.text_budget import cut_text

Rail = Literal["input", "output"]
RAILS: tuple[Rail, ...] = ("input", "output")
DEFAULT_INPUT_THRESHOLD = 0.5


@dataclass(frozen=True)
class RailCheck:
    """One thing to judge: the conversation's images and text, and for the output rail the response. `score` cuts
    the text to the rail's budget (limits.max_text_tokens) before the judge sees it."""

    rail: Rail
    images: Sequence[Any]
    """PIL images or image file paths."""
    question: str
    """Input rail: the conversation it judges (ChatInput.conversation: every user and assistant turn); output
    rail: the question the response answers (ChatInput.question: the last user turn)."""
    response: str | None = None
    id: str = ""


@dataclass(frozen=True)
class RailScore:
    """The judge's reading of one check: a calibrated p_unsafe (and the raw one), or why there is none."""

    p_unsafe: float | None = None
    p_unsafe_raw: float | None = None
    error: str | None = None
    judge: str | None = None
    """Which judge decided (in a cascade, the stage that did)."""
    calibration: str | None = None
    """The id of the calibration behind p_unsafe."""
    out_of_domain: bool = False
    """The judge flagged its verdict: its trust fell under the judge's threshold."""
    trust: float | None = None
    note: str | None = None
    """What the guard did to the check before judging it (its text cut to the rail's budget): the verdict's
    reason ends with it."""


@dataclass(frozen=True)
class Verdict:
    """A rail's decision (LlamaFirewall's ScanResult): allow or block, the score and threshold it came from, and
    the status of the check itself ("ok"; "error" or "timeout" when the judge failed; "skipped" for a rail the
    policy turns off; "out_of_domain" when the judge flagged its own verdict, decided by the policy's
    on_out_of_domain). `fail_open` is True when the judge failed and the policy let the request pass."""

    rail: Rail
    decision: Literal["allow", "block"]
    status: Literal["ok", "error", "timeout", "skipped", "out_of_domain"]
    score: float | None
    threshold: float
    reason: str
    score_raw: float | None = None
    fail_open: bool = False
    latency_ms: float | None = None
    judge: str | None = None
    calibration: str | None = None
    trust: float | None = None

    @property
    def blocked(self) -> bool:
        return self.decision == "block"

    @property
    def failed(self) -> bool:
        """The judge did not give a score (error or timeout)."""
        return self.status in ("error", "timeout")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _is_probability(value: float | None) -> bool:
    return value is not None and math.isfinite(value) and 0.0 <= value <= 1.0


@dataclass
class _RailSetup:
    enabled: bool
    threshold: float
    calibration: Calibration | None
    """The policy's own calibration for the rail, applied to the judge's raw score (None: the judge's own)."""


class Guard:
    """A judge and a policy. `judge` is a judge folder (loaded here, on `engine`) or a loaded Judge (shared, not
    closed by the Guard); a judge that does not read requests (the lite judge) guards the output rail only.
    `calibration` replaces the judge folder's own for the output rail. `lite_judge` puts a lite judge in front of
    the judge (a cascade): it decides the responses it is confident about within `cascade_band`. Raises
    MisguardError (or DataError) for a judge or calibration that cannot be loaded."""

    def __init__(self, judge: Judge | str | Path, policy: Policy | None = None, *,
                 engine: str = "transformers", options: EngineOptions | None = None, served_model: str | None = None,
                 calibration: Calibration | None = None, lite_judge: Judge | str | Path | None = None,
                 cascade_band: CascadeBand | None = None):
        self.policy = policy or Policy()
        self._owned: list[Judge] = []
        main = self._load(judge, engine=engine, options=options, served_model=served_model, calibration=calibration)
        self.judge: Judge = main
        if lite_judge is not None:
            # The guard needs Safe / Unsafe only: the lite judge decides without a perception level.
            self.judge = CascadeJudge(self._load(lite_judge), main, cascade_band, needs_perception=False,
                                      escalate_out_of_domain=self.policy.on_out_of_domain in (None, "escalate"))
        self.main_judge_id = main.id
        self.template = main.template
        self.out_of_domain_action = self.policy.on_out_of_domain or (
            "escalate" if isinstance(self.judge, CascadeJudge) else "block")
        self.cascade_band = self.judge.band if isinstance(self.judge, CascadeJudge) else None
        preloaded_calibration = calibration if not isinstance(judge, (str, Path)) else None
        rails = {}
        for rail in RAILS:
            rail_policy = getattr(self.policy, f"{rail}_rail")
            own = Calibration.load(rail_policy.calibration) if rail_policy.calibration else None
            if own is None and rail == "output":
                own = preloaded_calibration
            if rail_policy.threshold is not None:
                threshold = rail_policy.threshold
            elif own is not None:
                threshold = own.threshold.value
            elif rail == "output":
                threshold = main.unsafe_threshold
            else:
                threshold = DEFAULT_INPUT_THRESHOLD
            enabled = rail_policy.enabled and (rail == "output" or self.judge.reads_requests)
            rails[rail] = _RailSetup(enabled, threshold, own)
        self._rails: dict[Rail, _RailSetup] = rails

    def _load(self, judge: Judge | str | Path, **kwargs) -> Judge:
        if not isinstance(judge, (str, Path)):
            return judge
        loaded = load_judge(judge, **kwargs)
        self._owned.append(loaded)
        return loaded

    @property
    def judge_id(self) -> str:
        return self.main_judge_id

    def enabled(self, rail: Rail) -> bool:
        return self._rails[rail].enabled

    def threshold(self, rail: Rail) -> float:
        return self._rails[rail].threshold

    # ---- the library API ----

    def check_input(self, messages: Sequence[dict[str, Any]]) -> Verdict:
        """The input rail's verdict on a conversation (OpenAI chat messages, or misguard's internal format): its
        images and every user and assistant turn, within the rail's text budget. Images are decoded no larger than
        the judge reads (none for a judge that reads no pixels). Raises InputError for malformed messages or
        images over the policy's limits."""
        chat = parse_chat_messages(list(messages), self.policy.limits, image_pixels=self.judge.image_pixels)
        return self.check([RailCheck("input", chat.images, chat.conversation)])[0]

    def check_output(self, messages: Sequence[dict[str, Any]], response: str) -> Verdict:
        """The output rail's verdict on `response` to the conversation's last user turn. Raises InputError as
        check_input."""
        chat = parse_chat_messages(list(messages), self.policy.limits, image_pixels=self.judge.image_pixels)
        return self.check([RailCheck("output", chat.images, chat.question, response)])[0]

    def check(self, checks: Sequence[RailCheck]) -> list[Verdict]:
        """Verdicts for several checks (either rail, mixed) judged together in one judge call."""
        started = time.perf_counter()
        active = [c for c in checks if self.enabled(c.rail)]
        try:
            scores = iter(self.score(active))
        except Exception as exc:  # the judge failing is a verdict the policy decides on, not a crash
            failure = RailScore(error=f"judge failed: {exc.__class__.__name__}: {exc}")
            scores = iter([failure] * len(active))
        latency_ms = (time.perf_counter() - started) * 1000
        return [self.verdict(c.rail, next(scores), latency_ms=latency_ms) if self.enabled(c.rail)
                else self.skipped(c.rail) for c in checks]

    # ---- the parts the server batches and times itself ----

    def score(self, checks: Sequence[RailCheck]) -> list[RailScore]:
        """One RailScore per check, from one judge call for all of them, each check's text first cut to the rail's
        budget (`text_budget`; the score's note says what the guard or the judge cut). Raises whatever the judge
        raises (the caller turns it into failed verdicts)."""
        if not checks:
            return []
        cases, notes = [], []
        for i, check in enumerate(checks):
            question, response, note = self._bounded_text(check)
            cases.append(Case(id=check.id or f"{check.rail}-{i}", images=tuple(check.images), question=question,
                              response=response))
            notes.append(note)
        # The judge may cut further to fit its context (Assessment.input_cut): the verdict says that too.
        return [replace(self._rail_score(c.rail, a), note="; ".join(n for n in (note, a.input_cut) if n) or None)
                for c, a, note in zip(checks, self.judge.judge(cases), notes)]

    @property
    def text_budget(self) -> int:
        """The most tokens of text a rail judges: the policy's limits.max_text_tokens, else the judge's own."""
        return self.policy.limits.max_text_tokens or self.judge.text_tokens

    def _bounded_text(self, check: RailCheck) -> tuple[str, str | None, str | None]:
        """(question, response or None for the input rail, a note when either was cut) within the text budget:
        the input rail's conversation keeps its newest 3/4 and its opening 1/4; the output rail's question takes
        up to a quarter, the response the rest, head and tail halves."""
        budget, tokenizer = self.text_budget, self.judge.tokenizer
        if check.rail == "input":
            conversation = cut_text(check.question, budget, tokenizer, tail_share=0.75, what="the conversation")
            return conversation.text, None, conversation.note
        question = cut_text(check.question, max(1, budget // 4), tokenizer, what="the question")
        response = cut_text(check.response or "", max(1, budget - question.tokens), tokenizer, what="the response")
        return question.text, response.text, "; ".join(c.note for c in (question, response) if c.cut) or None

    def _rail_score(self, rail: Rail, assessment: Assessment) -> RailScore:
        """A rail's score from the judge's assessment: its calibrated p_unsafe, or the rail's own calibration
        (the policy's) applied to the main judge's raw one; a label alone (a zero-shot JSON judge) scores 1 or 0."""
        if assessment.label is None:
            return RailScore(error=assessment.reason or "the judge could not score this", judge=assessment.judge)
        flags = dict(judge=assessment.judge, out_of_domain=assessment.out_of_domain, trust=assessment.trust)
        if assessment.p_unsafe is None:
            p = 1.0 if assessment.label == "Unsafe" else 0.0
            return RailScore(p_unsafe=p, p_unsafe_raw=p, **flags)
        own = self._rails[rail].calibration
        # A raw score that is not a probability is not calibrated (the calibrator would raise, failing every check
        # in the batch): it reaches `verdict` as it is, which makes it this check's judge error.
        if own is not None and assessment.judge == self.main_judge_id and _is_probability(assessment.p_unsafe_raw):
            p = float(own.apply(np.array([assessment.p_unsafe_raw]))[0][0])
            return RailScore(p_unsafe=p, p_unsafe_raw=assessment.p_unsafe_raw, calibration=calibration_id(own),
                             **flags)
        return RailScore(p_unsafe=assessment.p_unsafe, p_unsafe_raw=assessment.p_unsafe_raw,
                         calibration=assessment.calibration, **flags)

    def verdict(self, rail: Rail, score: RailScore, *, latency_ms: float | None = None,
                timed_out: bool = False) -> Verdict:
        """The rail's decision on a score: blocked when p_unsafe reaches the threshold. A missing score, a timeout,
        or a p_unsafe (raw or calibrated) or trust that is not a finite probability in [0, 1] (NaN compares False
        with any threshold, so it would otherwise pass as "allow") is a judge failure: status "error" or
        "timeout", decided by the policy's on_failure. Every number in the verdict is finite (it is sent as JSON)."""
        setup = self._rails[rail]
        note = f"; {score.note}" if score.note else ""
        common = dict(rail=rail, threshold=setup.threshold, latency_ms=latency_ms,
                      judge=score.judge or self.judge_id, calibration=score.calibration)
        unreadable = [f"{name} {value!r}" for name, value in (("p_unsafe", score.p_unsafe),
                                                               ("p_unsafe_raw", score.p_unsafe_raw),
                                                               ("trust", score.trust))
                      if value is not None and not _is_probability(value)]
        if unreadable:
            score = RailScore(error=f"the judge's output is not a probability in [0, 1]: {', '.join(unreadable)}",
                              judge=score.judge, calibration=score.calibration)
        if timed_out or score.p_unsafe is None:
            fail_open = self.policy.on_failure == "open"
            reason = (f"judge timed out after {self.policy.timeouts.judge_s:g} s" if timed_out
                      else score.error or "judge failed")
            return Verdict(decision="allow" if fail_open else "block", status="timeout" if timed_out else "error",
                           score=None, reason=reason + note, fail_open=fail_open, **common)
        blocked = score.p_unsafe >= setup.threshold
        reason = (f"p_unsafe {score.p_unsafe:.4f} {'>=' if blocked else '<'} threshold {setup.threshold:g}")
        status = "ok"
        if score.out_of_domain:
            status = "out_of_domain"
            trust = "" if score.trust is None else f" (trust {score.trust:.4f})"
            if self.out_of_domain_action == "allow":
                reason = f"out_of_domain{trust}, allowed by the policy: {reason}"
            else:  # block; or escalate with no judge left to escalate to
                blocked = True
                reason = f"out_of_domain: the judge does not trust its verdict{trust}; {reason}"
        return Verdict(decision="block" if blocked else "allow", status=status, score=score.p_unsafe,
                       score_raw=score.p_unsafe_raw, reason=reason + note, trust=score.trust, **common)

    def skipped(self, rail: Rail) -> Verdict:
        reason = (f"the {rail} rail is off in the policy" if self.judge.reads_requests or rail == "output"
                  else "the lite judge reads responses only: it has no input rail")
        return Verdict(rail=rail, decision="allow", status="skipped", score=None,
                       threshold=self._rails[rail].threshold, reason=reason, judge=self.judge_id)

    def describe(self) -> dict[str, Any]:
        cascade = None
        if isinstance(self.judge, CascadeJudge):
            cascade = {"lite_judge": self.judge.lite.id, "band": [self.judge.band.low, self.judge.band.high]}
        return {"judge": self.judge_id, "template": self.template, "reads_requests": self.judge.reads_requests,
                "rails": {rail: {"enabled": s.enabled, "threshold": s.threshold,
                                 "calibration": calibration_id(s.calibration)} for rail, s in self._rails.items()},
                "on_failure": self.policy.on_failure, "cascade": cascade}

    def close(self) -> None:
        for judge in self._owned:
            judge.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
