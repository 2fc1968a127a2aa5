"""The BPO study's verdicts, figures and report.md, computed from results.json alone (a partial study too).

Claims (fixed before any study run; each holds or does not, with the numbers behind it; win rates in points):
1. BPO F = 2 beats offline F = 1: for every loss, mean final win rate of bpo-f2 > offline's.
2. BPO F = 2 matches or beats on-policy DAP with π_ref = π_sft: for every loss, mean(bpo-f2) ≥ mean(on-policy) − 2.
3. π_ref = π_β beats π_sft and π_gold at F = T (DPO): mean(bpo-ft) > mean(on-policy) and > mean(gold-ref).
Per-loss verdicts are listed beside each claim; a claim with a missing setting does not hold.
"""

from __future__ import annotations

from pathlib import Path

from .common import fmt

MATCH_MARGIN = 2.0  # points: "matches" in claim 2
LABELS = {"offline": "offline (F=1)", "on-policy": "on-policy, π_ref=π_sft (F=T)", "bpo-f2": "BPO F=2",
          "bpo-ft": "BPO F=T", "gold-ref": "π_ref=π_gold (F=T)"}


def _cell(summary, setting, loss, metric="win_rate"):
    row = next((r for r in summary if r["setting"] == setting and r["loss"] == loss), None)
    return None if row is None or metric not in row else row[metric]


def _pts(summary, setting, loss):
    cell = _cell(summary, setting, loss)
    return None if cell is None else 100 * cell["mean"]


def claims(summary: list[dict], protocol: dict) -> list[dict]:
    losses = protocol["losses"]
    out = []
    per, nums = {}, {}
    for loss in losses:
        a, b = _pts(summary, "bpo-f2", loss), _pts(summary, "offline", loss)
        per[loss] = a is not None and b is not None and a > b
        nums |= {f"{loss}_bpo_f2": a, f"{loss}_offline": b}
    out.append({"claim": "BPO F=2 beats offline DAP (F=1) for every loss", "rule": "mean win rate bpo-f2 > offline, each loss",
                "holds": bool(per) and all(per.values()), "per_loss": per, "numbers": nums})
    per, nums = {}, {}
    for loss in losses:
        a, b = _pts(summary, "bpo-f2", loss), _pts(summary, "on-policy", loss)
        per[loss] = a is not None and b is not None and a >= b - MATCH_MARGIN
        nums |= {f"{loss}_bpo_f2": a, f"{loss}_on_policy": b, f"{loss}_difference": None if a is None or b is None else a - b}
    out.append({"claim": "BPO F=2 matches or beats on-policy DAP with π_ref=π_sft for every loss",
                "rule": f"mean win rate bpo-f2 ≥ on-policy − {MATCH_MARGIN:g} points, each loss",
                "holds": bool(per) and all(per.values()), "per_loss": per, "numbers": nums})
    beh, sft, gold = (_pts(summary, s, "dpo") for s in ("bpo-ft", "on-policy", "gold-ref"))
    holds = None not in (beh, sft, gold) and beh > sft and beh > gold
    out.append({"claim": "π_ref=π_β beats π_ref=π_sft and π_ref=π_gold at F=T (DPO)",
                "rule": "mean win rate bpo-ft > on-policy and > gold-ref, DPO", "holds": bool(holds),
                "numbers": {"dpo_ref_behavior": beh, "dpo_ref_sft": sft, "dpo_ref_gold": gold}})
    return out


def summary_table(data: dict) -> str:
    s, losses = data["summary"], data["protocol"]["losses"]
    lines = ["| setting | " + " | ".join(f"{x.upper()} win rate % [95% CI]" for x in losses) + " |", "|---|" + "---|" * len(losses)]
    for setting in data["protocol"]["settings"]:
        lines.append(f"| {LABELS[setting]} | " + " | ".join(fmt(_cell(s, setting, x), 100) for x in losses) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures(data: dict, out: Path) -> None:
    """win_rate_vs_F.png (BPO's win rate at F = 1, 2, T per loss; on-policy and π_gold as markers at F = T)
    and win_rate_over_training.png (mean over seeds of the evaluations during training, per setting)."""
    plt, s, proto = _plt(), data["summary"], data["protocol"]
    losses, T = proto["losses"], proto["steps"]
    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.4), sharey=True, squeeze=False)
    for ax, loss in zip(axes[0], losses):
        pts = [(f, _cell(s, name, loss)) for f, name in ((1, "offline"), (2, "bpo-f2"), (T, "bpo-ft"))]
        pts = [(f, c) for f, c in pts if c]
        if pts:
            ax.errorbar([f for f, _ in pts], [100 * c["mean"] for _, c in pts], capsize=3, marker="o", label="π_ref = π_β (BPO)",
                        yerr=[[100 * (c["mean"] - c["ci95_low"]) for _, c in pts], [100 * (c["ci95_high"] - c["mean"]) for _, c in pts]])
        for name, marker in (("on-policy", "s"), ("gold-ref", "^")):
            c = _cell(s, name, loss)
            if c:
                ax.errorbar([T], [100 * c["mean"]], yerr=[[100 * (c["mean"] - c["ci95_low"])], [100 * (c["ci95_high"] - c["mean"])]],
                            marker=marker, capsize=3, linestyle="none", label=LABELS[name])
        init = [r["initial_win_rate"] for r in data["runs"] if r["loss"] == loss]
        if init:
            ax.axhline(100 * init[0], color="grey", linestyle=":", label="π_sft")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, T], [1, 2, f"T={T}"])
        ax.set_xlabel("F (data-collection phases)")
        ax.set_title(loss.upper())
    axes[0][0].set_ylabel("final win rate vs house reference (%)")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "win_rate_vs_F.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.4), sharey=True, squeeze=False)
    for ax, loss in zip(axes[0], losses):
        for setting in proto["settings"]:
            runs = [r for r in data["runs"] if r["setting"] == setting and r["loss"] == loss]
            if runs:
                steps = runs[0]["trace"]["step"]
                mean = [100 * sum(r["trace"]["win_rate"][i] for r in runs) / len(runs) for i in range(len(steps))]
                ax.plot(steps, mean, marker=".", label=LABELS[setting])
        ax.set_xlabel("step")
        ax.set_title(loss.upper())
    axes[0][0].set_ylabel("win rate vs house reference (%)")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "win_rate_over_training.png", dpi=110)
    plt.close(fig)


def _num(v) -> str:
    return "—" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))


def report(data: dict) -> str:
    p, s, runs = data["protocol"], data["summary"], data["runs"]
    expected = len(p["seeds"]) * (len([x for x in p["settings"] if x != "gold-ref"]) * len(p["losses"]) + ("gold-ref" in p["settings"] and "dpo" in p["losses"]))
    seeds_done = sorted({r["seed"] for r in runs})
    lines = [
        f"# BPO study ({p['mode']} mode): online DAP anchored to the behavior model", "",
        f"Embedded world; oracle = gold persona score of **{p['persona']}**; π_sft = world base model fine-tuned on random-style "
        f"answers (world/policies.py); T = {p['steps']} steps × B = {p['prompts_per_step']} prompts (budget {p['steps'] * p['prompts_per_step']} "
        f"prompts for every setting), lr {p['learning_rate']:g}, β = {p['beta']}, sampling temperature {p['temperature']}, top-k {p['top_k']}. "
        f"Win rate = greedy answers to the test-split questions vs the house-style reference, judged by the oracle (ties ½). "
        f"Cells: mean over seeds [95% percentile-bootstrap CI over seeds].", "",
        f"Runs: {len(runs)} of {expected} (seeds done: {seeds_done}; protocol seeds {p['seeds']})." + (
            " **The study is incomplete: read the numbers as partial.**" if len(runs) < expected else ""), "",
        "## Final win rate (%)", "", summary_table(data), "",
    ]
    if runs:
        lines.append(f"π_sft's own win rate: {100 * runs[0]['initial_win_rate']:.1f}%.")
    lines += ["", "## Claims", ""]
    for i, c in enumerate(data["claims"], 1):
        verdict = "**holds**" if c["holds"] else "**does not hold**"
        per = ("; per loss: " + ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in c["per_loss"].items())) if "per_loss" in c else ""
        nums = ", ".join(f"{k} = {_num(v)}" for k, v in c["numbers"].items())
        lines += [f"{i}. {c['claim']} — {verdict}{per}. Rule: {c['rule']}. Numbers (points): {nums}.", ""]
    if data.get("notes"):
        lines += ["## What we see", "", *data["notes"], ""]
    pilot = data.get("pilot")
    if pilot:
        first = pilot["first_protocol"]
        lines += ["## How the learning rate was chosen (pilot)", "",
                  f"Offline DPO only, tuning seed {pilot['seed']} (no study seed), persona {pilot['persona']}: the learning rate whose "
                  f"final win rate is closest to the middle of π_sft's headroom ({100 * pilot['initial_win_rate']:.1f}% → target "
                  f"{100 * pilot['rule_target']:.1f}%). Final win rates: "
                  + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in pilot["final_win_rate"].items()) + f"; chosen {pilot['chosen']:g}.", "",
                  f"A first protocol with persona {first['persona']} (π_sft at {100 * first['initial_win_rate']:.1f}%) chose {first['chosen']:g} "
                  "by the same rule (" + ", ".join(f"{k}: {100 * v:.1f}%" for k, v in first["final_win_rate"].items()) + "); its quick run "
                  "gave every setting the same final win rate (DPO 80.8% for offline, on-policy, BPO F=2 and F=T): the DPO loss never left "
                  "log 2, so the reference could not matter. The persona with the most headroom was chosen instead, before any full-mode run.", ""]
    lines += ["## Cost", "", "| setting | loss | annotations | identical pairs dropped | seconds per run |", "|---|---|---|---|---|"]
    for row in s:
        lines.append(f"| {LABELS[row['setting']]} | {row['loss']} | {fmt(row.get('annotations'), 1, 0)} | "
                     f"{fmt(row.get('identical_pairs'), 1, 0)} | {fmt(row.get('seconds'), 1, 0)} |")
    lines += ["", "## Figures", "", "![win rate vs F](win_rate_vs_F.png)", "", "![win rate over training](win_rate_over_training.png)", ""]
    return "\n".join(lines)
