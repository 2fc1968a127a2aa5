"""Writing files so that a reader never sees half of one, and only where tether means to write.

- Atomic writes: a temp file in the same directory, flushed to disk, then renamed over the target (a rename
  within one directory is atomic, and it replaces a symbolic link planted under the target's name instead of
  writing through it).
- Inside tether's own directories nothing is opened through a symbolic link: appends use O_NOFOLLOW, and a
  subdirectory (checkpoints/, plots/) must be a real directory (`own_dir`).
- Files and directories tether writes get the usual permissions of the umask (safetensors and mkdtemp make
  private ones).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

_UMASK_AT_IMPORT = os.umask(0)
os.umask(_UMASK_AT_IMPORT)


def current_umask() -> int:
    """The process's umask now (read from /proc where there is one, so reading it changes nothing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return _UMASK_AT_IMPORT


def cache_dir() -> Path:
    """tether's cache directory: $TETHER_CACHE, else ~/.cache/tether."""
    root = os.environ.get("TETHER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tether")
    path = Path(root)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _error(f"cannot create tether's cache directory {path} ({e.strerror or e}); set TETHER_CACHE") from None
    return path


def _error(message: str):
    from .config import TetherError  # config imports this module

    return TetherError(message)


def check_writable_dir(path: Path, option: str) -> Path:
    """Before any work: `path` (a cache directory) exists or can be made, and a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".tether-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise _error(
            f"option '{option}': cannot write into {path} ({e.strerror or e}); choose a writable directory"
        ) from None
    return path


def own_dir(path: str | os.PathLike) -> Path:
    """`path` as a real directory inside a directory of tether's: created when missing; a symbolic link or a
    file under that name is refused (tether never writes through a link it did not make)."""
    path = Path(path)
    try:
        os.mkdir(path)
    except FileExistsError:
        pass
    mode = os.lstat(path).st_mode
    if stat.S_ISLNK(mode) or not stat.S_ISDIR(mode):
        kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a directory"
        raise _error(f"{path}: is {kind}, which tether did not make; tether writes only into its own directories")
    return path


def open_append(path: str | os.PathLike):
    """A binary file opened for appending, created when missing, never through a symbolic link."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _error(
                f"{path}: is a symbolic link, which tether did not make; it never writes through one"
            ) from None
        raise
    return os.fdopen(fd, "ab")


def new_private_dir(parent: Path, prefix: str) -> Path:
    """A new, uniquely named directory in `parent` that only this call created (mkdtemp), with the usual
    permissions of the umask."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def share_like_umask(root: str | os.PathLike) -> None:
    """Give every file and directory under `root` (which tether just wrote) the permissions the umask asks for:
    safetensors writes its files 0600 and mkdtemp its directories 0700. Links are left alone."""
    umask = current_umask()
    for dirpath, _, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~umask)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file under `root`, then the directories, to disk: a full disk surfaces here (as an OSError),
    before the tree is renamed into place, and never as a torn file under its final name."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: str | os.PathLike) -> None:
    """Delete a directory tether made (never a link's target: a link is refused; rmtree does not follow links
    inside)."""
    path = Path(path)
    if path.is_symlink():
        raise _error(f"{path}: is a symbolic link, which tether did not make; it is left alone")
    shutil.rmtree(path, ignore_errors=True)


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
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object file, or {} when it is missing, torn, too deeply nested or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
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
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows
