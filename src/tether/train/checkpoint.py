"""Resumable checkpoints, written atomically (temp directory, then rename).

A checkpoint `checkpoints/step-000120/` holds the trainable parameters (all weights, or the LoRA adapter),
the optimizer and scheduler states, one RNG-state file per process and `state.json` (step, extras such as
the data position). A half-written checkpoint is never visible under its final name, so `--resume`
always finds a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PREFIX = "step-"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().clone() for n, p in model.named_parameters() if p.requires_grad}


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


def latest(run_dir: Path) -> Path | None:
    ckpts = sorted((run_dir / "checkpoints").glob(f"{PREFIX}*[0-9]"))
    return ckpts[-1] if ckpts else None


def save(accelerator, run_dir: Path, step: int, model, optimizer, scheduler, extra: dict, keep: int, tensors=None) -> Path:
    """Every process calls this; the main one writes the shared state, each writes its own RNG state.
    `tensors` (name -> tensor) replaces the model's trainable parameters as the saved weights."""
    final = run_dir / "checkpoints" / f"{PREFIX}{step:06d}"
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        weights = trainable_state(model) if tensors is None else {n: t.detach().contiguous().clone() for n, t in tensors.items()}
        save_file(weights, tmp / "trainable.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optim.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep:
            for old in sorted((run_dir / "checkpoints").glob(f"{PREFIX}*[0-9]"))[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, path: Path, model, optimizer, scheduler, tensors=None) -> dict:
    """Restore a checkpoint written by `save` (into `tensors` when given); returns its state.json."""
    params = load_file(path / "trainable.safetensors")
    named = dict(model.named_parameters()) if tensors is None else tensors
    missing = [n for n, p in named.items() if (p.requires_grad or tensors is not None) and n not in params]
    if missing or any(n not in named for n in params):
        raise RuntimeError(f"{path}: checkpoint does not match the model ({len(missing)} trainable tensors missing)")
    with torch.no_grad():
        for name, value in params.items():
            named[name].copy_(value)
    optim = torch.load(path / "optim.pt", weights_only=False)
    optimizer.load_state_dict(optim["optimizer"])
    scheduler.load_state_dict(optim["scheduler"])
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "state.json").read_text())
