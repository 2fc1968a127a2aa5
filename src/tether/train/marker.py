"""The marker that makes a directory tether's own: `.tether-run`, JSON, the first file tether writes into a new
or empty directory (a run's, a study's). It records the directory's identity (device and inode) and a random
run id, so a marker copied into another directory — or a run directory copied elsewhere — is not taken for
tether's. Light on purpose (no torch): `tether report` and the studies read it too."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from ..config import TetherError

MARKER = ".tether-run"


def directory_identity(path: Path) -> dict[str, int]:
    st = os.stat(path)
    return {"device": st.st_dev, "inode": st.st_ino}


def new_marker(path: Path, command: str, **fields) -> dict:
    """The marker of a directory tether has just made its own."""
    return {
        "tether_run": 1,
        "command": command,
        "run_id": uuid.uuid4().hex,
        "directory": directory_identity(path),
        **fields,
    }


def read_marker(path: Path) -> dict | None:
    """The directory's tether marker, None when it has none; TetherError when it is unreadable or was written
    for another directory. The inode must match (the device number may change when a network disk is mounted
    again, so it is recorded but not compared); a marker written before identities were recorded is accepted."""
    path = Path(path)
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError):
        raise TetherError(
            f"{path / MARKER}: unreadable tether marker; tether does not take this directory for its own: choose "
            "another directory"
        ) from None
    if not isinstance(marker, dict) or marker.get("tether_run") != 1:
        return None
    recorded = marker.get("directory")
    if isinstance(recorded, dict) and recorded.get("inode") != directory_identity(path)["inode"]:
        raise TetherError(
            f"{path}: its {MARKER} marker was written for another directory (copied here?), so tether does not "
            "take this directory for its own and writes nothing into it: choose another directory"
        )
    return marker
