"""The reference policy π_ref: a separate frozen model, the LoRA base with the adapter disabled, or
log-probs precomputed once and cached on disk (keyed by a fingerprint of model weights + tokenized data)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import Example, collate
from ..files import write_atomic
from ..logprobs import sequence_logps

log = logging.getLogger("tether")


def adapter_disabled(model):
    """Context in which a PEFT model behaves as its base model (no-op for a plain model)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


class LiveReference:
    """Scores batches with a reference model on the fly.

    `model` is either a separate frozen model, or the (unwrapped) PEFT policy itself, in which case the
    adapter is disabled during the forward, so no second copy of the weights exists.
    """

    def __init__(self, model, use_base_of_adapter: bool):
        self.model = model
        self.use_base_of_adapter = use_base_of_adapter

    @contextlib.contextmanager
    def generating(self):
        """The reference model in eval mode (no dropout), with the adapter disabled when it is the LoRA base."""
        ctx = adapter_disabled(self.model) if self.use_base_of_adapter else contextlib.nullcontext()
        was_training = self.model.training
        self.model.eval()
        try:
            with ctx, torch.no_grad():
                yield self.model
        finally:
            self.model.train(was_training)

    def logps(self, batch: dict[str, torch.Tensor], n_groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        with self.generating() as model:
            return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], n_groups)

    def weights_fingerprint(self) -> str:
        h = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(self.model.state_dict().items()):
            if self.use_base_of_adapter and "lora_" in name:
                continue
            h.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
            h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())  # the bytes in place, no copy
        return h.hexdigest()


def data_fingerprint(examples: list[Example], keys: tuple[str, ...]) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(keys).encode())
    for ex in examples:
        h.update(repr((ex.prompt_ids, [ex.completion_ids[k] for k in keys])).encode())
    return h.hexdigest()


def compute_logps_table(
    reference: LiveReference,
    examples: list[Example],
    keys: tuple[str, ...],
    pad_id: int,
    batch_size: int,
    indices: list[int],
    device,
    progress: bool = False,
    desc: str = "reference log-probs",
) -> torch.Tensor:
    """(len(keys), len(indices)) summed reference log-probs: column j is example indices[j], rows follow keys."""
    parts = []
    bar = tqdm(total=len(indices), desc=desc, disable=not progress, unit="ex")
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_id, keys).items()}
        sums, _ = reference.logps(batch, len(keys))
        parts.append(sums.view(len(keys), len(chunk)).cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(parts, dim=1) if parts else torch.empty(len(keys), 0)


def load_cached(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The (keys, examples) table saved by `save_cached`, or None. A cache file that is empty, torn, of another
    shape or not finite is removed with a warning (and so computed again)."""
    if not path.is_file():
        return None
    try:
        table = torch.load(path, weights_only=True)
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != tuple(shape) or not torch.isfinite(table).all():
            raise ValueError(f"not a finite {shape[0]}x{shape[1]} table")
    except Exception as e:  # noqa: BLE001 - any damage: rebuild
        log.warning("cached reference log-probs %s unusable (%s); computing them again", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        path.unlink(missing_ok=True)
        return None
    return table


def save_cached(path: Path, table: torch.Tensor) -> None:
    """Write atomically: a temp file in the same directory, then rename."""
    write_atomic(path, lambda tmp: torch.save(table, tmp))
