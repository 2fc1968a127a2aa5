"""The offline preference-optimization loop (DPO / IPO / SLiC) on `accelerate`. Reads top to bottom:
data → policy → reference → optimizer → (resume) → steps → final model.

Batching: optimizer step t consumes positions [t·G, (t+1)·G) of the data stream (see `stream_indices`),
G = batch_size × processes × gradient_accumulation_steps; within a step, micro-batch m of process r takes
the slice [(m·P + r)·b, (m·P + r + 1)·b). So 2 processes × batch b see exactly the pairs that 1 process ×
batch 2b sees, and gradients (averaged by DDP) are the same up to floating-point summation order.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

from ..base_responses import attach_base_responses, base_keys
from ..config import TetherError
from ..data import COMPLETION_KEYS, Example, collate, load_preference_records, tokenize_records
from ..files import cache_dir, read_json, write_text_atomic
from ..logprobs import SequenceScorer
from ..losses import objective
from ..models import load_tokenizer
from . import checkpoint
from .card import data_files, model_card, versions
from .checkpoint import full_tensor
from .common import (
    MetricsLog,
    check_finite_step,
    crash_point,
    distributed_setup,
    end_run,
    gathered_means,
    load_policy,
    log_to_trackers,
    make_accelerator,
    make_optimizer,
    mean_stats,
    objective_options,
    save_final,
    start_trackers,
    stream_indices,
    total_steps,
)
from .reference import (
    cached_reference,
    compute_logps_table,
    data_fingerprint,
    load_cached,
    offline_reference,
    save_cached,
)
from .report import write_report_quietly
from .rundir import claim_run_dir
from .train_config import TrainConfig

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
            load_preference_records(cfg.eval_file, split=cfg.eval_split),
            tokenizer,
            cfg.max_length,
            cfg.max_prompt_length,
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


def reference_table(accelerator, cfg, reference, examples, keys, pad_id, desc) -> torch.Tensor:
    """(len(keys), len(examples)) reference log-probs, from the disk cache or computed (sharded across processes)."""
    # the thread count, process count and batch size change float summation order (~1e-7): a table computed
    # under other settings would make "policy == reference" margins at step 0 tiny noise instead of exactly 0
    fp = (
        f"{reference.weights_fingerprint()}-{data_fingerprint(examples, keys)}"
        f"-t{torch.get_num_threads()}p{accelerator.num_processes}b{cfg.eval_batch_size}"
    )
    path = Path(cfg.ref_cache_dir or cache_dir() / "reflogps") / f"{fp}.pt"
    table = load_cached(path, (len(keys), len(examples)))
    if table is not None:
        log.info("reference log-probs reused from %s", path)
        return table
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    part = compute_logps_table(
        reference,
        examples,
        keys,
        pad_id,
        cfg.eval_batch_size,
        mine,
        accelerator.device,
        progress=cfg.progress and accelerator.is_main_process,
        desc=desc,
    )
    table = torch.empty(len(keys), len(examples))
    for idx, values in gather_object([(mine, part)]):
        table[:, idx] = values
    if accelerator.is_main_process:
        save_cached(path, table)
    return table


def _batch(examples, idx, table, reference, keys, pad_id, device):
    """The collated examples `idx` and their reference log-probs (from `table` when they were precomputed)."""
    batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id, keys).items()}
    recorded = table[:, idx].reshape(-1).to(device) if table is not None else None  # key-major, like the batch rows
    return batch, reference.logps(batch, len(keys), recorded)


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
        _, stats = objective(sums, counts, ref, len(keys), **objective_options(cfg))
        for k, v in stats.items():
            local.setdefault(k, []).extend(v.tolist())
    return gathered_means(local, prefix="eval_")


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run offline preference optimization as configured; returns the run directory.

    With `resume`, continues the run in `cfg.output_dir` from its newest readable checkpoint (a finished run is
    left untouched). Raises TetherError (one line) on bad input, a directory that is not tether's, a run already
    going on in it, changed options on resume, or a non-finite update."""
    run_dir = Path(cfg.output_dir)
    accelerator = make_accelerator(cfg, run_dir)
    setup = distributed_setup(accelerator, cfg)  # refuses a launch that asked for sharding and did not get it
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    train_ex, eval_ex, report = load_examples(cfg, tokenizer)  # bad data fails before anything is written
    claim = claim_run_dir(accelerator, "train", cfg, {"train_file": cfg.train_file, "eval_file": cfg.eval_file}, resume)
    try:
        if claim.finished:
            return run_dir
        return _train(cfg, accelerator, setup, tokenizer, train_ex, eval_ex, report, claim)
    finally:
        claim.release()


def _train(cfg, accelerator, setup, tokenizer, train_ex, eval_ex, report, claim) -> Path:
    run_dir = claim.path
    keys = COMPLETION_KEYS + base_keys(cfg)
    start_trackers(accelerator, cfg)
    if accelerator.is_main_process:
        write_text_atomic(run_dir / "data_report.json", json.dumps(report, indent=1, default=str))
    pad_id = tokenizer.pad_token_id

    model = load_policy(cfg).to(accelerator.device)
    reference = offline_reference(cfg, model, accelerator.device)
    if keys != COMPLETION_KEYS:
        attach_base_responses(accelerator, cfg, reference, tokenizer, [train_ex, eval_ex])
    train_table = eval_table = None
    if cfg.precompute_ref_logps:
        train_table = reference_table(
            accelerator, cfg, reference, train_ex, keys, pad_id, "reference log-probs (train)"
        )
        if eval_ex:
            eval_table = reference_table(
                accelerator, cfg, reference, eval_ex, keys, pad_id, "reference log-probs (eval)"
            )
        reference = cached_reference(reference)  # nothing of the reference model stays in memory

    procs, b, accum = accelerator.num_processes, cfg.batch_size, cfg.gradient_accumulation_steps
    global_batch = b * procs * accum
    steps = total_steps(cfg, len(train_ex), global_batch)
    optimizer, scheduler = make_optimizer(model, cfg, steps)
    sharded = setup["sharding"] != "none"
    if sharded:  # FSDP/DeepSpeed shard the parameters and must swap the optimizer's for the sharded ones
        scorer, optimizer = accelerator.prepare(SequenceScorer(model, n_groups=len(keys)), optimizer)
    else:
        scorer = accelerator.prepare(SequenceScorer(model, n_groups=len(keys)))
    trainable = [p for p in scorer.parameters() if p.requires_grad]
    setup["parameters_sharded"] = checkpoint.is_sharded(trainable)  # what the engine really did to the weights

    start, results = 0, {}
    state = checkpoint.load_latest(accelerator, run_dir, model, optimizer, scheduler) if claim.resumed else None
    if state is not None:
        start = state["step"]
        results = read_json(run_dir / "results.json")
    if start == 0 and eval_ex:
        results["initial_eval"] = evaluate(accelerator, cfg, scorer, eval_ex, eval_table, reference, keys, pad_id)
        log_to_trackers(accelerator, results["initial_eval"], step=0)
    if accelerator.is_main_process:
        results.update(
            reference=reference.label,
            versions=versions(),
            distributed=setup,
            data_files=data_files(train=cfg.train_file, eval=cfg.eval_file),
        )
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=1))
    metrics = MetricsLog(run_dir / "metrics.jsonl", accelerator.is_main_process, start if claim.resumed else None)

    bar = tqdm(
        total=steps,
        initial=start,
        desc="train",
        unit="step",
        disable=not (cfg.progress and accelerator.is_main_process),
    )
    window: list[dict] = []
    t0 = time.perf_counter()
    scorer.train()
    for step in range(start, steps):
        positions = stream_indices(step * global_batch, global_batch, len(train_ex), cfg.seed)
        step_stats = []
        for m in range(accum):
            first = (m * procs + accelerator.process_index) * b
            batch, ref = _batch(
                train_ex, positions[first : first + b], train_table, reference, keys, pad_id, accelerator.device
            )
            sync = accelerator.no_sync(scorer) if m < accum - 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                sums, counts = scorer(**batch)
                loss, stats = objective(sums, counts, ref, len(keys), **objective_options(cfg))
                accelerator.backward(loss / accum)
            step_stats.append(stats)
        crash_point("mid_step", step + 1)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm or float("inf")))
        check_finite_step(grad_norm, step + 1)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window.append({k: accelerator.gather(torch.cat([s[k] for s in step_stats])) for k in step_stats[0]})
        done = step + 1
        evaluate_now = eval_ex and cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps
        if done % cfg.logging_steps == 0 or done == steps or evaluate_now:
            row = {
                "step": done,
                **mean_stats(window),
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "epoch": done * global_batch / len(train_ex),
            }
            if evaluate_now:
                row.update(evaluate(accelerator, cfg, scorer, eval_ex, eval_table, reference, keys, pad_id))
            row["elapsed_s"] = round(time.perf_counter() - t0, 3)
            metrics.write(row)
            log_to_trackers(accelerator, row, step=done)
            bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['reward_accuracy']:.2f}")
            window = []
        bar.update(1)
        if cfg.save_steps and done % cfg.save_steps == 0 and done < steps:
            checkpoint.save(
                accelerator,
                run_dir,
                done,
                model,
                optimizer,
                scheduler,
                {"epoch": done * global_batch / len(train_ex)},
                cfg.save_total_limit,
            )
        crash_point("after_step", done)
    bar.close()

    if eval_ex:
        results["final_eval"] = evaluate(accelerator, cfg, scorer, eval_ex, eval_table, reference, keys, pad_id)
        log_to_trackers(accelerator, results["final_eval"], step=steps)
    results.update(
        steps=steps, num_processes=procs, global_batch=global_batch, train_pairs=len(train_ex), eval_pairs=len(eval_ex)
    )
    card = model_card(cfg, "offline", run_dir, results) if accelerator.is_main_process else None
    policy = accelerator.unwrap_model(scorer).model
    write = None
    if sharded:  # every process takes part in gathering the full weights; the main process writes them
        if setup["sharding"].startswith("deepspeed"):  # ZeRO-3 consolidation is DeepSpeed's own
            state = {k.removeprefix("model."): v for k, v in accelerator.get_state_dict(scorer).items()}
        else:  # FSDP2: gather tensor by tensor; only the main process keeps them (an adapter's tensors only, with LoRA)
            named = ((k, v) for k, v in policy.state_dict().items() if not cfg.lora or "lora_" in k)
            state = checkpoint.whole_tensors(named, keep=accelerator.is_main_process)
        write = functools.partial(policy.save_pretrained, state_dict=state)
    final = save_final(accelerator, policy, tokenizer, run_dir, write=write, card=card)
    if accelerator.is_main_process:
        results["final_model"] = str(final)
        write_text_atomic(run_dir / "results.json", json.dumps(results, indent=1))
        if cfg.write_report:
            write_report_quietly(run_dir)
        claim.mark_finished(steps)
    end_run(accelerator, scorer)
    return run_dir
