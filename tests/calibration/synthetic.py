"""Synthetic judge scores with a known miscalibration, for the calibration tests.

Each function returns (reported probabilities, reference labels) drawn from a seeded generator: the labels
follow the true probabilities, the judge reports a distorted version of them.
"""
from __future__ import annotations

import numpy as np
from scipy.special import expit, softmax


def power_distorted(n: int, seed: int, power: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """True P(Unsafe) = p ~ U(0, 1); the judge reports p ** power (too low everywhere)."""
    rng = np.random.default_rng(seed)
    true_p = rng.uniform(size=n)
    return true_p**power, (rng.uniform(size=n) < true_p).astype(np.int64)


def tempered_binary(n: int, seed: int, temperature: float, scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """True logit z ~ N(0, scale^2); the judge reports sigmoid(z * temperature), so T = temperature undoes it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, n)
    return expit(logits * temperature), (rng.uniform(size=n) < expit(logits)).astype(np.int64)


def tempered_multiclass(n: int, seed: int, temperature: float, k: int = 3,
                        scale: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """True class logits z ~ N(0, scale^2) per class; the judge reports softmax(z * temperature)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, scale, (n, k))
    true_p = softmax(logits, axis=1)
    # Inverse-CDF sampling; the clip guards a cumulative sum that rounds to just under 1.
    labels = np.minimum((rng.uniform(size=(n, 1)) > np.cumsum(true_p, axis=1)).sum(axis=1), k - 1)
    return softmax(logits * temperature, axis=1), labels.astype(np.int64)


def step_distorted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The judge reports p ~ U(0, 1) but P(Unsafe) is 0.05 below p = 0.7 and 0.95 above: a jump that no
    sigmoid of the logit (temperature, Platt) can follow, and a monotone map (isotonic) can."""
    rng = np.random.default_rng(seed)
    reported = rng.uniform(size=n)
    return reported, (rng.uniform(size=n) < np.where(reported > 0.7, 0.95, 0.05)).astype(np.int64)


def calibrated_binary(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A perfectly calibrated judge: reports p ~ U(0, 1), label ~ Bernoulli(p)."""
    return power_distorted(n, seed, power=1.0)
