"""Statistics of the retrain report: confidence intervals of accuracy, an exact McNemar test, a paired bootstrap of
an accuracy difference and accuracy against coverage (selective prediction).

No matplotlib here: these are plain numbers (numpy and scipy), usable without drawing anything.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: a rebuilt report gives the same interval


def t_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean of `values`; None with fewer than 2 values."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    half = stats.t.ppf((1 + confidence) / 2, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def wilson_interval(correct: int, total: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (here: accuracy over `total` test images)."""
    z = NormalDist().inv_cdf((1 + confidence) / 2)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> tuple[int, int, float]:
    """(images only A gets right, images only B gets right, two-sided exact McNemar p-value).

    The images both get right or both get wrong say nothing about which is better; under "no difference"
    each discordant image is a fair coin, so the p-value is a binomial test of the discordant counts.
    """
    only_a = int(np.sum(a_correct & ~b_correct))
    only_b = int(np.sum(~a_correct & b_correct))
    if only_a + only_b == 0:
        return 0, 0, 1.0
    return only_a, only_b, float(stats.binomtest(only_a, only_a + only_b, 0.5).pvalue)


def bootstrap(statistic, *samples: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
              confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """(statistic of the samples, its percentile bootstrap interval over test images).

    Paired: each resample draws test images with replacement and takes the same images from every sample (one
    per model), so the interval reflects how much the statistic depends on which images happened to be in the
    test split. `statistic(*samples)` reduces along the last axis.
    """
    samples = tuple(np.asarray(s, dtype=float) for s in samples)
    draws = np.random.default_rng(seed).integers(0, len(samples[0]), size=(resamples, len(samples[0])))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(statistic(*(s[draws] for s in samples)), [tail, 100 - tail])
    return float(statistic(*samples)), (float(low), float(high))


def paired_bootstrap(a_correct: np.ndarray, b_correct: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> tuple[float, tuple[float, float]]:
    """(accuracy of A - accuracy of B, paired percentile bootstrap interval of that difference)."""
    return bootstrap(lambda a, b: a.mean(-1) - b.mean(-1), a_correct, b_correct, resamples=resamples, seed=seed,
                     confidence=confidence)


def root_mean(squared_errors: np.ndarray) -> np.ndarray:
    """RMSE from per-image mean squared errors, along the last axis."""
    return np.sqrt(np.mean(squared_errors, axis=-1))


def coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(coverage, accuracy) of keeping the galaxies at or above each confidence threshold, most confident first.

    Only thresholds an astronomer can set count: galaxies of equal confidence are kept or dropped together.
    """
    order = np.argsort(-np.asarray(confidence, dtype=float), kind="stable")
    ranked, hits = np.asarray(confidence, dtype=float)[order], np.cumsum(np.asarray(correct, dtype=float)[order])
    kept = np.flatnonzero(np.append(ranked[1:] < ranked[:-1], True)) + 1  # ends of groups of equal confidence
    return kept / len(ranked), hits[kept - 1] / kept


def largest_coverage(coverage: np.ndarray, accuracy: np.ndarray, target: float) -> float:
    """The largest coverage whose kept galaxies reach `target` accuracy (0 when none do)."""
    reached = coverage[accuracy >= target - 1e-12]
    return float(reached.max()) if len(reached) else 0.0


def fmt_interval(interval: tuple[float, float] | None) -> str:
    """An accuracy interval in %, clipped to what accuracy can be (a t-interval of few seeds can pass 100 %)."""
    if interval is None:
        return "needs ≥ 2 seeds"
    low, high = (min(max(v, 0.0), 1.0) * 100 for v in interval)
    return f"[{low:.1f}, {high:.1f}]"


def mean_and_sd(values: pd.Series, digits: int = 2) -> str:
    return f"{values.mean():.{digits}f}" + (f" ± {values.std(ddof=1):.{digits}f}" if len(values) > 1 else "")
