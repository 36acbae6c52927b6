"""`misguard calibrate`: a judge's judgments and reference labels in, a calibration file out (and, with
`into_judge`, the calibration embedded in the judge folder). Re-runs alone from the files of the previous stages:
judgments.jsonl from `misguard score`, and GPT-4o's gpt_eval.py output, human labels, or any JSON Lines label file
read through field maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from misguard.calibration import Calibration, fit_calibration
from misguard.core.errors import MisguardError
from misguard.core.join import join_labels
from misguard.core.labels import LabelSource
from misguard.core.rows import BadRows
from misguard.judges.spec import embed_calibration


@dataclass
class CalibrateConfig:
    """One `misguard calibrate` run. Each field is one CLI option."""

    judgments: LabelSource
    """The local judge's judgments.jsonl (raw probabilities are used when the judgments were calibrated)."""
    reference: LabelSource
    """GPT-4o's labels for the same responses."""
    out: Path
    """The calibration file to write (JSON)."""
    method: str = "auto"
    """temperature | platt | isotonic | none | auto (picked by cross-validated log-loss), for the safety head."""
    perception_method: str = "auto"
    threshold_rule: str = "max_kappa"
    """How the Unsafe threshold is chosen: max_kappa (against the reference), match_rate (the reference's Unsafe
    rate) or fixed (0.5)."""
    into_judge: Path | None = None
    """Also embed the calibration in this judge folder's judge.json, so `misguard score` applies it by default."""
    max_unmatched_share: float = 0.02
    """Most share of reference labels allowed to match no judgment (judgments without a label are fine)."""
    skip_bad: bool = False


def run_calibrate(config: CalibrateConfig) -> Calibration:
    """Fit a calibration of the judge's probabilities against the reference labels and write it. Returns the
    Calibration. Raises DataError for bad or unmatched rows, MisguardError when the judgments carry no
    probabilities (zero-shot JSON judges) or there is too little to fit."""
    bad = BadRows(skip=config.skip_bad)
    judgments = config.judgments.read(raw_probabilities=True, bad=bad)
    # The reference may label only a sample of the judged responses: judgments without a label are expected.
    joined = join_labels(judgments, config.reference.read(bad=bad), max_unmatched_share=config.max_unmatched_share,
                         max_unmatched_judge_share=1.0, bad=bad)
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
            fitted_on={"judgments": str(config.judgments.path), "reference": str(config.reference.path),
                       "judge": judges, "pairs": len(pairs), "join_by": joined.join_by,
                       "skipped_rows": bad.report()})
    except ValueError as error:
        raise MisguardError(f"cannot calibrate on {len(pairs)} pairs: {error}") from None
    calibration.save(config.out)
    if config.into_judge is not None:
        embed_calibration(config.into_judge, calibration)
    return calibration
