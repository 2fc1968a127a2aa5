"""The BAPO study's verdicts, figures and report.md, computed from results.json alone.

Frontiers. A run's points are (personalization gain, retention) at each evaluated step (bapo.py); its curve
starts at the base model (gain 0, retention 1) and follows the steps. BAPO also has a curve across λ: the base
model (λ → ∞), then each λ's last-step point from the largest λ to the smallest. A method's retention at a
matched gain g is the best, over its curves, of the retention linearly interpolated where the curve first reaches
g; a curve that never reaches g gives nothing there. Gains and retentions are per seed; every verdict takes one
number per seed and a Student-t interval over seeds (tether.stats.t_interval: the paired t-interval when the
number is a difference of two methods on the same seed). Primary: greedy answers; the same rules on sampled
(T = 1) answers are reported beside them.

Claims (rules fixed before any full-mode run of this protocol):
1. DPO's forgetting at matched personalization grows with heterogeneity: per seed, d = F(highest level) −
   F(lowest level), F = 1 − DPO's retention at gain `target_gain`; holds when every seed has d, there are ≥ 5
   seeds, and the 95% t-interval of d lies above 0.
2. At the frontier level, at gain `target_gain`, BAPO's retention minus the best baseline's (the highest of DPO,
   IPO, SLiC, DPO + NLL that reach that gain on that seed) is > 0: every seed has a difference, ≥ 5 seeds, and
   the 95% t-interval lies above 0.
3. BAPO reaches a personalization gain within 5 points of DPO's best while retaining ≥ 0.95: per seed, d =
   (BAPO's highest gain over points with retention ≥ 0.95, the base model's 0 included) − (DPO's highest gain
   over its points); holds when ≥ 5 seeds and the 95% t-interval of d lies above −5.
Verdicts are three-valued (studies/verdicts.py): a claim with a seed whose curve never reaches the matched gain,
or with fewer than 5 seeds, is "not testable", never "does not hold"; so is claim 3 when DPO's best gain on a
seed is below 5 points (a BAPO that never leaves the base model would pass it; this precondition was added after
the recipe-2 results were in, and can only take a "holds" away).
"""

from __future__ import annotations

import math
from pathlib import Path

from tether.stats import t_interval
from tether_lab.studies.verdicts import FAILS, HOLDS, NOT_TESTABLE

BASELINES = ("dpo", "ipo", "slic", "dpo+nll")
MIN_SEEDS = 5
MIN_RETENTION = 0.95
WITHIN_POINTS = 5.0


def _points(run: dict, decoding: str) -> list[tuple[float, float]]:
    return [(p[decoding]["gain"], p[decoding]["retention"]) for p in run["points"]]


def curves(runs: list[dict], level: int, method: str, seed: int, decoding: str) -> list[list[tuple[float, float]]]:
    """Every curve of (gain, retention) of `method` at `level` on `seed`, each starting at the base model (0, 1)."""
    mine = [r for r in runs if r["level"] == level and r["method"] == method and r["seed"] == seed]
    out = [[(0.0, 1.0), *_points(r, decoding)] for r in mine]
    if method == "bapo":
        for form in sorted({r.get("anchor_form") or "hinge" for r in mine}):
            by_lam = sorted((r for r in mine if (r.get("anchor_form") or "hinge") == form), key=lambda r: -r["knob"])
            if len(by_lam) > 1:
                out.append([(0.0, 1.0), *(_points(r, decoding)[-1] for r in by_lam)])
    return out


def at_gain(curve: list[tuple[float, float]], gain: float) -> float | None:
    """Retention where `curve` first reaches `gain` (linear between the two points around it), else None."""
    for (g0, r0), (g1, r1) in zip(curve, curve[1:]):
        if g0 < gain <= g1:
            return r0 + (r1 - r0) * (gain - g0) / (g1 - g0)
    return None


def retention_at(runs, level, method, seed, decoding, gain) -> float | None:
    """The best retention over the method's curves at `gain` (None when no curve reaches it)."""
    values = [v for c in curves(runs, level, method, seed, decoding) if (v := at_gain(c, gain)) is not None]
    return max(values) if values else None


def best_gain(runs, level, method, seed, decoding, min_retention: float | None = None) -> float | None:
    """The highest gain over the method's points (with retention ≥ min_retention; the base point counts)."""
    points = [p for c in curves(runs, level, method, seed, decoding) for p in c]
    ok = [g for g, r in points if min_retention is None or r >= min_retention]
    return max(ok) if ok else None


def _interval(values: list[float]) -> dict:
    t = t_interval(values)
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in t.items()}


def verdict(per_seed: dict, threshold: float, min_seeds: int = MIN_SEEDS, blocked_by: str | None = None) -> dict:
    """Three-valued (studies/verdicts.py): not testable when `blocked_by` names a failed precondition, a seed has
    no value (its curve never reaches the matched gain) or there are fewer than min_seeds; otherwise holds when
    the t-interval's lower end is > threshold, and does not hold when it is not."""
    values = [v for v in per_seed.values() if v is not None]
    ci = _interval(values)
    missing = [s for s, v in per_seed.items() if v is None]
    reason = blocked_by
    if reason is None and missing:
        reason = f"not measured on seed(s) {missing}: the curve never reaches the matched value"
    if reason is None and len(values) < min_seeds:
        reason = f"{len(values)} seed(s), the rule needs {min_seeds}"
    if reason is not None:
        state = NOT_TESTABLE
    else:
        state = HOLDS if ci["ci95_low"] is not None and ci["ci95_low"] > threshold else FAILS
    out = {
        "verdict": state,
        "holds": state == HOLDS,
        "interval": ci,
        "per_seed": per_seed,
        "seeds_without_value": missing,
    }
    return {**out, "reason": reason} if reason else out


def claim_values(data: dict, decoding: str) -> list[dict]:
    p, runs = data["protocol"], data["runs"]
    seeds, levels, g = p["seeds"], sorted(p["levels"]), p["target_gain"]
    fl = p["frontier_level"]
    out = []

    lo, hi = levels[0], levels[-1]
    forget = {
        lv: {s: (None if (r := retention_at(runs, lv, "dpo", s, decoding, g)) is None else 1 - r) for s in seeds}
        for lv in levels
    }
    d1 = {s: None if forget[hi][s] is None or forget[lo][s] is None else forget[hi][s] - forget[lo][s] for s in seeds}
    out.append(
        {
            "claim": f"DPO's forgetting at matched personalization (+{g:g} style points) grows with heterogeneity "
            f"(h = {hi} minus h = {lo})",
            **verdict(d1, 0.0),
            "forgetting": {f"h{lv}": forget[lv] for lv in levels},
        }
    )

    bapo = {s: retention_at(runs, fl, "bapo", s, decoding, g) for s in seeds}
    base_ret = {
        m: {s: retention_at(runs, fl, m, s, decoding, g) for s in seeds} for m in BASELINES if m in p["methods"]
    }
    best = {s: max((v[s] for v in base_ret.values() if v[s] is not None), default=None) for s in seeds}
    d2 = {s: None if bapo[s] is None or best[s] is None else bapo[s] - best[s] for s in seeds}
    out.append(
        {
            "claim": f"at +{g:g} style points (h = {fl}), BAPO's retention minus the best baseline's is > 0",
            **verdict(d2, 0.0),
            "bapo_retention": bapo,
            "baseline_retention": base_ret,
            "best_baseline_retention": best,
        }
    )

    bg = {s: best_gain(runs, fl, "bapo", s, decoding, MIN_RETENTION) for s in seeds}
    dg = {s: best_gain(runs, fl, "dpo", s, decoding) for s in seeds}
    d3 = {s: None if bg[s] is None or dg[s] is None else bg[s] - dg[s] for s in seeds}
    # (added after the recipe-2 results, in the conservative direction: it can only turn "holds" into "not testable")
    vacuous = [s for s in seeds if dg[s] is not None and dg[s] < WITHIN_POINTS]
    out.append(
        {
            "claim": f"BAPO reaches a gain within {WITHIN_POINTS:g} points of DPO's best (h = {fl}) while retaining "
            f"≥ {MIN_RETENTION}",
            **verdict(
                d3,
                -WITHIN_POINTS,
                blocked_by=(
                    f"DPO's best gain is below {WITHIN_POINTS:g} points on seed(s) {vacuous}: a BAPO that never moves "
                    "from the base model would pass"
                    if vacuous
                    else None
                ),
            ),
            "bapo_best_gain_retaining": bg,
            "dpo_best_gain": dg,
        }
    )
    return out


def claims(data: dict, protocol=None) -> list[dict]:
    """The three claims on greedy answers, each with the same rule on sampled answers under "sampled"."""
    greedy, sampled = claim_values(data, "greedy"), claim_values(data, "sampled")
    return [{**c, "decoding": "greedy", "sampled": s} for c, s in zip(greedy, sampled)]


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def mean_points(runs: list[dict], decoding: str) -> dict:
    """{(level, method, knob, form, step): (mean gain, mean retention, n)} over seeds."""
    acc: dict = {}
    for r in runs:
        for pt in r["points"]:
            key = (r["level"], r["method"], r["knob"], r.get("anchor_form"), pt["step"])
            acc.setdefault(key, []).append((pt[decoding]["gain"], pt[decoding]["retention"]))
    return {k: (sum(g for g, _ in v) / len(v), sum(r for _, r in v) / len(v), len(v)) for k, v in acc.items()}


def _label(method, knob, form) -> str:
    if knob is None:
        return method
    name = "λ" if method == "bapo" else "α"
    return f"{method} {name}={knob:g}" + ("" if form in (None, "hinge") else f" ({form})")


def figures(data: dict, out: Path) -> list[Path]:
    """frontiers (gain vs retention, means over seeds) at the frontier level, greedy and sampled; DPO's frontier
    per level; the mechanism traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, runs = data["protocol"], data["runs"]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, d in zip(axes, ("greedy", "sampled")):
        means = mean_points(runs, d)
        arms = sorted({k[:4] for k in means if k[0] == p["frontier_level"]}, key=lambda k: (k[1], k[2] or 0))
        for i, arm in enumerate(arms):
            pts = [(0.0, 1.0)] + [means[k][:2] for k in sorted(means) if k[:4] == arm]
            ax.plot(
                *zip(*pts),
                marker="o",
                ms=3,
                color=f"C{i % 10}",
                lw=2 if arm[1] == "bapo" else 1,
                ls="-" if arm[1] == "bapo" else "--",
                label=_label(*arm[1:]),
            )
        ax.axvline(p["target_gain"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"personalization gain (style points over the base, {d} answers)")
        ax.set_title(
            f"h = {p['frontier_level']}, {d}: each method's frontier (mean over seeds; steps along a line)", fontsize=9
        )
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("retention (facts stated correctly, held-out realms, / base)")
    axes[1].legend(fontsize=7, ncol=2)
    paths.append(_save(plt, fig, out / "frontier.png"))

    fig, ax = plt.subplots(figsize=(6, 4.5))
    means = mean_points(runs, "greedy")
    for i, lv in enumerate(sorted(p["levels"])):
        pts = [(0.0, 1.0)] + [means[k][:2] for k in sorted(means) if k[0] == lv and k[1] == "dpo"]
        ax.plot(*zip(*pts), marker="o", color=f"C{i}", label=f"DPO, h = {lv}")
    ax.axvline(p["target_gain"], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("personalization gain (style points, greedy)")
    ax.set_ylabel("retention")
    ax.set_title("DPO's frontier by heterogeneity (mean over seeds)", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out / "dpo_by_heterogeneity.png"))
    seed = min(p["seeds"])
    mine = [
        r for r in runs if r["level"] == p["frontier_level"] and r["seed"] == seed and r["method"] in ("dpo", "bapo")
    ]
    mine.sort(key=lambda r: (r["method"] != "dpo", -(r["knob"] or 0)))
    paths.append(
        trace_figure(
            plt,
            [(_label(r["method"], r["knob"], r.get("anchor_form")), r["trace"]) for r in mine],
            f"h = {p['frontier_level']}, seed {seed}: log π_θ during training",
            out / "mechanism_logps.png",
        )
    )
    return paths


def trace_figure(plt, traces: list[tuple[str, dict]], title: str, path: Path) -> Path:
    """One panel per (label, run trace): the summed log π_θ of the chosen, rejected and base responses during
    training."""
    cols = max(1, len(traces))
    fig, axes = plt.subplots(1, cols, figsize=(3.2 * cols, 3.4), sharey=True, squeeze=False)
    for ax, (label, t) in zip(axes[0], traces):
        for key, name in (
            ("logps_chosen", "chosen y_w"),
            ("logps_rejected", "rejected y_l"),
            ("logps_base", "base y_b"),
        ):
            if any(v is not None for v in t.get(key, [])):
                ax.plot(t["step"], t[key], label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("summed log π_θ (batch mean)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def _ci(c: dict, digits: int = 3) -> str:
    if c["mean"] is None or c["n"] == 0:
        return "—"
    if c["ci95_low"] is None:
        return f"{c['mean']:+.{digits}f} (n = {c['n']}, no interval)"
    return f"{c['mean']:+.{digits}f} [{c['ci95_low']:+.{digits}f}, {c['ci95_high']:+.{digits}f}] (n = {c['n']})"


def _seedvals(d: dict, digits: int = 3) -> str:
    return ", ".join(f"{s}: {'—' if v is None else f'{v:.{digits}f}'}" for s, v in d.items())


def claim_lines(data: dict) -> list[str]:
    """The report's claims, each with its verdict (greedy, and the same rule on sampled answers) and numbers."""
    lines: list[str] = []
    for i, c in enumerate(data["claims"], 1):
        verdict = c["verdict"] + (f" — {c['reason']}" if c.get("reason") else "")
        s = c["sampled"]
        lines += [
            f"{i}. {c['claim']}: **{verdict}** (greedy). Paired difference over seeds: {_ci(c['interval'])}; "
            f"per seed: {_seedvals(c['per_seed'])}."
            + (
                f" Seeds without a value (frontier never reaches the gain): {c['seeds_without_value']}."
                if c["seeds_without_value"]
                else ""
            ),
            f"   - sampled answers (T = 1): {s['verdict']}; {_ci(s['interval'])}; "
            f"per seed: {_seedvals(s['per_seed'])}.",
        ]
        for key in ("bapo_retention", "best_baseline_retention", "bapo_best_gain_retaining", "dpo_best_gain"):
            if key in c:
                lines.append(
                    f"   - {key.replace('_', ' ')} (greedy), per seed: "
                    f"{_seedvals(c[key], 3 if 'retention' in key else 1)}"
                )
        if "forgetting" in c:
            lines.append(
                "   - DPO's forgetting at the matched gain (greedy), per seed: "
                + "; ".join(f"{lv}: {_seedvals(v)}" for lv, v in c["forgetting"].items())
            )
    return lines


def report(data: dict) -> str:
    p, runs, pre = data["protocol"], data["runs"], data["precheck"]
    lines = [
        f"# BAPO study v2 ({p['mode']} mode, world seed {p['world_seed']})",
        "",
        "## Pre-check (base model of the world used)",
        "",
        f"- greedy answer is the house answer on **{100 * pre['greedy_is_house']:.1f}%** of the {pre['n_prompts']} "
        f"held-out prompts (target ≥ 95%)",
        f"- median summed log π_ref of the house answer y_b: **{pre['median_logp_base']:.3f} nats** (target ≤ −0.9; "
        f"quartiles {pre['logp_base_quartiles'][0]:.3f}, {pre['logp_base_quartiles'][1]:.3f})",
        "",
        "## Protocol",
        "",
        f"World recipe 2 (`world/paraphrased_house.py`), seed {p['world_seed']}: personalization data from "
        "two thirds of the realms, every measure on one question per fact of the other third (held-out realms); "
        "rejected answers are never the house answer. "
        f"{p['steps']} steps × batch {p['batch_size']}, constant learning rate {p['learning_rate']:g}, "
        f"β = {p['beta']}, "
        f"evaluated every {p['eval_every']} steps; seeds {p['seeds']} (seed s trains on persona s mod 2 of its level: "
        + "; ".join(
            f"h = {lv}: " + ", ".join(f"`{x}`" for x in sorted({r["persona"] for r in runs if r["level"] == lv}))
            for lv in p["levels"]
        )
        + f"). DPO at every level; at h = {p['frontier_level']} also IPO, SLiC (by steps), DPO + NLL (α ∈ "
        f"{p['nll_weights']}), BAPO (λ ∈ {p['anchor_weights']}, anchor {', '.join(p['anchor_forms'])} on summed "
        "log-probs of greedy base responses). Gain = 100 · (style match − the base model's style match), on the same "
        "answers; retention = fraction of answers stating the fact correctly / the base model's fraction. "
        f"Base model: fact stated correctly {data['base']['greedy']['correct']:.3f} (greedy), "
        f"{data['base']['sampled']['correct']:.3f} (sampled); multiple choice {data['base']['mc']:.3f}.",
        "",
        "## Claims",
        "",
    ]
    lines += claim_lines(data)
    if any(c["verdict"] == NOT_TESTABLE for c in data["claims"]):
        lines += [
            "",
            "What would make the not-testable claims testable (a next protocol, not a retuning of this one): "
            "personalization data inside the base model's support — chosen answers the base model itself can "
            "write (its own samples that the persona scores higher, as the SmolLM2 study does) instead of "
            "rendered styles whose log-probability under the base model sits tens of nats below its house "
            "answer — so that DPO's curve reaches the matched gain between measured points on every seed.",
        ]
    lines += [
        "",
        *why_no_gain(data),
        "## Figures",
        "",
        "![frontier](frontier.png)",
        "",
        "![DPO by heterogeneity](dpo_by_heterogeneity.png)",
        "",
        "![mechanism](mechanism_logps.png)",
        "",
        "## Every evaluation point (means over seeds)",
        "",
        "| h | arm | step | n | gain greedy | retention greedy | gain sampled | retention sampled | MC retained "
        "| alignment retained (greedy) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += point_table(runs)
    lines += [
        "",
        "## Every run (last step, greedy)",
        "",
        "| h | persona | arm | seed | gain | retention | seconds | first held-out answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(runs, key=lambda r: (r["level"], r["method"], r["knob"] or 0, r["seed"])):
        last = r["points"][-1]["greedy"]
        answer = last["sample"].replace("\n", " ⏎ ").replace("|", "\\|")
        lines.append(
            f"| {r['level']} | {r['persona']} | {_label(r['method'], r['knob'], r.get('anchor_form'))} | {r['seed']} | "
            f"{last['gain']:+.1f} | {last['retention']:.3f} | {r['seconds']} | {answer[:80]} |"
        )
    lines += [
        "",
        f"Wall time of the invocation that finished the study: {data['wall_seconds_this_invocation']} s "
        f"(sum of run times {sum(r['seconds'] for r in runs):.0f} s).",
        "",
    ]
    return "\n".join(lines)


def point_table(runs: list[dict]) -> list[str]:
    acc: dict = {}
    for r in runs:
        for pt in r["points"]:
            acc.setdefault(
                (r["level"], r["method"], r["knob"] or 0, r.get("anchor_form") or "", pt["step"]), []
            ).append(pt)
    rows = []
    for (lv, m, knob, form, step), pts in sorted(acc.items()):

        def avg(f, pts=pts):
            return sum(f(x) for x in pts) / len(pts)

        rows.append(
            f"| {lv} | {_label(m, knob if m in ('bapo', 'dpo+nll') else None, form)} | {step} | {len(pts)} | "
            f"{avg(lambda x: x['greedy']['gain']):+.1f} | {avg(lambda x: x['greedy']['retention']):.3f} | "
            f"{avg(lambda x: x['sampled']['gain']):+.1f} | {avg(lambda x: x['sampled']['retention']):.3f} | "
            f"{avg(lambda x: x['mc_retained']):.3f} | {avg(lambda x: x['greedy']['alignment_retained']):.3f} |"
        )
    return rows


def why_no_gain(data: dict) -> list[str]:
    """When no λ lets BAPO gain ≥ target_gain (greedy, mean over seeds) at the frontier level: per λ, the gains
    and the anchored log-probabilities, so the reader sees what held BAPO."""
    p, runs = data["protocol"], data["runs"]
    means = mean_points(runs, "greedy")
    bapo = {k: v for k, v in means.items() if k[0] == p["frontier_level"] and k[1] == "bapo"}
    if not bapo or max(g for g, _, _ in bapo.values()) >= p["target_gain"]:
        return []
    lines = [
        f"## Why BAPO does not reach +{p['target_gain']:g} style points at h = {p['frontier_level']}",
        "",
        "| λ | best mean gain greedy | best mean gain sampled | log π_θ(y_b) first → last step "
        "| log π_θ(y_w) first → last | log π_θ(y_l) first → last |",
        "|---|---|---|---|---|---|",
    ]
    sampled = mean_points(runs, "sampled")
    for lam in p["anchor_weights"]:
        mine = [r for r in runs if r["method"] == "bapo" and r["knob"] == lam and r["level"] == p["frontier_level"]]
        if not mine:
            continue

        def ends(key, mine=mine):
            firsts = [r["trace"][key][0] for r in mine if r["trace"][key] and r["trace"][key][0] is not None]
            lasts = [r["trace"][key][-1] for r in mine if r["trace"][key] and r["trace"][key][-1] is not None]
            return f"{sum(firsts) / len(firsts):.2f} → {sum(lasts) / len(lasts):.2f}" if firsts and lasts else "—"

        g = max(v[0] for k, v in bapo.items() if k[2] == lam)
        gs = max(v[0] for k, v in sampled.items() if k[0] == p["frontier_level"] and k[1] == "bapo" and k[2] == lam)
        lines.append(
            f"| {lam:g} | {g:+.1f} | {gs:+.1f} | {ends('logps_base')} | {ends('logps_chosen')} "
            f"| {ends('logps_rejected')} |"
        )
    mine = [
        r
        for r in runs
        if r["method"] == "bapo" and r["level"] == p["frontier_level"] and r["trace"]["logps_base"][-1] is not None
    ]
    gap = sum(r["trace"]["logps_base"][-1] - r["trace"]["logps_chosen"][-1] for r in mine) / max(1, len(mine))
    return lines + [
        "",
        "While the anchor holds log π_θ(y_b) at its base value, the house answer keeps its probability; "
        "the greedy answer changes only once another answer overtakes it. At the last step the persona's "
        f"answer y_w is still {gap:.1f} nats less likely than y_b (mean over BAPO's runs, batch means): "
        "the DPO term is satisfied by pushing y_l down, long before y_w catches up.",
        "",
    ]


def summary_table(data: dict) -> str:
    """A plain-text summary for the terminal: per arm at every 10th step, mean gain and retention (greedy and
    sampled), then the verdicts."""
    pre = data.get("precheck", {})
    lines = [
        f"BAPO study v2, {data['protocol']['mode']} mode, world seed {data['protocol']['world_seed']}: "
        f"{len(data['runs'])} runs, seeds {data['protocol']['seeds']}",
        f"pre-check: greedy answer = house answer on {100 * pre.get('greedy_is_house', float('nan')):.1f}% of held-out "
        f"prompts; median log π_ref(y_b) {pre.get('median_logp_base', float('nan')):.3f} nats",
        f"{'h':>2}  {'arm':<18}{'step':>5}{'gain':>8}{'retention':>11}{'gain(T=1)':>11}{'ret.(T=1)':>11}",
    ]
    g, s = mean_points(data["runs"], "greedy"), mean_points(data["runs"], "sampled")
    for k in sorted(
        (k for k in g if k[4] % 10 == 0 or k[4] == data["protocol"]["steps"]),
        key=lambda k: (k[0], k[1], k[2] or 0, k[4]),
    ):
        lines.append(
            f"{k[0]:>2}  {_label(k[1], k[2], k[3]):<18}{k[4]:>5}"
            f"{g[k][0]:>8.1f}{g[k][1]:>11.3f}{s[k][0]:>11.1f}{s[k][1]:>11.3f}"
        )
    lines += [f"claim {i}: {c['verdict']} — {c['claim']}" for i, c in enumerate(data.get("claims", []), 1)]
    return "\n".join(lines)
