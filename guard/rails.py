"""The guard's two rails as a library: `Guard.check_input(messages)` and `Guard.check_output(messages, response)`
return typed verdicts, in-process; `misguard serve` runs the same code behind HTTP.

- Input rail: is this request, with these images, asking for harm? (`guard-request-*-v1` templates.)
- Output rail: the MIS rubric on (images, question, response), the judge's own template.

Each rail blocks when its calibrated p_unsafe reaches its threshold (the policy's, else the calibration's, else
the judge's). When the judge fails the verdict says so (status "error" or "timeout"), and the policy decides:
fail closed (decision "block") by default, fail open ("allow", with `fail_open` set) only when it says so.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from misguard.guard.chat_input import parse_chat_messages
from misguard.judges.judge import code_marginals, load_judge
from misguard.judges.parse import parse_json_safety, parse_json_verdict
from misguard.judges.templates import REQUEST_CODES, request_template_for
from misguard.engines.messages import GenerationParams
from misguard.guard.policy import Policy
from misguard.core.errors import MisguardError

if TYPE_CHECKING:
    from misguard.calibration import Calibration
    from misguard.engines import EngineOptions
    from misguard.judges.cascade import CascadeBand
    from misguard.judges.judge import Judge
    from misguard.judges.lite.judge import LiteJudge

Rail = Literal["input", "output"]
RAILS: tuple[Rail, ...] = ("input", "output")
DEFAULT_INPUT_THRESHOLD = 0.5
VERDICT_TOKENS = 48


@dataclass(frozen=True)
class RailCheck:
    """One thing to judge: the user's images and question, and for the output rail the response."""

    rail: Rail
    images: Sequence[Any]
    """PIL images or image file paths."""
    question: str
    response: str | None = None
    id: str = ""


@dataclass(frozen=True)
class RailScore:
    """The judge's reading of one check: a calibrated p_unsafe (and the raw one), or why there is none."""

    p_unsafe: float | None = None
    p_unsafe_raw: float | None = None
    error: str | None = None
    judge: str | None = None
    """Which judge decided, when a cascade's first stage did (None: the guard's judge)."""


@dataclass(frozen=True)
class Verdict:
    """A rail's decision (LlamaFirewall's ScanResult): allow or block, the score and threshold it came from, and
    the status of the check itself ("ok"; "error" or "timeout" when the judge failed; "skipped" for a rail the
    policy turns off). `fail_open` is True when the judge failed and the policy let the request pass."""

    rail: Rail
    decision: Literal["allow", "block"]
    status: Literal["ok", "error", "timeout", "skipped"]
    score: float | None
    threshold: float
    reason: str
    score_raw: float | None = None
    fail_open: bool = False
    latency_ms: float | None = None
    judge: str | None = None
    calibration: str | None = None

    @property
    def blocked(self) -> bool:
        return self.decision == "block"

    @property
    def failed(self) -> bool:
        """The judge did not give a score (error or timeout)."""
        return self.status in ("error", "timeout")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _RailSetup:
    enabled: bool
    threshold: float
    calibration: Calibration | None
    calibration_id: str | None = field(default=None)


class Guard:
    """A judge and a policy. `judge` is a judge folder (loaded here, on `engine`) or a loaded Judge or LiteJudge
    (shared, not closed by the Guard); a lite judge guards the output rail only. `calibration` replaces the
    judge's own for the output rail. `lite_judge` puts a lite judge in front of the output rail (a cascade): it
    decides what it is confident about within `cascade_band`. Raises MisguardError (or DataError) for a judge
    or calibration that cannot be loaded."""

    def __init__(self, judge: Judge | LiteJudge | str | Path, policy: Policy | None = None, *,
                 engine: str = "transformers",
                 options: EngineOptions | None = None, served_model: str | None = None,
                 calibration: Calibration | None = None, lite_judge: LiteJudge | str | Path | None = None,
                 cascade_band: CascadeBand | None = None):
        from misguard.judges.cascade import CascadeBand
        from misguard.judges.judge import calibration_id

        self.policy = policy or Policy()
        self._owns_judge = isinstance(judge, (str, Path))
        self.judge = load_judge(judge, engine, options, served_model=served_model,
                                calibration=calibration) if self._owns_judge else judge
        self.lite = getattr(self.judge, "kind", "vlm") == "lite"
        # A lite judge reads (question, response) pairs: it has no request head, so no input rail.
        self.request_template = None if self.lite else request_template_for(self.judge.template.mode)
        # A lite judge in front of the output rail (a cascade): it decides the responses it is confident about.
        self._owns_first_stage = isinstance(lite_judge, (str, Path))
        self.first_stage = load_judge(lite_judge) if self._owns_first_stage else lite_judge
        if self.first_stage is not None and getattr(self.first_stage, "kind", "vlm") != "lite":
            raise MisguardError("the cascade's first stage must be a lite judge")
        self.cascade_band = cascade_band or CascadeBand()
        rails = {}
        for rail in RAILS:
            rail_policy = getattr(self.policy, f"{rail}_rail")
            cal = _load_calibration(rail_policy.calibration) if rail_policy.calibration else None
            if cal is None and rail == "output":
                cal = calibration if calibration is not None else self.judge.calibration
            if rail_policy.threshold is not None:
                threshold = rail_policy.threshold
            elif rail_policy.calibration is not None:
                threshold = cal.threshold.value
            elif rail == "output":
                threshold = cal.threshold.value if cal is not None else self.judge.spec.unsafe_threshold
            else:
                threshold = DEFAULT_INPUT_THRESHOLD
            enabled = rail_policy.enabled and not (rail == "input" and self.lite)
            rails[rail] = _RailSetup(enabled, threshold, cal, calibration_id(cal))
        self._rails: dict[Rail, _RailSetup] = rails

    @property
    def judge_id(self) -> str:
        return self.judge.id

    def enabled(self, rail: Rail) -> bool:
        return self._rails[rail].enabled

    def threshold(self, rail: Rail) -> float:
        return self._rails[rail].threshold

    # ---- the library API ----

    def check_input(self, messages: Sequence[dict[str, Any]]) -> Verdict:
        """The input rail's verdict on a conversation (OpenAI chat messages, or misguard's internal format).
        Raises InputError for malformed messages or images over the policy's limits."""
        chat = parse_chat_messages(list(messages), self.policy.limits)
        return self.check([RailCheck("input", chat.images, chat.question)])[0]

    def check_output(self, messages: Sequence[dict[str, Any]], response: str) -> Verdict:
        """The output rail's verdict on `response` to the conversation. Raises InputError as check_input."""
        chat = parse_chat_messages(list(messages), self.policy.limits)
        return self.check([RailCheck("output", chat.images, chat.question, response)])[0]

    def check(self, checks: Sequence[RailCheck]) -> list[Verdict]:
        """Verdicts for several checks (either rail, mixed) judged together in one engine call."""
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
        """One RailScore per check, from one engine call for all of them (output checks the cascade's lite judge
        is confident about never reach the engine). Raises whatever a judge raises (the caller turns it into
        failed verdicts)."""
        if self.first_stage is None or not any(c.rail == "output" for c in checks):
            return self._score(checks)
        outputs = [i for i, c in enumerate(checks) if c.rail == "output"]
        first = self.first_stage
        raw, _ = first.probabilities([checks[i].question for i in outputs], [checks[i].response or "" for i in outputs])
        calibrated = first.calibration.apply(raw)[0] if first.calibration is not None else raw
        decided: dict[int, RailScore] = {}
        for i, p_raw, p in zip(outputs, raw, calibrated):
            if self.cascade_band.decides_safety(p):
                decided[i] = RailScore(p_unsafe=float(p), p_unsafe_raw=float(p_raw), judge=first.id)
        rest = [i for i in range(len(checks)) if i not in decided]
        scores = dict(decided)
        scores.update(zip(rest, self._score([checks[i] for i in rest])))
        return [scores[i] for i in range(len(checks))]

    def _score(self, checks: Sequence[RailCheck]) -> list[RailScore]:
        if not checks:
            return []
        if self.lite:
            if any(c.rail != "output" for c in checks):
                raise ValueError("the lite judge has no input rail")
            p_unsafe, _ = self.judge.probabilities([c.question for c in checks], [c.response or "" for c in checks])
            return self._calibrated(checks, [RailScore(p_unsafe_raw=float(p)) for p in p_unsafe])
        requests = [self.request_template.request(c.id or f"input-{i}", c.images, c.question) if c.rail == "input"
                    else self.judge.template.request(c.id or f"output-{i}", c.images, c.question, c.response or "")
                    for i, c in enumerate(checks)]
        if self.judge.template.mode == "codes":
            raw = [self._raw_from_probs(c.rail, probs) for c, probs in
                   zip(checks, self.judge.engine.label_probs(requests, self.judge.labels))]
        else:
            generations = self.judge.engine.generate(requests, GenerationParams(max_new_tokens=VERDICT_TOKENS))
            raw = [self._raw_from_text(c.rail, g.text) for c, g in zip(checks, generations)]
        return self._calibrated(checks, raw)

    def verdict(self, rail: Rail, score: RailScore, *, latency_ms: float | None = None,
                timed_out: bool = False) -> Verdict:
        """The rail's decision on a score, or on its absence (the policy's failure mode)."""
        setup = self._rails[rail]
        decider = score.judge or self.judge_id
        calibration = (self.first_stage.calibration_id if score.judge is not None and self.first_stage is not None
                       else setup.calibration_id)
        common = dict(rail=rail, threshold=setup.threshold, latency_ms=latency_ms, judge=decider,
                      calibration=calibration)
        if timed_out or score.p_unsafe is None:
            fail_open = self.policy.on_failure == "open"
            reason = (f"judge timed out after {self.policy.timeouts.judge_s:g} s" if timed_out
                      else score.error or "judge failed")
            return Verdict(decision="allow" if fail_open else "block", status="timeout" if timed_out else "error",
                           score=None, reason=reason, fail_open=fail_open, **common)
        blocked = score.p_unsafe >= setup.threshold
        reason = (f"p_unsafe {score.p_unsafe:.4f} {'>=' if blocked else '<'} threshold {setup.threshold:g}")
        return Verdict(decision="block" if blocked else "allow", status="ok", score=score.p_unsafe,
                       score_raw=score.p_unsafe_raw, reason=reason, **common)

    def skipped(self, rail: Rail) -> Verdict:
        reason = (f"the {rail} rail is off in the policy" if not (rail == "input" and self.lite)
                  else "the lite judge reads responses only: it has no input rail")
        return Verdict(rail=rail, decision="allow", status="skipped", score=None,
                       threshold=self._rails[rail].threshold, reason=reason, judge=self.judge_id)

    # ---- internals ----

    def _raw_from_probs(self, rail: Rail, probs) -> RailScore:
        if probs is None:
            return RailScore(error="the engine did not return the label tokens' probabilities")
        if rail == "output":
            return RailScore(p_unsafe_raw=code_marginals(probs.probs)[0])
        # The request template answers with the first two codes; their share of the two is P(harmful).
        safe, unsafe = (probs.probs[list(self.judge.labels.texts).index(code)] for code in REQUEST_CODES)
        if safe + unsafe <= 0:
            return RailScore(error="the judge gave the request codes no probability")
        return RailScore(p_unsafe_raw=unsafe / (safe + unsafe))

    @staticmethod
    def _raw_from_text(rail: Rail, text: str) -> RailScore:
        parsed = parse_json_safety(text) if rail == "input" else parse_json_verdict(text)
        if isinstance(parsed, str):
            return RailScore(error=f"unreadable verdict ({parsed}): {text[:200]!r}")
        return RailScore(p_unsafe_raw=1.0 if parsed[-1] == "Unsafe" else 0.0)

    def _calibrated(self, checks: Sequence[RailCheck], raw: list[RailScore]) -> list[RailScore]:
        import numpy as np

        out = list(raw)
        for rail in RAILS:
            rows = [i for i, (c, s) in enumerate(zip(checks, raw)) if c.rail == rail and s.p_unsafe_raw is not None]
            calibration = self._rails[rail].calibration
            values = np.array([raw[i].p_unsafe_raw for i in rows])
            if calibration is not None and rows and self.judge.template.mode in ("codes", "lite"):
                values = calibration.apply(values)[0]
            for i, value in zip(rows, values):
                out[i] = RailScore(p_unsafe=float(value), p_unsafe_raw=raw[i].p_unsafe_raw)
        return out

    def describe(self) -> dict[str, Any]:
        return {"judge": self.judge_id, "template": self.judge.template.id,
                "request_template": self.request_template.id if self.request_template else None,
                "rails": {rail: {"enabled": s.enabled, "threshold": s.threshold, "calibration": s.calibration_id}
                          for rail, s in self._rails.items()},
                "on_failure": self.policy.on_failure,
                "cascade": ({"lite_judge": self.first_stage.id, "band": [self.cascade_band.low, self.cascade_band.high]}
                            if self.first_stage is not None else None)}

    def close(self) -> None:
        if self._owns_judge:
            self.judge.close()
        if self._owns_first_stage:
            self.first_stage.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _load_calibration(path: Path) -> Calibration:
    """A rail's calibration file. Raises CalibrationFileError (a DataError) naming the file."""
    from misguard.calibration import Calibration

    return Calibration.load(path)
