"""Resumable checkpoints: tensors and JSON only, written atomically (a new temp directory, then a rename).

A checkpoint `checkpoints/step-000120/` holds
    trainable.safetensors            the trainable parameters (all weights, or the LoRA adapter), whole
    weights/shard-*.safetensors      instead, when the weights are sharded (FSDP2): each process's shards of them,
                                     written by torch.distributed.checkpoint without a gather (shards.py)
    optim.json, optim.safetensors    the optimizer and scheduler states (a sharded run: the scheduler's only, and
                                     each process's optimizer shard in optim_shard_R.json/.safetensors)
    rng_R.json, rng_R.safetensors    the RNG states of process R (python, numpy, torch, cuda)
    state.json                       the step, and extras such as the data position
Nothing in it is a pickle, so reading a checkpoint runs no code (state_files.py, shards.py). A checkpoint holding
any other file (a pickle such as optim.pt or DCP's .metadata, planted or left by an older tether) is damaged and
is never read.

Writing: every process writes its files into a new temp directory and flushes them to disk; only when all
succeeded is the directory renamed to its final name, and only then are checkpoints beyond save_total_limit
removed. A write that fails (a full disk) abandons the new checkpoint — its temp directory is removed, the
previous checkpoints stay — and the run stops with one line. Reading (`load_latest`): the newest checkpoint that
reads whole; a damaged newer one is skipped with a warning; checkpoints of the older, pickled format are refused
with one line (they are never unpickled).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException

from ..config import TetherError
from ..files import fsync_dir, new_private_dir, own_dir, share_like_umask
from ..models import is_sharded
from .engine import crash_point, from_every, from_main
from .shards import check_shards, load_shards, save_shards
from .state_files import as_dtensors, load_state, save_state

log = logging.getLogger("tether")

PREFIX = "step-"
_FINAL = re.compile(r"step-(\d+)")
_TEMP = re.compile(r"step-\d+\.tmp.*")  # a checkpoint being written (or left by a killed process)
_FINAL_TEMP = re.compile(r"final\.tmp.*")  # the final model being written (bookkeeping.save_final)
_FILES = re.compile(r"trainable\.safetensors|state\.json|(optim|optim_shard_\d+|rng_\d+)\.(json|safetensors)")
SHARDS = "weights"  # the directory of a sharded checkpoint's weights


class OldFormat(ValueError):
    """A checkpoint written by a tether whose optimizer and RNG states were pickles."""


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded one (an FSDP2 DTensor; a collective: every process must call it)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def whole_tensors(named, keep: bool = True) -> dict[str, torch.Tensor]:
    """(name, tensor) pairs as whole CPU tensors. Sharded tensors are gathered one at a time (a collective:
    every process must call this); a process with keep=False takes part and keeps nothing, so no process ever
    holds more than one gathered tensor beyond what it keeps."""
    out = {}
    for name, t in named:
        whole = full_tensor(t.detach())
        if keep:
            out[name] = whole.cpu().contiguous().clone()  # a copy: FSDP frees its unsharded buffers
    return out


def shard_like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """The whole tensor `value` laid out as `param` is: this process's shard of it when `param` is sharded
    (no communication: every process holds the whole `value`), else `value` itself."""
    if hasattr(param, "full_tensor"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    return value


def _copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """param ← value; a sharded param takes its own shard of the whole `value` (no communication)."""
    param.copy_(shard_like(value, param))


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The finished checkpoints of a run, newest first (real directories only; a link is never followed)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir() or root.is_symlink():
        return []
    found = [p for p in root.iterdir() if _FINAL.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: int(_FINAL.fullmatch(p.name)[1]), reverse=True)


def remove_unfinished(run_dir: Path) -> None:
    """Remove the temp directories of checkpoints (and of a final model) that a killed process never finished:
    tether's own, by their names, in its own run directory."""
    for root, pattern in ((Path(run_dir) / "checkpoints", _TEMP), (Path(run_dir), _FINAL_TEMP)):
        if root.is_dir() and not root.is_symlink():
            for p in root.iterdir():
                if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)


def brief_reason(e: BaseException) -> str:
    """An exception in a few words (its type and the first line of its message, at most 200 characters)."""
    text = (str(e).splitlines() or [""])[0] if not isinstance(e, OSError) else (e.strerror or str(e))
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def _all_errors(accelerator, error: str | None) -> list[str]:
    """Every process's error (None = it succeeded), on every process."""
    errors = from_every(accelerator, error)
    return [e for e in errors if e]


def _write_files(accelerator, tmp: Path, step: int, optimizer, scheduler, extra: dict, weights, sharded: bool):
    """This process's files of a checkpoint, flushed to disk (a full disk raises OSError here). `weights`: the
    whole tensors (kept by the main process), or when `sharded` the sharded ones, of which every process writes
    its own shards."""
    rank = accelerator.process_index
    if sharded:
        save_shards(tmp / SHARDS, weights)  # a collective; DCP flushes each file
    written = [f"rng_{rank}"]
    save_state(rng_state(), tmp, f"rng_{rank}")
    if sharded:  # FSDP: each process keeps its own shard of the optimizer state (resume with the same processes)
        save_state({"optimizer": optimizer.state_dict()}, tmp, f"optim_shard_{rank}")
        written.append(f"optim_shard_{rank}")
    files = [tmp / f"{stem}.{ext}" for stem in written for ext in ("json", "safetensors")]
    if accelerator.is_main_process:
        optim = {"scheduler": scheduler.state_dict()}
        if not sharded:
            save_file(weights, tmp / "trainable.safetensors")
            optim = {"optimizer": optimizer.state_dict(), **optim}
            files.append(tmp / "trainable.safetensors")
        save_state(optim, tmp, "optim")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}), encoding="utf-8")
        files += [tmp / "optim.json", tmp / "optim.safetensors", tmp / "state.json"]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save(
    accelerator, run_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int, tensors=None
) -> Path:
    """Every process calls this; the main process writes the shared state, each process its own RNG state
    (and, when sharded, its shards of the weights and of the optimizer state). `tensors` (name -> tensor) replaces
    the model's trainable parameters as the saved weights. Raises TetherError (on every process) when a file
    cannot be written; the checkpoint is then abandoned and the previous ones are kept."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    sharded = is_sharded(model.parameters())
    named = {n: p for n, p in model.named_parameters() if p.requires_grad} if tensors is None else dict(tensors)
    if sharded:  # every process writes its own shards: nothing is gathered
        weights = named
    else:
        weights = whole_tensors(named.items()) if accelerator.is_main_process else None
    tmp, error = None, None
    if accelerator.is_main_process:
        try:
            tmp = str(new_private_dir(own_dir(root), f"{final.name}.tmp-"))
            if sharded:
                (Path(tmp) / SHARDS).mkdir()
        except (OSError, TetherError) as e:
            error = brief_reason(e) if isinstance(e, OSError) else str(e)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp = None
    tmp = from_main(accelerator, tmp)
    if tmp is not None:
        try:
            _write_files(accelerator, Path(tmp), step, optimizer, scheduler, extra, weights, sharded)
        except OSError as e:
            error = f"{e.filename or tmp}: {e.strerror or e}"
        except (SafetensorError, CheckpointException) as e:  # safetensors' and DCP's wrapping of a failed write
            error = f"{tmp}: {brief_reason(e)}"
        except BaseException:  # a second Ctrl-C, say: the half-written checkpoint goes, the previous ones stay
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    errors = _all_errors(accelerator, error)
    if errors:
        if accelerator.is_main_process and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise TetherError(
            f"step {step}: the checkpoint could not be written ({errors[0]}); it was abandoned and the previous "
            "checkpoints are kept — free some space (or fix the directory) and rerun with --resume"
        )
    crash_point("mid_checkpoint", step)
    if accelerator.is_main_process:
        share_like_umask(tmp)  # safetensors writes 0600, mkdtemp 0700
        if sharded:
            fsync_dir(Path(tmp) / SHARDS)
        publish(Path(tmp), final)
        if keep:
            for old in checkpoint_dirs(run_dir)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def publish(tmp: Path, final: Path) -> None:
    """Rename the complete directory `tmp` to `final` (replacing an older one of tether's under that name; a
    link or a file there is left alone and refused)."""
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        shutil.rmtree(tmp, ignore_errors=True)
        raise TetherError(f"{final}: is not a directory tether wrote (a link or a file); it is left alone")
    fsync_dir(tmp)
    if final.exists():
        replaced = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-old-", dir=final.parent))  # a leftover on a crash
        os.replace(final, replaced)  # a rename onto an empty directory
        os.replace(tmp, final)
        shutil.rmtree(replaced, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def _check_files(path: Path) -> None:
    names = {p.name for p in path.iterdir()}
    if "optim.pt" in names and "optim.json" not in names:
        raise OldFormat("written by an older tether: its optimizer state is a pickle (optim.pt), never loaded")
    for p in sorted(path.iterdir()):
        if p.name == SHARDS and p.is_dir() and not p.is_symlink():
            continue  # its files are checked by check_shards
        if not _FILES.fullmatch(p.name) or p.is_symlink() or not p.is_file():
            raise ValueError(f"holds {p.name!r}, which is not a file of a tether checkpoint (a pickle is never loaded)")


def read(path: Path, model, tensors=None) -> dict:
    """Read and check every file of a checkpoint without applying anything (sharded weights: their headers, the
    tensors are read by `load`); raises on a missing, torn, foreign or mismatched file. Nothing read here can run
    code."""
    _check_files(path)
    named = dict(model.named_parameters()) if tensors is None else tensors
    saved = {n: p for n, p in named.items() if p.requires_grad or tensors is not None}
    if (path / SHARDS).is_dir():
        check_shards(path / SHARDS, saved)
        params = None
    else:
        params = load_file(path / "trainable.safetensors")
        missing = [n for n in saved if n not in params]
        if missing or any(n not in named for n in params):
            raise ValueError(f"does not match the model ({len(missing)} trainable tensors missing)")
        for name, value in params.items():
            if value.shape != named[name].shape:
                raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, the model {tuple(named[name].shape)}")
    optim = load_state(path, "optim")
    if not isinstance(optim, dict) or "scheduler" not in optim:
        raise ValueError("optim.json holds no scheduler state")
    if "optimizer" not in optim:  # a sharded run: one optimizer shard per process
        shards = sorted(p.stem for p in path.glob("optim_shard_*.json")) or ["optim_shard_0"]
        for shard in shards:
            if "optimizer" not in load_state(path, shard):
                raise ValueError(f"{shard}.json holds no optimizer state")
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError("state.json has no step")
    for rng_file in sorted(path.glob("rng_*.json")):
        rng = load_state(path, rng_file.stem)
        if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= rng.keys():
            raise ValueError(f"{rng_file.name} is not an RNG state")
    return {"params": params, "named": named, "saved": saved, "optim": optim, "state": state}


def load(accelerator, path: Path, model, optimizer, scheduler, tensors=None) -> dict:
    """Restore a checkpoint written by `save` (into `tensors` when given); returns its state.json."""
    ckpt = read(path, model, tensors)
    if ckpt["params"] is None:  # sharded: each process reads the chunks of its own shards
        load_shards(path / SHARDS, ckpt["saved"])
    else:
        with torch.no_grad():
            for name, value in ckpt["params"].items():
                _copy_into(ckpt["named"][name], value)
    optim = ckpt["optim"]
    if "optimizer" not in optim:
        shard = f"optim_shard_{accelerator.process_index}"
        if not (path / f"{shard}.json").is_file():
            raise TetherError(
                f"{path}: written by a sharded run with other processes (no {shard}.json); resume with "
                "the same number of processes"
            )
        optim = {**optim, "optimizer": as_dtensors(load_state(path, shard)["optimizer"], optimizer)}
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    rng = f"rng_{accelerator.process_index}"
    if (path / f"{rng}.json").is_file():
        set_rng_state(load_state(path, rng))
    return ckpt["state"]


def _choose(run_dir: Path, model, tensors) -> str | None:
    """Main process: the name of the newest checkpoint that reads whole, None when there is none; raises
    TetherError when the only checkpoints are of the older, pickled format."""
    remove_unfinished(run_dir)
    ckpts, old = checkpoint_dirs(run_dir), []
    for path in ckpts:
        try:
            read(path, model, tensors)
        except OldFormat:
            old.append(path)
            continue
        except Exception as e:  # noqa: BLE001 - any damage: fall back to the previous checkpoint
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, brief_reason(e))
            continue
        return path.name
    if old:
        raise TetherError(
            f"{run_dir}: its checkpoints were written by an older tether, whose pickled optimizer state (optim.pt) "
            "this version never loads (unpickling can run code); finish the run with the tether that started it, "
            "or start a new run in another output_dir"
        )
    if ckpts:
        log.warning("%s: no readable checkpoint; the run starts again from step 0", run_dir)
    return None


def load_latest(accelerator, run_dir: Path, model, optimizer, scheduler, tensors=None) -> dict | None:
    """Restore the newest checkpoint that reads whole; a damaged newer one is skipped with a warning. Every
    process takes the same one (the main process decides). None when there is no readable checkpoint."""
    choice: list = [None, None]  # (checkpoint name, error)
    if accelerator.is_main_process:
        try:
            choice = [_choose(run_dir, model, tensors), None]
        except TetherError as e:
            choice = [None, str(e)]
    name, error = from_main(accelerator, choice)
    if error:
        raise TetherError(error)
    if name is None:
        return None
    path = Path(run_dir) / "checkpoints" / name
    state = load(accelerator, path, model, optimizer, scheduler, tensors)
    log.info("resumed from %s", path)
    return state
