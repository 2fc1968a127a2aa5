"""The offline preference-optimization loop (any loss of tether.loss_table, and BAPO's anchor to the base's own
answers) on `accelerate`. `OfflineRun` reads top to bottom: data → policy → reference (and BAPO's y_b) → optimizer →
(resume) → steps → final model.

Batching: optimizer step t consumes positions [t·G, (t+1)·G) of the data stream (see `stream_indices`),
G = batch_size × processes × gradient_accumulation_steps; within a step, micro-batch m of process r takes
the slice [(m·P + r)·b, (m·P + r + 1)·b). So 2 processes × batch b see exactly the pairs that 1 process ×
batch 2b sees, and gradients (averaged by DDP) are the same up to floating-point summation order — for every
loss that is a mean over pairs; sft and aot take the micro-batch as their batch, as TRL does (docs/losses.md).
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

from ..base_responses import attach_base_responses, base_keys
from ..config import TetherError, check_config
from ..data import COMPLETION_KEYS, Example, collate, load_preference_records, tokenize_records
from ..files import cache_dir, check_writable_dir, write_text_atomic
from ..logprobs import SequenceScorer, pair_logit_means
from ..loss_table import needs_reference
from ..losses import objective
from ..models import forward_is_collective, load_tokenizer, pad_token_set, share_of, to_device
from . import checkpoint
from .bookkeeping import (
    MetricsLog,
    TrainingRun,
    finish_run,
    gathered_means,
    log_to_trackers,
    mean_stats,
    progress_bar,
    record_start,
    resume_point,
    start_trackers,
)
from .callbacks import Callbacks
from .checkpoint import full_tensor
from .engine import (
    configure_deepspeed,
    crash_point,
    distributed_setup,
    loads_empty,
    make_accelerator,
    shard_model,
)
from .inputs import RunObjects
from .optimization import (
    check_finite_step,
    load_policy,
    make_optimizer,
    objective_options,
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
from .rundir import claim_run_dir
from .train_config import TrainConfig, logp_options

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
    # the thread count, process count, batch size and how batches are laid out change float summation order
    # (~1e-7): a table computed under other settings would make "policy == reference" margins at step 0 tiny noise
    # instead of exactly 0 (padded, unchunked tables keep the key they had before those options existed)
    layout = (
        f"-pf{int(cfg.padding_free)}c{cfg.logprob_chunk_size}" if cfg.padding_free or cfg.logprob_chunk_size else ""
    )
    fp = (
        f"{reference.weights_fingerprint()}-{data_fingerprint(examples, keys)}"
        f"-t{torch.get_num_threads()}p{accelerator.num_processes}b{cfg.eval_batch_size}{layout}"
    )
    path = Path(cfg.ref_cache_dir or cache_dir() / "reflogps") / f"{fp}.pt"
    table = load_cached(path, (len(keys), len(examples)))
    if table is not None:
        log.info("reference log-probs reused from %s", path)
        return table
    mine, real = share_of(
        list(range(len(examples))),
        accelerator.process_index,
        accelerator.num_processes,
        even=forward_is_collective(reference.model),  # sharded: every process scores as many batches
    )
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
    for idx, values in gather_object([(mine[:real], part[:, :real])]):
        table[:, idx] = values
    if accelerator.is_main_process:
        save_cached(path, table)
    return table


class OfflineRun(TrainingRun):
    """Everything one offline run holds; `run()` is the loop."""

    def __init__(self, cfg: TrainConfig, resume: bool, objects: RunObjects | None = None):
        self.cfg, objects = cfg, objects or RunObjects()
        self.callbacks = objects.callbacks or Callbacks(args=cfg)
        self.run_dir = Path(cfg.output_dir)
        self.acc = make_accelerator(cfg, self.run_dir)
        self.setup = distributed_setup(self.acc, cfg)  # refuses a launch that asked for sharding and did not get it
        set_seed(cfg.seed)
        self.tokenizer = pad_token_set(objects.tokenizer) if objects.tokenizer else load_tokenizer(cfg.model)
        self.pad_id = self.tokenizer.pad_token_id
        # every check that can be made fails here, before the run directory is claimed: the data, the policy
        # (lora_target_modules, an adapter that does not fit its base), the reference model, the caches
        self.train_ex, self.eval_ex, self.data_report = load_examples(cfg, self.tokenizer)
        # FSDP2: the policy (and a separate reference model) are sharded as soon as they are loaded; with
        # memory-efficient loading only the first process read the weights, the others receive their shards here
        self.fsdp2 = self.setup["sharding"] == "fsdp2"
        empty = objects.model is None and loads_empty(self.acc, self.setup)
        shard = functools.partial(shard_model, self.acc) if self.fsdp2 else None
        self.model = to_device(load_policy(cfg, objects.model, empty, self.acc.device), self.acc.device)
        if shard is not None:
            shard(self.model)
        self.reference = offline_reference(
            cfg, self.model, self.acc.device, objects.ref_model, objects.initial, shard=shard, empty=empty
        )
        if cfg.precompute_ref_logps or cfg.method == "bapo":
            check_writable_dir(Path(cfg.ref_cache_dir or cache_dir() / "reflogps"), "ref_cache_dir")
        self.claim = claim_run_dir(
            self.acc,
            "train",
            cfg,
            {"train_file": cfg.train_file, "eval_file": cfg.eval_file},
            resume,
            objects.fingerprints,
        )

    def load_models(self) -> None:
        """BAPO's y_b, the reference log-probs (precomputed when asked; on the sharded model under FSDP2, every
        process making the same forward calls), the optimizer and the engine's wrapping (after the run directory
        is claimed)."""
        cfg, acc = self.cfg, self.acc
        self.keys = COMPLETION_KEYS + base_keys(cfg)
        start_trackers(acc, cfg)
        if acc.is_main_process:
            write_text_atomic(self.run_dir / "data_report.json", json.dumps(self.data_report, indent=1, default=str))
        if self.keys != COMPLETION_KEYS:
            attach_base_responses(acc, cfg, self.reference, self.tokenizer, [self.train_ex, self.eval_ex])
        self.train_table = self.eval_table = None
        # a loss that reads no reference: only BAPO's base rows have reference log-probs, always precomputed
        free = not needs_reference(cfg.loss)
        ref_keys = self.keys[len(COMPLETION_KEYS) :] if free else self.keys
        if ref_keys and (cfg.precompute_ref_logps or free):
            self.train_table = reference_table(
                acc, cfg, self.reference, self.train_ex, ref_keys, self.pad_id, "reference log-probs (train)"
            )
            if self.eval_ex:
                self.eval_table = reference_table(
                    acc, cfg, self.reference, self.eval_ex, ref_keys, self.pad_id, "reference log-probs (eval)"
                )
            self.reference = cached_reference(self.reference, base_rows_only=free)  # no reference model stays

        self.procs, self.accum = acc.num_processes, cfg.gradient_accumulation_steps
        self.global_batch = cfg.batch_size * self.procs * self.accum
        self.steps = total_steps(cfg, len(self.train_ex), self.global_batch)
        self.optimizer, self.scheduler = make_optimizer(self.model, cfg, self.steps)
        self.sharded = self.setup["sharding"] != "none"
        scorer = SequenceScorer(self.model, len(self.keys), **logp_options(cfg), logit_means=True)
        if self.fsdp2:  # sharded in place already (the root is the transformers model): the optimizer holds shards
            self.scorer = scorer
        elif self.sharded:  # DeepSpeed shards the parameters and must swap the optimizer's for the sharded ones
            configure_deepspeed(acc, cfg.batch_size, self.accum, cfg.max_grad_norm)
            self.scorer, self.optimizer = acc.prepare(scorer, self.optimizer)
        else:
            self.scorer = acc.prepare(scorer)
        # what accelerate's no_sync keeps from reducing gradients between micro-batches: the engine's root module
        self.sync_root = getattr(self.model, "get_base_model", lambda: self.model)() if self.fsdp2 else self.scorer
        self.trainable = [p for p in self.scorer.parameters() if p.requires_grad]
        self.setup["parameters_sharded"] = checkpoint.is_sharded(self.trainable)  # what the engine really did

    # ------------------------------------------------------------------------------------------ batches

    def _batch(self, examples: list[Example], idx: list[int], table: torch.Tensor | None):
        """The collated examples `idx` and their reference log-probs (from `table` when they were precomputed)."""
        device = self.acc.device
        batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], self.pad_id, self.keys).items()}
        recorded = table[:, idx].reshape(-1).to(device) if table is not None else None  # key-major, like the rows
        return batch, self.reference.logps(batch, len(self.keys), recorded)

    @torch.no_grad()
    def evaluate(self, examples: list[Example], table: torch.Tensor | None) -> dict[str, float]:
        """Mean loss and reward statistics over held-out examples (sharded across processes)."""
        if not examples:
            return {}
        mine, real = share_of(list(range(len(examples))), self.acc.process_index, self.procs, even=self.fsdp2)
        local: dict[str, list[float]] = {}
        for start in range(0, len(mine), self.cfg.eval_batch_size):
            batch, ref = self._batch(examples, mine[start : start + self.cfg.eval_batch_size], table)
            sums, counts, logit_sums = self.scorer(**batch)
            _, stats = objective(sums, counts, ref, len(self.keys), **objective_options(self.cfg))
            stats.update(pair_logit_means(logit_sums, counts, len(self.keys)))
            for k, v in stats.items():
                local.setdefault(k, []).extend(v.tolist())
        return gathered_means({k: v[:real] for k, v in local.items()}, prefix="eval_")

    # ------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> Path:
        cfg, acc, steps = self.cfg, self.acc, self.steps
        resumed = resume_point(acc, self.claim, self.model, self.optimizer, self.scheduler)
        start, results = resumed or (0, {})
        self.callbacks.begin(acc, start, steps)
        if resumed is None and self.eval_ex:
            results["initial_eval"] = self.evaluate(self.eval_ex, self.eval_table)
            log_to_trackers(acc, results["initial_eval"], step=0)
            self.callbacks.evaluate(results["initial_eval"])
        record_start(
            acc, self.run_dir, results, self.reference.label, self.setup, train=cfg.train_file, eval=cfg.eval_file
        )
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", acc.is_main_process, start if self.claim.resumed else None)
        bar = progress_bar(acc, cfg, steps, start, "train")
        window: list[dict] = []
        t0 = time.perf_counter()
        self.scorer.train()
        for step in range(start, steps):
            stats, grad_norm, lr = self.step(step)
            window.append(stats)
            done = step + 1
            evaluate_now = self.eval_ex and cfg.eval_steps and done % cfg.eval_steps == 0 and done < steps
            if done % cfg.logging_steps == 0 or done == steps or evaluate_now:
                row = {
                    "step": done,
                    **mean_stats(window),
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "epoch": self._epoch(done),
                }
                evaluated = self.evaluate(self.eval_ex, self.eval_table) if evaluate_now else {}
                row.update(evaluated)
                row["elapsed_s"] = round(time.perf_counter() - t0, 3)
                metrics.write(row)
                log_to_trackers(acc, row, step=done)
                self.callbacks.evaluate(evaluated)
                self.callbacks.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", acc=f"{row['reward_accuracy']:.2f}")
                window = []
            bar.update(1)
            self.callbacks.step_end(done)
            if cfg.save_steps and done % cfg.save_steps == 0 and done < steps:
                self._save_checkpoint(done)
            crash_point("after_step", done)
            self.stop_if_asked(done, steps)
        bar.close()
        return self._finish(results)

    def step(self, step: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, float]:
        """One optimizer step over the global batch of `step` (this process's micro-batches, gradients
        accumulated); returns every process's per-pair stats, the gradient norm and the learning rate used."""
        cfg, acc, b = self.cfg, self.acc, self.cfg.batch_size
        positions = stream_indices(step * self.global_batch, self.global_batch, len(self.train_ex), cfg.seed)
        step_stats = []
        for m in range(self.accum):
            first = (m * self.procs + acc.process_index) * b
            batch, ref = self._batch(self.train_ex, positions[first : first + b], self.train_table)
            sync = acc.no_sync(self.sync_root) if m < self.accum - 1 else contextlib.nullcontext()
            with sync, acc.autocast():
                sums, counts, logit_sums = self.scorer(**batch)
                loss, stats = objective(sums, counts, ref, len(self.keys), **objective_options(cfg))
                acc.backward(loss / self.accum)
            stats.update(pair_logit_means(logit_sums, counts, len(self.keys)))
            step_stats.append(stats)
        crash_point("mid_step", step + 1)
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm or float("inf")))
        check_finite_step(grad_norm, step + 1)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        gathered = {k: acc.gather(torch.cat([s[k] for s in step_stats])) for k in step_stats[0]}
        return gathered, grad_norm, lr

    def _epoch(self, done: int) -> float:
        return done * self.global_batch / len(self.train_ex)

    def _save_checkpoint(self, done: int) -> Path:
        return self.saved(
            checkpoint.save(
                self.acc,
                self.run_dir,
                done,
                self.model,
                self.optimizer,
                self.scheduler,
                {"epoch": self._epoch(done)},
                self.cfg.save_total_limit,
            )
        )

    def _finish(self, results: dict) -> Path:
        """The final evaluation, the final model (gathered whole when sharded) and the shared bookkeeping tail."""
        acc = self.acc
        if self.eval_ex:
            results["final_eval"] = self.evaluate(self.eval_ex, self.eval_table)
            log_to_trackers(acc, results["final_eval"], step=self.steps)
            self.callbacks.evaluate(results["final_eval"])
        results.update(
            steps=self.steps,
            num_processes=self.procs,
            global_batch=self.global_batch,
            train_pairs=len(self.train_ex),
            eval_pairs=len(self.eval_ex),
        )
        policy = acc.unwrap_model(self.scorer).model
        write = None
        if self.sharded:  # every process takes part in gathering the full weights; the main process writes them
            if self.setup["sharding"].startswith("deepspeed"):  # ZeRO-3 consolidation is DeepSpeed's own
                state = {k.removeprefix("model."): v for k, v in acc.get_state_dict(self.scorer).items()}
            else:  # FSDP2: gather tensor by tensor, kept by the main process only (an adapter's tensors with LoRA)
                named = ((k, v) for k, v in policy.state_dict().items() if not self.cfg.lora or "lora_" in k)
                state = checkpoint.whole_tensors(named, keep=acc.is_main_process)
            write = functools.partial(policy.save_pretrained, state_dict=state)
        return finish_run(
            acc,
            self.cfg,
            "offline",
            self.claim,
            results,
            policy,
            self.tokenizer,
            self.steps,
            write,
            keep=(self.scorer,),
        )


def train(cfg: TrainConfig, resume: bool = False) -> Path:
    """Run offline preference optimization as configured; returns the run directory.

    `cfg` is checked first (`tether.config.check_config`: as the command line checks it). With `resume`,
    continues the run in `cfg.output_dir` from its newest readable checkpoint (a finished run is left untouched).
    Raises TetherError (one line) on bad input, a directory that is not tether's, a run already going on in it,
    changed options on resume, or a non-finite update. `tether.DPOTrainer` is the same run over objects."""
    return OfflineRun(check_config(cfg), resume).run()
