"""The BAPO study's verdicts, figures and report.md, computed from results.json alone.

Claims (fixed before any run; each holds or does not, with the numbers behind it):
1. DPO's forgetting grows with heterogeneity. Forgetting F = 1 − (knowledge retained + alignment retained)/2;
   holds when DPO's mean F never decreases from one level to the next and is larger at the highest level
   than at the lowest.
2. BAPO keeps more knowledge and general alignment than every baseline: at every level and for both
   metrics BAPO's mean retained fraction is ≥ every baseline's, and strictly greater somewhere.
3. BAPO reaches personalization within 5 points of DPO: at every level, BAPO's mean persona score
   (×100) ≥ DPO's − 5.
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

    gaps = {lv: None for lv in levels}
    for lv in levels:
        b, d = _mean(summary, lv, "bapo", "persona_score"), _mean(summary, lv, "dpo", "persona_score")
        gaps[lv] = None if b is None or d is None else 100 * (b - d)
    out.append({
        "claim": "BAPO reaches personalization within 5 points of DPO",
        "holds": all(g is not None and g >= -5 for g in gaps.values()),
        "numbers": {f"h{lv}_persona_points_bapo_minus_dpo": g for lv, g in gaps.items()},
    })
    return out


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

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
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
            x, y = forgetting(summary, lv, m), _mean(summary, lv, m, "persona_score")
            ax.scatter(x, y, color=f"C{i}", marker=markers[j % len(markers)], s=50, label=m if j == 0 else None)
    ax.set_xlabel("forgetting  1 − (knowledge + alignment retained)/2")
    ax.set_ylabel("persona score")
    ax.set_title("personalization vs forgetting (marker = heterogeneity)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    paths.append(_save(plt, fig, out / "personalization_vs_forgetting.png"))

    top = levels[-1]
    runs = {r["method"]: r for r in data["runs"] if r["level"] == top and r["seed"] == min(data["protocol"]["seeds"])}
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, m in zip(axes, ("dpo", "bapo")):
        if m not in runs:
            continue
        t = runs[m]["trace"]
        for key, label in (("logps_chosen", "chosen y_w"), ("logps_rejected", "rejected y_l"), ("logps_base", "base response y_b")):
            ax.plot(t["step"], t[key], label=label)
        ax.set_title(f"{m}: log π_θ during training (heterogeneity {top})")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("summed log-prob (batch mean)")
    axes[1].legend(fontsize=8)
    paths.append(_save(plt, fig, out / "mechanism_logps.png"))
    return paths


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
        + ". Cells: mean over seeds [95% percentile-bootstrap CI over seeds]; one seed gives the value alone.",
        "",
        f"Base model: knowledge accuracy {data['base']['knowledge']:.3f}, general alignment {data['base']['alignment']:.3f}.",
        "",
    ]
    tables = (
        ("Knowledge retained (% of the base model's accuracy)", "knowledge_retained", 100),
        ("General alignment retained (% of the base model's score)", "alignment_retained", 100),
        ("Persona score (×100)", "persona_score", 100),
        ("Win rate vs the base model (%)", "win_rate", 100),
    )
    for title, metric, scale in tables:
        lines += [f"## {title}", "", "| method | " + " | ".join(f"h = {lv}" for lv in levels) + " |",
                  "|---|" + "---|" * len(levels)]
        for m in p["methods"]:
            lines.append(f"| {m} | " + " | ".join(fmt(_cell(summary, lv, m, metric), scale) for lv in levels) + " |")
        lines.append("")
    lines += ["## Claims", ""]
    for c in data["claims"]:
        verdict = "**holds**" if c["holds"] else "**does not hold**"
        nums = ", ".join(f"{k} = {v:.4g}" if isinstance(v, float) else f"{k} = {v}" for k, v in c["numbers"].items())
        lines += [f"- {c['claim']}: {verdict}. ({nums})"]
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
        "| h | method | seed | knowledge | alignment | persona | win rate | seconds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["runs"], key=lambda r: (r["level"], p["methods"].index(r["method"]), r["seed"])):
        lines.append(
            f"| {r['level']} | {r['method']} | {r['seed']} | {r['knowledge']:.3f} | {r['alignment']:.3f} | "
            f"{r['persona_score']:.3f} | {r['win_rate']:.3f} | {r['seconds']} |"
        )
    lines += ["", f"Wall time of the invocation that finished the study: {data['wall_seconds_this_invocation']} s.", ""]
    return "\n".join(lines)
