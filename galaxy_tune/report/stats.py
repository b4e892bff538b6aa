"""Statistics of the retrain report: confidence intervals of accuracy and an exact McNemar test.

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


def fmt_interval(interval: tuple[float, float] | None) -> str:
    """An accuracy interval in %, clipped to what accuracy can be (a t-interval of few seeds can pass 100 %)."""
    if interval is None:
        return "needs ≥ 2 seeds"
    low, high = (min(max(v, 0.0), 1.0) * 100 for v in interval)
    return f"[{low:.1f}, {high:.1f}]"


def mean_and_sd(values: pd.Series) -> str:
    return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")
