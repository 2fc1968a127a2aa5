"""Student-t quantiles and intervals of tether.stats against published table values and a coverage check."""

import numpy as np
import pytest

from tether.stats import paired_t_interval, t_cdf, t_interval, t_quantile


@pytest.mark.parametrize(
    "p,df,expected",
    [
        (0.975, 1, 12.706204736),
        (0.975, 2, 4.302652730),
        (0.975, 4, 2.776445105),
        (0.975, 9, 2.262157163),
        (0.975, 30, 2.042272456),
        (0.95, 5, 2.015048373),
        (0.995, 10, 3.169272673),
        (0.025, 4, -2.776445105),
    ],
)
def test_t_quantile_matches_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=1e-8)
    assert t_cdf(expected, df) == pytest.approx(p, abs=1e-10)


def test_t_interval_formula_and_pairing():
    r = t_interval([1, 2, 3, 4, 5])
    half = 2.776445105 * np.std([1, 2, 3, 4, 5], ddof=1) / np.sqrt(5)
    assert (r["mean"], r["n"]) == (3.0, 5)
    assert r["ci95_low"] == pytest.approx(3 - half) and r["ci95_high"] == pytest.approx(3 + half)
    assert paired_t_interval([3, 5, 4], [1, 2, 3]) == t_interval([2, 3, 1])
    assert np.isnan(t_interval([1.0])["ci95_low"])
    with pytest.raises(ValueError):
        paired_t_interval([1, 2], [1])


def test_t_interval_covers_the_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    samples = rng.normal(1.0, 2.0, (4000, 5))
    hits = [(lambda r: r["ci95_low"] <= 1.0 <= r["ci95_high"])(t_interval(s)) for s in samples]
    assert 0.94 <= np.mean(hits) <= 0.96
