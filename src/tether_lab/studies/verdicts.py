"""Gates and three-valued verdicts, shared by the studies.

A study first checks its gates (can this regime show the effect at all?) on a tuning seed; a failed gate stops
it. A claim is then one of
    holds           every gate passed, enough seeds have a value, and the test rejects "no effect";
    does not hold   every gate passed, enough seeds have a value, and it does not;
    not testable    a gate failed, or a value the claim needs was not measured (never read off the base model,
                    never interpolated past the last measured point), or too few seeds have one; the reason is
                    said.
Each claim is a paired per-seed difference d (BAPO − DPO, say) tested one-sided against a threshold with
Student's t; a study's claims are corrected together with Holm's step-down method at `ALPHA`.
"""

from __future__ import annotations

import math

from tether.stats import t_cdf, t_interval

HOLDS, FAILS, NOT_TESTABLE = "holds", "does not hold", "not testable"
ALPHA = 0.05


def gate(name: str, value, threshold: str, passed: bool, detail: str = "") -> dict:
    """One pre-check: its value, the rule it must meet (as text), pass/fail."""
    return {"gate": name, "value": value, "threshold": threshold, "passed": bool(passed), "detail": detail}


def failed_gates(gates: list[dict]) -> list[str]:
    return [g["gate"] for g in gates if not g["passed"]]


def _clean(interval: dict) -> dict:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in interval.items()}


def paired_claim(
    claim: str, per_seed: dict, threshold: float = 0.0, min_seeds: int = 5, blocked_by: list[str] | None = None
) -> dict:
    """A claim "mean of d > threshold" over the per-seed values (None = not measured on that seed). `blocked_by`:
    the failed gates (names) or other reasons (sentences) that make it not testable whatever the values.

    Returns the claim with `verdict` (NOT_TESTABLE, or None until `holm` decides), the 95% t-interval of d,
    the one-sided p-value of d > threshold, and `reason` when not testable."""
    values = [v for v in per_seed.values() if v is not None]
    out = {
        "claim": claim,
        "threshold": threshold,
        "per_seed": per_seed,
        "interval": _clean(t_interval(values)),
        "seeds_without_value": [s for s, v in per_seed.items() if v is None],
        "p_value": None,
        "verdict": None,
    }
    if blocked_by:
        return {
            **out,
            "verdict": NOT_TESTABLE,
            "reason": "; ".join(b if " " in b else f"gate {b} failed" for b in blocked_by),
        }
    if len(values) < min_seeds:
        missing = f"; not measured on seed(s) {out['seeds_without_value']}" if out["seeds_without_value"] else ""
        return {
            **out,
            "verdict": NOT_TESTABLE,
            "reason": f"{len(values)} seed(s) with a value, the rule needs {min_seeds}{missing}",
        }
    out["p_value"] = one_sided_p(values, threshold)
    return out


def one_sided_p(values: list[float], threshold: float) -> float:
    """P-value of the one-sided t-test of mean(values) > threshold (0 or 1 when the values do not vary)."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    if sd <= 1e-12 * (1 + abs(mean)):  # no spread (up to rounding): the sign alone decides
        return 0.0 if mean - threshold > 1e-9 else 1.0
    return 1.0 - t_cdf((mean - threshold) / (sd / math.sqrt(n)), n - 1)


def holm(claims: list[dict], alpha: float = ALPHA) -> list[dict]:
    """Decide every testable claim (verdict None) by Holm's step-down correction over them: sort by p-value,
    compare the i-th smallest (0-based) with alpha / (m − i), stop at the first that fails. Sets `p_holm`."""
    testable = sorted((c for c in claims if c["verdict"] is None), key=lambda c: c["p_value"])
    m, running, rejecting = len(testable), 0.0, True
    for i, c in enumerate(testable):
        running = max(running, min(1.0, (m - i) * c["p_value"]))
        c["p_holm"] = running
        rejecting = rejecting and c["p_value"] <= alpha / (m - i)
        c["verdict"] = HOLDS if rejecting else FAILS
    return claims


def describe(c: dict, digits: int = 3) -> str:
    """One line: verdict, the difference with its interval, and the reason when not testable."""
    i = c["interval"]
    if i.get("mean") is None:
        numbers = "no value"
    elif i.get("ci95_low") is None:
        numbers = f"{i['mean']:+.{digits}f} (one seed: no interval)"
    else:
        numbers = f"{i['mean']:+.{digits}f} [{i['ci95_low']:+.{digits}f}, {i['ci95_high']:+.{digits}f}] (n = {i['n']})"
    text = f"**{c['verdict'].upper()}**: {c['claim']} — d = {numbers}"
    if c.get("p_holm") is not None:
        text += f", one-sided p = {c['p_value']:.3g}, Holm-adjusted {c['p_holm']:.3g}"
    if c.get("reason"):
        text += f" ({c['reason']})"
    return text
