"""Optimizer, scheduler and RNG states on disk without pickle: NAME.json holds the structure, NAME.safetensors
the tensors. Reading them runs no code, whatever the files say (a pickle, as `torch.load` reads it, can).

The JSON keeps what plain JSON would lose: tuples ({"__tuple__": [...]}), dicts with keys that are not strings
(optimizer states are keyed by parameter index: {"__items__": [[key, value], ...]}), numpy arrays (the numpy
RNG state: {"__ndarray__": [...], "dtype": ...}) and tensors ({"__tensor__": KEY}, KEY in the safetensors file).
A shard of an FSDP2 tensor (a DTensor) is stored as this process's local shard ({"__tensor__": KEY,
"shard": true}) and read back as a `LocalShard` that `as_dtensors` lays out like its parameter again.
Floats are written with repr, so every value reads back bit for bit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file


@dataclass
class LocalShard:
    """This process's shard of a sharded optimizer tensor, as read from disk."""

    tensor: torch.Tensor


def _encode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        shard = hasattr(obj, "to_local")
        key = f"t{len(tensors)}"
        tensors[key] = (obj.to_local() if shard else obj).detach().cpu().contiguous().clone()
        return {"__tensor__": key, "shard": True} if shard else {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(x, tensors) for x in obj]}
    if isinstance(obj, list):
        return [_encode(x, tensors) for x in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    raise TypeError(f"a {type(obj).__name__} cannot be written into a checkpoint")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(x, tensors) for x in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        t = tensors[obj["__tensor__"]]
        return LocalShard(t) if obj.get("shard") else t
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(x, tensors) for x in obj["__tuple__"])
    if "__items__" in obj:
        return {_hashable(_decode(k, tensors)): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _hashable(key):
    if isinstance(key, (list, dict, torch.Tensor, np.ndarray, LocalShard)):
        raise ValueError("a mapping key that is not a plain value")
    return key


def save_state(obj, directory: Path, name: str) -> None:
    """Write `obj` (nested dicts, lists, tuples, numbers, strings, numpy arrays, tensors) as NAME.json and
    NAME.safetensors in `directory`."""
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors)
    save_file(tensors, directory / f"{name}.safetensors")
    (directory / f"{name}.json").write_text(json.dumps(tree), encoding="utf-8")


def load_state(directory: Path, name: str):
    """What `save_state` wrote; raises (ValueError, KeyError, OSError, ...) on a missing, torn or altered file."""
    tensors = load_file(directory / f"{name}.safetensors")
    tree = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    return _decode(tree, tensors)


def as_dtensors(state, optimizer):
    """An optimizer state read by `load_state` with each `LocalShard` laid out as a shard of its parameter again
    (an FSDP2 DTensor on the parameter's mesh and placements). `optimizer` is a torch optimizer (the state its
    state_dict()) or an object with `.items`, a list of them (the state a list of their states)."""
    if hasattr(optimizer, "items") and isinstance(state, list):
        return [as_dtensors(s, o) for s, o in zip(state, optimizer.items, strict=True)]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entry in state.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, LocalShard):
                entry[key] = _dtensor_like(value.tensor, params[index])
    return state


def _dtensor_like(local: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local.to(param.device),
        param.device_mesh,
        param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
