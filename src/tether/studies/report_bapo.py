"""The BAPO study's verdicts, figures and report.md, computed from results.json alone.

Claims (fixed before any run; each holds or does not, with the numbers behind it):
1. DPO's forgetting grows with heterogeneity. Forgetting F = 1 − (knowledge retained + alignment retained)/2;
   holds when DPO's mean F never decreases from one level to the next and is larger at the highest level
   than at the lowest.
2. BAPO keeps more knowledge and general alignment than every baseline: at every level and for both
   metrics BAPO's mean retained fraction is ≥ every baseline's, and strictly greater somewhere.
3. BAPO reaches personalization within 5 points of DPO: at every level, BAPO's mean style match (×100) ≥
   DPO's − 5. The style match (world.rewards.style_match) is the primary personalization measure: the persona
   score is gated on the answer being correct, so it counts forgetting as a failure to personalize. The same
   test on the persona score is reported beside it (`secondary`), with the base model's values for scale.
"""

from __future__ import annotations

from pathlib import Path

from .common import fmt

BASELINES = ("dpo", "ipo", "slic", "dpo+nll")


def _cell(summary, level, method, metric):
    row = next((r for r in summary if r["level"] == level and r["method"] == method), None)
    return None if row is None or metric not in row else row[metric]


def _mean(summary, level, method, metric):
    cell = _cell(summary, level, method, metric)
    return None if cell is None else cell["mean"]


def _base_cell(summary, level, metric):
    """The base model's value at `level` (identical in every run of that level)."""
    return next((r[metric] for r in summary if r["level"] == level and metric in r), None)


def _gain(summary, level, method):
    m, b = _mean(summary, level, method, "style_match"), _mean(summary, level, method, "base_style_match")
    return None if m is None or b is None else 100 * (m - b)


def _numbers(numbers: dict) -> str:
    return ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in numbers.items())


def forgetting(summary, level, method):
    k, a = _mean(summary, level, method, "knowledge_retained"), _mean(summary, level, method, "alignment_retained")
    return None if k is None or a is None else 1 - (k + a) / 2


def claims(summary: list[dict], protocol) -> list[dict]:
    levels = sorted({r["level"] for r in summary})
    out = []

    f = [forgetting(summary, lv, "dpo") for lv in levels]
    holds = None not in f and all(b >= a for a, b in zip(f, f[1:])) and f[-1] > f[0]
    out.append({
        "claim": "DPO's forgetting grows with preference heterogeneity",
        "holds": bool(holds),
        "numbers": {f"dpo_forgetting_h{lv}": v for lv, v in zip(levels, f)},
    })

    numbers, ok, strict = {}, True, False
    baselines = [m for m in BASELINES if m in protocol.methods]
    for lv in levels:
        for metric in ("knowledge_retained", "alignment_retained"):
            mine = _mean(summary, lv, "bapo", metric)
            values = [v for v in (_mean(summary, lv, m, metric) for m in baselines) if v is not None]
            best = max(values) if values else None
            numbers[f"h{lv}_{metric}_bapo"], numbers[f"h{lv}_{metric}_best_baseline"] = mine, best
            if mine is None or best is None or mine < best - 1e-12:
                ok = False
            elif mine > best + 1e-12:
                strict = True
    out.append({
        "claim": "BAPO keeps more knowledge and general alignment than every baseline",
        "holds": bool(ok and strict),
        "numbers": numbers,
    })

    primary, secondary = (_within_points(summary, levels, metric) for metric in ("style_match", "persona_score"))
    out.append({
        "claim": "BAPO reaches personalization (style match) within 5 points of DPO",
        **primary,
        "secondary": {"claim": "the same on the persona score (gated on correctness)", **secondary},
    })
    return out


def _within_points(summary, levels, metric, points=5.0) -> dict:
    """holds when at every level BAPO's mean `metric` ×100 ≥ DPO's − `points`; numbers: both means, the base's, the gap."""
    numbers, ok = {}, bool(levels)
    for lv in levels:
        b, d = _mean(summary, lv, "bapo", metric), _mean(summary, lv, "dpo", metric)
        base = _mean(summary, lv, "dpo", f"base_{metric}")
        gap = None if b is None or d is None else 100 * (b - d)
        numbers |= {f"h{lv}_{metric}_dpo": d, f"h{lv}_{metric}_bapo": b, f"h{lv}_{metric}_base": base,
                    f"h{lv}_points_bapo_minus_dpo": gap}
        ok = ok and gap is not None and gap >= -points
    return {"holds": bool(ok), "numbers": numbers}


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figures(data: dict, out: Path) -> list[Path]:
    """knowledge/alignment retained vs heterogeneity; personalization vs forgetting; the mechanism traces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, methods = data["summary"], data["protocol"]["methods"]
    levels = sorted({r["level"] for r in summary})
    paths = []

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)  # one scale: a 0.2% dip must not look like a cliff
    for ax, metric, title in zip(axes, ("knowledge_retained", "alignment_retained"), ("knowledge retained", "general alignment retained")):
        for m in methods:
            cells = [_cell(summary, lv, m, metric) for lv in levels]
            mean = [c["mean"] for c in cells]
            err = [[c["mean"] - c["ci95_low"] for c in cells], [c["ci95_high"] - c["mean"] for c in cells]]
            ax.errorbar(levels, mean, yerr=err, marker="o", capsize=3, label=m, linewidth=2 if m == "bapo" else 1)
        ax.set_xlabel("heterogeneity (style dimensions away from the house)")
        ax.set_xticks(levels)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("fraction of the base model's score")
    axes[1].legend(fontsize=8)
    paths.append(_save(plt, fig, out / "retained_vs_heterogeneity.png"))

    fig, ax = plt.subplots(figsize=(5.5, 4))
    markers = "os^Dv"
    for i, m in enumerate(methods):
        for j, lv in enumerate(levels):
            x, y = forgetting(summary, lv, m), _mean(summary, lv, m, "style_match")
            ax.scatter(x, y, color=f"C{i}", marker=markers[j % len(markers)], s=50, label=m if j == 0 else None)
    ax.set_xlabel("forgetting  1 − (knowledge + alignment retained)/2")
    ax.set_ylabel("style match (personalization, ungated)")
    ax.set_title("personalization vs forgetting (marker = heterogeneity)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out / "personalization_vs_forgetting.png"))

    paths.append(mechanism_figure(plt, data, "level", levels, lambda lv: f"heterogeneity {lv}", "response",
                                  out / "mechanism_logps.png"))
    return paths


def mechanism_figure(plt, data: dict, by: str, values: list, describe, noun: str, path: Path) -> Path:
    """One row per value of run[by], DPO and BAPO side by side (lowest seed): the summed log π_θ of the chosen,
    rejected and base {noun}s during training, from each run's trace."""
    seed = min(data["protocol"]["seeds"])
    fig, axes = plt.subplots(len(values), 2, figsize=(10, 3.2 * len(values)), sharey="row", squeeze=False)
    for row, value in zip(axes, values):
        runs = {r["method"]: r for r in data["runs"] if r[by] == value and r["seed"] == seed}
        for ax, m in zip(row, ("dpo", "bapo")):
            if m not in runs:
                continue
            t = runs[m]["trace"]
            for key, label in (("logps_chosen", "chosen y_w"), ("logps_rejected", "rejected y_l"), ("logps_base", f"base {noun} y_b")):
                if any(v is not None for v in t.get(key, [])):
                    ax.plot(t["step"], t[key], label=label)
            ax.set_title(f"{m}, {describe(value)}, seed {seed}", fontsize=10)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("summed log π_θ (batch mean)")
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes[0][1].legend(fontsize=8)
    fig.suptitle(f"log π_θ of chosen, rejected and base {noun}s during training")
    return _save(plt, fig, path)


def report(data: dict) -> str:
    p, summary = data["protocol"], data["summary"]
    levels = sorted({r["level"] for r in summary})
    personas = {r["level"]: r["persona"] for r in data["runs"]}
    lines = [
        f"# BAPO study ({p['mode']} mode)",
        "",
        "Personalizing the embedded world's base model to one persona, with DPO-family losses and with BAPO. "
        "Protocol (also in results.json): "
        f"{p['steps']} steps × batch {p['batch_size']}, learning rate {p['learning_rate']}, β = {p['beta']}, "
        f"BAPO λ = {p['anchor_weight']} (hinge, summed log-probs, greedy base responses), full fine-tuning, "
        f"seeds {p['seeds']}. Personas by heterogeneity: "
        + ", ".join(f"{lv} = `{personas.get(lv, '?')}`" for lv in levels)
        + ". Cells: mean over seeds [95% percentile-bootstrap CI over seeds]; one seed gives the value alone. "
        "Knowledge: 4-way multiple choice over all 600 facts; general alignment: gold score of greedy answers to the "
        "held-out prompts; style match: mean match of those answers to the persona's pole on the four style "
        "dimensions, right or wrong; persona score: the style match of correct answers, 0 for wrong ones.",
        "",
        f"Base model: knowledge accuracy {data['base']['knowledge']:.3f}, general alignment {data['base']['alignment']:.3f}.",
        "",
    ]
    tables = (
        ("Knowledge retained (% of the base model's accuracy)", "knowledge_retained", None),
        ("General alignment retained (% of the base model's score)", "alignment_retained", None),
        ("Style match (×100; personalization, right or wrong — the primary measure)", "style_match", "base_style_match"),
        ("Persona score (×100; style match of correct answers, 0 for wrong ones)", "persona_score", "base_persona_score"),
        ("Win rate vs the base model on the persona score (%)", "win_rate", None),
    )
    for title, metric, base_metric in tables:
        lines += [f"## {title}", "", "| method | " + " | ".join(f"h = {lv}" for lv in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        if base_metric:
            lines.append("| *base model* | " + " | ".join(fmt(_base_cell(summary, lv, base_metric), 100) for lv in levels) + " |")
        for m in p["methods"]:
            lines.append(f"| {m} | " + " | ".join(fmt(_cell(summary, lv, m, metric), 100) for lv in levels) + " |")
        lines.append("")
    verdicts = [("holds" if c["holds"] else "does not hold") for c in data["claims"]]
    lines += ["## Claims", "", "In short: " + "; ".join(f"claim {i} {v}" for i, v in enumerate(verdicts, 1)) + ".", ""]
    for i, c in enumerate(data["claims"], 1):
        lines += [f"{i}. {c['claim']}: **{verdicts[i - 1]}**. ({_numbers(c['numbers'])})"]
        if "secondary" in c:
            sec = c["secondary"]
            lines += [f"   - {sec['claim']}: {'holds' if sec['holds'] else 'does not hold'}. ({_numbers(sec['numbers'])})"]
            for m, note in (("dpo", "BAPO matching a DPO that barely moves is weak evidence"), ("bapo", "0 = no personalization")):
                gains = {lv: _gain(summary, lv, m) for lv in levels}
                lines += [f"   - for scale, {m}'s own style-match gain over the base model (points): "
                          + ", ".join(f"h = {lv}: {'—' if g is None else f'{g:+.1f}'}" for lv, g in gains.items()) + f" ({note})"]
    lines += [
        "",
        "## Figures",
        "",
        "![retained vs heterogeneity](retained_vs_heterogeneity.png)",
        "",
        "![personalization vs forgetting](personalization_vs_forgetting.png)",
        "",
        "![mechanism](mechanism_logps.png)",
        "",
        "## Every run",
        "",
        "| h | method | seed | knowledge | alignment | style match | persona | win rate | seconds | first held-out answer |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["runs"], key=lambda r: (r["level"], p["methods"].index(r["method"]), r["seed"])):
        answer = r["sample"]["response"].replace("\n", " ⏎ ").replace("|", "\\|")
        lines.append(
            f"| {r['level']} | {r['method']} | {r['seed']} | {r['knowledge']:.3f} | {r['alignment']:.3f} | "
            f"{r['style_match']:.3f} | {r['persona_score']:.3f} | {r['win_rate']:.3f} | {r['seconds']} | {answer[:90]} |"
        )
    lines += ["", f"Wall time of the invocation that finished the study: {data['wall_seconds_this_invocation']} s.", ""]
    return "\n".join(lines)


def summary_table(data: dict) -> str:
    """A plain-text summary for the terminal: one row per (level, method) with the means, then the verdicts."""
    p, summary = data["protocol"], data["summary"]
    cols = (("knowledge_retained", "knowl. ret."), ("alignment_retained", "align. ret."), ("style_match", "style match"),
            ("persona_score", "persona"), ("win_rate", "win rate"))
    lines = [f"BAPO study, {p['mode']} mode: {len(data['runs'])} runs, {p['steps']} steps, lr {p['learning_rate']:g}, "
             f"λ = {p['anchor_weight']:g}, seeds {p['seeds']} (means over seeds)",
             f"{'h':>2}  {'method':<9}" + "".join(f"{title:>13}" for _, title in cols)]
    for lv in sorted({r["level"] for r in summary}):
        base = {m: _base_cell(summary, lv, f"base_{m}") for m in ("style_match", "persona_score")}
        lines.append(f"{lv:>2}  {'base':<9}{1:>13.3f}{1:>13.3f}" + "".join(
            f"{base[m]['mean']:>13.3f}" if base[m] else f"{'—':>13}" for m in ("style_match", "persona_score")))
        for m in p["methods"]:
            lines.append(f"{lv:>2}  {m:<9}" + "".join(
                f"{c['mean']:>13.3f}" if (c := _cell(summary, lv, m, key)) else f"{'—':>13}" for key, _ in cols))
    lines += [f"claim {i}: {'holds' if c['holds'] else 'does not hold'} — {c['claim']}" for i, c in enumerate(data["claims"], 1)]
    return "\n".join(lines)
