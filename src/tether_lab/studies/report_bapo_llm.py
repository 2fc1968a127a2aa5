"""report.md and figures of the BAPO study on a chat model (protocol version 3), from results.json alone:
gates first, then the selection, the claims, the frontiers (with the null run's floor) and every point."""

from __future__ import annotations

from pathlib import Path

from tether_lab.studies.bapo_llm_rules import value_at
from tether_lab.studies.common import write_study_report
from tether_lab.studies.verdicts import describe

STAGES = ("calibration", "confirmatory")


def _label(run: dict) -> str:
    if run["kind"] == "bapo":
        return f"BAPO λ={run['anchor_weight']:g}"
    if run["kind"] == "dpo":
        return f"DPO lr {run['learning_rate']:g} β {run['beta']:g}"
    return {
        "ipo": "IPO",
        "slic": "SLiC",
        "dpo+nll": f"DPO+NLL α={run['nll_weight']:g}",
        "null": "null (SFT on y_b)",
    }.get(run["arm"], run["arm"])


def figures(data: dict, out: Path) -> list[Path]:
    """frontier-STAGE-PERSONA.png: net knowledge loss (right→wrong − wrong→right, of 399) against persona gain,
    one line per arm and seed, from the first MEASURED point (the base model is the origin, not a point); the
    null run's points mark the churn any LoRA perturbation costs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    gains = data["protocol"]["matched_gains"]
    for stage in STAGES:
        for persona in data["protocol"]["personas"]:
            runs = [r for r in data["runs"] if r["stage"] == stage and r["persona"] == persona]
            if not runs:
                continue
            fig, ax = plt.subplots(figsize=(8, 5))
            colors: dict[str, str] = {}
            for r in sorted(runs, key=lambda r: (r["kind"], r["arm"], r["seed"])):
                label = _label(r)
                first = label not in colors
                colors.setdefault(label, f"C{len(colors) % 10}")
                style = dict(color="black", ls=":", marker="x") if r["kind"] == "null" else dict(marker="o", ms=3)
                xs, ys = [pt["gain"] for pt in r["points"]], [pt["net_loss"] for pt in r["points"]]
                style = {"color": colors[label], **style}
                ax.plot(xs, ys, label=label if first else None, lw=1.0, alpha=0.8, **style)
            for g in gains:
                ax.axvline(g, color="grey", lw=0.8, ls="--")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlabel(f"persona gain ({persona} score over the base model's)")
            ax.set_ylabel("net knowledge loss (questions right→wrong − wrong→right, of 399)")
            ax.set_title(
                f"{stage}, {persona}: each line one run (arm × seed), points at the evaluated steps", fontsize=9
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            path = out / f"frontier-{stage}-{persona}.png"
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
    return paths


def report(data: dict) -> str:
    p, base = data["protocol"], data["base"]
    lines = [
        f"# BAPO vs DPO on {p['model']} (protocol version {p['version']}{', quick mode' if p.get('quick') else ''})",
        "",
        "## Gates (checked on the calibration's tuning data seed before any confirmatory run)",
        "",
        "| gate | value | rule | passed | what |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {g['gate']} | {g['value']} | {g['threshold']} | {'yes' if g['passed'] else '**NO**'} "
              f"| {g['detail']} |"
              for g in data.get("gates", [])]  # fmt: skip
    if data.get("stopped_at_gates"):
        lines += ["", f"**The study stopped at the gate(s) {', '.join(data['stopped_at_gates'])}**: no confirmatory "
                  "run was made, and every claim is not testable."]  # fmt: skip
    lines += ["", "## Claims (paired per-seed differences, one-sided t-test, Holm over the testable claims)", ""]
    lines += [f"- {describe(c)}" for c in data.get("claims", [])]
    sel = data.get("selection")
    if sel:
        lines += ["", "## Selection (the rule in bapo_llm_rules.select, applied to the calibration)", "",
                  f"Arms: {sel['arms']}; evaluation steps per arm: {sel['eval_steps']}."]  # fmt: skip
    lines += ["", "## Setting", "",
              f"Base model: knowledge {base['knowledge']:.3f} on the probe; persona scores "
              + ", ".join(f"{k} {v:.3f}" for k, v in base["persona_score"].items())
              + f". LoRA r {p['lora_r']} (α {p['lora_alpha']}), {p['batch_size']} pairs per step, constant learning "
              f"rate, {p['steps']} steps, {p['train_prompts']} training prompts, {p['eval_prompts']} held-out prompts, "
              f"{p['max_new_tokens']} new tokens. Data seed of study seed s: {p['data_seed']} + s; calibration: "
              f"{p['data_seed']} + 1000.", ""]  # fmt: skip
    for name, d in sorted(data.get("data", {}).items()):
        lines.append(f"- data `{name}`: {d['pairs']} pairs, chosen scores higher in {100 * d['chosen_wins']:.0f}%; "
                     f"null run {d['null_pairs']} pairs")  # fmt: skip
    lines += ["", "Not measured here: general alignment (no general reward model for this chat model ships with "
              "tether; "
              "the paper's second axis), and forgetting against preference heterogeneity (one persona carries the "
              "claims, one replicates; levels of heterogeneity would need ≥ 3 per persona)."]  # fmt: skip
    for stage in STAGES:
        runs = [r for r in data["runs"] if r["stage"] == stage]
        if not runs:
            continue
        lines += ["", f"## {stage.capitalize()}: every point", ""]
        lines += [f"![{stage} {persona}](frontier-{stage}-{persona}.png)" for persona in p["personas"]
                  if any(r["persona"] == persona for r in runs)]  # fmt: skip
        lines += ["", "| persona | seed | arm | step | gain | win vs base | knowledge | right→wrong | wrong→right "
                  "| net loss |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(runs, key=lambda r: (r["persona"], r["seed"], r["kind"], r["arm"])):
            for pt in r["points"]:
                lines.append(f"| {r['persona']} | {r['seed']} | {_label(r)} | {pt['step']} | {pt['gain']:+.3f} | "
                             f"{pt['win_rate']:.2f} | {pt['knowledge']:.3f} | {pt['right_to_wrong']} | "
                             f"{pt['wrong_to_right']} | {pt['net_loss']:+d} |")  # fmt: skip
        lines += ["", "Net knowledge loss at the matched gains, read between measured points (– = not measured):", "",
                  "| persona | seed | arm | " + " | ".join(f"+{g:g}" for g in p["matched_gains"]) + " |",
                  "|---|---|---|" + "---|" * len(p["matched_gains"])]  # fmt: skip
        for r in sorted(runs, key=lambda r: (r["persona"], r["seed"], r["kind"], r["arm"])):
            cells = [value_at(r["points"], g) for g in p["matched_gains"]]
            lines.append(f"| {r['persona']} | {r['seed']} | {_label(r)} | "
                         + " | ".join("–" if v is None else f"{v:+.1f}" for v in cells) + " |")  # fmt: skip
    hours = sum(r["seconds"] for r in data["runs"]) / 3600
    lines += ["", f"Compute: {hours:.2f} hours of runs (training and evaluation) in all; the invocation that wrote "
              f"this took {data.get('wall_seconds_this_invocation', 0) / 60:.1f} min; the base evaluation "
              f"{(base.get('seconds') or 0):.0f} s.", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(data: dict, out: Path) -> Path:
    return write_study_report(out, report(data), lambda: figures(data, out))
