"""What a Python caller hands a run instead of paths and names (the trainer objects, tether/trainers.py): a model
object, a reference model, a tokenizer, in-memory datasets, an oracle and callbacks. The command line hands none.

An in-memory dataset (a `datasets.Dataset`, a split of a `DatasetDict`, or a list of dicts) is validated record
by record ("train_dataset: record 3: missing field 'chosen'") and written once to tether's cache as a JSON-lines
file named by its content; the run then reads that file like any other. So config.yaml names a file that holds
exactly what was trained on, a resumed run checks that the data did not change, and the run can be continued
from the command line as well.

An in-memory model is used as given (trained in place, as TRL does); config.yaml records where it came from
(its `name_or_path` when that is a local directory, else `<in-memory CLASS>`), and its fingerprint is a hash
of its weights, so resuming with other weights is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

from ..config import TetherError
from ..data import COMPLETION_KEYS, parse_record, prompt_records
from ..files import cache_dir, write_text_atomic
from .callbacks import Callbacks


@dataclasses.dataclass
class RunObjects:
    """Objects that replace what a config names: `model` (cfg.model), `ref_model` (cfg.ref_model), `tokenizer`
    (loaded from cfg.model otherwise), `oracle` (cfg.oracle) and the callbacks. `initial`: a frozen copy of an
    in-memory model taken before training (π_ref when it is fully fine-tuned against itself). `fingerprints`:
    option -> fingerprint of the in-memory model given for it (checked on resume instead of a directory's)."""

    model: Any = None
    ref_model: Any = None
    initial: Any = None
    tokenizer: Any = None
    oracle: Any = None
    callbacks: Callbacks | None = None
    fingerprints: dict[str, str] = dataclasses.field(default_factory=dict)


def model_label(model) -> str:
    """What config.yaml records for an in-memory model: the local directory it was loaded from, when there is one."""
    where = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if where and os.path.isdir(where):
        return str(where)
    return f"<in-memory {type(model).__name__}>"


def check_model_object(model, option: str) -> None:
    """An in-memory model must be a causal LM tether can train as it is (not a PEFT model: its adapter would be
    mistaken for the reference's absence)."""
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TetherError(f"{option}: expected a path, a built-in name or a torch model, got {type(model).__name__}")
    if hasattr(model, "peft_config"):
        raise TetherError(
            f"{option}: a PEFT model; pass model.merge_and_unload() (LoRA is then added by lora: true), or the "
            "adapter's directory (it is merged into its base, docs/training.md)"
        )


def dataset_rows(data, name: str, split: str) -> list[tuple[str, dict]]:
    """(source, row) pairs of an in-memory dataset; a DatasetDict gives its `split`."""
    if isinstance(data, dict) and data and all(hasattr(v, "to_list") for v in data.values()):  # a DatasetDict
        if split not in data:
            raise TetherError(f"{name}: has no split '{split}' (it has {', '.join(data.keys())}); pick one")
        data, name = data[split], f"{name}['{split}']"
    if hasattr(data, "to_list"):
        data = data.to_list()
    if isinstance(data, dict) or not hasattr(data, "__iter__") or isinstance(data, (str, bytes)):
        raise TetherError(f"{name}: expected a datasets.Dataset, a DatasetDict or a list of dicts, got {type(data)}")
    rows = [(f"{name}: record {i}", row) for i, row in enumerate(data)]
    if not rows:
        raise TetherError(f"{name}: holds no records")
    return rows


def dataset_file(data, name: str, kind: str, split: str = "train") -> str:
    """A path for an in-memory dataset of `kind` "preference", "prompt" or "reference" (prompts with a reference
    answer; see the module docstring); a path given as a string is returned as it is."""
    if isinstance(data, (str, os.PathLike)):
        return str(data)
    rows = dataset_rows(data, name, split)
    if kind == "preference":
        for source, row in rows:
            parse_record(row, source, COMPLETION_KEYS)
    else:
        prompt_records(rows, need_reference=kind == "reference")
    lines = []
    for source, row in rows:
        try:
            lines.append(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        except (TypeError, ValueError) as e:
            raise TetherError(
                f"{source}: cannot be stored as JSON ({e}); give plain strings, lists and dicts"
            ) from None
    text = "".join(lines)
    path = cache_dir() / "datasets" / f"{hashlib.blake2b(text.encode(), digest_size=16).hexdigest()}.jsonl"
    if not path.is_file():
        write_text_atomic(path, text)
    return str(path)


def model_file_or_object(model, option: str) -> tuple[str, Any]:
    """(what the config records, the object or None) for a model given as a path/name or as an object."""
    if model is None or isinstance(model, (str, os.PathLike)):
        return (str(model) if model is not None else None), None
    check_model_object(model, option)
    return model_label(model), model
