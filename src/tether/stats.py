"""Statistics of evaluations and studies: means with percentile-bootstrap intervals, and pairwise win rates
(docs/methods.md §6). Plain numbers in, plain dicts out; no model."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
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
