"""The BPO study's prechecks, verdicts, figures and report.md, computed from results.json alone (a partial study too).

Claims of protocol v2 (rules fixed in this file before any study seed ran; win rates in points). Each claim is a
paired per-seed difference d_s = win rate of setting A − win rate of setting B on seed s (the settings share the
seed's prompt stream and sampling seeds), over the seeds both settings ran, with its 95% Student-t interval
(tether.stats.paired_t_interval). A claim "A beats B" holds when the interval's lower end is > 0; "A matches or
beats B" when it is > −MATCH_MARGIN. Fewer than 2 paired seeds: the claim does not hold (no interval).

Main comparison (DPO):
1. BPO F = 2 beats offline DAP (F = 1).
2. BPO F = 2 matches or beats on-policy DAP with π_ref = π_sft.
3. At F = T, π_ref = π_β beats π_ref = π_sft (BPO F = T vs on-policy).
4. At F = T, π_ref = π_β beats π_ref = π_gold.
5. Fresh data pays off: BPO F = T beats offline DAP (the regime check: without it, claims 1-4 have nothing to show).
Secondary (each extra loss, IPO and SLiC, on the seeds it ran): BPO F = 2 beats offline.

Prechecks (printed first in the report): the mean final training loss of offline DPO (a loss at log 2 ≈ 0.693
means the margins never left 0, the regime in which the reference cannot matter) and the mean loss of BPO F = T
at mid-training (exactly log 2 when π_ref = π_β = π_θ at every step, as in v1; the LoRA ensemble should move it).
"""

from __future__ import annotations

import math
from pathlib import Path

from tether.loss_table import NAMES as LOSS_NAMES
from tether.stats import paired_t_interval
from tether_lab.studies.common import fmt
from tether_lab.studies.verdicts import FAILS, HOLDS, NOT_TESTABLE

MATCH_MARGIN = 2.0  # points: "matches" in claim 2
LOG2 = math.log(2)
LABELS = {
    "offline": "offline (F=1)",
    "bpo-f2": "BPO F=2",
    "bpo-f4": "BPO F=4",
    "bpo-ft": "BPO F=T",
    "on-policy": "on-policy, π_ref=π_sft (F=T)",
    "gold-ref": "π_ref=π_gold (F=T)",
}
# (claim, setting A, setting B, lower bound the interval must exceed)
MAIN_CLAIMS = [
    ("BPO F=2 beats offline DAP (F=1)", "bpo-f2", "offline", 0.0),
    ("BPO F=2 matches or beats on-policy DAP with π_ref=π_sft", "bpo-f2", "on-policy", -MATCH_MARGIN),
    ("at F=T, π_ref=π_β beats π_ref=π_sft", "bpo-ft", "on-policy", 0.0),
    ("at F=T, π_ref=π_β beats π_ref=π_gold", "bpo-ft", "gold-ref", 0.0),
    ("fresh data pays off: BPO F=T beats offline DAP", "bpo-ft", "offline", 0.0),
]


def _cell(summary, setting, loss, metric="win_rate"):
    row = next((r for r in summary if r["setting"] == setting and r["loss"] == loss), None)
    return None if row is None or metric not in row else row[metric]


def paired(runs: list[dict], a: str, b: str, loss: str) -> dict:
    """Paired t-interval of the per-seed final win-rate difference a − b (points), over the seeds both ran."""
    wa = {r["seed"]: 100 * r["win_rate"] for r in runs if r["setting"] == a and r["loss"] == loss}
    wb = {r["seed"]: 100 * r["win_rate"] for r in runs if r["setting"] == b and r["loss"] == loss}
    seeds = sorted(wa.keys() & wb.keys())
    out = paired_t_interval([wa[s] for s in seeds], [wb[s] for s in seeds]) if seeds else {"mean": None, "n": 0}
    return {**out, "seeds": seeds, "differences": [round(wa[s] - wb[s], 2) for s in seeds]}


def _claim(text: str, a: str, b: str, loss: str, bound: float, runs: list[dict]) -> dict:
    d = paired(runs, a, b, loss)
    holds = d["n"] >= 2 and d["ci95_low"] > bound
    return {
        "claim": f"{text} ({loss.upper()})",
        "loss": loss,
        "a": a,
        "b": b,
        "rule": f"95% paired t-interval of win rate({a}) − win rate({b}) over seeds, lower end > {bound:g} points",
        "holds": bool(holds),
        "difference": d,
    }


def claims(runs: list[dict], protocol: dict) -> list[dict]:
    main = protocol["losses"][0]
    out = [_claim(text, a, b, main, bound, runs) for text, a, b, bound in MAIN_CLAIMS]
    for loss in protocol.get("extra_losses", []):
        out.append(
            _claim("BPO F=2 beats offline DAP (F=1)", "bpo-f2", "offline", loss, 0.0, runs) | {"secondary": True}
        )
    return out


def _window_mean(values: list, lo: int, hi: int) -> float | None:
    xs = [v for v in values[lo:hi] if v is not None]
    return sum(xs) / len(xs) if xs else None


def _mean_over_runs(runs: list[dict], setting: str, field: str, where: str) -> float | None:
    """Mean over runs (DPO, `setting`) of the mean of trace[field] over the last tenth of the steps (where = 'end')
    or the tenth around T/2 (where = 'mid')."""
    vals = []
    for r in runs:
        if r["setting"] != setting or r["loss"] != "dpo":
            continue
        trace = r["trace"][field]
        n, w = len(trace), max(1, len(trace) // 10)
        lo = n - w if where == "end" else max(0, n // 2 - w // 2)
        v = _window_mean(trace, lo, lo + w)
        if v is not None:
            vals.append(v)
    return sum(vals) / len(vals) if vals else None


def prechecks(runs: list[dict], protocol: dict) -> dict:
    """Can the regime show the effect at all? (module docstring)."""
    out = {
        "offline_dpo_final_loss": _mean_over_runs(runs, "offline", "loss", "end"),
        "offline_dpo_final_margin": _mean_over_runs(runs, "offline", "margin", "end"),
        "bpo_ft_loss_mid": _mean_over_runs(runs, "bpo-ft", "loss", "mid"),
        "bpo_ft_margin_mid": _mean_over_runs(runs, "bpo-ft", "margin", "mid"),
        "log2": LOG2,
    }
    tie = [sum(x or 0 for x in r["trace"]["ties"]) / max(1, r["annotations"]) for r in runs if r["loss"] == "dpo"]
    out["tie_fraction"] = sum(tie) / len(tie) if tie else None
    return out


def summary_table(data: dict) -> str:
    s, p = data["summary"], data["protocol"]
    losses = list(p["losses"]) + [x for x in p.get("extra_losses", []) if x not in p["losses"]]
    lines = [
        "| setting | " + " | ".join(f"{x.upper()} win rate % [95% CI]" for x in losses) + " |",
        "|---|" + "---|" * len(losses),
    ]
    for setting in LABELS:
        if any(_cell(s, setting, x) for x in losses):
            lines.append(f"| {LABELS[setting]} | " + " | ".join(fmt(_cell(s, setting, x), 100) for x in losses) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _losses(data: dict) -> list[str]:
    return sorted({r["loss"] for r in data["runs"]}, key=LOSS_NAMES.index)


def _curve(runs: list[dict], x: str, y: str, source: str) -> tuple[list, list]:
    """Mean over runs of runs[source][y] against the mean of runs[source][x], point by point (a step without
    usable pairs, None, is left out of its point's mean; a point with no value at all is NaN)."""
    n = min(len(r[source][y]) for r in runs)

    def mean(key, i):
        vals = [r[source][key][i] for r in runs if r[source][key][i] is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    return [mean(x, i) for i in range(n)], [mean(y, i) for i in range(n)]


def figures(data: dict, out: Path) -> None:
    """win_rate_vs_F.png (final win rate at F = 1, 2, 4, T with π_ref = π_β; on-policy and π_gold as markers at
    F = T), win_rate_vs_annotations.png (mean over seeds of the evaluations during training against the number
    of annotations so far, per setting) and loss_margin.png (per-step DPO loss and reward margin, mean over seeds)."""
    plt, s, proto = _plt(), data["summary"], data["protocol"]
    losses, T = _losses(data), proto["steps"]
    if not losses:
        return
    fig, axes = plt.subplots(1, len(losses), figsize=(4 * len(losses), 3.4), sharey=True, squeeze=False)
    for ax, loss in zip(axes[0], losses):
        pts = [(f, _cell(s, name, loss)) for f, name in ((1, "offline"), (2, "bpo-f2"), (4, "bpo-f4"), (T, "bpo-ft"))]
        pts = [(f, c) for f, c in pts if c]
        if pts:
            ax.errorbar(
                [f for f, _ in pts],
                [100 * c["mean"] for _, c in pts],
                capsize=3,
                marker="o",
                label="π_ref = π_β (BPO)",
                yerr=[
                    [100 * (c["mean"] - c["ci95_low"]) for _, c in pts],
                    [100 * (c["ci95_high"] - c["mean"]) for _, c in pts],
                ],
            )
        for name, marker in (("on-policy", "s"), ("gold-ref", "^")):
            c = _cell(s, name, loss)
            if c:
                ax.errorbar(
                    [T],
                    [100 * c["mean"]],
                    yerr=[[100 * (c["mean"] - c["ci95_low"])], [100 * (c["ci95_high"] - c["mean"])]],
                    marker=marker,
                    capsize=3,
                    linestyle="none",
                    label=LABELS[name],
                )
        init = [r["initial_win_rate"] for r in data["runs"] if r["loss"] == loss]
        if init:
            ax.axhline(100 * init[0], color="grey", linestyle=":", label="π_sft")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, T], [1, 2, 4, f"T={T}"])
        ax.set_xlabel("F (data-collection phases)")
        ax.set_title(loss.upper())
    axes[0][0].set_ylabel("final win rate vs house reference (%)")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "win_rate_vs_F.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(losses), figsize=(4.5 * len(losses), 3.6), sharey=True, squeeze=False)
    for ax, loss in zip(axes[0], losses):
        for setting in LABELS:
            runs = [r for r in data["runs"] if r["setting"] == setting and r["loss"] == loss]
            if runs:
                xs, ys = _curve(runs, "annotations", "win_rate", "evals")
                ax.plot(xs, [100 * y for y in ys], marker=".", label=f"{LABELS[setting]} ({len(runs)} seeds)")
        ax.set_xlabel("annotations (pairs labelled by the oracle)")
        ax.set_title(loss.upper())
    axes[0][0].set_ylabel("win rate vs house reference (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "win_rate_vs_annotations.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), squeeze=False)
    for setting in LABELS:
        runs = [r for r in data["runs"] if r["setting"] == setting and r["loss"] == "dpo"]
        if runs:
            steps = list(range(1, min(len(r["trace"]["loss"]) for r in runs) + 1))
            for ax, key in zip(axes[0], ("loss", "margin")):
                ax.plot(steps, _curve(runs, key, key, "trace")[1], label=LABELS[setting], linewidth=1)
    axes[0][0].axhline(LOG2, color="grey", linestyle=":", label="log 2")
    axes[0][0].set_title("DPO training loss (mean over seeds)")
    axes[0][1].set_title("DPO reward margin β·h (mean over seeds)")
    for ax in axes[0]:
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_margin.png", dpi=110)
    plt.close(fig)


def _num(v, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _interval(d: dict) -> str:
    if d.get("n", 0) < 2:
        return f"n = {d.get('n', 0)} paired seeds: no interval"
    return (
        f"{d['mean']:+.1f} [{d['ci95_low']:+.1f}, {d['ci95_high']:+.1f}] points "
        f"(n = {d['n']} seeds; per seed {d['differences']})"
    )


REGIME_CHECK = MAIN_CLAIMS[-1][0]  # claim 5: unless fresh data pays off here, nothing the others say is a finding


def verdicts(claims: list[dict], quick: bool = False) -> list[dict]:
    """Each claim's three-valued verdict, as {"verdict": holds / does not hold / not testable, "reason": why it is
    not testable, or None} (the shape `verdicts.paired_claim` gives the chat-model studies).

    A claim with fewer than 2 paired seeds, or any claim of a quick run, is not testable. The regime check (claim
    5, "fresh data pays off") is judged first: when it does not hold, the other claims are not testable — a
    difference between two settings of a regime where fresh data does not help says nothing about BPO."""
    regime = next((c for c in claims if c["claim"].startswith(REGIME_CHECK)), None)
    out = []
    for c in claims:
        if quick:
            reason = "quick mode: a smoke run, never a verdict"
        elif c["difference"].get("n", 0) < 2:
            reason = "fewer than 2 paired seeds"
        elif c is not regime and regime is not None and not regime["holds"]:
            reason = f"the regime check, claim {claims.index(regime) + 1}, does not hold"
        else:
            out.append({"verdict": HOLDS if c["holds"] else FAILS, "reason": None})
            continue
        out.append({"verdict": NOT_TESTABLE, "reason": reason})
    return out


def claim_lines(data: dict) -> list[str]:
    lines = []
    said = verdicts(data["claims"], quick=data["protocol"].get("mode") == "quick")
    for i, (c, v) in enumerate(zip(data["claims"], said), 1):
        shown = f"**{v['verdict']}**" + (f" ({v['reason']})" if v["reason"] else "")
        tag = " (secondary)" if c.get("secondary") else ""
        lines += [
            f"{i}. {c['claim']}{tag} — {shown}. Paired difference {_interval(c['difference'])}. Rule: {c['rule']}.",
            "",
        ]
    return lines


def _rare_pole_table(data: dict) -> list[str]:
    """Share of π_β's sampled responses with each of the persona's non-house poles, per quarter of the run."""
    runs = [r for r in data["runs"] if r.get("rare_poles")]
    if not runs:
        return []
    dims = list(runs[0]["rare_poles"])
    lines = [
        "## Does π_β ever write what the oracle prefers?",
        "",
        "Share (%) of the responses π_β sampled that carry each of the persona's non-house poles, per quarter of the "
        "run (quarters of the steps; mean over seeds). Each is in 10% of π_sft's fine-tuning answers.",
        "",
        "| setting | loss | " + " | ".join(f"{d}: Q1 / Q2 / Q3 / Q4" for d in dims) + " |",
        "|---|---|" + "---|" * len(dims),
    ]
    for setting in LABELS:
        for loss in _losses({"runs": runs}):
            mine = [r for r in runs if r["setting"] == setting and r["loss"] == loss]
            if mine:
                cells = [
                    " / ".join(
                        f"{100 * sum(r['rare_poles'][d][q] or 0 for r in mine) / len(mine):.1f}"
                        for q in range(len(mine[0]["rare_poles"][d]))
                    )
                    for d in dims
                ]
                lines.append(f"| {LABELS[setting]} | {loss} | " + " | ".join(cells) + " |")
    return lines + [""]


def _setup_paragraph(p: dict) -> str:
    """The protocol in one paragraph: world, oracle, π_sft, the ensemble, budget and decoding."""
    ens = (
        f"LoRA ensemble of {p['ensemble_size']} adapters (r = {p['lora_r']}, alpha {p['lora_alpha']}, "
        f"merge {p['ensemble_merge']}), π_β = the merged ensemble"
    )
    return (
        f"Embedded world, world seed **{p['world_seed']}** (default world recipe, pinned in the protocol); oracle = "
        f"gold persona score of **{p['persona']}**; π_sft = world base model fine-tuned on *skewed* random-style "
        f"answers (each of the persona's non-house poles with probability {p['rare_prob']}; world/policies.py); "
        f"{ens}; T = {p['steps']} steps × B = {p['prompts_per_step']} prompts (budget "
        f"{p['steps'] * p['prompts_per_step']} annotations for every setting), lr {p['learning_rate']:g}, "
        f"β = {p['beta']}, sampling temperature {p['temperature']}, top-k {p['top_k']}. Win rate = greedy answers to "
        "the test-split questions vs the house-style reference, judged by the oracle (ties ½)."
    )


def _pilot_section(pilot: dict) -> list[str]:
    """How β and the learning rate were chosen: the rule and the pilot's grid."""
    ch = pilot["chosen"]
    lines = [
        "## How β and the learning rate were chosen (pilot)",
        "",
        f"Offline DPO only, tuning seed {pilot['seed']} (no study seed), T = {pilot['steps']}, "
        f"B = {pilot['prompts_per_step']}, persona {pilot['persona']}. Rule (bpo.pilot_choice, fixed before the "
        "pilot ran): the (β, learning rate) whose final win rate is closest to the middle of the headroom above a "
        f"tie with the house answer (π_sft {100 * pilot['initial_win_rate']:.1f}%; target (max(π_sft, 50%) + 100%)/2 "
        f"= {100 * ch['rule_target']:.1f}%), ties within 1 point to the larger β. Chosen: β = {ch['beta']:g}, "
        f"lr {ch['learning_rate']:g}.",
        "",
        "| β | lr | final win rate % | final loss | final margin β·h | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for r in pilot["runs"]:
        lines.append(
            f"| {r['beta']:g} | {r['learning_rate']:g} | {100 * r['final_win_rate']:.1f} | {_num(r['final_loss'])} "
            f"| {_num(r['final_margin'])} | {r['seconds']:.0f} |"
        )
    return [*lines, ""]


def _cost_table(summary: list[dict]) -> list[str]:
    lines = [
        "## Cost",
        "",
        "| setting | loss | annotations | ties | identical pairs dropped | seconds per run |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary:
        lines.append(
            f"| {LABELS[row['setting']]} | {row['loss']} | {fmt(row.get('annotations'), 1, 0)} "
            f"| {fmt(row.get('ties'), 1, 0)} | {fmt(row.get('identical_pairs'), 1, 0)} "
            f"| {fmt(row.get('seconds'), 1, 0)} |"
        )
    return lines


def report(data: dict) -> str:
    p, s, runs = data["protocol"], data["summary"], data["runs"]
    expected = len(p["seeds"]) * len(p["settings"]) * len(p["losses"]) + len(p["extra_seeds"]) * len(
        p["extra_settings"]
    ) * len(p["extra_losses"])
    seeds_done = sorted({r["seed"] for r in runs})
    pre = data.get("precheck", {})
    lines = [
        f"# BPO study v{p['version']} ({p['mode']} mode): online DAP anchored to the behavior model",
        "",
        _setup_paragraph(p),
        "",
        f"Runs: {len(runs)} of {expected} (seeds done: {seeds_done}; main seeds {p['seeds']}"
        + (
            f"; {'/'.join(p['extra_losses'])} on seeds {p['extra_seeds']})."
            if p["extra_losses"] and p["extra_seeds"]
            else "; no IPO/SLiC runs)."
        )
        + (" **The study is incomplete: read the numbers as partial.**" if len(runs) < expected else ""),
        "",
        "## Prechecks: can this regime show the effect?",
        "",
        "- offline DPO, mean training loss over the last tenth of the steps: "
        f"**{_num(pre.get('offline_dpo_final_loss'))}** (log 2 = {LOG2:.3f}); reward margin β·h "
        f"{_num(pre.get('offline_dpo_final_margin'))}",
        "- BPO F=T (DPO), mean training loss at mid-training (the tenth of the steps around T/2): "
        f"**{_num(pre.get('bpo_ft_loss_mid'))}**; reward margin {_num(pre.get('bpo_ft_margin_mid'))} "
        "(v1: exactly log 2 and 0, π_ref = π_β = π_θ)",
        f"- ties: {_num(pre.get('tie_fraction') and 100 * pre['tie_fraction'], 1)}% of the annotations of DPO runs",
        "",
        "## Final win rate (%)",
        "",
        "Cells: mean over seeds [95% percentile-bootstrap CI over seeds]; the claims below use paired "
        "per-seed differences instead.",
        "",
        summary_table(data),
        "",
    ]
    if runs:
        lines.append(f"π_sft's own win rate: {100 * runs[0]['initial_win_rate']:.1f}%.")
    lines += ["", "## Claims (paired per-seed differences, 95% t-intervals)", "", *claim_lines(data)]
    if data.get("notes"):
        lines += ["## What we see", "", *[x for note in data["notes"] for x in (note, "")]]
    if data.get("pilot"):
        lines += _pilot_section(data["pilot"])
    lines += _rare_pole_table(data)
    lines += _cost_table(s)
    lines += [
        "",
        "## Figures",
        "",
        "![win rate vs F](win_rate_vs_F.png)",
        "",
        "![win rate vs annotations](win_rate_vs_annotations.png)",
        "",
        "![DPO loss and margin](loss_margin.png)",
        "",
    ]
    return "\n".join(lines)
