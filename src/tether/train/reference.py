"""The reference policy π_ref of the loss: one `Reference` object for every reference mode of both loops.

    initial   π_sft, the policy before training: the LoRA base with the adapter disabled, the policy itself
              until its first step (offline, when the log-probs are precomputed), or a frozen copy
    fixed     a separate frozen model (`ref_model`)
    behavior  π_β, the behavior policy of BPO (docs/methods.md §5): its log-probs are recorded when it samples
    ema       an exponential moving average of π_θ, moved after every step (online)
    none      no reference: the loss reads none (docs/losses.md, "No reference"); with BAPO only the base
              responses' log π_ref(y_b) are known (precomputed offline, from the ledger online)
    cached    (offline) any of the above, its log-probs computed once before training and cached on disk
              (keyed by a fingerprint of the model weights + tokenized data)

`offline_reference` and `online_reference` are the only places that read the `reference` / `ref_model`
options; both loops call `Reference.logps` for a batch, `Reference.update` after every optimizer step, and
write `Reference.label` into results.json (the model card shows it)."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import Example, collate
from ..files import write_atomic
from ..logprobs import sequence_logps
from ..loss_table import needs_reference
from ..models import eval_mode, load_model, to_device
from .checkpoint import full_tensor
from .train_config import logp_options

log = logging.getLogger("tether")


def load_reference_model(name: str, dtype, device, shard: Callable | None = None, empty: bool = False):
    """A model loaded to serve as a reference: eval mode, no gradients, on `device`, sharded by `shard` (FSDP2:
    `engine.shard_model`) when given, like the policy (`empty`: loaded with empty weights, which sharding fills)."""
    model = to_device(load_model(name, dtype, empty=empty).eval().requires_grad_(False), device)
    return model if shard is None else shard(model)


class Reference:
    """π_ref: `logps(batch, n_keys, recorded)` gives the summed log π_ref of every row of a collated batch
    (key-major); `recorded` holds log-probs of those rows known before the step (π_β's from sampling, a cached
    table), which a reference that scores live does not need. `label` says what π_ref is."""

    def __init__(self, label: str):
        self.label = label

    def logps(self, batch: dict[str, torch.Tensor], n_keys: int, recorded: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def update(self) -> None:
        """After every optimizer step (or skipped step): only a moving reference (ema) changes."""


class RecordedReference(Reference):
    """A reference whose log-probs were recorded before they are needed: π_β's at sampling time (online), or a
    table precomputed once and cached (offline)."""

    def logps(self, batch, n_keys, recorded=None):
        if recorded is None:
            raise ValueError(f"the {self.label} reference scores nothing itself: its log-probs must be given")
        return recorded


class NoReference(Reference):
    """The loss reads no reference: no model, no pass, and `logps` is None (BAPO's log π_ref(y_b) are kept
    apart: a table of the base rows alone offline, the ledger's online)."""

    def logps(self, batch, n_keys, recorded=None):
        return None


class LiveReference(Reference):
    """Scores batches with a model on the fly. `open()` is a context yielding the model in eval mode without
    gradients (for `generating` too); `model` and `adapter_off` say whose weights the fingerprint of a cache
    key covers (the base's alone when the reference is the policy with its adapter disabled); `after_step`, when
    given, moves the reference after every step (ema); `scoring` holds `sequence_logps`'s padding_free and
    chunk_size (none: padded batches, the whole head at once)."""

    def __init__(
        self,
        label: str,
        open: Callable,
        model=None,
        adapter_off: bool = False,
        after_step: Callable | None = None,
        scoring: dict | None = None,
    ):
        super().__init__(label)
        self.open, self.model, self.adapter_off, self.after_step = open, model, adapter_off, after_step
        self.scoring = scoring or {}

    def generating(self):
        return self.open()

    def logps(self, batch, n_keys, recorded=None):
        with self.open() as model:
            ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            return sequence_logps(model, ids, mask, completion, n_keys, **self.scoring)[0]

    def update(self) -> None:
        if self.after_step is not None:
            self.after_step()

    def weights_fingerprint(self) -> str:
        return weights_fingerprint(self.model, skip_adapters=self.adapter_off)


def weights_fingerprint(model, skip_adapters: bool = False) -> str:
    """A hash of a model's tensors (names and bytes); with `skip_adapters`, of its base weights alone, named as
    in the model without the adapter (so it equals the fingerprint of the model before LoRA was added)."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        if skip_adapters and "lora_" in name:
            continue
        h.update(name.replace("base_model.model.", "").replace(".base_layer", "").encode())
        whole = full_tensor(tensor.detach())  # sharded: gathered one tensor at a time (every process calls this)
        h.update(whole.cpu().contiguous().view(torch.uint8).numpy())  # the bytes in place, no copy
    return h.hexdigest()


def model_reference(label: str, model, adapter_off: bool = False, scoring: dict | None = None) -> LiveReference:
    """A live reference that is `model` (with its adapters disabled when `adapter_off`), scoring as `scoring` says
    (`LiveReference`)."""
    return LiveReference(label, lambda: eval_mode(model, adapter_off), model, adapter_off, scoring=scoring)


def offline_reference(
    cfg, policy, device, ref_model=None, initial=None, shard: Callable | None = None, empty: bool = False
) -> Reference:
    """π_ref of an offline run, as a live scorer (precomputing turns it into a cached one, `cached_reference`):
    a separate frozen model, the LoRA base (adapter disabled) or the initial policy; for a loss that reads no
    reference, nothing (`NoReference`), or with BAPO the initial policy for the base responses alone. It lays out
    its batches as the policy's (`logp_options`). `ref_model`: an in-memory reference model; `initial`: an
    in-memory frozen copy of the initial policy (the trainer's, when it was given a model object to fully
    fine-tune)."""
    free = not needs_reference(cfg.loss)
    if free and cfg.method != "bapo":
        return NoReference(f"none (loss {cfg.loss} reads no reference)")
    scoring = logp_options(cfg)
    if cfg.ref_model:
        ref = frozen(ref_model, device, shard) if ref_model is not None else None
        ref = ref or load_reference_model(cfg.ref_model, cfg.torch_dtype, device, shard, empty)
        return model_reference(f"fixed ({cfg.ref_model})", ref, scoring=scoring)
    if cfg.lora:
        return model_reference(
            "initial (the base with the adapter disabled)", policy, adapter_off=True, scoring=scoring
        )
    if cfg.precompute_ref_logps or free:  # the policy IS the reference until the first step
        return model_reference("initial", policy, scoring=scoring)
    copy = frozen(initial, device, shard) if initial is not None else None
    copy = copy or load_reference_model(cfg.model, cfg.torch_dtype, device, shard, empty)
    return model_reference("initial (a frozen copy)", copy, scoring=scoring)


def frozen(model, device, shard: Callable | None = None):
    """An in-memory model as a reference: on `device`, eval mode, no gradients, sharded by `shard` when given."""
    model = model.to(device).eval().requires_grad_(False)
    return model if shard is None else shard(model)


def cached_reference(live: Reference, base_rows_only: bool = False) -> RecordedReference:
    """`live` once its log-probs are precomputed for every example: nothing of its model is needed any more.
    `base_rows_only`: only BAPO's base responses were scored (the loss reads no reference)."""
    if base_rows_only:
        return RecordedReference(f"none for y_w, y_l; {live.label} for the base responses, log-probs precomputed")
    return RecordedReference(f"{live.label}, log-probs precomputed")


def policy_copies_needed(cfg) -> tuple[bool, tuple[str, ...]]:
    """What the online policy keeps for the reference besides π_θ and π_β: (π_sft?, names of the moving
    averages of π_θ it keeps)."""
    return cfg.reference == "initial", ("ema",) if cfg.reference == "ema" else ()


def online_reference(cfg, policy, device, ref_model=None) -> Reference:
    """π_ref of an online run, built on `policy` (an OnlinePolicy made with `policy_copies_needed(cfg)`)."""
    if cfg.reference == "behavior":
        return RecordedReference("behavior (BPO)")
    if cfg.reference == "none":
        return NoReference(f"none (loss {cfg.loss} reads no reference)")
    if cfg.reference == "fixed":
        model = frozen(ref_model, device, policy.shard) if ref_model is not None else None
        model = model or load_reference_model(cfg.ref_model, cfg.torch_dtype, device, policy.shard, policy.empty)
        return model_reference("fixed", model)
    if cfg.reference == "initial":
        return LiveReference("initial", policy.initial)
    return LiveReference(
        "ema", lambda: policy.average("ema"), after_step=lambda: policy.update_average("ema", cfg.ema_rate)
    )


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
        sums = reference.logps(batch, len(keys))
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
        log.warning(
            "cached reference log-probs %s unusable (%s); computing them again",
            path,
            str(e).splitlines()[0] if str(e) else type(e).__name__,
        )
        path.unlink(missing_ok=True)
        return None
    return table


def save_cached(path: Path, table: torch.Tensor) -> None:
    """Write atomically: a temp file in the same directory, then rename."""
    write_atomic(path, lambda tmp: torch.save(table, tmp))
