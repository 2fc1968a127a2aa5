"""The engine a run runs on: the `accelerate` Accelerator (and which sharding it really engaged), how every
process leaves a run together, and the fault-injection points the crash tests use."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object

from ..config import TetherError
from ..models import eval_mode

log = logging.getLogger("tether")


def make_accelerator(cfg, run_dir: Path) -> Accelerator:
    mixed = cfg.mixed_precision
    if mixed == "bf16" and not torch.cuda.is_available():
        log.warning(
            "mixed_precision=bf16 ignored: no GPU (bf16 matrix products are very slow on CPU); training in float32"
        )
        mixed = "no"
    trackers = [t for t in cfg.report_to if t != "none"]
    missing = [name for name in trackers if importlib.util.find_spec(name) is None]
    if missing:
        hint = " ".join(f"'tether[{name}]'" if name != "wandb" else name for name in missing)
        raise TetherError(
            f"option 'report_to': {', '.join(missing)} not installed; run `pip install {hint}` or use none"
        )
    # accelerate starts every tracker but TensorBoard, whose writer tether opens itself (bookkeeping.start_trackers)
    log_with = [t for t in trackers if t != "tensorboard"] or None
    return Accelerator(
        cpu=not torch.cuda.is_available(), mixed_precision=mixed, log_with=log_with, project_dir=str(run_dir)
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
            f"the launch asked for {asked[0]} but accelerate engaged {kind} with {accelerator.num_processes} "
            "process(es): the weights would not be sharded (accelerate uses FSDP/DeepSpeed only on GPUs); "
            "refusing to train unsharded"
        )
    setup = {"distributed_type": kind, "sharding": sharding, "num_processes": accelerator.num_processes}
    if sharding == "fsdp2":  # only the first process reads the weights; the others receive their shards
        setup["efficient_loading"] = bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)
    if sharding != "none" and getattr(cfg, "load_in_4bit", False):
        raise TetherError(
            f"load_in_4bit under {sharding} is not supported (4-bit weights are not sharded by tether's engines; "
            "untested): train QLoRA with plain data parallel, or shard a bf16 base (torch_dtype: bfloat16)"
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
    return setup


def configure_deepspeed(accelerator, batch_size: int, accumulation: int, max_grad_norm: float) -> None:
    """Fill the batch settings a DeepSpeed config leaves "auto" with the run's own (tether hands accelerate no
    data loader to read them from): micro-batch per process, accumulation, global batch, gradient clipping."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    values = {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": batch_size * accumulation * accelerator.num_processes,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value


def loads_empty(accelerator, setup: dict) -> bool:
    """Whether this process builds its models with empty weights: FSDP2 memory-efficient loading
    (`fsdp_cpu_ram_efficient_loading: true`) on any process but the first, which alone reads the weights."""
    return bool(setup.get("efficient_loading")) and not accelerator.is_main_process


def shard_model(accelerator, model):
    """accelerate's FSDP2 preparation (`fully_shard` on each decoder layer, the embedding/output tail and the
    root), applied in place to the transformers model — under the PEFT wrapper with LoRA, so that every weight
    sits in a unit whose own forward gathers it: the log-prob path calls the backbone and the head directly.
    With memory-efficient loading (`fsdp_cpu_ram_efficient_loading`) the first process's weights are broadcast
    here, one tensor at a time, and every process keeps its shard of each: the others built the model empty (on
    the meta device) and never hold it whole. FSDP2 takes the first unit to run a forward as the root, so one
    token goes through the real root here (the first forward of a run may be generation or a reference log-prob,
    which starts below the root)."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    fsdp2_prepare_model(accelerator, inner)
    with eval_mode(inner):  # no dropout, nothing drawn from the random state; resharded on the way out
        inner(input_ids=torch.zeros((1, 1), dtype=torch.long, device=accelerator.device))
    return model


def from_main(accelerator, value):
    """The main process's `value`, on every process (`value` itself in a single-process run)."""
    box = [value]
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    return box[0]


def from_every(accelerator, value) -> list:
    """Every process's `value`, in process order, on every process (`[value]` in a single-process run)."""
    return gather_object([value]) if accelerator.num_processes > 1 else [value]


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
