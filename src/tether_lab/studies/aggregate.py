"""The aggregate view of a set of runs (Agarwal et al. 2021, "Deep RL at the edge of the statistical precipice"; the
BPO paper's Figure 3): the median, the interquartile mean (IQM) and the mean of the runs' scores, each with a 95%
stratified percentile-bootstrap interval. Pure Python, no model.

    IQM        the mean of the middle half of the sorted scores: the lowest and the highest ⌊n/4⌋ dropped
               (scipy.stats.trim_mean(x, 0.25), which the `rliable` package uses)
    stratified each bootstrap replicate redraws, with replacement, as many runs as each stratum has from that
               stratum alone (a stratum = a task, or here a loss), pools them and computes the statistic;
               the interval is the replicates' 2.5th and 97.5th percentiles
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

STATISTICS = ("median", "iqm", "mean")


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def median(values: Sequence[float]) -> float:
    xs, n = sorted(values), len(values)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def iqm(values: Sequence[float]) -> float:
    """Interquartile mean: ⌊n/4⌋ scores cut from each end of the sorted list, the rest averaged."""
    xs, cut = sorted(values), len(values) // 4
    return mean(xs[cut : len(xs) - cut])


FUNCTIONS: dict[str, Callable[[Sequence[float]], float]] = {"median": median, "iqm": iqm, "mean": mean}


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-quantile (0 ≤ q ≤ 1) of sorted values, linear between order statistics (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (pos - lo) * (sorted_values[hi] - sorted_values[lo])


def stratified_bootstrap(
    strata: dict[str, Sequence[float]], statistic: str = "mean", replicates: int = 2000, seed: int = 0
) -> dict:
    """{"value", "ci95_low", "ci95_high", "n", "replicates"} of `statistic` over the pooled scores of every stratum,
    with its 95% stratified percentile-bootstrap interval (module docstring). Empty strata are left out."""
    groups = [list(v) for v in strata.values() if len(v)]
    if not groups:
        return {"value": None, "ci95_low": None, "ci95_high": None, "n": 0, "replicates": 0}
    fn, rng = FUNCTIONS[statistic], random.Random(seed)
    draws = sorted(fn([x for g in groups for x in rng.choices(g, k=len(g))]) for _ in range(replicates))
    return {
        "value": fn([x for g in groups for x in g]),
        "ci95_low": percentile(draws, 0.025),
        "ci95_high": percentile(draws, 0.975),
        "n": sum(len(g) for g in groups),
        "replicates": replicates,
    }


def aggregate(strata: dict[str, Sequence[float]], replicates: int = 2000, seed: int = 0) -> dict[str, dict]:
    """Median, IQM and mean of the pooled scores, each with its stratified bootstrap interval."""
    return {s: stratified_bootstrap(strata, s, replicates, seed) for s in STATISTICS}
