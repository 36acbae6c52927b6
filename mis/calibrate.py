"""`misguard calibrate`: a judge's judgments and reference labels in, a calibration file out (and, with
`into_judge`, the calibration embedded in the judge folder). Re-runs alone from the files of the previous stages:
judgments.jsonl from `misguard score`, and GPT-4o's gpt_eval.py output, human labels, or any JSON Lines label file
read through field maps.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from misguard.calibration import Calibration, fit_calibration
from misguard.calibration.trust import (
    DEFAULT_FLAG_SHARE,
    MIN_ROWS,
    VLM_SIGNALS,
    ConformalTrust,
    check_flag_share,
    vlm_signals,
)
from misguard.core.errors import MisguardError
from misguard.core.join import join_labels
from misguard.core.labels import LabelRecord, LabelSource, read_sources, source_paths
from misguard.core.rows import BadRows
from misguard.core.settings import check_number
from misguard.judges.spec import embed_calibration


@dataclass
class CalibrateConfig:
    """One `misguard calibrate` run. Each field is one CLI option."""

    judgments: LabelSource
    """The local judge's judgments.jsonl (raw probabilities are used when the judgments were calibrated)."""
    reference: LabelSource | Sequence[LabelSource]
    """GPT-4o's labels for the same responses: one file, or several read as one set (one per target model)."""
    out: Path
    """The calibration file to write (JSON)."""
    method: str = "auto"
    """temperature | platt | isotonic | none | auto, for the safety head. Auto compares them on held-out folds and
    keeps the lowest log-loss: none (the judge's own probabilities) unless a method beats it; the report's
    `auto` holds the comparison."""
    perception_method: str = "auto"
    threshold_rule: str = "max_kappa"
    """How the Unsafe threshold is chosen: max_kappa (against the reference), match_rate (the reference's Unsafe
    rate) or fixed (0.5)."""
    into_judge: Path | None = None
    """Also embed the calibration in this judge folder's judge.json, so `misguard score` applies it by default."""
    max_unmatched_share: float = 0.02
    """Most share of reference labels allowed to match no judgment (judgments without a label are fine)."""
    skip_bad: bool = False
    flag_share: float | None = DEFAULT_FLAG_SHARE
    """For a VLM judge's judgments (they carry the answer codes' mass): fit its trust score on the same rows, so
    that this share of them would be flagged out of domain; None or 0: no trust score."""

    def __post_init__(self):
        check_number("CalibrateConfig.max_unmatched_share", self.max_unmatched_share, at_least=0.0, at_most=1.0)


def run_calibrate(config: CalibrateConfig) -> Calibration:
    """Fit a calibration of the judge's probabilities against the reference labels and write it. Returns the
    Calibration. Raises DataError for bad or unmatched rows, MisguardError when the judgments carry no
    probabilities (zero-shot JSON judges) or there is too little to fit."""
    if config.flag_share:
        try:
            check_flag_share(config.flag_share)
        except ValueError as error:
            raise MisguardError(f"--flag-share: {error}") from None
    bad = BadRows(skip=config.skip_bad)
    judgments = config.judgments.read(raw_probabilities=True, bad=bad)
    # The reference may label only a sample of the judged responses: judgments without a label are expected.
    joined = join_labels(judgments, read_sources(config.reference, bad=bad),
                         max_unmatched_share=config.max_unmatched_share, max_unmatched_judge_share=1.0, bad=bad)
    pairs = [(j, r) for j, r in joined.pairs if j.p_unsafe is not None and r.safety is not None]
    if not pairs:
        raise MisguardError(f"{config.judgments.path}: no judgment with probabilities matches a reference label; "
                            "calibration needs a judge that reports p_unsafe (a judge folder, not zero-shot JSON)")
    p_unsafe = np.array([j.p_unsafe for j, _ in pairs])
    has_perception = all(j.p_perception is not None for j, _ in pairs)
    p_perception = np.array([j.p_perception for j, _ in pairs]) if has_perception else None
    judges = sorted({record.judge for record in judgments if record.judge})
    try:
        calibration = fit_calibration(
            p_unsafe, [r.safety for _, r in pairs], p_perception, [r.perception for _, r in pairs],
            method=config.method, perception_method=config.perception_method, threshold_rule=config.threshold_rule,
            fitted_on={"judgments": str(config.judgments.path), "reference": source_paths(config.reference),
                       "judge": judges, "pairs": len(pairs), "join_by": joined.join_by,
                       "skipped_rows": bad.report()})
    except ValueError as error:
        raise MisguardError(f"cannot calibrate on {len(pairs)} pairs: {error}") from None
    if config.flag_share:
        calibration = _with_trust(calibration, [j for j, _ in pairs], config.flag_share)
    calibration.save(config.out)
    if config.into_judge is not None:
        embed_calibration(config.into_judge, calibration)
    return calibration


def _with_trust(calibration: Calibration, judgments: list[LabelRecord], flag_share: float) -> Calibration:
    """The calibration with a VLM judge's trust score fitted on these judgments (calibration/trust.py): on their
    calibrated probabilities and the answer codes' mass. Judgments without the mass (the lite judge keeps its own
    trust score; a server that returns no logprobs) get none, and the report says why."""
    if not judgments or any(j.label_mass is None for j in judgments):
        note = "the judgments carry no answer-code mass (not a VLM judge reading code probabilities)"
        return replace(calibration, report={**calibration.report, "trust": {"fitted": False, "why": note}})
    if len(judgments) < MIN_ROWS:
        note = f"{len(judgments)} pairs; a trust score needs {MIN_ROWS} or more"
        return replace(calibration, report={**calibration.report, "trust": {"fitted": False, "why": note}})
    has_perception = all(j.p_perception is not None for j in judgments)
    p_unsafe, p_perception = calibration.apply(np.array([j.p_unsafe for j in judgments]),
                                               np.array([j.p_perception for j in judgments]) if has_perception
                                               else None)
    names = VLM_SIGNALS if has_perception else VLM_SIGNALS[:2]
    signals = vlm_signals(p_unsafe, calibration.threshold.value, [j.label_mass for j in judgments], p_perception)
    try:
        trust = ConformalTrust.fit(signals, names=names, flag_share=flag_share)
    except ValueError as error:
        raise MisguardError(f"cannot fit the trust score: {error}") from None
    flagged = float(trust.flagged(trust.score(signals)).mean())
    report = {"fitted": True, "signals": list(names), "rows": len(judgments), "flag_share": flag_share,
              "threshold": trust.threshold, "flagged_in_sample": flagged}
    return replace(calibration, trust=trust, report={**calibration.report, "trust": report})
