"""The annotation ledger of an online run: every sampled pair and its label, appended durably (written,
flushed and fsynced) BEFORE the run trains on it.

One JSON object per line: step, prompt_index (position in the prompt file), prompt, response_ids (two token
lists), responses (texts), behavior_logps, scores, label (0 = first response preferred, 1 = second, null =
no preference), status (ok | identical | tie | oracle_failed), oracle, behavior_version. A resumed run reads
the pairs of the steps it replays from here instead of sampling and asking the oracle again. A line cut short
by a crash is dropped on opening (its step had not been trained on: the write completes before training).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class Ledger:
    def __init__(self, path: Path, writable: bool):
        self.path, self.writable = Path(path), writable
        self.by_step: dict[int, list[dict]] = {}
        if self.path.exists():
            good, lines = 0, self.path.read_bytes().split(b"\n")
            for line in lines:
                if not line.strip():
                    good += len(line) + 1
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a torn last line
                self.by_step.setdefault(row["step"], []).append(row)
                good += len(line) + 1
            if writable and good < self.path.stat().st_size:
                with self.path.open("r+b") as f:
                    f.truncate(min(good, self.path.stat().st_size))

    def rows(self, step: int) -> list[dict] | None:
        """The ledger's rows for `step` (all processes'), or None when the step was never annotated."""
        return self.by_step.get(step)

    def append(self, step: int, rows: list[dict]) -> None:
        self.by_step[step] = rows
        if not self.writable:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())

    def count(self, status: str | None = None) -> int:
        return sum(1 for rows in self.by_step.values() for r in rows if status is None or r["status"] == status)
