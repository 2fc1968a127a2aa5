"""`tether report RUN_DIR`: report.md and PNG curves of a training run, from the files the run wrote.

Reads config.yaml, data_report.json, results.json (before/after evaluation) and metrics.jsonl (a torn last
line is skipped); writes RUN_DIR/report.md and RUN_DIR/plots/*.png. Every run writes it at its end; the
command rewrites it (for a run still going, or after a crash). Works for offline and online (BPO) runs: a
curve is drawn only when its metric is in metrics.jsonl. Like a run, it writes only into a directory marked as
tether's (train/marker.py) and never through a symbolic link: each file is written beside its target and
renamed over it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from ..config import TetherError, brief, load_yaml, read_text
from ..files import own_dir, read_json, read_json_lines, write_atomic, write_text_atomic
from .marker import MARKER, read_marker

log = logging.getLogger("tether")

# (file stem, title, y label, [(metric, legend label)]); eval_* points include the before/after evaluation
CURVES = [
    ("loss", "loss", "loss", [("loss", "train"), ("eval_loss", "eval")]),
    (
        "reward_accuracy",
        "reward accuracy",
        "fraction r_w > r_l",
        [("reward_accuracy", "train"), ("eval_reward_accuracy", "eval")],
    ),
    ("margins", "reward margin", "r_w − r_l", [("reward_margin", "train"), ("eval_reward_margin", "eval")]),
    (
        "logps",
        "log-probs of the answers",
        "summed log-prob",
        [
            ("logps_chosen", "chosen"),
            ("logps_rejected", "rejected"),
            ("logps_base", "base answers (BAPO)"),
            ("eval_logps_chosen", "chosen (eval)"),
            ("eval_logps_rejected", "rejected (eval)"),
        ],
    ),
    ("learning_rate", "learning rate", "lr", [("lr", "lr")]),
    ("grad_norm", "gradient norm (before clipping)", "norm", [("grad_norm", "grad norm")]),
    ("win_rate", "win rate vs the reference answers", "win rate", [("eval_win_rate", "win rate")]),
    ("annotations", "oracle annotations (cumulative)", "pairs", [("annotations", "annotations")]),
    (
        "ties",
        "pairs per step not trained on",
        "pairs",
        [("tie", "ties"), ("identical", "identical responses"), ("oracle_failed", "oracle failures")],
    ),
    (
        "time",
        "time per phase (cumulative)",
        "seconds",
        [("sample_s", "sampling"), ("annotate_s", "annotation"), ("reference_s", "reference"), ("update_s", "update")],
    ),
]


def read_metrics(path: Path) -> list[dict]:
    """Rows of metrics.jsonl; an unreadable line (a run killed mid-write) is skipped."""
    return [row for row in read_json_lines(path) if "step" in row]


def _series(rows: list[dict], results: dict, key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    if key.startswith("eval_"):  # before training = step 0, after = the last step
        if isinstance(results.get("initial_eval", {}).get(key), (int, float)):
            points.insert(0, (0, results["initial_eval"][key]))
        if isinstance(results.get("final_eval", {}).get(key), (int, float)) and "steps" in results:
            points.append((results["steps"], results["final_eval"][key]))
    return [p[0] for p in points], [p[1] for p in points]


def plot_curves(rows: list[dict], results: dict, out: Path) -> list[Path]:
    """One PNG per curve whose metrics exist; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own_dir(out)
    written = []
    for stem, title, ylabel, series in CURVES:
        drawn = [(label, *_series(rows, results, key)) for key, label in series]
        drawn = [d for d in drawn if d[1]]
        if not drawn:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.4))
        for label, xs, ys in drawn:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(drawn) > 1:
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{stem}.png"
        write_atomic(path, lambda tmp, fig=fig: fig.savefig(tmp, dpi=110, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _before_after(results: dict) -> list[str]:
    before, after = results.get("initial_eval") or {}, results.get("final_eval") or {}
    keys = [k for k in after if isinstance(after[k], (int, float))] or [
        k for k in before if isinstance(before[k], (int, float))
    ]
    if not keys:
        return ["No held-out evaluation (set eval_file or eval_fraction)."]
    lines = ["| metric | before training | after training | change |", "|---|---|---|---|"]
    for k in keys:
        b, a = before.get(k), after.get(k)
        change = _fmt(a - b) if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
        lines.append(f"| {k} | {_fmt(b) if b is not None else ''} | {_fmt(a) if a is not None else ''} | {change} |")
    return lines


def _data_section(run_dir: Path, results: dict) -> list[str]:
    report = read_json(run_dir / "data_report.json")
    lines = []
    for split, rep in report.items():
        if isinstance(rep, dict) and "records" in rep:
            lines.append(
                f"- {split}: {rep['records']} records, {rep['kept']} pairs kept, {rep['skipped_identical']} skipped "
                f"with chosen == rejected, {rep['skipped_truncated']} skipped as truncated to nothing"
            )
    online = {
        k: results[k]
        for k in ("annotations", "ledger_rows", "identical_pairs", "ties", "oracle_failures")
        if k in results
    }
    if online:
        lines.append("- online: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in online.items()))
    return lines or ["No data report in this run directory."]


def read_run_config(run_dir: Path) -> tuple[str, dict]:
    """(text, options) of the config.yaml of a run directory tether marked as its own; else a one-line error."""
    marker = read_marker(run_dir) if run_dir.is_dir() else None
    if marker is None or marker.get("command") not in ("train", "online"):
        raise TetherError(f"{run_dir}: not a tether run directory (no {MARKER} marker of a train or online run)")
    path = run_dir / "config.yaml"
    try:
        text = read_text(path)
        cfg = load_yaml(text)
    except (OSError, yaml.YAMLError, ValueError, RecursionError) as e:
        raise TetherError(f"{path}: unreadable ({brief(str(e) or type(e).__name__, 200)})") from None
    if not isinstance(cfg, dict):
        raise TetherError(f"{path}: not a mapping of option: value, as tether writes it; the run directory is damaged")
    return text, cfg


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report.md (and plots/*.png when matplotlib is installed); returns the report's path."""
    run_dir = Path(run_dir)
    config, cfg = read_run_config(run_dir)
    results = read_json(run_dir / "results.json")
    rows = read_metrics(run_dir / "metrics.jsonl")
    kind = "online" if "prompt_file" in cfg else "offline"
    done = (
        f"{results['steps']} steps, finished"
        if "final_model" in results
        else (f"{rows[-1]['step']} steps logged, not finished" if rows else "no step logged yet")
    )
    lines = [
        f"# Run report: `{run_dir.name}`",
        "",
        f"{kind} run of `{cfg.get('model')}` with loss `{cfg.get('loss')}` (β = {cfg.get('beta')}); {done}.",
    ]
    if "final_model" in results:
        lines.append(f"Final model: `{results['final_model']}`.")
    if rows and "elapsed_s" in rows[-1]:
        lines.append(f"Training time: {rows[-1]['elapsed_s']:.1f} s.")
    lines += [
        "",
        "## Before / after training (held-out data)",
        "",
        *_before_after(results),
        "",
        "## Data",
        "",
        *_data_section(run_dir, results),
    ]
    if isinstance(results.get("seconds"), dict):
        lines += [
            "",
            "## Time per phase",
            "",
            "| phase | seconds |",
            "|---|---|",
            *[f"| {k.removesuffix('_s')} | {v} |" for k, v in results["seconds"].items()],
        ]
    lines += ["", "## Curves", ""]
    try:
        figures = plot_curves(rows, results, run_dir / "plots")
        lines += [f"![{p.stem}](plots/{p.name})" for p in figures] or ["No metrics logged yet."]
    except ImportError:
        lines.append("Figures need matplotlib: `pip install 'tether[plots]'`, then `tether report` again.")
    lines += ["", "## Configuration", "", "```yaml", config.rstrip(), "```", ""]
    return write_text_atomic(run_dir / "report.md", "\n".join(lines))


def write_report_quietly(run_dir: Path) -> None:
    """The end of a run: a report that cannot be written is a warning, never a failed run."""
    try:
        path = write_report(run_dir)
        log.info("report written to %s", path)
    except Exception as e:  # noqa: BLE001
        log.warning(
            "could not write %s/report.md (%s: %s); run `tether report %s` to retry",
            run_dir,
            type(e).__name__,
            e,
            run_dir,
        )
