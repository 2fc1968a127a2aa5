"""Seconds per DPO optimizer step and peak memory: tether's training loop vs TRL's DPOTrainer, same work.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_dpo_step.py                       # everything, ~30 steps per run
    .venv/bin/python benchmarks/bench_dpo_step.py --models tiny --modes live --steps 8 --warmup 2   # quick
    .venv/bin/python benchmarks/bench_dpo_step.py --workload long-chosen --models 5m --threads 2     # issue 29
    .venv/bin/python benchmarks/bench_dpo_step.py --models smollm2 --lora 16 --steps 12 --warmup 2 \
        --out benchmarks/results/dpo_step_smollm2_lora.json     # SmolLM2-135M-Instruct (`make smollm2`), LoRA
    flags: --models tiny,5m --modes live,precomputed --steps 30 --warmup 5 --threads 2 --retries 2 --out PATH
           --workdir DIR (keep the models, data and per-run logs) --lora R (LoRA rank on both sides; 0 = full)
           --workload uniform|long-chosen

The parent process never runs a multi-threaded torch op (the matmul peak is measured in a worker), so an
OMP_WAIT_POLICY=ACTIVE run is not disturbed by a spinning OpenMP pool in the parent.
On a loaded machine, 2 threads on 2 cores measure the scheduler more than the code (every parallel op waits for
a descheduled thread: one busy process elsewhere made a 0.4 s step take 6.6 s here); --threads 1, or
OMP_WAIT_POLICY=PASSIVE in the environment (passed on to the runs), gives steadier numbers there. The
"others" column says how many cores other processes kept busy during each run; a run disturbed by them
(>= 0.25 core) is repeated up to --retries times and the quietest kept.

Method
- Models: tiny Llamas from `tether_lab.tiny` (byte-level BPE tokenizer, vocab 2048, trained on the benchmark's own
  words; `tiny_llama`, float32, random init, untied head), saved to a temp dir:
  tiny = hidden 128 × 2 layers (~1M params), 5m = hidden 256 × 4 layers (~5M params). `smollm2` = the pretrained
  SmolLM2-135M-Instruct from tether's cache (its own tokenizer sizes the data; tied head counted once in P).
- LoRA (--lora R): rank R, alpha 2R, no dropout, every linear layer except the head, on both sides (TRL through
  `peft_config`); both then score the reference with the adapter disabled. The nominal backward is 2·P·T (no
  weight gradients of the frozen base), so step FLOPs = (4 + 2 if live)·P·T. Step 1's loss is log 2 on both
  sides (LoRA B starts at zero); both seed 42 before PEFT draws lora_A, so later losses agree as well.
- Data: deterministic standard-format records {"prompt", "chosen", "rejected"}: prompt = 64 tokens, each
  completion = 63 tokens + EOS, so every sequence is ~128 tokens (= max_length, nothing is truncated);
  steps × 8 pairs (one epoch). Both tools consume the SAME batches in the SAME order: TRL with
  train_sampling_strategy="sequential", tether (which draws a seeded permutation) from a file written in the
  inverse of that permutation (`tether.train.optimization.stream_indices`).
- Settings, identical on both sides: CPU, float32, torch threads = --threads (2), no gradient checkpointing,
  8 pairs/step, no accumulation, max_length 128, loss sigmoid/dpo with β = 0.1, torch.optim.AdamW with the
  fused kernel (lr 1e-6, linear decay, no warm-up, betas (0.9, 0.999), eps 1e-8, no weight decay; TRL's default
  "adamw_torch_fused", and tether's `make_optimizer` uses fused=True as well), grad-norm clipping at 1.0, dropout
  off, no evaluation, no checkpoints, metrics logged EVERY step on both sides (tether logging_steps=1, TRL
  logging_steps=1).
- Reference modes: `live` = a separate frozen copy of the model scores every batch (TRL's default);
  `precomputed` = reference log-probs computed once before training (outside the timed loop).
- Each (tool, model, mode) runs in its own subprocess, so peak RSS (ru_maxrss) is per run: it covers everything
  that process did (imports, model loading, tokenization, precompute, training).
- Timing: tether runs the real loop (`tether.train.train`); the end of every step is time-stamped through the
  loop's per-step hook `crash_point` (falling back to the `elapsed_s` column of metrics.jsonl if that hook is
  gone). TRL: a TrainerCallback stamps time.perf_counter() at on_step_end. Step time = difference of consecutive
  stamps (so it includes data collation and logging); the first --warmup steps are dropped; the median (and the
  minimum) are shown. The process CPU time (time.process_time) is stamped too: CPU seconds per step is less
  disturbed by other processes than wall time (with 1 thread; with more, OMP spin-waits count as CPU time too).
- Correctness: (1) per-pair summed completion log-probs of the first batch, tether's `sequence_logps` (scoring as
  `tether train` does at its defaults: padding-free, chunked head) on its own tokenization vs TRL's (its
  precomputed reference log-probs: its tokenization, collator and fused LM head), plus a check that both tokenized
  the pairs identically; (2) the per-step losses of the timed runs: step 1 is log 2 for both (policy ==
  reference), step 2 and the last step test gradients/optimizer/data order.
- FLOP/s: nominal step FLOPs = 6·P·T (+ 2·P·T for a live reference forward), P = non-embedding parameters
  (the LM head included, the input embedding not), T = tokens the model processes per step (16 rows × padded
  width, padding included). Divided by the median step time and by this machine's float32 matmul FLOP/s (best of
  10 × five 1024×1024 torch.mm with --threads threads); also per process-CPU second on both sides (%CPU).
  Attention score FLOPs are not counted. tether applies the LM head only at completion positions, so its real
  matmul work is a bit below the nominal count (printed); TRL on CPU projects every position. The same ratio
  counting only the real tokens' FLOPs (T_real = each prompt once + every completion token of the step, no
  padding; benchmarks/workloads.py) is the work that has to be done whatever the layout: a tool that pads or
  repeats the prompt does more arithmetic for it, and its real-token fraction is lower. Also printed with
  T_seq = prompt + completion per row (no padding, but a prompt counted once per completion, as TRL computes it).
- Workloads (--workload): `uniform` (above; nothing to pad), `long-chosen` (prompts 16–63 tokens, chosen 150–190,
  rejected 8–24, max_length 256: much of a padded batch is padding). The padding share of each layout (TRL's
  padded rows, tether padded, tether packed) is printed first and written under `data.padding`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from workloads import batch_tokens, filler_pairs, make_words, padding_report, print_report

MODELS = {
    "tiny": dict(hidden_size=128, num_layers=2),
    "5m": dict(hidden_size=256, num_layers=4),
    "smollm2": None,
}  # None: the pretrained SmolLM2-135M-Instruct (`make smollm2`), with its own tokenizer
PRETRAINED = {"smollm2": "smollm2-135m-instruct"}
VOCAB, PAIRS, PROMPT_TOKENS = 2048, 8, 64
# --workload: uniform = prompt 64 + completions of 63 + EOS (no padding); long-chosen = benchmarks/workloads.py's
SHAPE = {"workload": "uniform", "max_length": 128}
MAX_LENGTHS = {"uniform": 128, "long-chosen": 256}
LR, BETA, SEED = 1e-6, 0.1, 42
LORA = {"r": 0}  # --lora R: a LoRA adapter (alpha 2R, no dropout, every linear layer but the head) on both sides
ROOT = Path(__file__).resolve().parents[1]
KEYS = ("chosen", "rejected")


# ------------------------------------------------------------------------------------------------ data and models


def build_workdir(work: Path, model_names: list[str], n_pairs: int) -> dict:
    """Tokenizer + models + data files under `work`; returns facts the report needs."""
    from tether.train.optimization import stream_indices
    from tether_lab.demo import COLOURS, OBJECTS, write_jsonl
    from tether_lab.tiny import tiny_llama, train_tokenizer

    words, rng = make_words(), random.Random(1)  # one stream: the tokenizer's corpus, then the pairs
    pretrained = [m for m in model_names if MODELS[m] is None]
    if pretrained:  # its tokenizer sizes the data; the model directory is tether's cached copy
        from tether.models import load_tokenizer, resolve_model_path

        if len(model_names) > 1:
            sys.exit(f"--models {pretrained[0]} runs on its own (its tokenizer differs from the tiny models')")
        tok = load_tokenizer(PRETRAINED[pretrained[0]])
    else:
        corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(3000)]
        corpus += [f"What colour is the {o}? The {o} is {c}, I believe." for o in OBJECTS for c in COLOURS]
        tok = train_tokenizer(corpus, vocab_size=VOCAB)
    records = filler_pairs(SHAPE["workload"], tok, n_pairs, rng)
    # TRL reads base.jsonl in order; tether's step t takes file rows perm[8t : 8t+8], so put base[j] at perm[j]
    perm = stream_indices(0, n_pairs, n_pairs, SEED)
    permuted = [None] * n_pairs
    for j, p in enumerate(perm):
        permuted[p] = records[j]
    write_jsonl(records, work / "base.jsonl")
    write_jsonl(permuted, work / "tether.jsonl")
    models = {}
    for name in model_names:
        if MODELS[name] is None:
            from tether.models import load_model

            link = work / f"model_{name}"
            if not link.exists():
                link.symlink_to(resolve_model_path(PRETRAINED[name]))
            model = load_model(link)
        else:
            model = tiny_llama(tok, **MODELS[name], max_position_embeddings=512, seed=0)
            model.save_pretrained(work / f"model_{name}")
            tok.save_pretrained(work / f"model_{name}")
        head = model.get_output_embeddings().weight
        tied = head is model.get_input_embeddings().weight
        total = sum(p.numel() for p in model.parameters())  # a tied head is counted once
        models[name] = {
            # non-embedding parameters + the LM head (a tied head is still a matmul over the vocabulary)
            "params_total": total,
            "params_nonembedding": total - (0 if tied else model.get_input_embeddings().weight.numel()),
            "lm_head_params": head.numel(),
            "tied_head": tied,
            **(MODELS[name] or {"hidden_size": model.config.hidden_size, "num_layers": model.config.num_hidden_layers}),
        }
    # tokens per step as tether tokenizes them (the check run shows TRL's tokens are identical)
    from tether.data import load_preference_records, tokenize_records

    max_length = SHAPE["max_length"]
    ex, rep = tokenize_records(load_preference_records(work / "base.jsonl"), tok, max_length, PROMPT_TOKENS)
    full = [len(e.prompt_ids) + len(e.completion_ids[k]) for e in ex for k in ("chosen", "rejected")]
    assert rep.kept == n_pairs and max(full) <= max_length, (rep.summary(), max(full))
    batches = [ex[s : s + PAIRS] for s in range(0, n_pairs, PAIRS)]  # step t's pairs, on both sides
    hidden = next(iter(models.values()))["hidden_size"]
    return {
        "models": models,
        "step_width": [max(len(e.prompt_ids) + len(e.completion_ids[k]) for e in b for k in KEYS) for b in batches],
        "step_completion_tokens": [sum(len(e.completion_ids[k]) for e in b for k in KEYS) for b in batches],
        # what has to be computed: each prompt once, every completion token (workloads.batch_tokens)
        "step_real_tokens": [batch_tokens(b, hidden)["real"] for b in batches],
        "step_sequence_tokens": [batch_tokens(b, hidden)["sequences"] for b in batches],  # a prompt per completion
        "padding": padding_report(batches, hidden),
        "seq_len_min_max": [min(full), max(full)],
        "pairs": n_pairs,
        "workload": SHAPE["workload"],
    }


def matmul_flops(threads: int, n: int = 1024, repeats: int = 10) -> tuple[float, float]:
    """float32 n×n matmul FLOP/s, best of `repeats`: per wall-clock second and per process-CPU second. Runs in a
    worker process: with OMP_WAIT_POLICY=ACTIVE an OpenMP pool in this (parent) process would spin on a core
    for the whole benchmark."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best_wall = best_cpu = math.inf
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        for _ in range(5):
            torch.mm(a, b)
        best_wall, best_cpu = (
            min(best_wall, (time.perf_counter() - t) / 5),
            min(best_cpu, (time.process_time() - c) / 5),
        )
    return 2 * n**3 / best_wall, 2 * n**3 / best_cpu


# ------------------------------------------------------------------------------------------------ subprocess workers


def run_tether(work: Path, model: str, mode: str, steps: int) -> dict:
    from tether.train import TrainConfig, offline, train

    stamps: list[tuple[float, float]] = []
    if hasattr(offline, "crash_point"):
        original = offline.crash_point
        offline.crash_point = lambda name, step: (
            name == "after_step" and stamps.append((time.perf_counter(), time.process_time())),
            original(name, step),
        )
    out, refcache = work / f"run_tether_{model}_{mode}", work / f"refcache_{model}_{mode}"
    for d in (out, refcache):  # tether refuses to overwrite a run (a reused --workdir); a fresh reference cache
        shutil.rmtree(d, ignore_errors=True)
    cfg = TrainConfig(
        model=str(work / f"model_{model}"),
        train_file=str(work / "tether.jsonl"),
        output_dir=str(out),
        loss="dpo",
        beta=BETA,
        max_length=SHAPE["max_length"],
        max_prompt_length=PROMPT_TOKENS,
        learning_rate=LR,
        lr_scheduler="linear",
        warmup_steps=0,
        max_steps=steps,
        batch_size=PAIRS,
        gradient_accumulation_steps=1,
        max_grad_norm=1.0,
        weight_decay=0.0,
        seed=SEED,
        disable_dropout=True,
        precompute_ref_logps=(mode == "precomputed"),
        ref_cache_dir=str(refcache),  # beside the run: tether makes it before it claims the (empty) run directory
        logging_steps=1,
        eval_steps=0,
        save_steps=0,
        report_to="none",
        progress=False,
        lora=LORA["r"] > 0,
        lora_r=max(LORA["r"], 1),
        lora_alpha=2 * max(LORA["r"], 1),
        lora_dropout=0.0,
    )
    cfg.validate()
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if len(stamps) != steps:  # hook unavailable: per-step times from the cumulative elapsed_s (ms resolution)
        stamps = [(r["elapsed_s"], math.nan) for r in rows]
    return {"stamps": stamps, "losses": [r["loss"] for r in rows]}


def trl_setup(work: Path, model: str, mode: str, steps: int, rows: list[dict], callbacks=()):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    path = work / f"model_{model}"
    args = DPOConfig(
        output_dir=str(work / f"run_trl_{model}_{mode}"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=PAIRS,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch_fused",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type=["sigmoid"],
        max_length=SHAPE["max_length"],
        precompute_ref_log_probs=(mode in ("precomputed", "check")),
        train_sampling_strategy="sequential",
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = None
    if LORA["r"] > 0:  # TRL then scores the reference with the adapter disabled, as tether does
        from peft import LoraConfig

        peft = LoraConfig(
            r=LORA["r"], lora_alpha=2 * LORA["r"], lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
        )
    return DPOTrainer(
        model=policy,
        args=args,
        train_dataset=Dataset.from_list(rows),
        peft_config=peft,
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=list(callbacks),
    )


def run_trl(work: Path, model: str, mode: str, steps: int) -> dict:
    from transformers import TrainerCallback

    stamps: list[tuple[float, float]] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append((time.perf_counter(), time.process_time()))

    rows = [json.loads(line) for line in (work / "base.jsonl").read_text().splitlines()]
    trainer = trl_setup(work, model, mode, steps, rows, [Clock()])
    trainer.train()
    return {"stamps": stamps, "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h]}


def run_check(work: Path, model: str) -> dict:
    """Per-pair log-probs of the first batch: tether.logprobs.sequence_logps vs TRL's precomputed ones."""
    import torch

    from tether.data import collate, load_preference_records, tokenize_records
    from tether.logprobs import sequence_logps
    from tether.models import load_model, load_tokenizer
    from tether.train.train_config import TrainConfig, logp_options

    path = work / f"model_{model}"
    rows = [json.loads(line) for line in (work / "base.jsonl").read_text().splitlines()][:PAIRS]
    (work / "check.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(path)
    ex, _ = tokenize_records(load_preference_records(work / "check.jsonl"), tok, SHAPE["max_length"], PROMPT_TOKENS)
    batch = collate(ex, tok.pad_token_id)
    scoring = logp_options(TrainConfig(model=str(path), train_file="-"))  # as tether train scores, at its defaults
    with torch.no_grad():
        sums, _ = sequence_logps(load_model(path).eval(), **batch, n_keys=2, **scoring)
    ours = sums.view(2, -1)
    ds = trl_setup(work, model, "check", 1, rows).train_dataset
    theirs = torch.tensor([ds["ref_chosen_logps"], ds["ref_rejected_logps"]], dtype=torch.float32)
    same_tokens = all(
        e.prompt_ids == d["prompt_ids"]
        and e.completion_ids["chosen"] == d["chosen_ids"]
        and e.completion_ids["rejected"] == d["rejected_ids"]
        for e, d in zip(ex, ds)
    )
    diff = (ours - theirs).abs()
    return {
        "same_tokens": same_tokens,
        "max_abs_diff": diff.max().item(),
        "max_rel_diff": (diff / theirs.abs()).max().item(),
        "tether_chosen_logps": ours[0].tolist(),
        "trl_chosen_logps": theirs[0].tolist(),
    }


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    LORA["r"] = args.lora
    SHAPE.update(workload=args.workload, max_length=MAX_LENGTHS[args.workload])
    work = Path(args.work)
    fn = {"tether": run_tether, "trl": run_trl}.get(args.worker)
    if args.worker == "matmul":
        res = dict(zip(("wall", "cpu"), matmul_flops(args.threads)))
    elif args.worker == "check":
        res = run_check(work, args.model)
    else:
        res = fn(work, args.model, args.mode, args.steps)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.result).write_text(json.dumps(res))


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes), from /proc/stat; nan where unavailable."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:9]]
    except (OSError, ValueError):
        return math.nan
    return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def spawn(work: Path, tool: str, model: str, mode: str, steps: int, threads: int, lora: int = 0) -> dict:
    """Run one worker (`tool` on `model` in `mode`) in its own process; its result and the others' load."""
    result, log = work / f"result_{tool}_{model}_{mode}.json", work / f"log_{tool}_{model}_{mode}.txt"
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        CUDA_VISIBLE_DEVICES="",
        HF_DATASETS_CACHE=str(work / "hf_datasets"),
        TETHER_CACHE=str(work / "tether_cache"),
    )
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        "--model",
        model,
        "--mode",
        mode,
        "--steps",
        str(steps),
        "--work",
        str(work),
        "--result",
        str(result),
        "--threads",
        str(threads),
        "--lora",
        str(lora),
        "--workload",
        SHAPE["workload"],
    ]

    def usage() -> float:  # CPU seconds of this script's finished children
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    t0, busy0, mine0 = time.perf_counter(), busy_cpu_s(), usage()
    with log.open("w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    # cores kept busy by OTHER processes during the run: a load indicator printed next to the timings
    others = ((busy_cpu_s() - busy0) - (usage() - mine0)) / (time.perf_counter() - t0)
    if code != 0:
        sys.exit(
            f"{tool}/{model}/{mode} failed (exit {code}); last lines of {log}:\n"
            + "".join(log.read_text().splitlines(True)[-25:])
        )
    return {**json.loads(result.read_text()), "other_processes_cores": max(others, 0.0)}


def spawn_quietest(retries: int, *args) -> dict:
    """`spawn`, repeated up to `retries` more times while other processes kept >= 0.25 core busy; the quietest run."""
    best = None
    for _ in range(1 + retries):
        r = spawn(*args)
        best = r if best is None or r["other_processes_cores"] < best["other_processes_cores"] else best
        if r["other_processes_cores"] < 0.25:
            break
    return best


# ------------------------------------------------------------------------------------------------ the report


def step_times(stamps: list[list[float]], warmup: int, which: int = 0) -> list[float]:
    """Per-step durations of steps warmup+1.. (which=0: wall clock, 1: process CPU time)."""
    return [b[which] - a[which] for a, b in zip(stamps[:-1], stamps[1:])][max(warmup - 1, 0) :]  # diff i = step i+2


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,5m")
    p.add_argument("--modes", default="live,precomputed")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=2, help="torch threads per run (default 2 = this machine's cores)")
    p.add_argument(
        "--retries", type=int, default=2, help="re-run a measurement disturbed by other processes up to N times"
    )
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        help="LoRA rank on both sides (alpha 2R, every linear layer); 0 = full fine-tuning",
    )
    p.add_argument(
        "--workload",
        choices=tuple(MAX_LENGTHS),
        default="uniform",
        help="uniform: every sequence 128 tokens; long-chosen: chosen 150-190, rejected 8-24 tokens (max_length 256)",
    )
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dpo_step.json"))
    p.add_argument("--workdir", default=None, help="keep models, data and logs here (default: a temp dir)")
    p.add_argument("--worker", choices=("tether", "trl", "check", "matmul"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    SHAPE.update(workload=args.workload, max_length=MAX_LENGTHS[args.workload])
    models, modes = args.models.split(","), args.modes.split(",")
    assert set(models) <= set(MODELS) and set(modes) <= {"live", "precomputed"}, "unknown model or mode"
    assert args.steps >= args.warmup + 2, "need at least warmup + 2 steps"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_dpo_"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(1)  # no OpenMP pool here that could spin (OMP_WAIT_POLICY=ACTIVE) during the runs
    facts = build_workdir(work, models, args.steps * PAIRS)

    def matmul() -> tuple[float, float]:
        r = spawn(work, "matmul", "-", "-", 0, args.threads)
        return r["wall"], r["cpu"]

    mm_first = matmul()
    import tether

    print(f"tether from {Path(tether.__file__).parent} (set PYTHONPATH to benchmark another checkout)")
    print(f"work dir {work}; {facts['pairs']} pairs, sequence lengths {facts['seq_len_min_max']}")
    print_report(f"padding ({args.workload})", facts["padding"])
    log2, rows, checks = math.log(2), [], {}
    for model in models:
        checks[model] = spawn(work, "check", model, "check", 1, args.threads, args.lora)
        for mode in modes:
            res = {
                tool: spawn_quietest(args.retries, work, tool, model, mode, args.steps, args.threads, args.lora)
                for tool in ("tether", "trl")
            }
            info, T = facts["models"][model], 2 * PAIRS * statistics.mean(facts["step_width"][args.warmup :])
            # forward 2PT + backward 4PT (2PT with LoRA: no weight gradients of the frozen base) + live reference 2PT
            flops = ((4 if args.lora else 6) + (2 if mode == "live" else 0)) * info["params_nonembedding"] * T
            Tc = statistics.mean(facts["step_completion_tokens"][args.warmup :])  # tether's LM head sees only these
            # the same count over the real tokens alone: each prompt once, every completion token, no padding
            T_real = statistics.mean(facts["step_real_tokens"][args.warmup :])
            T_seq = statistics.mean(facts["step_sequence_tokens"][args.warmup :])  # the same, a prompt per completion
            real_flops = flops * T_real / T
            P, H = info["params_nonembedding"], info["lm_head_params"]
            row = {
                "model": model,
                "mode": mode,
                "params_total": info["params_total"],
                "params_nonembedding": P,
                "tokens_per_step": T,
                "real_tokens_per_step": T_real,
                "sequence_tokens_per_step": T_seq,
                "step_flops": flops,
                "step_flops_real_tokens": real_flops,
                "tether_actual_over_nominal_flops": ((P - H) * T + H * Tc) / (P * T),
            }
            for tool, r in res.items():
                times, cpu = step_times(r["stamps"], args.warmup), step_times(r["stamps"], args.warmup, 1)
                med = statistics.median(times)
                row[tool] = {
                    "median_step_s": med,
                    "min_step_s": min(times),
                    "max_step_s": max(times),
                    "median_step_cpu_s": statistics.median(cpu),
                    "other_processes_cores": r["other_processes_cores"],
                    "timed_steps": len(times),
                    "steps_per_s": 1 / med,
                    "peak_rss_mb": r["peak_rss_mb"],
                    "achieved_gflops": flops / med / 1e9,
                    "achieved_gflops_per_cpu_s": flops / statistics.median(cpu) / 1e9,
                    "achieved_gflops_real_tokens": real_flops / med / 1e9,
                    "achieved_gflops_sequence_tokens": flops * T_seq / T / med / 1e9,
                    "loss_step1": r["losses"][0],
                    "loss_step2": r["losses"][1],
                    "loss_last": r["losses"][-1],
                    "losses": r["losses"],
                    "step_times_s": times,
                    "step_cpu_s": cpu,
                }
            row["speedup_tether_over_trl"] = row["tether"]["steps_per_s"] / row["trl"]["steps_per_s"]
            row["speedup_min"] = row["trl"]["min_step_s"] / row["tether"]["min_step_s"]
            row["speedup_cpu"] = row["trl"]["median_step_cpu_s"] / row["tether"]["median_step_cpu_s"]
            row["loss_step2_abs_diff"] = abs(row["tether"]["loss_step2"] - row["trl"]["loss_step2"])
            row["loss_last_abs_diff"] = abs(row["tether"]["loss_last"] - row["trl"]["loss_last"])
            rows.append(row)
    # the matmul rate is measured before and after the runs and the better kept (a busy moment only lowers it)
    mm_last = matmul()
    mm, mm_cpu = max(mm_first[0], mm_last[0]), max(mm_first[1], mm_last[1])
    print(
        f"measured float32 matmul: {mm / 1e9:.1f} GFLOP/s, {mm_cpu / 1e9:.1f} GFLOP per CPU-second "
        f"({args.threads} thread(s), best of 2 × 10 × five 1024² torch.mm)"
    )
    for r in rows:
        for tool in ("tether", "trl"):
            r[tool]["fraction_of_matmul_peak"] = r[tool]["achieved_gflops"] * 1e9 / mm
            r[tool]["fraction_of_matmul_peak_cpu_time"] = r[tool]["achieved_gflops_per_cpu_s"] * 1e9 / mm_cpu
            r[tool]["fraction_of_matmul_peak_real_tokens"] = r[tool]["achieved_gflops_real_tokens"] * 1e9 / mm
            r[tool]["fraction_of_matmul_peak_sequence_tokens"] = r[tool]["achieved_gflops_sequence_tokens"] * 1e9 / mm

    print(
        f"\nseconds per optimizer step, steps {args.warmup + 1}..{args.steps} "
        f"(8 pairs × 2 rows × ≤{SHAPE['max_length']} tokens, {args.threads} thread(s)); "
        "speed-up = TRL time / tether time = tether steps/s ÷ TRL steps/s"
    )
    head = (
        f"{'model':<7} {'mode':<11} | {'tether median':>13} {'min':>7} {'CPU s':>7} | {'TRL median':>10} {'min':>7} "
        f"{'CPU s':>7} | {'speed-up':>8} {'(min)':>6} {'(CPU)':>6} | {'others':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        t, q = r["tether"], r["trl"]
        print(
            f"{r['model']:<7} {r['mode']:<11} | {t['median_step_s']:13.4f} {t['min_step_s']:7.4f} "
            f"{t['median_step_cpu_s']:7.4f} | "
            f"{q['median_step_s']:10.4f} {q['min_step_s']:7.4f} {q['median_step_cpu_s']:7.4f} | "
            f"{r['speedup_tether_over_trl']:7.2f}x {r['speedup_min']:5.2f}x {r['speedup_cpu']:5.2f}x | "
            f"{t['other_processes_cores']:4.1f}/{q['other_processes_cores']:<4.1f}"
        )
    print("  others = cores kept busy by other processes during the tether/TRL run (0 = quiet machine)")
    print(
        "\npeak RSS per process, and achieved FLOP/s at the median step time: nominal step FLOPs = "
        "(6, or 4 with LoRA, + 2 if live)·P·T, P = non-embedding params incl. lm_head, T = tokens per step; "
        f"%peak = of the measured matmul {mm / 1e9:.1f} GFLOP/s; "
        f"%CPU = the same ratio per process-CPU second (matmul {mm_cpu / 1e9:.1f} GFLOP per CPU-s), steadier under load"
    )
    head = (
        f"{'model':<7} {'mode':<11} {'P':>9} {'T':>6} | {'tether MB':>9} {'TRL MB':>8} | {'tether GFLOP/s':>14} "
        f"{'%peak':>6} {'%CPU':>6} | {'TRL GFLOP/s':>11} {'%peak':>6} {'%CPU':>6}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        t, q = r["tether"], r["trl"]
        print(
            f"{r['model']:<7} {r['mode']:<11} {r['params_nonembedding']:9,} {r['tokens_per_step']:6.0f} | "
            f"{t['peak_rss_mb']:9.0f} {q['peak_rss_mb']:8.0f} | {t['achieved_gflops']:14.2f} "
            f"{100 * t['fraction_of_matmul_peak']:5.1f}% "
            f"{100 * t['fraction_of_matmul_peak_cpu_time']:5.1f}% | {q['achieved_gflops']:11.2f} "
            f"{100 * q['fraction_of_matmul_peak']:5.1f}% {100 * q['fraction_of_matmul_peak_cpu_time']:5.1f}%"
        )
    print(
        "  (tether applies the LM head only at completion positions, so its matmul work is "
        + ", ".join(f"{r['model']} {100 * r['tether_actual_over_nominal_flops']:.0f}%" for r in rows[:: len(modes)])
        + " of the nominal count; TRL on CPU projects every position)"
    )
    print(
        "counting only the real tokens' FLOPs, % of the matmul peak: real T = each prompt once + every completion "
        "token; sequence T = prompt + completion per row (a prompt once per completion); no padding in either"
    )
    for r in rows:
        t, q = r["tether"], r["trl"]
        print(
            f"  {r['model']:<7} {r['mode']:<11} real T {r['real_tokens_per_step']:6.0f} / {r['tokens_per_step']:.0f}: "
            f"tether {100 * t['fraction_of_matmul_peak_real_tokens']:5.1f}%, "
            f"TRL {100 * q['fraction_of_matmul_peak_real_tokens']:5.1f}%;   "
            f"sequence T {r['sequence_tokens_per_step']:6.0f}: "
            f"tether {100 * t['fraction_of_matmul_peak_sequence_tokens']:5.1f}%, "
            f"TRL {100 * q['fraction_of_matmul_peak_sequence_tokens']:5.1f}%"
        )
    print(
        "\nloss agreement (same weights, same batches in the same order; step 1 has policy == reference, so log 2 = "
        f"{log2:.6f}; step 2 and the last step test gradients, clipping, AdamW and data order)"
    )
    for r in rows:
        t, q = r["tether"], r["trl"]
        print(
            f"  {r['model']:<7} {r['mode']:<11} step1 {t['loss_step1']:.7f} / {q['loss_step1']:.7f}   "
            f"step2 {t['loss_step2']:.7f} / {q['loss_step2']:.7f} (|Δ| {r['loss_step2_abs_diff']:.1e})   "
            f"last {t['loss_last']:.7f} / {q['loss_last']:.7f} (|Δ| {r['loss_last_abs_diff']:.1e})   [tether / TRL]"
        )
    print(
        "per-pair summed completion log-probs of the first batch, initial weights "
        "(tether.logprobs.sequence_logps vs TRL's precomputed reference log-probs):"
    )
    for model, c in checks.items():
        print(
            f"  {model:<7} identical tokenization: {c['same_tokens']}; max |Δ| {c['max_abs_diff']:.2e} "
            f"(relative {c['max_rel_diff']:.1e}) on values ≈ {c['tether_chosen_logps'][0]:.2f}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "settings": {
                    "steps": args.steps,
                    "warmup": args.warmup,
                    "pairs_per_step": PAIRS,
                    "max_length": SHAPE["max_length"],
                    "workload": SHAPE["workload"],
                    "lr": LR,
                    "beta": BETA,
                    "threads": args.threads,
                    "lora_r": args.lora,
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                    "trl_logging_steps": 1,
                    "tether_logging_steps": 1,
                    "optimizer": "torch AdamW (fused) on both sides",
                    "tether_module": str(Path(tether.__file__).parent),
                },
                "data": facts,
                "matmul_flops": mm,
                "matmul_flops_per_cpu_s": mm_cpu,
                "runs": rows,
                "logp_checks": checks,
            },
            indent=1,
        )
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
