"""A whole LoRA DPO job as a user runs it, tether vs TRL: launch to saved adapter, plus where tether's time goes.

Run (from the repository root; needs `make smollm2` and `make bench`):

    .venv/bin/python benchmarks/bench_job.py                        # 3 alternated runs of each, ~15 min on 2 cores
    .venv/bin/python benchmarks/bench_job.py --workload knowledge --trl same,defaults,padding-free --runs 2
    .venv/bin/python benchmarks/bench_job.py --workload long-chosen --runs 2
    .venv/bin/python benchmarks/bench_job.py --smoke                # a toy model, 16 pairs, 1 run: does it run?
    flags: --runs 3 --pairs 64 --threads N (unset = each tool's default) --out PATH --workdir DIR --no-phases
           --workload filler|knowledge|long-chosen --tether defaults,padded --trl same,defaults,padding-free

Method
- The job: SmolLM2-135M-Instruct (tether's built-in `smollm2-135m-instruct`; TRL gets the same local directory),
  --pairs (64) preference pairs of --workload (benchmarks/workloads.py: `filler`, the job until issue 29, colour
  questions with filler answers of 24–120 tokens; `knowledge`, knowledge-probe questions with one-option answers;
  `long-chosen`, chosen 150–190 tokens against rejected 8–24), 1 epoch, 8 pairs per step, LoRA rank 16,
  max_length 256. Every other setting is each tool's own default, so the comparison is what a user of each gets:
    tether: python -m tether.cli train --model smollm2-135m-instruct --train_file DATA --lora true --lora_r 16
            --max_length 256 --max_prompt_length 128 --batch_size 8 --num_epochs 1 --output_dir OUT
            --ref_cache_dir FRESH
    TRL:    trl dpo --model_name_or_path MODEL --dataset_name DATA_DIR --use_peft --lora_r 16 --max_length 256
            --per_device_train_batch_size 8 --num_train_epochs 1 --output_dir OUT --use_cpu --bf16 false
  TRL needs `--use_cpu` to run on this machine at all, and `--bf16 false` so both train in float32 (the same
  arithmetic; bf16 matrix products are very slow on this CPU); tether needs `--max_prompt_length` below max_length
  (its default is 256; the prompts here have at most 64 tokens, so nothing is cut on either side). The defaults
  that differ, as shipped: tether adapts every linear layer (TRL/PEFT: q_proj and v_proj only), precomputes
  reference log-probs and logs every step;
  TRL checkpoints activations (`activation_checkpointing=True`) and logs every 10 steps.
- Variants (each run alternates through all of them): tether `defaults` (padding-free batches, chunked log-prob
  head) and `padded` (`--padding_free false --logprob_chunk_size 0`: tether before issue 29); TRL `same`
  (`--gradient_checkpointing false`: the same arithmetic as tether), `defaults` (checkpointing on, as shipped) and
  `padding-free` (`same` + `--padding_free true`; TRL 1.16 warns that it is unavailable and pads: the log is
  searched for that warning and the result says whether TRL fell back). Ratios: each variant ÷ the first tether
  variant (the baseline).
- Padding share (printed first, in the JSON under `padding`): benchmarks/workloads.py's count over the job's batches
  in tether's order, with tether's tokenization: the share of each layout's tokens that is padding (TRL's padded
  rows, tether padded, tether packed).
- --smoke: the same commands on a toy Llama (hidden 32, built in the work directory) and 16 pairs, the phase run
  and one run of each variant, written to the work directory: checks that everything runs, records nothing.
- Nothing is reused between runs: every run gets a fresh output directory, tether a fresh reference log-prob cache
  and TRL a fresh `HF_DATASETS_CACHE` (a user's first run; tether's second run of the same job would skip the
  reference pass). Models and libraries are warm in the page cache (the phase run below goes first).
- Timing: each command runs as a child process from launch until it exits; the runs alternate (tether, TRL,
  tether, ...) so a drift in the machine's speed hits both; medians and the ratio of medians are printed, and
  the ratio pair by pair. Peak RSS is the largest process of the run (wait4's ru_maxrss). "others" = cores kept
  busy by other processes during the run (from /proc/stat), a load indicator: this machine is shared.
- Phases (one extra tether run, first): the same command in a worker that time-stamps tether's own steps by
  wrapping the functions `tether.train.offline.train` calls: import (launch until `tether.train.offline` is
  imported), setup (the accelerator), load (tokenizer, model, LoRA), tokenize (read + tokenize the data, write
  the run directory), reference (reference log-probs: weights fingerprint + forward passes), loop (optimizer,
  all steps, metrics), save (final adapter + tokenizer), exit (train() returned until the process ended).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_step import busy_cpu_s  # noqa: E402
from workloads import WORKLOADS, padding_report, print_report, tether_batches, tokenized, workload_pairs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
PAIRS_PER_STEP, LORA_R, MAX_LENGTH = 8, 16, 256
TETHER_VARIANTS = {"defaults": [], "padded": ["--padding_free", "false", "--logprob_chunk_size", "0"]}
TRL_VARIANTS = {
    "same": ["--gradient_checkpointing", "false"],
    "defaults": [],
    "padding-free": ["--gradient_checkpointing", "false", "--padding_free", "true"],
}
TRL_FALLBACK = "temporarily unavailable"  # TRL 1.16's warning when padding_free=True falls back to padding
PHASES = ("import", "setup", "load", "tokenize", "reference", "loop", "save", "exit")


def write_data(work: Path, n_pairs: int, workload: str, model: str) -> tuple[Path, dict]:
    """n_pairs records of `workload` in work/data/train.jsonl, and their padding report (see Padding share)."""
    from transformers import AutoConfig

    from tether.models import load_tokenizer, resolve_model_path
    from tether_lab.demo import write_jsonl

    tok = load_tokenizer(model)
    records = workload_pairs(workload, tok, n_pairs)
    (work / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(records, work / "data" / "train.jsonl")
    examples = tokenized(records, tok, MAX_LENGTH, 128)
    hidden = AutoConfig.from_pretrained(resolve_model_path(model)).hidden_size
    return work / "data" / "train.jsonl", padding_report(tether_batches(examples, PAIRS_PER_STEP), hidden)


def tether_argv(data: Path, out: Path, model: str = MODEL, variant: str = "defaults") -> list[str]:
    argv = [
        "train",
        "--model",
        model,
        "--train_file",
        str(data),
        "--output_dir",
        str(out / "run"),
        "--lora",
        "true",
        "--lora_r",
        str(LORA_R),
        "--max_length",
        str(MAX_LENGTH),
        "--max_prompt_length",
        "128",
        "--batch_size",
        str(PAIRS_PER_STEP),
        "--num_epochs",
        "1",
        "--ref_cache_dir",
        str(out / "refcache"),
    ]
    return argv + TETHER_VARIANTS[variant]


def trl_command(data: Path, out: Path, model_dir: Path, variant: str = "defaults") -> list[str]:
    trl = Path(sys.executable).parent / "trl"
    return [
        str(trl),
        "dpo",
        "--model_name_or_path",
        str(model_dir),
        "--dataset_name",
        str(data.parent),
        "--output_dir",
        str(out / "run"),
        "--use_peft",
        "--lora_r",
        str(LORA_R),
        "--max_length",
        str(MAX_LENGTH),
        "--per_device_train_batch_size",
        str(PAIRS_PER_STEP),
        "--num_train_epochs",
        "1",
        "--use_cpu",
        "--bf16",
        "false",
        *TRL_VARIANTS[variant],
    ]


def run(cmd: list[str], env: dict, log: Path) -> dict:
    """Run `cmd` to completion; wall seconds, CPU seconds, peak RSS of its largest process, others' load."""
    t0, busy0 = time.perf_counter(), busy_cpu_s()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(
            f"{cmd[:3]} failed (exit {proc.returncode}); last lines of {log}:\n"
            + "".join(log.read_text().splitlines(True)[-25:])
        )
    cpu = ru.ru_utime + ru.ru_stime
    others = ((busy_cpu_s() - busy0) - cpu) / wall
    return {"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": ru.ru_maxrss / 1024, "other_processes_cores": max(others, 0.0)}


def phase_worker(argv: list[str], result: Path, launched: float) -> None:
    """Run `tether train` in this process, as the command does, with its steps time-stamped (see Phases)."""
    sys.argv = ["tether", *argv]
    import tether.cli
    from tether.train import bookkeeping, offline

    spans = {"import": time.time() - launched}

    def timed(module, name: str, phase: str) -> None:
        original = getattr(module, name, None)
        if original is None:  # the phases name the functions train() calls: keep this list in step with offline.py
            raise SystemExit(f"bench_job: {module.__name__} has no {name!r}; update the phase list")

        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                spans[phase] = spans.get(phase, 0.0) + time.perf_counter() - t

        setattr(module, name, wrapper)

    for module, name, phase in (
        (offline, "make_accelerator", "setup"),
        (offline, "load_tokenizer", "load"),
        (offline, "load_policy", "load"),
        (offline, "load_examples", "tokenize"),
        (offline, "claim_run_dir", "tokenize"),
        (offline, "reference_table", "reference"),
        (bookkeeping, "save_final", "save"),
    ):
        timed(module, name, phase)
    train = offline.train

    def train_timed(*a, **k):
        t = time.perf_counter()
        out = train(*a, **k)
        # the rest of train(): optimizer, every step, metrics
        spans["loop"] = time.perf_counter() - t - sum(v for k, v in spans.items() if k != "import")
        result.write_text(json.dumps({**spans, "returned_at": time.time()}))
        return out

    offline.train = train_timed
    sys.exit(tether.cli.main())  # argv from sys.argv: the command's own way out of the process


def phase_run(work: Path, env: dict, data: Path, model: str) -> dict:
    """The per-phase tether run (see Phases): seconds per phase and the run's wall, CPU and memory."""
    out = work / "phases"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    launched = time.time()
    argv = json.dumps(tether_argv(data, out, model))
    r = run(
        [sys.executable, __file__, "--worker", str(out / "phases.json"), repr(launched), argv], env, out / "log.txt"
    )
    phases = json.loads((out / "phases.json").read_text())
    phases["exit"] = launched + r["wall_s"] - phases.pop("returned_at")
    phases = {"seconds": {k: round(phases.get(k, 0.0), 2) for k in PHASES}, **r}
    spans = ", ".join(f"{k} {v:.1f}" for k, v in phases["seconds"].items())
    print(f"tether phases (s): {spans}; total {r['wall_s']:.1f}", flush=True)
    return phases


def run_variant(name: str, work: Path, env: dict, data: Path, model: str, model_dir: Path, i: int) -> dict:
    """Run 'tether:VARIANT' or 'trl:VARIANT' once in a fresh output directory; its measurements."""
    tool, variant = name.split(":")
    out = work / f"{tool}-{variant}{i}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if tool == "tether":
        cmd, e = [sys.executable, "-m", "tether.cli", *tether_argv(data, out, model, variant)], env
    else:
        cmd, e = trl_command(data, out, model_dir, variant), {**env, "HF_DATASETS_CACHE": str(out / "datasets")}
    r = run(cmd, e, out / "log.txt")
    saved = sorted(x.name for x in (out / "run" / ("final" if tool == "tether" else "")).glob("adapter_*"))
    assert saved, f"{name}: no saved adapter in {out / 'run'}"
    if tool == "trl" and "padding_free" in " ".join(cmd):
        r["fell_back_to_padding"] = TRL_FALLBACK in (out / "log.txt").read_text()
    print(
        f"run {i + 1} {name:<17} {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU, {r['peak_rss_mb']:6.0f} MB, "
        f"others {r['other_processes_cores']:.2f} core" + (" (TRL padded anyway)" * r.get("fell_back_to_padding", 0)),
        flush=True,
    )
    return r


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Medians per variant, and every other variant's wall-time and memory ratio to the first (a tether variant),
    pair by pair too."""
    med = {
        v: {k: statistics.median(x[k] for x in rs) for k in ("wall_s", "cpu_s", "peak_rss_mb")}
        for v, rs in runs.items()
    }
    base = next(iter(runs))
    out = {"median": med, "baseline": base, "ratios_to_baseline": {}}
    for v, rs in runs.items():
        if v != base:
            out["ratios_to_baseline"][v] = {
                "wall": med[v]["wall_s"] / med[base]["wall_s"],
                "wall_pairwise": [b["wall_s"] / a["wall_s"] for a, b in zip(runs[base], rs)],
                "baseline_memory_over_this": med[base]["peak_rss_mb"] / med[v]["peak_rss_mb"],
            }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="alternated runs of each command")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--workload", choices=WORKLOADS[:3], default="filler", help="benchmarks/workloads.py")
    p.add_argument("--tether", default="defaults", help="tether variants, comma-separated: defaults, padded")
    p.add_argument("--trl", default="same,defaults", help="TRL variants, comma-separated: same, defaults, padding-free")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (unset = each tool's default)")
    p.add_argument("--no-phases", action="store_true", help="skip the per-phase tether run")
    p.add_argument("--smoke", action="store_true", help="a toy model, 16 pairs, 1 run: does it all run?")
    p.add_argument(
        "--out", default=None, help="default benchmarks/results/job_smollm2[_WORKLOAD].json (--smoke: WORKDIR)"
    )
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", nargs=3, metavar=("RESULT", "LAUNCHED", "ARGV_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return phase_worker(json.loads(args.worker[2]), Path(args.worker[0]), float(args.worker[1]))
    variants = [f"tether:{v}" for v in args.tether.split(",")] + [f"trl:{v}" for v in args.trl.split(",")]
    known = {f"tether:{v}" for v in TETHER_VARIANTS} | {f"trl:{v}" for v in TRL_VARIANTS}
    unknown = [v for v in variants if v not in known]
    if unknown or not args.tether:
        sys.exit(f"unknown variant(s) {unknown}, or no tether variant to compare with")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_job_"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    model, runs_n, pairs = MODEL, args.runs, args.pairs
    if args.smoke:
        from tether_lab.demo import toy_model

        model, runs_n, pairs = str(toy_model(work / "toy", hidden_size=32, num_layers=2)), 1, 16
    from tether.models import resolve_model_path

    model_dir = resolve_model_path(model)
    data, padding = write_data(work, pairs, args.workload, model)
    print(f"work dir {work}; {pairs} {args.workload} pairs; tether from {ROOT / 'src'}", flush=True)
    print_report(args.workload, padding)
    suffix = "" if args.workload == "filler" else f"_{args.workload.replace('-', '_')}"
    recorded = ROOT / "benchmarks" / "results" / f"job_smollm2{suffix}.json"
    out_path = Path(args.out or (work / "result.json" if args.smoke else recorded))  # a smoke run records nothing
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cores": os.cpu_count(),
        "settings": {
            "workload": args.workload,
            "pairs": pairs,
            "batch": PAIRS_PER_STEP,
            "lora_r": LORA_R,
            "max_length": MAX_LENGTH,
            "threads": args.threads,
            "smoke": args.smoke,
            "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        },
        "commands": {
            **{
                v: ["python", "-m", "tether.cli", *tether_argv(Path("DATA"), Path("OUT"), model, v.split(":")[1])]
                for v in variants
                if v.startswith("tether:")
            },
            **{
                v: trl_command(Path("DATA_DIR/train.jsonl"), Path("OUT"), Path("MODEL"), v.split(":")[1])[1:]
                for v in variants
                if v.startswith("trl:")
            },
        },
        "padding": padding,
        "runs": runs,
        "tether_phases": None if args.no_phases else phase_run(work, env, data, model),
    }

    def save() -> None:  # after every run, so a run cut short keeps what it measured
        result["load_average"] = os.getloadavg()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))

    save()
    for i in range(runs_n):
        for v in variants:
            runs[v].append(run_variant(v, work, env, data, model, model_dir, i))
            save()
    result["summary"] = summary = summarize(runs)
    save()
    base = summary["median"][summary["baseline"]]
    print(f"\nmedian of {runs_n}: {summary['baseline']} {base['wall_s']:.1f} s, {base['peak_rss_mb']:.0f} MB")
    for v, r in summary["ratios_to_baseline"].items():
        pairwise = ", ".join(f"{x:.2f}" for x in r["wall_pairwise"])
        print(
            f"  {v:<17} {summary['median'][v]['wall_s']:7.1f} s: {r['wall']:.2f}x the baseline's wall time (pair by "
            f"pair {pairwise}); the baseline's peak memory {r['baseline_memory_over_this']:.2f}x this one's"
        )
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
