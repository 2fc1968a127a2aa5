"""Peak memory and step time of a LoRA DPO step with and without gradient checkpointing.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_checkpointing.py            # all settings, 1 warm-up + 2 timed steps each
    flags: --settings plain,checkpointing,unshared --steps 2 --warmup 1 --threads 2 --seq 1024 --mem-limit-gb 14
           --out PATH --workdir DIR

Method
- Model: a random-init Llama of 273M parameters (hidden 1024, 16 layers, 16 heads, MLP 2816, vocab 32000,
  untied embeddings), float32, CPU, saved once to --workdir and loaded through tether's own `load_policy`
  (so `gradient_checkpointing: true` is switched on exactly as `tether train` does it).
- Work: LoRA (r 16, alpha 32, all linear layers), DPO β = 0.1, 4 pairs per step, every sequence --seq tokens
  (1,024 = prompt 512 + completion 512, random tokens), precomputed (fixed) reference log-probs, fused AdamW.
- Memory guard: each setting's process gets an address-space limit (--mem-limit-gb, RLIMIT_AS), so a setting
  that does not fit fails with an allocation error (reported as "did not fit") instead of waking the kernel's
  OOM killer on a shared machine.
- Settings: `plain` = tether's default path (each prompt runs once for chosen and rejected, with a key/value
  cache); `checkpointing` = gradient_checkpointing: true (non-reentrant; the prompt cache cannot survive the
  recomputation, so whole sequences run: 8 × 1,024 tokens); `unshared` = no checkpointing, whole sequences
  (isolates the cost of checkpointing itself from the loss of prompt sharing).
- Each setting runs in its own process. Peak memory = the process's peak RSS (ru_maxrss) over the whole run;
  "step peak − start" subtracts the RSS just before the first step (model loaded, LoRA added). Step time =
  median wall seconds of the timed steps; CPU seconds reported too (less disturbed by other processes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("plain", "checkpointing", "unshared")


def build_model(workdir: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = workdir / "llama-273m"
    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")), eos_token="t1", pad_token="t0"
    )
    tok.save_pretrained(path)
    return path


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(setting: str, model_dir: Path, steps: int, warmup: int, seq: int) -> dict:
    import torch

    from tether.config import load_config
    from tether.data import COMPLETION_KEYS, Example, collate
    from tether.logprobs import sequence_logps
    from tether.losses import objective
    from tether.train import TrainConfig
    from tether.train.optimization import load_policy, make_optimizer, objective_options

    cfg = load_config(
        TrainConfig,
        None,
        dict(
            model=str(model_dir),
            train_file="unused.jsonl",
            lora=True,
            lora_r=16,
            lora_alpha=32,
            learning_rate=1e-5,
            gradient_checkpointing=setting == "checkpointing",
            max_length=seq,
            max_prompt_length=seq // 2,
            max_steps=steps + warmup,
        ),
    )
    model = load_policy(cfg).train()
    optimizer, _ = make_optimizer(model, cfg, steps + warmup)
    g = torch.Generator().manual_seed(0)
    half = seq // 2
    examples = [
        Example(
            torch.randint(2, 32000, (half,), generator=g).tolist(),
            {k: torch.randint(2, 32000, (half,), generator=g).tolist() for k in COMPLETION_KEYS},
            f"pair {i}",
        )
        for i in range(4)
    ]
    batch = collate(examples, 0, COMPLETION_KEYS)
    ref = torch.full((8,), -11.0 * half)
    n_keys = 2 if setting == "plain" else 1
    start_rss = rss_mb()
    walls, cpus, losses = [], [], []
    for step in range(warmup + steps):
        t, c = time.perf_counter(), time.process_time()
        sums, counts = sequence_logps(
            model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], n_keys
        )
        loss, _ = objective(sums, counts, ref, 2, **objective_options(cfg))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step >= warmup:
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        print(f"{setting} step {step}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "setting": setting,
        "seq": seq,
        "params": n_params,
        "wall_s": statistics.median(walls),
        "cpu_s": statistics.median(cpus),
        "walls": walls,
        "peak_rss_mb": round(peak),
        "start_rss_mb": round(start_rss),
        "step_peak_minus_start_mb": round(peak - start_rss),
        "losses": losses,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence (half prompt, half completion)")
    ap.add_argument("--mem-limit-gb", type=float, default=14.0, help="address-space limit of each setting's process")
    ap.add_argument(
        "--workdir",
        default=os.path.join(os.environ.get("TETHER_CACHE", os.path.expanduser("~/.cache/tether")), "bench"),
    )
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "checkpointing.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        limit = int(args.mem_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            row = child(args.child, Path(args.workdir) / "llama-273m", args.steps, args.warmup, args.seq)
        except (RuntimeError, MemoryError) as e:  # torch reports a failed allocation as RuntimeError
            if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            row = {
                "setting": args.child,
                "seq": args.seq,
                "did_not_fit_gb": args.mem_limit_gb,
                "error": str(e).splitlines()[0][:200],
            }
        print(json.dumps(row))
        return
    build_model(Path(args.workdir))  # once; each setting loads it in its own process
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for setting in args.settings.split(","):
        load = os.getloadavg()[0]
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                setting,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--threads",
                str(args.threads),
                "--workdir",
                args.workdir,
                "--seq",
                str(args.seq),
                "--mem-limit-gb",
                str(args.mem_limit_gb),
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["load_avg_before"] = load
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["setting"]: r for r in rows}
    summary = {}
    fits = lambda name: name in by and "wall_s" in by[name]  # noqa: E731
    if fits("plain") and fits("checkpointing"):
        p, c = by["plain"], by["checkpointing"]
        summary = {
            "memory_saved_vs_plain": 1 - c["peak_rss_mb"] / p["peak_rss_mb"],
            "step_memory_saved_vs_plain": 1 - c["step_peak_minus_start_mb"] / p["step_peak_minus_start_mb"],
            "time_ratio_vs_plain": c["wall_s"] / p["wall_s"],
            "cpu_ratio_vs_plain": c["cpu_s"] / p["cpu_s"],
        }
        if fits("unshared"):
            u = by["unshared"]
            summary.update(
                memory_saved_vs_unshared=1 - c["peak_rss_mb"] / u["peak_rss_mb"],
                time_ratio_vs_unshared=c["wall_s"] / u["wall_s"],
                cpu_ratio_vs_unshared=c["cpu_s"] / u["cpu_s"],
            )
    result = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "seq": args.seq,
        "mem_limit_gb": args.mem_limit_gb,
        "torch": torch.__version__,
        "runs": rows,
        "summary": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
