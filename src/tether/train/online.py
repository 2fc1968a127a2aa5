"""The online preference-optimization loop (BPO, docs/methods.md §5) on `accelerate`. Reads top to bottom:
prompts → oracle → models → (resume) → steps → final model.

    for t in 0 .. T−1:
        if t mod K == 0: π_β ← π_θ                                   (K = T / F)
        B new prompts; 2 responses each sampled from π_β; identical pairs dropped
        the oracle labels each pair; the pairs go to the ledger (fsynced) BEFORE training
        one optimizer step on L_DAP(·; π_θ, π_ref) with π_ref = π_β (BPO), π_sft, a fixed model, an EMA, or none
        (reference: none, for a loss that reads no reference)

Sharding: step t takes prompt stream positions [t·B, (t+1)·B); process r samples the slots [r·B/P, (r+1)·B/P),
and the main process, which alone holds the oracle, annotates every process's pairs in one call and shares the
labels. Sampling is seeded per stream position, and the loss is normalised by the number of usable
pairs over all processes, so P processes give the same update as one. A resumed run replays the ledger's
pairs for every step it already annotated: the oracle is never asked twice about the same pair.

Under FSDP2 (weights sharded over the processes) every forward call is a collective, so every process makes
the same calls: sampling decodes in step until all processes are done, BAPO's base answers and the evaluation
split their prompts evenly (padded with a repeat whose result is dropped), and a process without usable pairs
in a step trains on one of another's with weight 0.
"""

from __future__ import annotations

import functools
import logging
import time
from array import array
from pathlib import Path

import torch
from accelerate.utils import gather_object, set_seed

from ..base_responses import add_base_completions, base_answers, base_keys
from ..config import TetherError, brief, check_config
from ..data import COMPLETION_KEYS, Example, collate, load_prompt_records
from ..generation import eos_token_ids, generate_ids, prompt_ids
from ..logprobs import completion_logps_ids
from ..models import load_tokenizer, pad_token_set, share_of
from ..oracles import Annotator, load_oracle
from ..sampling import sample_responses
from ..stats import summarize, win_rates
from ..vllm_client import EngineError
from . import checkpoint
from .bookkeeping import (
    MetricsLog,
    TrainingRun,
    finish_run,
    gathered_means,
    log_to_trackers,
    progress_bar,
    record_start,
    resume_point,
    start_trackers,
)
from .callbacks import Callbacks
from .engine import crash_point, distributed_setup, from_every, from_main, loads_empty, make_accelerator, shard_model
from .inputs import RunObjects
from .ledger import Ledger
from .online_config import OnlineConfig
from .online_policy import OnlinePolicy
from .optimization import stream_indices
from .reference import online_reference, policy_copies_needed
from .rundir import claim_run_dir
from .vllm_sampling import VllmSampler

log = logging.getLogger("tether")


class OnlineRun(TrainingRun):
    """Everything one online run holds; `run()` is the loop."""

    def __init__(self, cfg: OnlineConfig, resume: bool, objects: RunObjects | None = None):
        self.cfg, self.resume, objects = cfg, resume, objects or RunObjects()
        self.callbacks = objects.callbacks or Callbacks(args=cfg)
        self.run_dir = Path(cfg.output_dir)
        self.acc = make_accelerator(cfg, self.run_dir)
        self.setup = distributed_setup(self.acc, cfg)  # refuses a launch that asked for sharding and did not get it
        if self.setup["sharding"].startswith("deepspeed"):
            raise TetherError(
                f"tether online does not run under {self.setup['sharding']} (its π_β snapshots, adapter ensemble and "
                f"sampler are written for whole weights or FSDP2 shards); launch it with FSDP2 or plain data parallel"
            )
        self.sharded = self.setup["sharding"] == "fsdp2"
        set_seed(cfg.seed)
        self.tokenizer = pad_token_set(objects.tokenizer) if objects.tokenizer else load_tokenizer(cfg.model)
        # bad input fails here, before anything is written
        self.prompts = load_prompt_records(cfg.prompt_file)
        self.eval_set = load_prompt_records(cfg.eval_file, need_reference=True) if cfg.eval_file else []
        if cfg.eval_prompts:
            self.eval_set = self.eval_set[: cfg.eval_prompts]
        self.procs, self.rank = self.acc.num_processes, self.acc.process_index
        self.annotator, self.oracle_id = self._load_annotator(objects.oracle)
        if cfg.prompts_per_step % self.procs:
            raise TetherError(
                f"option 'prompts_per_step' ({cfg.prompts_per_step}) must be a multiple of the {self.procs} processes"
            )
        budget = cfg.prompts_per_step * cfg.steps
        if budget > len(self.prompts):
            log.warning(
                "%s: %d prompts for a budget of %d; prompts will be reused (with fresh samples)",
                cfg.prompt_file,
                len(self.prompts),
                budget,
            )
        # the sampler seam (docs/scaling.md): anything with sample_responses' signature and result; an inference
        # engine's client may also have start(), sync(π_β, version) (called before sampling), close() and metrics
        self.sample = sample_responses if cfg.sampler == "tether" else VllmSampler(cfg, self.acc, self.run_dir)
        # every prompt is tokenized and the models are loaded before the run directory is claimed: a prompt that
        # cannot be tokenized, a lora_target_modules typo or a missing ref_model fail here, leaving nothing behind
        self.prompt_ids = tokenize_prompts(self.tokenizer, self.prompts, cfg.max_prompt_length)
        self.eval_ids = tokenize_prompts(self.tokenizer, self.eval_set)
        keep_initial, averages = policy_copies_needed(cfg)
        self.policy = OnlinePolicy(
            cfg,
            self.acc.device,
            keep_initial or cfg.method == "bapo",
            averages,
            functools.partial(shard_model, self.acc) if self.sharded else None,
            objects.model is None and loads_empty(self.acc, self.setup),
            model=objects.model,
        )  # BAPO: y_b from π_sft
        self.setup["parameters_sharded"] = self.policy.sharded  # what the engine really did to the weights
        self.reference = online_reference(cfg, self.policy, self.acc.device, objects.ref_model)
        self.claim = claim_run_dir(
            self.acc,
            "online",
            cfg,
            {"prompt_file": cfg.prompt_file, "eval_file": cfg.eval_file},
            resume,
            objects.fingerprints,
        )

    def run(self) -> Path:
        """`TrainingRun.run`, and the sampler's end (an engine's server stopped) whatever ended the run."""
        try:
            return super().run()
        finally:
            if hasattr(self.sample, "close"):
                self.sample.close()

    def load_models(self) -> None:
        """The trackers, the ledger and the loop's state (after the run directory is claimed)."""
        cfg = self.cfg
        start_trackers(self.acc, cfg)
        self.eos = eos_token_ids(self.policy.model, self.tokenizer)
        self.ledger = Ledger(self.run_dir / "ledger.jsonl", writable=self.acc.is_main_process)
        self.max_new_tokens = min(cfg.max_new_tokens, cfg.max_length - cfg.max_prompt_length)  # sampled and y_b
        self.keys = COMPLETION_KEYS + base_keys(cfg)
        self.base_cache: dict[int, tuple[list[int], float]] = {}  # BAPO anchor: prompt -> (y_b, log π_sft(y_b))
        self.timing = {"sample_s": 0.0, "annotate_s": 0.0, "reference_s": 0.0, "update_s": 0.0}
        if hasattr(self.sample, "start"):
            self.sample.start()

    def _load_annotator(self, given=None) -> tuple[Annotator | None, str]:
        """The oracle (`given`: an in-memory one), loaded by the main process alone: it scores every process's pairs
        (one reward model per run, on `oracle_device`, not one per process). Every process gets the oracle's id, or
        the main process's error."""
        cfg, annotator, error = self.cfg, None, None
        if self.acc.is_main_process:
            try:
                options = dict(dtype=cfg.oracle_dtype, device=cfg.oracle_device, batch_size=cfg.oracle_batch_size)
                oracle = given or load_oracle(cfg.oracle, **options, default_device=self.acc.device)
                annotator = Annotator(
                    oracle, cfg.oracle_noise, cfg.oracle_retries, cfg.oracle_timeout, cfg.oracle_backoff
                )
            except TetherError as e:
                error = str(e)
        oracle_id, error = self._from_main([annotator.oracle.id if annotator else None, error])
        if error:
            raise TetherError(error)
        return annotator, oracle_id

    def _from_main(self, value):
        """The main process's `value`, on every process."""
        return from_main(self.acc, value)

    # ------------------------------------------------------------------------------------------ data

    def _ids(self, index: int) -> list[int]:
        return list(self.prompt_ids[index])

    def _share(self, items: list) -> tuple[list, int]:
        """This process's round-robin share of `items` and how many of its entries are real (padded when sharded:
        `models.share_of`)."""
        return share_of(items, self.rank, self.procs, even=self.sharded)

    def _base_answers(self, step_prompts: list[int], indices: list[int]) -> list[tuple[list[int], float]]:
        """BAPO's anchor: the initial model's greedy answer y_b to each prompt and log π_sft(y_b), once per prompt.
        The step's new prompts (all processes') are split over the processes and the answers shared."""
        todo = sorted({i for i in step_prompts if i not in self.base_cache})
        if todo:
            mine, real = self._share(todo)
            prompts = [self._ids(i) for i in mine]
            with self.policy.initial() as model:
                ys = [
                    y
                    for (y,) in base_answers(
                        model,
                        self.tokenizer,
                        prompts,
                        max_new_tokens=self.max_new_tokens,
                        batch_size=self.cfg.eval_batch_size,
                    )
                ]
                logps = completion_logps_ids(model, prompts, ys, self.tokenizer.pad_token_id, self.cfg.eval_batch_size)
            found = {i: (y, lp) for i, y, lp in list(zip(mine, ys, logps))[:real]}
            for part in from_every(self.acc, found):
                self.base_cache.update(part)
        return [self.base_cache[i] for i in indices]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in ids if t not in self.eos], skip_special_tokens=True).strip()

    def _seed(self, step: int, slot: int) -> int:
        """The seed of a slot's samples (and of its label noise): its position in the prompt stream."""
        return self.cfg.seed * 1_000_003 + step * self.cfg.prompts_per_step + slot

    def collect(self, step: int, version: int) -> list[dict]:
        """Sample this process's slots of `step` (identical pairs marked); one ledger row per slot, not yet
        annotated (`annotate`)."""
        cfg, b = self.cfg, self.cfg.prompts_per_step // self.procs
        positions = stream_indices(step * cfg.prompts_per_step, cfg.prompts_per_step, len(self.prompts), cfg.seed)
        slots = list(range(self.rank * b, (self.rank + 1) * b))
        indices = [positions[s] for s in slots]
        seeds = [self._seed(step, s) for s in slots]
        t = time.perf_counter()
        with self.policy.behavior() as model:
            if hasattr(self.sample, "sync"):  # an engine with its own copy of π_β: the weights, when they changed
                self.sample.sync(model, version)
            samples = self.sample(
                model,
                [self._ids(i) for i in indices],
                seeds,
                n=2,
                max_new_tokens=self.max_new_tokens,
                temperature=cfg.temperature,
                top_k=cfg.top_k,
                top_p=cfg.top_p,
                eos_ids=self.eos,
                pad_id=self.tokenizer.pad_token_id,
            )
        self.timing["sample_s"] += time.perf_counter() - t
        rows = []
        for slot, index, ids, logps in zip(slots, indices, samples.ids, samples.logps):
            rows.append(
                {
                    "slot": slot,
                    "prompt_index": index,
                    "prompt": self.prompts[index].prompt,
                    "response_ids": ids,
                    "responses": [self._text(r) for r in ids],
                    "behavior_logps": logps,
                    "scores": None,
                    "label": None,
                    "status": "identical" if ids[0] == ids[1] else "pending",
                    "oracle": self.oracle_id,
                    "behavior_version": version,
                }
            )
        if self.cfg.method == "bapo":
            for r, (y, lp) in zip(rows, self._base_answers(positions, indices)):
                r.update(base_ids=y, base_logp=lp)
        recorded = self.ledger.partial_rows(step)  # complete records of a step a crash cut short: not asked again
        for i, r in enumerate(rows):
            if r["slot"] in recorded:
                rows[i] = {k: v for k, v in recorded[r["slot"]].items() if k not in ("step", "rows_in_step")}
        return rows

    def annotate(self, step: int, rows: list[dict]) -> None:
        """Label the pending pairs of `rows` (every process's rows of `step`, the same list on every process): the
        main process asks the oracle about all of them in one call, and every process gets the answers."""
        pending = [r for r in rows if r["status"] == "pending"]
        if not pending:
            return
        t = time.perf_counter()
        notes = None
        if self.annotator is not None:
            answers = self.annotator.annotate(
                [r["prompt"] for r in pending],
                [tuple(r["responses"]) for r in pending],
                [self._seed(step, r["slot"]) for r in pending],
            )
            notes = [(list(a.scores) if a.scores else None, a.label, a.status) for a in answers]
        for r, (scores, label, status) in zip(pending, self._from_main(notes), strict=True):
            r.update(scores=scores, label=label, status=status)
        self.timing["annotate_s"] += time.perf_counter() - t

    def batch(self, rows: list[dict]):
        """(collated batch of this process's usable pairs, key-major: chosen, rejected (and BAPO's y_b); the
        log-probs of those rows under π_β, and under π_sft for y_b)."""
        examples, logps = [], [[], [], []]
        for r in rows:
            win, lose = r["label"], 1 - r["label"]
            comps = {"chosen": r["response_ids"][win], "rejected": r["response_ids"][lose]}
            example = Example(self._ids(r["prompt_index"]), comps, f"step {r['step']} slot {r['slot']}")
            if self.cfg.method == "bapo":
                add_base_completions(example, [r["base_ids"]], self.cfg.max_length, self.tokenizer.eos_token_id)
                logps[2].append(r["base_logp"])
            examples.append(example)
            logps[0].append(r["behavior_logps"][win])
            logps[1].append(r["behavior_logps"][lose])
        batch = {k: v.to(self.acc.device) for k, v in collate(examples, self.tokenizer.pad_token_id, self.keys).items()}
        return batch, torch.tensor(sum(logps, []), dtype=torch.float32, device=self.acc.device)

    # ------------------------------------------------------------------------------------------ evaluation

    def evaluate(self, eval_set: list | None = None) -> dict[str, float]:
        """Win rate of greedy answers of the merged policy against the reference texts (of `eval_set`, prompt
        records with a reference; default: the run's own), by the oracle without label noise (ties count one
        half), with a 95% bootstrap CI; sharded over processes."""
        eval_set = self.eval_set if eval_set is None else eval_set
        if not eval_set:
            return {}
        eval_ids = self.eval_ids if eval_set is self.eval_set else tokenize_prompts(self.tokenizer, eval_set)
        mine, real = self._share(list(range(len(eval_set))))
        with self.policy.merged() as model:
            ids = generate_ids(
                model,
                self.tokenizer,
                [list(eval_ids[i]) for i in mine],
                max_new_tokens=self.cfg.eval_max_new_tokens,
                batch_size=self.cfg.eval_batch_size,
            )
        answers = sorted(x for part in gather_object([list(zip(mine[:real], map(self._text, ids)))]) for x in part)
        rows = None
        if self.annotator is not None:  # the main process scores every process's answers
            prompts = [eval_set[i].prompt for i, _ in answers]
            scores = self.annotator.scores(prompts, [a for _, a in answers])
            ref_scores = self.annotator.scores(prompts, [eval_set[i].completions["reference"] for i, _ in answers])
            rows = [(i, a, b) for (i, _), a, b in zip(answers, scores or [], ref_scores or [])]
        rows = self._from_main(rows)
        if not rows:
            return {"eval_failed": 1.0}
        wins = win_rates([a for _, a, _ in rows], [b for _, _, b in rows])
        s = summarize(wins)
        return {
            "eval_win_rate": s["mean"],
            "eval_win_rate_ci95_low": s["ci95_low"],
            "eval_win_rate_ci95_high": s["ci95_high"],
            "eval_reward": sum(a for _, a, _ in rows) / len(rows),
            "eval_reference_reward": sum(b for _, _, b in rows) / len(rows),
            "eval_n": len(rows),
        }

    # ------------------------------------------------------------------------------------------ the loop

    def _loop(self) -> Path:
        cfg, acc, policy = self.cfg, self.acc, self.policy
        self.opt, self.sched = policy.optimizer_state()
        resumed = resume_point(acc, self.claim, policy.model, self.opt, self.sched, tensors=policy.state_tensors())
        start, results = resumed or (0, {})
        if resumed is not None:
            log.info("the ledger holds %d annotated pairs", self.ledger.count())
        self.callbacks.begin(acc, start, cfg.steps)
        if resumed is None and self.eval_set:
            results["initial_eval"] = self.evaluate()
            log_to_trackers(acc, results["initial_eval"], step=0)
            self.callbacks.evaluate(results["initial_eval"])
        record_start(
            acc, self.run_dir, results, self.reference.label, self.setup, prompts=cfg.prompt_file, eval=cfg.eval_file
        )
        metrics = MetricsLog(self.run_dir / "metrics.jsonl", acc.is_main_process, start if self.claim.resumed else None)
        self.start, self.failing_steps = start, 0
        self.annotations = sum(self._annotated(self.ledger.rows(s) or []) for s in range(start))
        bar = progress_bar(acc, cfg, cfg.steps, start, "online")
        self.t0 = time.perf_counter()
        for step in range(start, cfg.steps):
            row = self.step(step)
            done = step + 1
            row.update({name: round(v, 3) for name, v in self.timing.items()})
            row.update({name: round(v, 4) for name, v in getattr(self.sample, "metrics", {}).items()})
            evaluated = self.evaluate() if cfg.eval_steps and done % cfg.eval_steps == 0 and done < cfg.steps else {}
            row.update(evaluated)
            row["elapsed_s"] = round(time.perf_counter() - self.t0, 3)
            if done % cfg.logging_steps == 0 or done == cfg.steps or "eval_win_rate" in row:
                metrics.write(row)
                log_to_trackers(acc, row, step=done)
                self.callbacks.evaluate(evaluated)
                self.callbacks.log(row)
            if "loss" in row:
                bar.set_postfix(loss=f"{row['loss']:.4f}", pairs=row["pairs"])
            bar.update(1)
            self.callbacks.step_end(done)
            if cfg.save_steps and done % cfg.save_steps == 0 and done < cfg.steps:
                self._save_checkpoint(done)
            crash_point("after_step", done)
            self.stop_if_asked(done, cfg.steps)
        bar.close()
        return self._finish(results)

    def step(self, step: int) -> dict:
        """One step: refresh π_β at a phase start, this step's pairs (replayed from the ledger, or sampled,
        annotated and recorded), one update on them; returns the step's metrics row (without timings)."""
        k = self.cfg.steps // self.cfg.phases
        version = step // k
        if step % k == 0:
            self.policy.refresh_behavior()
        rows = self.ledger.rows(step)
        replayed = rows is not None
        if not replayed:
            rows = self._new_rows(step, version)
        for r in rows:
            r["step"] = step
        self.annotations += self._annotated(rows)
        usable = [r for r in rows if r["label"] is not None]
        row = {
            "step": step + 1,
            "pairs": len(usable),
            "annotations": self.annotations,
            "behavior_version": version,
            "replayed": replayed,
        }
        row.update(
            {status: sum(r["status"] == status for r in rows) for status in ("identical", "tie", "oracle_failed")}
        )
        row.update(self._update(usable, step))
        self.reference.update()
        return row

    def _new_rows(self, step: int, version: int) -> list[dict]:
        """Every process's rows of `step`, sampled and annotated, written to the ledger before anyone trains on
        them; stops the run when the oracle has failed too often for too long."""
        cfg = self.cfg
        try:
            mine = self.collect(step, version)
        except EngineError as e:  # every process at once (the sampler agrees on failures before any annotation)
            self._save_checkpoint(step)
            raise TetherError(
                f"step {step + 1}: {e}; stopped after saving a checkpoint at step {step} — bring the server back "
                f"and rerun with --resume (the ledger keeps every recorded answer)"
            ) from None
        rows = sorted((r for part in gather_object([mine]) for r in part), key=lambda r: r["slot"])
        self.annotate(step, rows)
        self.failing_steps = self.failing_steps + 1 if self._failure_rate(rows) > cfg.max_oracle_failure_rate else 0
        if self.failing_steps >= min(cfg.oracle_failure_patience, cfg.steps - self.start):
            self._stop_for_oracle(step, rows)
        self.ledger.append(step, rows)
        self.acc.wait_for_everyone()  # the ledger is on disk before any process trains on these pairs
        return rows

    def _update(self, usable: list[dict], step: int) -> dict:
        """One optimizer step on the usable pairs of every process (each process trains on its own slots), or
        a skipped step when there are none; returns its metrics."""
        policy, timing = self.policy, self.timing
        if not usable:
            lr = policy.learning_rate()
            policy.skip_step()
            return {"lr": lr, "skipped": True}
        b = self.cfg.prompts_per_step // self.procs
        mine = [r for r in usable if r["slot"] // b == self.rank]
        local = mine or (usable[:1] if self.sharded else [])  # sharded: every process runs the same calls
        batch, recorded = self.batch(local) if local else (None, None)
        t = time.perf_counter()
        if local:  # y_b's reference stays log π_sft(y_b), from the ledger
            n = len(local)
            base_ref = recorded[2 * n :] if len(self.keys) > 2 else None
            pair_ref = self.reference.logps(batch, len(self.keys), recorded)  # None: the loss reads no reference
            ref_logps = base_ref if pair_ref is None else torch.cat([pair_ref[: 2 * n], recorded[2 * n :]])
        timing["reference_s"] += time.perf_counter() - t
        t = time.perf_counter()
        stats, grad_norm, lr = (
            policy.step(batch, ref_logps, len(usable), len(self.keys), step + 1, n_local=len(mine))
            if local
            else self._idle_step(len(usable), step + 1)
        )
        timing["update_s"] += time.perf_counter() - t
        return {**gathered_means({name: v.tolist() for name, v in stats.items()}), "grad_norm": grad_norm, "lr": lr}

    def _finish(self, results: dict) -> Path:
        """The final evaluation, the run's totals, the merged final model and the shared bookkeeping tail."""
        cfg, acc, ledger = self.cfg, self.acc, self.ledger
        if self.eval_set:
            results["final_eval"] = self.evaluate()
            log_to_trackers(acc, results["final_eval"], step=cfg.steps)
            self.callbacks.evaluate(results["final_eval"])
        if acc.is_main_process:
            results.update(
                steps=cfg.steps,
                phases=cfg.phases,
                num_processes=self.procs,
                prompts_per_step=cfg.prompts_per_step,
                annotations=ledger.count("ok") + ledger.count("tie"),
                ledger_rows=ledger.count(),
                identical_pairs=ledger.count("identical"),
                ties=ledger.count("tie"),
                oracle_failures=ledger.count("oracle_failed"),
                seconds={
                    **{name: round(v, 2) for name, v in self.timing.items()},
                    "total": round(time.perf_counter() - self.t0, 2),
                },
            )
        state = self.policy.final_state(keep=acc.is_main_process)  # every process: merging, gathering are collectives
        write = functools.partial(self.policy.write_final, state=state)
        return finish_run(acc, cfg, "online", self.claim, results, self.policy.model, self.tokenizer, cfg.steps, write)

    def _save_checkpoint(self, step: int) -> Path:
        return self.saved(
            checkpoint.save(
                self.acc,
                self.run_dir,
                step,
                self.policy.model,
                self.opt,
                self.sched,
                {},
                self.cfg.save_total_limit,
                tensors=self.policy.state_tensors(),
            )
        )

    @staticmethod
    def _annotated(rows: list[dict]) -> int:
        """Pairs the oracle answered (a tie is an answer too)."""
        return sum(r["status"] in ("ok", "tie") for r in rows)

    def _idle_step(self, n_global: int, step: int):
        """This process has no usable pair this step: it still joins the gradient sum (with zeros)."""
        empty = {"input_ids": torch.zeros((0, 1), dtype=torch.long)}
        return self.policy.step(empty, None, n_global, len(self.keys), step)

    @staticmethod
    def _failure_rate(rows: list[dict]) -> float:
        """Of the pairs sent to the oracle this step, the fraction it failed on."""
        asked = [r for r in rows if r["status"] != "identical"]
        return sum(r["status"] == "oracle_failed" for r in asked) / len(asked) if asked else 0.0

    def _stop_for_oracle(self, step: int, rows: list[dict]) -> None:
        """The oracle failed on too many pairs for too long: keep what the run has (a checkpoint at `step`; this
        step's pairs are not recorded, so a resumed run asks about them again) and stop with an error."""
        cfg = self.cfg
        self._save_checkpoint(step)
        raise TetherError(
            f"step {step + 1}: the oracle {self.oracle_id} failed on {self._failure_rate(rows):.0%} of the "
            f"pairs, above max_oracle_failure_rate {cfg.max_oracle_failure_rate:g} for {cfg.oracle_failure_patience} "
            f"steps in a row; stopped after saving a checkpoint at step {step} — fix the oracle and rerun with --resume"
        )


def tokenize_prompts(tokenizer, records, keep_last: int | None = None) -> list[array]:
    """Token ids of every record's prompt (the last `keep_last` of them, when given), compactly; a prompt that
    cannot be tokenized, or tokenizes to nothing, is a one-line error naming its record."""
    out = []
    for rec in records:
        try:
            ids = prompt_ids(tokenizer, rec.prompt)
        except Exception as e:  # noqa: BLE001 - a template or tokenizer failure on this record
            raise TetherError(
                f"{rec.source}: cannot tokenize the prompt ({type(e).__name__}: {brief(str(e), 150)})"
            ) from None
        if not ids:
            raise TetherError(f"{rec.source}: the prompt tokenizes to no token at all; give it some text")
        out.append(array("q", ids[-keep_last:] if keep_last else ids))
    return out


def online_train(cfg: OnlineConfig, resume: bool = False) -> Path:
    """Run online preference optimization (BPO and its baselines) as configured; returns the run directory.

    With `resume`, continues the run in `cfg.output_dir` (a finished run is left untouched); raises TetherError
    (one line) on bad input, a directory that is not tether's or is in use, changed options, a non-finite update
    or an oracle that keeps failing (see `max_oracle_failure_rate`). `cfg` is checked first, as the command line
    checks it; `tether.OnlineDPOTrainer` is the same run over objects."""
    return OnlineRun(check_config(cfg), resume).run()
