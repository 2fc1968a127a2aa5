"""What every study shares: results.json written atomically and resumably, summaries with bootstrap CIs."""

from __future__ import annotations

import json
from pathlib import Path

from tether.config import TetherError
from tether.files import write_text_atomic
from tether.stats import summarize
from tether.train.marker import MARKER, read_marker


class StudyResults:
    """results.json of a study: `study`, `protocol` (written before the first run), `runs` (one object per
    (setting, seed), appended as each finishes, so an interrupted study resumes where it stopped),
    `summary` and `claims` (written at the end)."""

    def __init__(self, out: Path, study: str, protocol: dict, resume: bool = True):
        """`resume` False: a directory that already holds this study's runs is refused (continue it with --resume)."""
        self.path = out / "results.json"
        data = _claim_study_dir(out, study)
        if data is not None:
            if data.get("protocol") != protocol:
                raise TetherError(
                    f"{self.path}: holds a study with another protocol ({_changed(data.get('protocol'), protocol)}); "
                    "use another --out, or the same options as before"
                )
            if not resume and data.get("runs"):
                raise TetherError(
                    f"{out}: already holds {len(data['runs'])} finished run(s) of this study; add --resume "
                    "to continue it, or choose another --out"
                )
            self.data = data
        else:
            self.data = {"study": study, "protocol": protocol, "runs": [], "summary": [], "claims": []}
            self.save()

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1))

    def find(self, **setting) -> dict | None:
        return next((r for r in self.data["runs"] if all(r.get(k) == v for k, v in setting.items())), None)

    def add(self, run: dict) -> None:
        self.data["runs"].append(run)
        self.save()


def _changed(old, new: dict) -> str:
    """The protocol keys whose values differ, as 'key: old → new' (at most five)."""
    old = old if isinstance(old, dict) else {}
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = [f"{k}: {old.get(k)!r} → {new.get(k)!r}"[:120] for k in keys[:5]]
    return "; ".join(shown) + (f"; and {len(keys) - 5} more" if len(keys) > 5 else "")


def _claim_study_dir(out: Path, study: str) -> dict | None:
    """Check that `out` may hold this study (new, empty, or a study directory tether wrote: its marker, or a
    results.json of the same study written before markers existed) and mark it; returns its results.json, if any."""
    if out.exists() and not out.is_dir():
        raise TetherError(f"option '--out': {out} is a file, not a directory; choose a directory path")
    data = None
    if (out / "results.json").exists():
        try:
            data = json.loads((out / "results.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise TetherError(f"{out / 'results.json'}: unreadable; use another --out") from None
        if not isinstance(data, dict):
            data = None
    marked = out.is_dir() and read_marker(out) is not None  # a marker copied from elsewhere is refused here
    ours = marked or (data is not None and data.get("study") == study)
    if out.is_dir() and any(out.iterdir()) and not ours:
        raise TetherError(
            f"option '--out': {out} is not empty and is not a tether study directory; tether writes only "
            "into new or empty directories or its own: choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not marked:
            # no directory identity: a study directory is committed with its results and resumed from another
            # clone (a run directory's marker records its inode, train/marker.py)
            write_text_atomic(out / MARKER, json.dumps({"tether_run": 1, "command": f"study {study}"}) + "\n")
    except OSError as e:
        raise TetherError(f"option '--out': cannot write into {out} ({e.strerror or e})") from None
    return data


def set_threads(threads: int | None) -> None:
    """torch's intra-op thread count for this process (None leaves it as it is)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def summarize_runs(runs: list[dict], by: tuple[str, ...], metrics: tuple[str, ...]) -> list[dict]:
    """One row per setting (the values of `by`): mean and 95% percentile-bootstrap CI per metric, over seeds;
    a setting that ran one seed and kept its per-item values (`run["items"][metric]`, whose mean is the metric)
    gets its CI over those items instead. Each cell says which in "over"."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault(tuple(run[k] for k in by), []).append(run)
    rows = []
    for key, members in groups.items():
        row = dict(zip(by, key))
        row["seeds"] = sorted(r["seed"] for r in members)
        for m in metrics:
            values = [r[m] for r in members if r.get(m) is not None]
            items = members[0].get("items", {}).get(m) if len(members) == 1 else None
            if items:
                row[m] = {**summarize(items), "over": "items"}
            elif values:
                row[m] = {**summarize(values), "over": "seeds"}
        rows.append(row)
    return rows


def fmt(cell: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    """'mean [lo, hi]' of a summary cell (one seed: just the mean)."""
    if not cell:
        return "—"
    if cell["n"] < 2:
        return f"{cell['mean'] * scale:.{digits}f}"
    lo, hi = cell["ci95_low"] * scale, cell["ci95_high"] * scale
    return f"{cell['mean'] * scale:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def write_study_report(out: Path, markdown: str, figures=None) -> Path:
    """A study's report.md (atomically), after its figures when `figures()` can draw them (matplotlib is the
    optional `plots` extra: without it the report is written alone)."""
    if figures is not None:
        try:
            figures()
        except ImportError:
            pass
    return write_text_atomic(out / "report.md", markdown)
