"""Writing files so that a reader never sees half of one: a temp file in the same directory, flushed to disk,
then renamed over the target (a rename within one directory is atomic)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


def cache_dir() -> Path:
    """tether's cache directory: $TETHER_CACHE, else ~/.cache/tether."""
    root = os.environ.get("TETHER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tether")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` writes the new content to a temp file beside `path`, which is then renamed to `path`.
    On any error the temp file is removed and `path` keeps its old content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object file, or {} when it is missing, torn or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of an append-only .jsonl file; a line that does not parse (torn by a killed writer) or
    is not an object is skipped. A missing file has no rows."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return rows
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
