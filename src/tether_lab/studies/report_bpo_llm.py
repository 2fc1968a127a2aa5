"""report.md and figures of the BPO study on a chat model (protocol version 5), from results.json alone: the gates
first, then the claims, the aggregate view, π_sft and π_gold, and every calibration, pilot and study run."""

from __future__ import annotations

import statistics
from pathlib import Path

from tether_lab.studies.bpo_llm_rules import (
    LABELS,
    METRIC_LABELS,
    METRICS,
    identical_share,
    margin_window,
    median_abs_margin,
)
from tether_lab.studies.common import write_study_report
from tether_lab.studies.verdicts import describe

STAGES = {"tuning": "calibration and pilots (tuning seeds, dev prompts)", "study": "study seeds (test prompts)"}
CURVES = ("win_rate", "sampled_score", "sampled_win_rate")


def _label(run: dict, stage: str) -> str:
    name = f"{LABELS[run['setting']]} {run['loss'].upper()}"
    return f"{name} lr {run['learning_rate']:g} s{run['seed']}" if stage == "tuning" else name


def _mean_curve(runs: list[dict], key: str) -> list[float]:
    n = min(len(r["curves"][key]) for r in runs)
    return [statistics.fmean(r["curves"][key][i] for r in runs) for i in range(n)]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figures(data: dict, out: Path) -> list[Path]:
    """curves-STAGE.png: greedy win rate vs the reference text, sampled score and sampled win rate vs π_sft
    against the annotations spent, one line per setting and loss (mean over the study seeds; every tuning run on
    its own); training-STAGE.png: per step, the median β|h| of the step's pairs and the oracle's mean score of
    π_β's samples."""
    plt, paths = _plt(), []
    for stage in STAGES:
        runs = [r for r in data["runs"] if r["stage"] == stage]
        groups: dict[str, list[dict]] = {}
        for r in runs:
            groups.setdefault(_label(r, stage), []).append(r)
        if not groups:
            continue
        fig, axes = plt.subplots(1, len(CURVES), figsize=(5 * len(CURVES), 4))
        for ax, metric in zip(axes, CURVES):
            for label, members in groups.items():
                ax.plot(
                    _mean_curve(members, "annotations"), _mean_curve(members, metric), marker="o", ms=3, label=label
                )
            ax.set_xlabel("annotations spent")
            ax.set_title(METRIC_LABELS[metric], fontsize=9)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        paths.append(_save(fig, plt, out / f"curves-{stage}.png"))
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for label, members in groups.items():
            steps = range(min(len(r["pair_margins"]) for r in members))
            margins = [statistics.fmean(median_abs_margin(r, [s]) or 0.0 for r in members) for s in steps]
            axes[0].plot([s + 1 for s in steps], margins, label=label)
            scores = [statistics.fmean(r["trace"]["behavior_score"][s] or 0.0 for r in members) for s in steps]
            axes[1].plot([s + 1 for s in steps], scores, label=label)
        axes[0].set_title("median β|h| of the step's pairs (as the loss saw them)", fontsize=9)
        axes[1].set_title("oracle's mean score of π_β's samples", fontsize=9)
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=6)
        paths.append(_save(fig, plt, out / f"training-{stage}.png"))
    return paths


def _save(fig, plt, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _interval(i: dict | None) -> str:
    if not i or i.get("mean") is None:
        return "–"
    if i.get("ci95_low") is None:
        return f"{i['mean']:+.1f} (n = 1)"
    return f"{i['mean']:+.1f} [{i['ci95_low']:+.1f}, {i['ci95_high']:+.1f}] (n = {i['n']})"


def _head(data: dict) -> list[str]:
    p = data["protocol"]
    lines = [
        f"# BPO on {p['model']} (protocol version {p['version']}{', quick mode' if p.get('quick') else ''})",
        "",
        f"Oracle: the `{p['persona']}` persona's programmatic score; π_gold: the model prompted with its instruction. "
        f"Data seed **{p['data_seed']}** (the prompt pool's split into training, dev and test topics); T = "
        f"{p['steps']} steps × B = {p['prompts_per_step']} prompts, {p['max_new_tokens']} new tokens, β {p['beta']:g}, "
        f"learning rate {data.get('learning_rate') or '– (not calibrated)'}. Win rates in %, differences in points.",
        "",
        "## Gates (checked on the tuning seeds before any study seed; the first that fails stops the study)",
        "",
        "| gate | value | rule | passed | what |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {g['gate']} | {g['value']} | {g['threshold']} | {'yes' if g['passed'] else '**NO**'} | "
              f"{g['detail']} |" for g in data.get("gates", [])]  # fmt: skip
    if data.get("stopped_at_gates"):
        lines += ["", f"**The study stopped at the gate {', '.join(data['stopped_at_gates'])}**: no study seed was "
                  "run, and every claim is not testable (which is not the same as does not hold)."]  # fmt: skip
    plan = data.get("plan")
    if plan and plan.get("needed"):
        seeds = f"study seeds {plan['seeds'][0]}–{plan['seeds'][-1]}" if plan["seeds"] else "no study seed"
        lines += ["", f"Seed plan: the tuning seeds' paired differences {plan['pilot_differences']} (sd {plan['sd']}) "
                  f"ask for {plan['needed']} seeds, the budget holds {plan['max_seeds']}: {seeds}."]  # fmt: skip
    return lines


def _claims(data: dict) -> list[str]:
    lines = ["", "## Claims (final greedy win rate vs the reference text: paired per-seed differences, one-sided "
             "t-test; the regime check 5 first, alone; then Holm over claims 1–4)", ""]  # fmt: skip
    lines += [f"- {describe(c, 1)}" for c in data.get("claims", [])]
    lines += [
        "",
        "The same differences on the metrics that do not saturate (95% t-intervals, no verdict):",
        "",
        "| claim | " + " | ".join(METRIC_LABELS[m] for m in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for row in data.get("descriptive", []):
        lines.append(f"| {row['claim']} | " + " | ".join(_interval(row[m]) for m in METRICS) + " |")
    return lines


def _aggregates(data: dict) -> list[str]:
    lines = ["", "## Aggregate view (the paper's Figure 3: median, IQM and mean over runs, 95% stratified "
             "percentile-bootstrap CIs; strata = losses; win rates in %, scores × 100)", ""]  # fmt: skip
    rows = data.get("aggregates", [])
    for metric in METRICS:
        mine = [r for r in rows if r["metric"] == metric]
        if not mine:
            continue
        lines += [f"**{METRIC_LABELS[metric]}**", "", "| setting | losses | runs | median | IQM | mean |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for r in mine:
            cells = [
                f"{r[s]['value']:.1f} [{r[s]['ci95_low']:.1f}, {r[s]['ci95_high']:.1f}]"
                for s in ("median", "iqm", "mean")
            ]
            lines.append(f"| {LABELS[r['setting']]} | {r['losses']} | {r['mean']['n']} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _quote(text: str | None, chars: int = 80) -> str:
    """A model's answer as a table cell: its first characters, quoted, newlines and | escaped."""
    return repr((text or "")[:chars]).replace("|", "\\|")


def _reference_models(data: dict) -> list[str]:
    lines = ["", "## π_sft and π_gold (π_sft's greedy answers are the reference texts)", "",
             "| split | model | prompts | greedy win rate | greedy score | sampled score | sampled win rate vs π_sft | "
             "first greedy answer |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for split, models in data.get("reference_models", {}).items():
        for who, m in models.items():
            lines.append(f"| {split} | π_{who} | {m['eval_n']} | {_pct(m['eval_win_rate'])} | {m['eval_reward']:.3f} | "
                         f"{m['eval_sampled_score']:.3f} | {_pct(m['eval_sampled_win_rate'])} | "
                         f"{_quote(m['sample'])} |")  # fmt: skip
    return lines


def _runs(data: dict, stage: str) -> list[str]:
    runs = [r for r in data["runs"] if r["stage"] == stage]
    if not runs:
        return []
    window = margin_window(data["protocol"])
    lines = ["", f"## Every run: {STAGES[stage]}", "", f"![curves]({'curves-' + stage}.png)",
             f"![training]({'training-' + stage}.png)", "",
             "| setting | loss | seed | lr | greedy win rate (by evaluation) | sampled score | sampled win rate | "
             "identical pairs | median β\\|h\\| at T/2 | annotations | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(runs, key=lambda r: (r["seed"], r["learning_rate"], list(LABELS).index(r["setting"]), r["loss"])):
        curve = " → ".join(_pct(x) for x in r["curves"]["win_rate"])
        margin = median_abs_margin(r, window)
        margin = "–" if margin is None else f"{margin:.2f}"
        lines.append(f"| {LABELS[r['setting']]} | {r['loss']} | {r['seed']} | {r['learning_rate']:g} | {curve} | "
                     f"{r['sampled_score']:.3f} | {_pct(r['sampled_win_rate'])} | {100 * identical_share(r):.0f}% | "
                     f"{margin} | {r['annotations']} | {r['seconds']:.0f} |")  # fmt: skip
    first = min(r["seed"] for r in runs)
    lines += ["", f"What each run samples at the end for the first evaluation prompt (seed {first}):", ""]
    lines += [f"- {_label(r, stage)}: {_quote(r.get('sample'), 160)}" for r in runs if r["seed"] == first]
    return lines


def report(data: dict) -> str:
    lines = _head(data) + _claims(data) + _aggregates(data) + _reference_models(data)
    for stage in STAGES:
        lines += _runs(data, stage)
    hours = sum(r["seconds"] for r in data["runs"]) / 3600
    lines += ["", f"Compute: {hours:.2f} hours of runs in all; the invocation that wrote this took "
              f"{data.get('wall_seconds_this_invocation', 0) / 60:.1f} min.", ""]  # fmt: skip
    return "\n".join(lines)


def write_report(data: dict, out: Path) -> Path:
    return write_study_report(out, report(data), lambda: figures(data, out))
