"""Pieces every training loop shares: the accelerator, optimizer and schedule, the data order, the run
directory (metrics.jsonl, final model), and the policy set-up (dropout, LoRA)."""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from transformers import get_scheduler

from ..config import TetherError
from ..files import read_json_lines, write_text_atomic
from ..models import add_lora, disable_dropout, enable_gradient_checkpointing, load_model

log = logging.getLogger("tether")


def make_accelerator(cfg, run_dir: Path) -> Accelerator:
    mixed = cfg.mixed_precision
    if mixed == "bf16" and not torch.cuda.is_available():
        log.warning(
            "mixed_precision=bf16 ignored: no GPU (bf16 matrix products are very slow on CPU); training in float32"
        )
        mixed = "no"
    trackers = [t for t in cfg.report_to if t != "none"] or None
    for name in trackers or []:
        if importlib.util.find_spec(name) is None:
            hint = "pip install 'tether[tensorboard]'" if name == "tensorboard" else f"pip install {name}"
            raise TetherError(f"option 'report_to': {name} is not installed; run `{hint}` or use none")
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed, log_with=trackers, project_dir=str(run_dir)
    )


def start_trackers(accelerator, cfg) -> None:
    """Start the metric trackers (after the run directory is claimed: they write into it)."""
    if any(t != "none" for t in cfg.report_to):
        accelerator.init_trackers(
            "tether", config={k: v for k, v in vars(cfg).items() if isinstance(v, (int, float, str, bool))}
        )


def distributed_setup(accelerator, cfg) -> dict:
    """The engine the run actually ran under (what accelerate engaged, not what was asked for) and whether
    the weights were sharded across processes. A launch that asked for FSDP or DeepSpeed but got neither
    (accelerate falls back to plain data parallel, or to independent processes, without saying so) is refused."""
    kind = (
        accelerator.distributed_type.value
        if hasattr(accelerator.distributed_type, "value")
        else str(accelerator.distributed_type)
    )
    sharding = "none"
    if kind == "FSDP":
        plugin = accelerator.state.fsdp_plugin
        sharding = f"fsdp{getattr(plugin, 'fsdp_version', 1)}"
    elif kind == "DEEPSPEED":
        plugin = accelerator.state.deepspeed_plugin
        sharding = f"deepspeed-zero{getattr(plugin, 'zero_stage', '?')}"
    asked = [
        name
        for name, env in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
        if os.environ.get(env, "false").lower() in ("1", "true")
    ]
    if asked and sharding == "none":
        raise TetherError(
            f"the launch asked for {asked[0]} but accelerate engaged {kind} with {accelerator.num_processes} process(es): "
            f"the weights would not be sharded (accelerate uses FSDP/DeepSpeed only on GPUs); refusing to train unsharded"
        )
    if sharding == "fsdp1":
        raise TetherError(
            "FSDP version 1 is not supported; use FSDP2 (fsdp_version: 2, as in examples/accelerate/fsdp.yaml)"
        )
    if sharding.startswith("deepspeed") and (cfg.save_steps or getattr(cfg, "gradient_accumulation_steps", 1) > 1):
        raise TetherError(
            "under DeepSpeed tether does not yet write resumable checkpoints nor accumulate gradients itself: "
            "set save_steps: 0 and gradient_accumulation_steps: 1 (batch_size per process instead)"
        )
    return {"distributed_type": kind, "sharding": sharding, "num_processes": accelerator.num_processes}


def load_policy(cfg):
    """The trainable policy: the model in cfg.torch_dtype, dropout off if asked, gradient checkpointing on if
    asked, wrapped in a fresh LoRA adapter (float32 weights) if asked. A PEFT adapter directory as cfg.model
    is merged into its base first, so a new adapter (or full fine-tuning) starts from base + that adapter."""
    model = load_model(cfg.model, cfg.torch_dtype)
    if cfg.disable_dropout:
        disable_dropout(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora:
        model = add_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules, seed=cfg.seed)
        if cfg.disable_dropout:
            disable_dropout(model)
    return model


def objective_options(cfg) -> dict:
    """The values `losses.objective` takes from a run's options (the anchor's weight is 0 unless BAPO is on)."""
    return dict(
        loss=cfg.loss,
        beta=cfg.beta,
        label_smoothing=cfg.label_smoothing,
        nll_weight=cfg.nll_weight,
        anchor_weight=cfg.anchor_weight,
        anchor_form=cfg.anchor_form,
        anchor_normalize=cfg.anchor_normalize,
    )


def make_optimizer(model: torch.nn.Module, cfg, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # the fused kernel updates all parameters in one pass (5M params on CPU: 8.6 -> 3.5 ms per step, weights
    # equal to the unfused AdamW within 1.2e-7 after 5 steps); it needs floating-point CPU/CUDA tensors
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    opt = torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )
    name = "constant_with_warmup" if cfg.lr_scheduler == "constant" else cfg.lr_scheduler
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)  # HF's rule for warmup_ratio
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    return opt, sched


def total_steps(cfg, n_examples: int, global_batch: int) -> int:
    """max_steps when >= 0 (0 = no step, as in HF's Trainer), else ceil(num_epochs · examples / global batch)."""
    if cfg.max_steps >= 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * n_examples / global_batch))


def stream_indices(start: int, count: int, n: int, seed: int) -> list[int]:
    """Positions [start, start+count) of an endless stream of per-epoch permutations of range(n).

    Epoch e is a permutation drawn from a generator seeded by (seed, e) alone, so the order depends on
    nothing but the position: a resumed run sees exactly the data an uninterrupted run would.
    """
    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        take = _epoch_permutation(n, seed, epoch)[offset : offset + count - len(out)]
        out.extend(take)
        pos += len(take)
    return out


@functools.lru_cache(maxsize=2)  # the current epoch and the next: a step may straddle the boundary
def _epoch_permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist())


def check_finite_step(grad_norm, step: int | None) -> None:
    """Stop a run whose update would be non-finite, before the optimizer applies it (the weights stay finite,
    the last checkpoint stays the newest). Every process sees the same (all-reduced) norm, so all stop."""
    value = float(grad_norm)
    if not math.isfinite(value):
        where = f"step {step}" if step is not None else "this step"
        raise TetherError(
            f"{where}: the gradient norm is {value}; the update was not applied and the run stops (checkpoints so far "
            "are kept). Lower learning_rate or beta, or check the data"
        )


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (main process only), flushed each time.

    On resume it keeps only the complete rows of steps up to the checkpoint: a line torn by a crash, or rows a
    killed run wrote after its checkpoint, are dropped (those steps are run again)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and path.exists():
            kept = [row for row in read_json_lines(path) if row.get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()


# TRL's (HF Trainer's) names for the scalars tether logs; trackers get them under train/ and eval/ as in TRL
TRACKER_NAMES = {
    "reward_accuracy": "rewards/accuracies",
    "reward_margin": "rewards/margins",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "logps_base": "logps/base",
    "lr": "learning_rate",
    "nll": "nll_loss",
}


def tracker_scalars(row: dict) -> dict:
    """A metrics row under TRL's TensorBoard/W&B names: train/rewards/margins, eval/logps/chosen, train/learning_rate ..."""
    out = {}
    for key, value in row.items():
        if key == "step" or not isinstance(value, (int, float)):
            continue
        split, name = ("eval", key[5:]) if key.startswith("eval_") else ("train", key)
        out[f"{split}/{TRACKER_NAMES.get(name, name)}"] = value
    return out


def log_to_trackers(accelerator, row: dict, step: int) -> None:
    if accelerator.trackers:
        accelerator.log(tracker_scalars(row), step=step)


def mean_stats(stats: list[dict[str, torch.Tensor]], prefix: str = "") -> dict[str, float]:
    """Average per-pair statistics (lists of (n,) tensors) into one float per name."""
    if not stats:
        return {}
    return {prefix + k: torch.cat([s[k] for s in stats]).float().mean().item() for k in stats[0]}


def gathered_means(local: dict[str, list[float]], prefix: str = "") -> dict[str, float]:
    """Per name, the mean of the values of every process (each process calls this with its own lists)."""
    merged: dict[str, list[float]] = {}
    for part in gather_object([local]):
        for k, v in part.items():
            merged.setdefault(k, []).extend(v)
    return {prefix + k: sum(v) / len(v) for k, v in merged.items()}


def save_final(accelerator, model, tokenizer, run_dir: Path, write=None, card: str | None = None) -> Path:
    """Save the final model (full weights or PEFT adapter) and tokenizer atomically to run_dir/final.
    `write(directory)` replaces `model.save_pretrained(directory)` when the model needs its own way;
    `card` (markdown) becomes final/README.md, replacing PEFT's empty template."""
    final = run_dir / "final"
    if accelerator.is_main_process:
        tmp = run_dir / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        (write or model.save_pretrained)(tmp)
        tokenizer.save_pretrained(tmp)
        if card is not None:
            (tmp / "README.md").write_text(card)
        crash_point("mid_final", 0)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


_KEPT_ALIVE: list = []


def end_run(accelerator, *keep) -> None:
    """Every process leaves the run together. A multi-process run does NOT destroy its gloo process group, and
    `keep` (the DDP-wrapped model, which holds the group) stays referenced until the process exits.

    Why: torch's ProcessGroupGloo destructor joins its worker threads while holding the GIL, and a worker may
    still be freeing the tensors of the last collective, which needs the GIL: a deadlock that hit about 1 run in
    8 on a loaded 2-core machine when `train()` returned and dropped the DDP model (or when
    `destroy_process_group` dropped the last reference). The CLI leaves multi-process runs through `os._exit`
    (nothing is torn down); a Python caller's group goes at interpreter exit, long after the workers went idle.
    The cost: the model stays in memory after a multi-process `train()` returns."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes == 1:
        accelerator.end_training()
        return
    for tracker in accelerator.trackers:
        tracker.finish()
    _KEPT_ALIVE.extend([accelerator, *keep])


def crash_point(name: str, step: int) -> None:
    """Fault injection for tests: TETHER_CRASH_AT=NAME:STEP kills the process abruptly (like kill -9, exit code
    17) when it reaches the named point at that step. Points: after_step, mid_step (after the backward pass,
    before the optimizer step), mid_checkpoint (checkpoint files written, not yet renamed into place),
    mid_ledger (half of a step's ledger rows written), mid_final (final model written, not yet renamed)."""
    if os.environ.get("TETHER_CRASH_AT") == f"{name}:{step}" or (
        name == "after_step" and os.environ.get("TETHER_CRASH_AFTER_STEP") == str(step)
    ):
        os._exit(17)
