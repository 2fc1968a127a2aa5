"""The offline preference-optimization loop (DPO / IPO / SLiC) on `accelerate`. Reads top to bottom:
data → policy → reference → optimizer → (resume) → steps → final model.

Batching: optimizer step t consumes positions [t·G, (t+1)·G) of the data stream (see `stream_indices`),
G = batch_size × processes × gradient_accumulation_steps; within a step, micro-batch m of process r takes
the slice [(m·P + r)·b, (m·P + r + 1)·b). So 2 processes × batch b see exactly the pairs that 1 process ×
batch 2b sees, and gradients (averaged by DDP) are the same up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from ..config import TetherError
from ..data import COMPLETION_KEYS, Example, collate, load_preference_records, tokenize_records
from ..logprobs import SequenceScorer
from ..bapo import attach_base_responses, base_keys
from ..losses import base_anchor, preference_loss
from ..models import cache_dir, load_model, load_tokenizer
from . import checkpoint
from .common import (
    MetricsLog,
    crash_hook,
    end_run,
    gathered_means,
    load_policy,
    make_accelerator,
    make_optimizer,
    mean_stats,
    prepare_run_dir,
    log_to_trackers,
    save_final,
    stream_indices,
    total_steps,
)
from .config import TrainConfig
from ..run_report import write_report_quietly
from .reference import LiveReference, compute_logps_table, data_fingerprint, load_cached, save_cached

log = logging.getLogger("tether")


def load_examples(cfg: TrainConfig, tokenizer) -> tuple[list[Example], list[Example], dict]:
    """Tokenized train and eval examples, and a report of what was skipped."""
    train_ex, train_rep = tokenize_records(
        load_preference_records(cfg.train_file, split=cfg.train_split), tokenizer, cfg.max_length, cfg.max_prompt_length
    )
    report = {"train": vars(train_rep)}
    log.info("%s: %s", cfg.train_file, train_rep.summary())
    if cfg.eval_file:
        eval_ex, eval_rep = tokenize_records(
            load_preference_records(cfg.eval_file, split=cfg.eval_split), tokenizer, cfg.max_length, cfg.max_prompt_length
        )
        report["eval"] = vars(eval_rep)
    elif cfg.eval_fraction > 0:
        perm = torch.randperm(len(train_ex), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        n_eval = max(1, int(round(cfg.eval_fraction * len(train_ex))))
        eval_ex = [train_ex[i] for i in sorted(perm[:n_eval])]
        train_ex = [train_ex[i] for i in sorted(perm[n_eval:])]
    else:
        eval_ex = []
    if not train_ex:
        raise TetherError(f"{cfg.train_file}: no usable preference pairs left ({train_rep.summary()})")
    return train_ex, eval_ex, report


def make_reference(cfg: TrainConfig, policy, device) -> LiveReference:
    """π_ref as a live scorer: a separate frozen model, the LoRA base (adapter disabled) or the initial policy."""
    if cfg.ref_model:
        ref = load_model(cfg.ref_model).eval().requires_grad_(False).to(device)
        return LiveReference(ref, use_base_of_adapter=False)
    if cfg.lora:
        return LiveReference(policy, use_base_of_adapter=True)
    if cfg.precompute_ref_logps:  # the policy IS the reference until the first step
        return LiveReference(policy, use_base_of_adapter=False)
    ref = load_model(cfg.model).eval().requires_grad_(False).to(device)
    return LiveReference(ref, use_base_of_adapter=False)


def reference_table(accelerator, cfg, reference, examples, keys, pad_id, desc) -> torch.Tensor:
    """(len(keys), len(examples)) reference log-probs, from the disk cache or computed (sharded across processes)."""
    # the thread count, process count and batch size change float summation order (~1e-7): a table computed
    # under other settings would make "policy == reference" margins at step 0 tiny noise instead of exactly 0
    fp = (f"{reference.weights_fingerprint()}-{data_fingerprint(examples, keys)}"
          f"-t{torch.get_num_threads()}p{accelerator.num_processes}b{cfg.eval_batch_size}")
    path = Path(cfg.ref_cache_dir or cache_dir() / "reflogps") / f"{fp}.pt"
    table = load_cached(path)
    if table is not None and table.shape == (len(keys), len(examples)):
        log.info("reference log-probs reused from %s", path)
        return table
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    part = compute_logps_table(
        reference, examples, keys, pad_id, cfg.eval_batch_size, mine, accelerator.device,
        progress=cfg.progress and accelerator.is_main_process, desc=desc,
    )
    table = torch.empty(len(keys), len(examples))
    for idx, values in gather_object([(mine, part)]):
        table[:, idx] = values
    if accelerator.is_main_process:
        save_cached(path, table)
    return table


def pair_stats(cfg, sums, counts, ref_sums, n_keys):
    """Loss and per-pair stats from key-major rows: chosen rows, rejected rows, then (BAPO) base-response rows.

    BAPO: L = L_DAP + λ · mean over the n base responses of A(x, y_b)   (METHODS.md §2)
    """
    pol, lens, ref = sums.view(n_keys, -1), counts.view(n_keys, -1), ref_sums.view(n_keys, -1)
    loss, stats = preference_loss(
        pol[0], pol[1], ref[0], ref[1], lens[0], lens[1],
        loss=cfg.loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing, nll_weight=cfg.nll_weight,
    )
    if n_keys > 2:
        anchor = base_anchor(pol[2:], ref[2:], lens[2:], cfg.anchor_form, cfg.anchor_normalize).mean(dim=0)
        loss = loss + cfg.anchor_weight * anchor.mean()
        stats["loss"] = stats["loss"] + cfg.anchor_weight * anchor.detach()
        stats["anchor"] = anchor.detach()
        stats["logps_base"] = pol[2:].detach().mean(dim=0)
        stats["anchor_active"] = (ref[2:] > pol[2:]).float().mean(dim=0)
    return loss, stats


def _batch(examples, idx, table, reference, keys, pad_id, device):
    batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id, keys).items()}
    if table is not None:
        ref = table[:, idx].reshape(-1).to(device)  # key-major, like the rows of the batch
    else:
        ref = reference.logps(batch, len(keys))[0]
    return batch, ref


@torch.no_grad()
def evaluate(accelerator, cfg, scorer, examples, table, reference, keys, pad_id) -> dict[str, float]:
    """Mean loss and reward statistics over held-out examples (sharded across processes)."""
    if not examples:
        return {}
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    local: dict[str, list[float]] = {}
    for start in range(0, len(mine), cfg.eval_batch_size):
        idx = mine[start : start + cfg.eval_batch_size]
        batch, ref = _batch(examples, idx, table, reference, keys, pad_id, accelerator.device)
        sums, counts = scorer(**batch)
        _, stats = pair_stats(cfg, sums, counts, ref, len(keys))
        for k, v in stats.items():
            local.setdefault(k, []).extend(v.tolist())
    return gathered_means(local, prefix="eval_")


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run offline preference optimization as configured; returns the run directory."""
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, run_dir)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_ex, eval_ex, report = load_examples(cfg, tokenizer)  # bad data fails before anything is written
    keys = COMPLETION_KEYS + base_keys(cfg)
    prepare_run_dir(run_dir, cfg, resume, accelerator.is_main_process)
    if accelerator.is_main_process:
        (run_dir / "data_report.json").write_text(json.dumps(report, indent=1, default=str))
    pad_id = tokenizer.pad_token_id

    model = load_policy(cfg).to(accelerator.device)
    reference = make_reference(cfg, model, accelerator.device)
    if keys != COMPLETION_KEYS:
        attach_base_responses(accelerator, cfg, reference, tokenizer, [train_ex, eval_ex])
    train_table = eval_table = None
    if cfg.precompute_ref_logps:
        train_table = reference_table(accelerator, cfg, reference, train_ex, keys, pad_id, "reference log-probs (train)")
        if eval_ex:
            eval_table = reference_table(accelerator, cfg, reference, eval_ex, keys, pad_id, "reference log-probs (eval)")
        reference = None  # nothing of the reference stays in memory

    world, b, accum = accelerator.num_processes, cfg.batch_size, cfg.gradient_accumulation_steps
    global_batch = b * world * accum
    steps = total_steps(cfg, len(train_ex), global_batch)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    scorer = accelerator.prepare(SequenceScorer(model, n_groups=len(keys)))
    trainable = [p for p in model.parameters() if p.requires_grad]

    start, results = 0, {}
    ckpt = checkpoint.latest(run_dir) if resume else None
    if ckpt is not None:
        start = checkpoint.load(accelerator, ckpt, model, optimizer, scheduler)["step"]
        log.info("resumed from %s", ckpt)
        results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").exists() else {}
    elif eval_ex:
        results["initial_eval"] = evaluate(accelerator, cfg, scorer, eval_ex, eval_table, reference, keys, pad_id)
        log_to_trackers(accelerator, results["initial_eval"], step=0)
        if accelerator.is_main_process:
            (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, start if ckpt else None)

    bar = tqdm(total=steps, initial=start, desc="train", unit="step", disable=not (cfg.progress and accelerator.is_main_process))
    window: list[dict] = []
    t0 = time.perf_counter()
    scorer.train()
    for step in range(start, steps):
        positions = stream_indices(step * global_batch, global_batch, len(train_ex), cfg.seed)
        step_stats = []
        for m in range(accum):
            lo = (m * world + accelerator.process_index) * b
            batch, ref = _batch(train_ex, positions[lo : lo + b], train_table, reference, keys, pad_id, accelerator.device)
            sync = accelerator.no_sync(scorer) if m < accum - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                sums, counts = scorer(**batch)
                loss, stats = pair_stats(cfg, sums, counts, ref, len(keys))
                accelerator.backward(loss / accum)
            step_stats.append(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append({k: accelerator.gather(torch.cat([s[k] for s in step_stats])) for k in step_stats[0]})
        done = step + 1
        evaluate_now = eval_ex and cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps
        if done % cfg.logging_steps == 0 or done == steps or evaluate_now:
            row = {"step": done, **mean_stats(window), "lr": lr, "grad_norm": grad_norm.item(), "epoch": done * global_batch / len(train_ex)}
            if evaluate_now:
                row.update(evaluate(accelerator, cfg, scorer, eval_ex, eval_table, reference, keys, pad_id))
            row["elapsed_s"] = round(time.perf_counter() - t0, 3)
            metrics.write(row)
            log_to_trackers(accelerator, row, step=done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['reward_accuracy']:.2f}")
            window = []
        bar.update(1)
        if cfg.save_steps and done % cfg.save_steps == 0 and done < steps:
            checkpoint.save(accelerator, run_dir, done, model, optimizer, scheduler, {"epoch": done * global_batch / len(train_ex)}, cfg.save_total_limit)
        crash_hook(done)
    bar.close()

    if eval_ex:
        results["final_eval"] = evaluate(accelerator, cfg, scorer, eval_ex, eval_table, reference, keys, pad_id)
        log_to_trackers(accelerator, results["final_eval"], step=steps)
    final = save_final(accelerator, accelerator.unwrap_model(scorer).model, tokenizer, run_dir)
    if accelerator.is_main_process:
        results.update(
            steps=steps, num_processes=world, global_batch=global_batch, train_pairs=len(train_ex),
            eval_pairs=len(eval_ex), final_model=str(final),
        )
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        if cfg.write_report:
            write_report_quietly(run_dir)
    end_run(accelerator, scorer)
    return run_dir
