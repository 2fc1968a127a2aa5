"""Statistics of evaluations and studies: means with percentile-bootstrap intervals, Student-t intervals (paired
per-seed differences, for study verdicts), and pairwise win rates
(docs/methods.md §6). Plain numbers in, plain dicts out; no model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lo, hi): the sample mean and its (1 − alpha) percentile-bootstrap interval.

    Resamples len(values) items with replacement `n_boot` times from a seeded generator; lo and hi are
    the alpha/2 and 1 − alpha/2 quantiles of the resampled means. Empty input gives NaNs.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


def summarize(values: Sequence[float], seed: int = 0) -> dict:
    """{"mean", "ci95_low", "ci95_high", "n"} of per-item values (95% percentile bootstrap)."""
    mean, lo, hi = bootstrap_ci(values, seed=seed)
    return {"mean": mean, "ci95_low": lo, "ci95_high": hi, "n": len(values)}


def win_rates(scores: Sequence[float], other_scores: Sequence[float]) -> list[float]:
    """Per item: 1 if scores beat other_scores, 0.5 on a tie, 0 otherwise (mean = win rate, ties split)."""
    return [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores, other_scores, strict=True)]


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def t_cdf(t: float, df: float) -> float:
    """P(T ≤ t) for Student's t with `df` degrees of freedom (through the regularized incomplete beta)."""
    import math

    x = df / (df + t * t)
    if x >= 1.0:
        return 0.5
    a, b = df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    ibeta = front * _betacf(a, b, x) / a if x < (a + 1) / (a + b + 2) else 1.0 - front * _betacf(b, a, 1 - x) / b
    return 1.0 - 0.5 * ibeta if t > 0 else 0.5 * ibeta


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` degrees of freedom (bisection on t_cdf; |error| < 1e-10)."""
    if not 0 < p < 1 or df <= 0:
        raise ValueError("t_quantile needs 0 < p < 1 and df > 0")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12:
            break
    return (lo + hi) / 2


def t_interval(values: Sequence[float], alpha: float = 0.05) -> dict:
    """{"mean", "ci95_low", "ci95_high", "n", "sd"}: the mean of `values` and its Student-t (1 − alpha) interval,
    mean ± t(1 − alpha/2, n − 1) · sd / √n. For paired per-seed differences (one value per seed), this is the
    paired t-interval. Fewer than 2 values give a NaN interval."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    mean = float(x.mean()) if n else float("nan")
    if n < 2:
        return {"mean": mean, "ci95_low": float("nan"), "ci95_high": float("nan"), "n": n, "sd": float("nan")}
    sd = float(x.std(ddof=1))
    half = t_quantile(1 - alpha / 2, n - 1) * sd / float(np.sqrt(n))
    return {"mean": mean, "ci95_low": mean - half, "ci95_high": mean + half, "n": n, "sd": sd}


def paired_t_interval(a: Sequence[float], b: Sequence[float], alpha: float = 0.05) -> dict:
    """t_interval of the paired differences a[i] − b[i] (same seed i in both; lengths must match)."""
    return t_interval([x - y for x, y in zip(a, b, strict=True)], alpha)
