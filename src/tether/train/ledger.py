"""The annotation ledger of an online run: every sampled pair and its label, appended durably (written,
flushed and fsynced) BEFORE the run trains on it.

One JSON object per line: step, rows_in_step (how many rows the step has), slot, prompt_index (position in the
prompt file), prompt, response_ids (two token lists), responses (texts), behavior_logps, scores, label (0 =
first response preferred, 1 = second, null = no preference), status (ok | identical | tie | oracle_failed),
oracle, behavior_version. A resumed run reads the pairs of the steps it replays from here instead of sampling
and asking the oracle again.

A crash can cut a step's rows short (a torn last line, or only some of the step's lines written). On opening,
the torn line is dropped and a step with fewer rows than `rows_in_step` is incomplete: it was never trained on
(the write completes before training), so it is run again, and only the pairs without a complete record go to
the oracle (`partial_rows`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .engine import crash_point


class Ledger:
    def __init__(self, path: Path, writable: bool):
        self.path, self.writable = Path(path), writable
        self.by_step: dict[int, list[dict]] = {}
        self.partial: dict[int, dict[int, dict]] = {}  # step -> slot -> complete row, for incomplete steps
        if not self.path.exists():
            return
        good, found = 0, {}
        for line in self.path.read_bytes().split(b"\n"):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    break  # a torn last line
                if not isinstance(row, dict) or "step" not in row:
                    break
                found.setdefault(row["step"], {})[row.get("slot", len(found.get(row["step"], {})))] = row
            good += len(line) + 1
        if writable and good < self.path.stat().st_size:
            with self.path.open("r+b") as f:
                f.truncate(good)
        for step, rows in found.items():
            expected = next(iter(rows.values())).get("rows_in_step", len(rows))  # older ledgers: steps were whole
            if len(rows) >= expected:
                self.by_step[step] = [rows[s] for s in sorted(rows)]
            else:
                self.partial[step] = rows

    def rows(self, step: int) -> list[dict] | None:
        """The ledger's rows for `step` (all processes'), or None when the step was not completely annotated."""
        return self.by_step.get(step)

    def partial_rows(self, step: int) -> dict[int, dict]:
        """Slot -> complete row of a step a crash cut short (empty when there is none)."""
        return self.partial.get(step, {})

    def append(self, step: int, rows: list[dict]) -> None:
        """Record the complete rows of `step` (rows already on disk from a cut-short attempt are not repeated)."""
        on_disk = self.partial.pop(step, {})
        self.by_step[step] = rows
        if not self.writable:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"step": step, "rows_in_step": len(rows), **r}, ensure_ascii=False) + "\n"
            for r in rows
            if r.get("slot") not in on_disk
        ]
        text = "".join(lines).encode("utf-8")
        with self.path.open("ab") as f:
            if os.environ.get("TETHER_CRASH_AT") == f"mid_ledger:{step + 1}":
                f.write(text[: len(text) // 2])  # fault injection: a torn write, then death
                f.flush()
                os.fsync(f.fileno())
                crash_point("mid_ledger", step + 1)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def count(self, status: str | None = None) -> int:
        return sum(1 for rows in self.by_step.values() for r in rows if status is None or r["status"] == status)
