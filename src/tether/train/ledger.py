"""The annotation ledger of an online run: every sampled pair and its label, appended durably (written,
flushed and fsynced) BEFORE the run trains on it.

One JSON object per line: step, rows_in_step (how many rows the step has), slot, prompt_index (position in the
prompt file), prompt, response_ids (two token lists), responses (texts), behavior_logps, scores, label (0 =
first response preferred, 1 = second, null = no preference), status (ok | identical | tie | oracle_failed),
oracle, behavior_version. A resumed run reads the pairs of the steps it replays from here instead of sampling
and asking the oracle again.

A crash can cut a step's rows short (a torn last line, or only some of the step's lines written). On opening,
a torn last line (one without its newline) is dropped and a step with fewer rows than `rows_in_step` is
incomplete: it was never trained on (the write completes before training), so it is run again, and only the
pairs without a complete record go to the oracle (`partial_rows`). Any other damaged line — one in the middle,
or a complete last line that is not a record — is never dropped: opening the ledger fails with one line naming
it, so no recorded answer is ever deleted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..config import TetherError
from ..files import open_append
from .engine import crash_point


def _row(line: bytes) -> dict | None:
    """A ledger row, or None for a line that is not one."""
    try:
        row = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return row if isinstance(row, dict) and isinstance(row.get("step"), int) else None


class Ledger:
    def __init__(self, path: Path, writable: bool):
        self.path, self.writable = Path(path), writable
        self.by_step: dict[int, list[dict]] = {}
        self.partial: dict[int, dict[int, dict]] = {}  # step -> slot -> complete row, for incomplete steps
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        found, torn = self._parse(data)
        if writable and torn:
            fd = os.open(self.path, os.O_RDWR | os.O_NOFOLLOW)
            try:
                os.ftruncate(fd, len(data) - torn)
                os.fsync(fd)
            finally:
                os.close(fd)
        for step, rows in found.items():
            expected = next(iter(rows.values())).get("rows_in_step", len(rows))  # older ledgers: steps were whole
            if len(rows) >= expected:
                self.by_step[step] = [rows[s] for s in sorted(rows)]
            else:
                self.partial[step] = rows

    def _parse(self, data: bytes) -> tuple[dict[int, dict[int, dict]], int]:
        """(step -> slot -> row, length of the torn last line to drop). A last line without its newline is a torn
        write (a whole record there is kept, its newline added); any other line that is not a record raises
        TetherError naming it."""
        found: dict[int, dict[int, dict]] = {}
        lines = data.split(b"\n")
        torn = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = _row(line)
            if row is None and number == len(lines):
                torn = len(line)
                continue
            if row is None:
                raise TetherError(
                    f"{self.path}:line {number}: damaged record (not a ledger row); tether never deletes recorded "
                    "answers: restore the line from a copy, or delete it yourself to have that pair annotated again, "
                    "then rerun with --resume"
                )
            rows = found.setdefault(row["step"], {})
            rows[row.get("slot", len(rows))] = row
        if lines[-1].strip() and not torn and self.writable:
            with open_append(self.path) as f:  # a whole last record without its newline: complete the line
                f.write(b"\n")
        return found, torn

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
        with open_append(self.path) as f:
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
