"""Buying agreement with a review budget: the items where the judge is least confident go to GPT-4o or a human.

A local judge that disagrees with the reference on a few percent of items can still be used for the whole
benchmark if those items can be found: sort the judge's verdicts by how confident it was, keep the most
confident ones and send the rest for review. `escalation_curve` says how agreement with the reference rises
as more is escalated (on labelled data, to choose a budget); `select_for_review` picks the items to send (on
new data, for a chosen budget).

Confidence is the judge's probability of the MIS outcome it gave (see `confidence`). Judgments without
probabilities (zero-shot JSON judgments, unscored rows) have no confidence and always go to review.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from misguard.calibration.agreement import POSITIVE_LABEL, SAFETY_LABELS, head_agreement, outcome_of
from misguard.core.labels import LabelRecord
from misguard.core.metrics import METRICS
from misguard.core.records import PERCEPTION_LEVELS

DEFAULT_COVERAGES: tuple[float, ...] = tuple(round(1.0 - 0.05 * step, 2) for step in range(11))
"""1.00, 0.95, ..., 0.50: the shares of items the judge keeps."""

# ceil(coverage * n) must not round 0.7 * 10 = 7.000000000000001 up to 8.
_CEIL_SLACK = 1e-9


def confidence(p_unsafe: float | None, p_perception: Sequence[float] | Mapping[str, float] | None = None, *,
               threshold: float = 0.5) -> float | None:
    """Return the judge's probability of the MIS outcome it gave, or None when `p_unsafe` is None.

    Judged Unsafe (p_unsafe >= threshold): the outcome is ASR whatever the perception level, so the
    confidence is p_unsafe. Judged Safe: the outcome is RSR, RR or HR according to the perception level, so
    the confidence is (1 - p_unsafe) * max(p_perception), the probability of Safe at the judged (most
    probable) level; without p_perception it is 1 - p_unsafe.

    The product is an independence approximation: a judgment stores the marginals P(Unsafe) and P(Level k),
    not the joint over the six (safety, level) codes, so P(Safe, Level k) is taken as P(Safe) * P(Level k).

    `p_perception` is (p Level1, p Level2, p Level3) as LabelRecord holds it, or a dict keyed by
    PERCEPTION_LEVELS as a judgments file writes it. `threshold` should be the one that produced the judge's
    labels, so that the outcome scored here is the one the judge gave.
    Raises ValueError for a probability outside [0, 1] or not a number, a p_perception of the wrong shape, or
    a threshold that is not a finite number.
    """
    _check_threshold(threshold)
    if p_unsafe is None:
        return None
    p_unsafe = _probability(p_unsafe, "p_unsafe")
    if p_unsafe >= threshold:
        return p_unsafe
    if p_perception is None:
        return 1.0 - p_unsafe
    return (1.0 - p_unsafe) * max(_perception_probabilities(p_perception))


def record_confidence(record: LabelRecord, *, threshold: float = 0.5) -> float | None:
    """Return `confidence` of a judge record's p_unsafe and p_perception (None for a record without
    probabilities, e.g. a zero-shot JSON judgment or an unscored row). When the record carries its own
    Safe/Unsafe label, that label decides the outcome scored (a calibrated judge's threshold need not be
    `threshold`). Raises ValueError as `confidence`."""
    if not record.scored or record.p_unsafe is None:
        return None
    if record.safety is not None:
        # A threshold no p_unsafe falls below (Unsafe) or reaches (Safe) scores the outcome the judge gave.
        threshold = 0.0 if record.safety == "Unsafe" else 2.0
    return confidence(record.p_unsafe, record.p_perception, threshold=threshold)


def escalation_curve(pairs: Sequence[tuple[LabelRecord, LabelRecord]], *, coverages: Sequence[float] | None = None,
                     threshold: float = 0.5) -> list[dict[str, Any]]:
    """Agreement of the judge with the reference on the items it keeps, for each share of items it keeps.

    The (judge, reference) pairs are sorted by the judge's confidence (`record_confidence`), most confident
    first (ties keep their order). For each coverage (default DEFAULT_COVERAGES: 1.00, 0.95, ..., 0.50)
    ceil((1 - coverage) * n) pairs are escalated, as many as `select_for_review` lists for the share
    1 - coverage, and the rest kept, n counting every pair. Pairs whose judge record has no probabilities
    (zero-shot JSON judgments, unscored rows) cannot be ranked and are always escalated, so fewer may be kept;
    they are counted in `escalated` at every coverage.

    Returns one dict per coverage, in the order given: {coverage, kept, escalated, no_probabilities (pairs
    escalated for want of probabilities), safety_n, safety_accuracy, safety_kappa, outcome_n, outcome_accuracy}.
    Safety figures are `head_agreement` over the kept pairs where both sides are scored; outcome figures over
    those where both sides also have a perception level (4-way MIS outcome), outcome_accuracy None when there
    are none (binary-only labels on either side). Kappa is None where it is undefined (one label throughout).
    Raises ValueError for no pairs, no pair with probabilities, a coverage outside (0, 1], or as `confidence`.
    """
    pairs = list(pairs)
    if not pairs:
        raise ValueError("no pairs to compare")
    coverages = DEFAULT_COVERAGES if coverages is None else tuple(coverages)
    if not coverages:
        raise ValueError("no coverages given")
    for coverage in coverages:
        _check_share(coverage, "coverage")
    ranked = [(score, pair) for pair in pairs
              if (score := record_confidence(pair[0], threshold=threshold)) is not None]
    if not ranked:
        raise ValueError(f"none of the {len(pairs)} judge records has probabilities (p_unsafe); there is no "
                         f"confidence to rank them by")
    # sorted() is stable, so pairs of equal confidence keep their input order.
    ranked.sort(key=lambda item: -item[0])
    n, no_probabilities = len(pairs), len(pairs) - len(ranked)
    curve = []
    for coverage in coverages:
        # The escalated count is the review list's for share 1 - coverage, so the two always agree.
        kept = ranked[:min(n - _ceil_share(1.0 - coverage, n), len(ranked))]
        curve.append({"coverage": float(coverage), "kept": len(kept), "escalated": n - len(kept),
                      "no_probabilities": no_probabilities, **_agreement([pair for _, pair in kept])})
    return curve


def _agreement(pairs: list[tuple[LabelRecord, LabelRecord]]) -> dict[str, Any]:
    scored = [(judge, reference) for judge, reference in pairs if judge.scored and reference.scored]
    safety = head_agreement([r.safety for _, r in scored], [j.safety for j, _ in scored], SAFETY_LABELS,
                            positive=POSITIVE_LABEL)
    with_perception = [(judge, reference) for judge, reference in scored
                       if judge.perception is not None and reference.perception is not None]
    outcome = head_agreement([outcome_of(r.safety, r.perception) for _, r in with_perception],
                             [outcome_of(j.safety, j.perception) for j, _ in with_perception], METRICS)
    return {"safety_n": safety["n"], "safety_accuracy": safety["accuracy"], "safety_kappa": safety["kappa"],
            "outcome_n": outcome["n"], "outcome_accuracy": outcome["accuracy"]}


def select_for_review(records: Sequence[LabelRecord], share: float, *,
                      threshold: float = 0.5) -> list[tuple[LabelRecord, float | None]]:
    """Return the ceil(share * n) judge records the judge is least sure of, least confident first, each with
    its confidence (`record_confidence`).

    Records without probabilities (confidence None: zero-shot JSON judgments, unscored rows) come first, in
    their input order; then the others by rising confidence (ties in input order).
    Raises ValueError for a share outside (0, 1] or as `confidence`.
    """
    share = _check_share(share, "share")
    records = list(records)
    scored = [(record, record_confidence(record, threshold=threshold)) for record in records]
    without = [(record, score) for record, score in scored if score is None]
    ranked = sorted(((record, score) for record, score in scored if score is not None), key=lambda item: item[1])
    return (without + ranked)[:_ceil_share(share, len(records))]


def parse_share(text: str) -> float:
    """Return a review share given as a percentage ("10%", "12.5 %") or a fraction ("0.1") as a fraction.

    Raises ValueError for text that is neither, or a share outside (0, 1] (0%, 150%, "10" -- a fraction above 1).
    """
    stripped = str(text).strip()
    percent = stripped.endswith("%")
    number = stripped[:-1].strip() if percent else stripped
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"share must be a percentage such as 10% or a fraction such as 0.1, got {text!r}") from None
    if percent:
        value /= 100.0
    if not math.isfinite(value) or not 0.0 < value <= 1.0:
        hint = "" if percent else f" (for {number} percent write {number}%)"
        raise ValueError(f"share must be more than 0 and at most 100% (1.0), got {text!r}{hint}")
    return value


def _ceil_share(share: float, n: int) -> int:
    return max(0, min(n, math.ceil(share * n - _CEIL_SLACK)))


def _check_share(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number more than 0 and at most 1, got {value!r}")
    return float(value)


def _check_threshold(threshold: Any) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")


def _probability(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number from 0 to 1, got {value!r}")
    return float(value)


def _perception_probabilities(p_perception: Sequence[float] | Mapping[str, float]) -> list[float]:
    if isinstance(p_perception, Mapping):
        if set(p_perception) != set(PERCEPTION_LEVELS):
            raise ValueError(f"p_perception must have the keys {', '.join(PERCEPTION_LEVELS)}, got "
                             f"{sorted(p_perception)}")
        values = [p_perception[level] for level in PERCEPTION_LEVELS]
    elif isinstance(p_perception, (str, bytes)) or len(p_perception) != len(PERCEPTION_LEVELS):
        raise ValueError(f"p_perception must hold {len(PERCEPTION_LEVELS)} probabilities "
                         f"({', '.join(PERCEPTION_LEVELS)}), got {p_perception!r}")
    else:
        values = list(p_perception)
    return [_probability(value, f"p_perception[{index}]") for index, value in enumerate(values)]
