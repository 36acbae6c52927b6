"""The one interface every judge implements, and what goes in and out of it.

A judge reads `Case`s (images, a question, and the response to judge, or no response when the request itself is
judged: the guard's input rail) and returns one `Assessment` per case: its label, calibrated and raw p_unsafe,
perception level, status, reason and which judge decided. The VLM judge on any engine (transformers, vLLM, an
OpenAI-compatible server), the lite judge and the cascade all implement `Judge`; `score`, the cascade and the
guard's rails hold a `Judge` and nothing else.

A judge never turns what it cannot read into a label: such a case is `status: "unscored"` with a reason (an
unreadable verdict, label tokens the engine did not return), or `status: "error"` when the judge itself failed on it
(a probability that is not a finite number, an image that could not be decoded: `bad_image`).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from misguard.calibration import Calibration
from misguard.core.progress import Progress
from misguard.core.records import PERCEPTION_LEVELS, Status
from misguard.engines.base import runs
from misguard.engines.messages import image_key

Label = Literal["Safe", "Unsafe"]
Level = Literal["Level1", "Level2", "Level3"]
DEFAULT_CHUNK = 256
"""Cases a judge without an engine of its own hands back at a time from `judge_stream`."""
DEFAULT_IMAGE_PIXELS = 1280 * 28 * 28
"""The most pixels of one image a judge reads when its processor does not say: Qwen2-VL's default `max_pixels`
(1280 visual tokens of 28x28 pixels), about 1 megapixel."""
DEFAULT_TEXT_TOKENS = 4096
"""The most tokens of a case's text a judge reads when it does not say (the tiny and many small VLMs' context)."""


@dataclass(frozen=True)
class Case:
    """One thing to judge: the images (file paths or PIL images), the user's question, and the response to it;
    `response` None judges the request itself (the guard's input rail). `image_description` is text about the
    images where the data has one (a text-only judge reads it instead of the pixels)."""

    id: str
    images: tuple[Any, ...]
    question: str
    response: str | None = None
    image_description: str | None = None

    @property
    def is_request(self) -> bool:
        return self.response is None


@dataclass(frozen=True)
class Assessment:
    """A judge's verdict on one case. `p_unsafe` is calibrated when the judge has a calibration (`p_unsafe_raw`
    is then its own value before it; without one both are the same); the perception fields are None for a judge
    without a perception head and for request cases. `label` is Unsafe when p_unsafe reaches the judge's
    threshold (a zero-shot JSON judge gives the label alone, with no probability). An unscored assessment has no
    label and no probabilities, and says why in `reason`. An out-of-domain one keeps its label and probabilities,
    but its trust score fell under the judge's trust threshold: the judge says it may not know (`reason`)."""

    judge: str
    """The id of the judge that decided (in a cascade: the stage that did)."""
    template: str
    status: Status
    label: Label | None = None
    p_unsafe: float | None = None
    p_unsafe_raw: float | None = None
    perception: Level | None = None
    p_perception: dict[str, float] | None = None
    p_perception_raw: dict[str, float] | None = None
    calibration: str | None = None
    """The id of the calibration applied ("sha256:..."), or None for raw probabilities."""
    reason: str | None = None
    trust: float | None = None
    """How far the judge trusts this verdict, in [0, 1] (calibration/trust.py), where the judge measures it."""
    label_mass: float | None = None
    """A VLM judge reading answer-code probabilities: the codes' share of the next-token distribution (near 1
    when the model answers in the judge's format)."""
    input_cut: str | None = None
    """How the judge shortened the case's text to fit its context (e.g. "response cut to 3,900 of 250,000 tokens
    (head and tail kept)"); None when it read all of it."""
    bad_image: str | None = None
    """With status "error": the image (its path) that could not be used, when that is why: the case's input is at
    fault, not the judge (`misguard score` treats it as a bad row)."""

    @property
    def scored(self) -> bool:
        """A verdict the judge stands by."""
        return self.status == "scored"

    @property
    def out_of_domain(self) -> bool:
        return self.status == "out_of_domain"

    def with_trust(self, trust: float, flagged: bool, threshold: float,
                   unlike: str = "the data the judge was trained and checked on") -> Assessment:
        """This assessment with its trust score; flagged: status out_of_domain, with the reason."""
        if not flagged:
            return replace(self, trust=trust)
        return replace(self, trust=trust, status="out_of_domain",
                       reason=f"trust {trust:.4f} < {threshold:.4f}: unlike {unlike}")

    @classmethod
    def unscored(cls, judge: str, template: str, reason: str, calibration: str | None = None) -> Assessment:
        return cls(judge=judge, template=template, status="unscored", reason=reason, calibration=calibration)


@runtime_checkable
class Judge(Protocol):
    """What every judge offers. `judge` returns one Assessment per case, in order; `judge_stream` yields
    (index into `cases`, Assessment) as they are ready, so a caller can save them as it goes, and tells `progress`
    of the cases as they finish (a forward batch, a request a server answered), so a caller's bar moves between
    saves."""

    @property
    def id(self) -> str: ...

    @property
    def template(self) -> str:
        """The id of the prompt template (or the feature layout, for a lite judge) its judgments carry."""

    @property
    def calibration_id(self) -> str | None: ...

    @property
    def unsafe_threshold(self) -> float: ...

    @property
    def reads_requests(self) -> bool:
        """Whether it judges a request with no response (the guard's input rail)."""

    @property
    def has_perception(self) -> bool:
        """Whether its assessments of responses carry a perception level (MIS metrics need one)."""

    @property
    def chunk_size(self) -> int:
        """How many cases a caller should save at a time: it bounds what a crash loses."""

    @property
    def image_pixels(self) -> int | None:
        """The most pixels of one image the judge reads (its processor resizes a larger image down to about this),
        so the guard decodes no image much larger; None: it reads no pixels at all (the lite judge), so the guard
        checks images' headers and never decodes them."""

    @property
    def text_tokens(self) -> int:
        """The most tokens of one case's text (question and response) the judge reads: the guard's default
        `limits.max_text_tokens`."""

    @property
    def tokenizer(self) -> Any | None:
        """The judge's text tokenizer (a transformers tokenizer), in whose tokens the guard measures a text budget;
        None: the budget is measured in characters."""

    def judge(self, cases: Sequence[Case]) -> list[Assessment]: ...

    def judge_stream(self, cases: Sequence[Case], progress: Progress | None = None,
                     ) -> Iterator[tuple[int, Assessment]]: ...

    def describe(self) -> dict[str, Any]:
        """What the judge is, for run manifests (its judge.json, engine, calibration, threshold)."""

    def close(self) -> None: ...


class JudgeBase:
    """What the judges share: `judge` from `judge_stream`, a chunked `judge_stream` from `judge` (or from
    `judge_chunk`, where a judge reports its cases finishing within a chunk), and use as a context manager. A
    subclass defines at least one of `judge` and `judge_stream`."""

    chunk_size: int = DEFAULT_CHUNK
    # What a judge that says nothing else reads: images up to about a megapixel, a few thousand characters' tokens.
    image_pixels: int | None = DEFAULT_IMAGE_PIXELS
    text_tokens: int = DEFAULT_TEXT_TOKENS
    tokenizer: Any | None = None

    def judge(self, cases: Sequence[Case]) -> list[Assessment]:
        out: list[Any] = [None] * len(cases)
        for index, assessment in self.judge_stream(cases):
            out[index] = assessment
        return out

    def judge_stream(self, cases: Sequence[Case], progress: Progress | None = None,
                     ) -> Iterator[tuple[int, Assessment]]:
        # A chunk never splits cases on the same images (a judge's K responses to one item): an engine behind
        # the judge runs their shared prompt prefix once.
        start = 0
        for chunk in runs(cases, self.chunk_size, key=lambda case: tuple(image_key(im) for im in case.images)):
            yield from enumerate(self.judge_chunk(chunk, progress), start)
            start += len(chunk)

    def judge_chunk(self, cases: Sequence[Case], progress: Progress | None) -> list[Assessment]:
        """`judge(cases)`, then `progress` told of all of them. A judge that sees cases finish sooner (a lite
        judge's forward passes, a cascade's stages) reports them as they do."""
        assessed = self.judge(cases)
        if progress is not None:
            progress(len(cases))
        return assessed

    def close(self) -> None:
        """Free what the judge holds."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def assessments(judge: str, template: str, raw_unsafe: Sequence[float] | np.ndarray,
                raw_perception: np.ndarray | None, *, calibration: Calibration | None, calibration_id: str | None,
                threshold: float, calibrate: bool = True) -> list[Assessment]:
    """Assessments from a judge's raw head probabilities (raw_unsafe [n]; raw_perception [n, 3] in
    PERCEPTION_LEVELS order, or None without a perception head): calibrated with `calibration` when there is one
    and `calibrate` (the raw values kept beside), labelled Unsafe at p_unsafe >= threshold. A row whose
    probabilities are not finite numbers is status "error" (comparing NaN with a threshold is False, which would read
    as Safe) is an error: the judge failed on it. Shared by every kind of judge."""
    raw_unsafe = np.asarray(raw_unsafe, dtype=np.float64)
    finite = np.isfinite(raw_unsafe)
    if raw_perception is not None:
        raw_perception = np.asarray(raw_perception, dtype=np.float64)
        finite &= np.isfinite(raw_perception).all(axis=1)
    p_unsafe, p_perception = raw_unsafe, raw_perception
    applied = calibration is not None and calibrate
    if applied and finite.any():
        p_unsafe, p_perception = raw_unsafe.copy(), None if raw_perception is None else raw_perception.copy()
        calibrated = calibration.apply(raw_unsafe[finite],
                                       None if raw_perception is None else raw_perception[finite])
        p_unsafe[finite] = calibrated[0]
        if p_perception is not None and calibrated[1] is not None:
            p_perception[finite] = calibrated[1]
    cal_id = calibration_id if applied else None
    out = []
    for row in range(len(raw_unsafe)):
        if not finite[row] or not math.isfinite(float(p_unsafe[row])):
            out.append(Assessment(judge=judge, template=template, status="error", calibration=cal_id,
                                  reason=f"the judge gave a probability that is not a finite number (p_unsafe "
                                         f"{float(raw_unsafe[row])!r})"))
            continue
        levels = levels_raw = None
        level = None
        if p_perception is not None:
            levels = dict(zip(PERCEPTION_LEVELS, map(float, p_perception[row])))
            levels_raw = dict(zip(PERCEPTION_LEVELS, map(float, raw_perception[row])))
            level = max(PERCEPTION_LEVELS, key=levels.__getitem__)
        p = float(p_unsafe[row])
        out.append(Assessment(judge=judge, template=template, status="scored",
                              label="Unsafe" if p >= threshold else "Safe", p_unsafe=p,
                              p_unsafe_raw=float(raw_unsafe[row]), perception=level, p_perception=levels,
                              p_perception_raw=levels_raw, calibration=cal_id))
    return out
