"""Resumable checkpoints, written atomically (temp directory, then rename).

A checkpoint `checkpoints/step-000120/` holds the trainable parameters (all weights, or the LoRA adapter),
the optimizer and scheduler states, one RNG-state file per process and `state.json` (step, extras such as
the data position). A half-written checkpoint is never visible under its final name, so `--resume`
always finds a complete one; a checkpoint damaged afterwards (a torn or corrupted file) is skipped on resume
in favour of the previous one (`load_latest`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from safetensors.torch import load_file, save_file

from ..config import TetherError
from ..models import is_sharded
from .engine import crash_point

log = logging.getLogger("tether")

PREFIX = "step-"


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


def save(
    accelerator, run_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int, tensors=None
) -> Path:
    """Every process calls this; the main one writes the shared state, each writes its own RNG state.
    `tensors` (name -> tensor) replaces the model's trainable parameters as the saved weights."""
    final = run_dir / "checkpoints" / f"{PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    sharded = is_sharded(model.parameters())
    if sharded:  # FSDP: each process keeps its own shard of the optimizer state (resume with the same processes)
        torch.save({"optimizer": optimizer.state_dict()}, tmp / f"optim_shard_{accelerator.process_index}.pt")
    if accelerator.is_main_process or sharded:
        named = ((n, p) for n, p in model.named_parameters() if p.requires_grad) if tensors is None else tensors.items()
        weights = whole_tensors(named, keep=accelerator.is_main_process)
    if accelerator.is_main_process:
        save_file(weights, tmp / "trainable.safetensors")
        optim = (
            {"scheduler": scheduler.state_dict()}
            if sharded
            else {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        )
        torch.save(optim, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
    accelerator.wait_for_everyone()
    crash_point("mid_checkpoint", step)
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep:
            for old in sorted((run_dir / "checkpoints").glob(f"{PREFIX}*[0-9]"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read(path: Path, model, tensors=None) -> dict:
    """Read and check every file of a checkpoint without applying anything; raises on a missing, torn or
    mismatched file."""
    params = load_file(path / "trainable.safetensors")
    named = dict(model.named_parameters()) if tensors is None else tensors
    missing = [n for n, p in named.items() if (p.requires_grad or tensors is not None) and n not in params]
    if missing or any(n not in named for n in params):
        raise ValueError(f"does not match the model ({len(missing)} trainable tensors missing)")
    for name, value in params.items():
        if value.shape != named[name].shape:
            raise ValueError(f"tensor {name} has shape {tuple(value.shape)}, the model {tuple(named[name].shape)}")
    optim = torch.load(path / "optim.pt", weights_only=False)
    if "optimizer" not in optim:  # a sharded run: one optimizer shard per process
        for shard in sorted(path.glob("optim_shard_*.pt")) or [path / "optim_shard_0.pt"]:
            torch.load(shard, weights_only=False)
    state = json.loads((path / "state.json").read_text())
    if not isinstance(state.get("step"), int):
        raise ValueError("state.json has no step")
    for rng_file in path.glob("rng_*.pt"):
        torch.load(rng_file, weights_only=False)
    return {"params": params, "named": named, "optim": optim, "state": state}


def load(accelerator, path: Path, model, optimizer, scheduler, tensors=None) -> dict:
    """Restore a checkpoint written by `save` (into `tensors` when given); returns its state.json."""
    ckpt = read(path, model, tensors)
    with torch.no_grad():
        for name, value in ckpt["params"].items():
            _copy_into(ckpt["named"][name], value)
    optim = ckpt["optim"]
    if "optimizer" not in optim:
        shard = path / f"optim_shard_{accelerator.process_index}.pt"
        if not shard.is_file():
            raise TetherError(
                f"{path}: written by a sharded run with other processes (no {shard.name}); resume with "
                "the same number of processes"
            )
        optim = {**optim, **torch.load(shard, weights_only=False)}
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return ckpt["state"]


def load_latest(accelerator, run_dir: Path, model, optimizer, scheduler, tensors=None) -> dict | None:
    """Restore the newest checkpoint that reads whole; a damaged newer one is skipped with a warning. Every
    process takes the same one (the main process decides). None when there is no readable checkpoint."""
    ckpts = sorted((run_dir / "checkpoints").glob(f"{PREFIX}*[0-9]"), reverse=True)
    choice: list = [None]
    if accelerator.is_main_process:
        for path in ckpts:
            try:
                read(path, model, tensors)
            except Exception as e:  # noqa: BLE001 - any damage: fall back to the previous checkpoint
                log.warning(
                    "checkpoint %s is damaged (%s: %s); falling back to the previous one",
                    path,
                    type(e).__name__,
                    str(e).splitlines()[0] if str(e) else "",
                )
                continue
            choice = [path.name]
            break
        if ckpts and choice[0] is None:
            log.warning("%s: no readable checkpoint; the run starts again from step 0", run_dir)
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    if choice[0] is None:
        return None
    path = run_dir / "checkpoints" / choice[0]
    state = load(accelerator, path, model, optimizer, scheduler, tensors)
    log.info("resumed from %s", path)
    return state
