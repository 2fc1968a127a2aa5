"""A whole LoRA DPO job as a user runs it, tether vs TRL: launch to saved adapter, plus where tether's time goes.

Run (from the repository root; needs `make smollm2` and `make bench`):

    .venv/bin/python benchmarks/bench_job.py                        # 3 alternated runs of each, ~15 min on 2 cores
    flags: --runs 3 --pairs 64 --threads N (unset = each tool's default) --out PATH --workdir DIR --no-phases

Method
- The job: SmolLM2-135M-Instruct (tether's built-in `smollm2-135m-instruct`; TRL gets the same local directory),
  --pairs (64) standard-format preference pairs, 1 epoch, 8 pairs per step, LoRA rank 16, max_length 256. Every
  other setting is each tool's own default, so the comparison is what a user of each gets:
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
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_step import busy_cpu_s, fill, make_words  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
PAIRS_PER_STEP, LORA_R, MAX_LENGTH = 8, 16, 256
PHASES = ("import", "setup", "load", "tokenize", "reference", "loop", "save", "exit")


def write_data(work: Path, n_pairs: int) -> Path:
    """n_pairs standard-format records in work/data/train.jsonl: prompts ≤ 64 tokens, completions 24–120 tokens."""
    from tether.models import load_tokenizer
    from tether_lab.demo import COLOURS, OBJECTS, write_jsonl

    tok, words, rng = load_tokenizer(MODEL), make_words(), random.Random(1)

    def cost(s: str) -> int:
        return len(tok(s)["input_ids"])

    records = []
    for _ in range(n_pairs):
        obj, col = rng.choice(OBJECTS), rng.choice(COLOURS)
        prompt = fill(rng, words, cost, f"What colour is the {obj}? Context:", 63) + "\n"
        chosen = fill(rng, words, cost, f"The {obj} is {col}, I believe.", rng.randint(24, 120))
        rejected = fill(rng, words, cost, f"{col}, maybe.", rng.randint(24, 120))
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    (work / "data").mkdir(parents=True, exist_ok=True)
    write_jsonl(records, work / "data" / "train.jsonl")
    return work / "data" / "train.jsonl"


def tether_argv(data: Path, out: Path) -> list[str]:
    argv = [
        "train",
        "--model",
        MODEL,
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
    return argv


def trl_command(data: Path, out: Path, model_dir: Path) -> list[str]:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="alternated runs of each command")
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (unset = each tool's default)")
    p.add_argument("--no-phases", action="store_true", help="skip the per-phase tether run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "job_smollm2.json"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", nargs=3, metavar=("RESULT", "LAUNCHED", "ARGV_JSON"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return phase_worker(json.loads(args.worker[2]), Path(args.worker[0]), float(args.worker[1]))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_job_"))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    from tether.models import resolve_model_path

    model_dir, data = resolve_model_path(MODEL), write_data(work, args.pairs)
    print(f"work dir {work}; {args.pairs} pairs; tether from {ROOT / 'src'}", flush=True)

    def fresh(tag: str) -> Path:
        out = work / tag
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        return out

    phases = None
    if not args.no_phases:
        out = fresh("phases")
        launched = time.time()
        worker = [
            sys.executable,
            __file__,
            "--worker",
            str(out / "phases.json"),
            repr(launched),
            json.dumps(tether_argv(data, out)),
        ]
        r = run(worker, env, out / "log.txt")
        phases = json.loads((out / "phases.json").read_text())
        phases["exit"] = launched + r["wall_s"] - phases.pop("returned_at")
        phases = {"seconds": {k: round(phases.get(k, 0.0), 2) for k in PHASES}, **r}
        print(
            "tether phases (s): "
            + ", ".join(f"{k} {v:.1f}" for k, v in phases["seconds"].items())
            + f"; total {r['wall_s']:.1f}",
            flush=True,
        )
    runs: dict[str, list[dict]] = {"tether": [], "trl": []}
    result = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cores": os.cpu_count(),
        "settings": {
            "pairs": args.pairs,
            "batch": PAIRS_PER_STEP,
            "lora_r": LORA_R,
            "max_length": MAX_LENGTH,
            "threads": args.threads,
            "omp_wait_policy_env": os.environ.get("OMP_WAIT_POLICY"),
        },
        "commands": {
            "tether": ["python", "-m", "tether.cli", *tether_argv(Path("DATA"), Path("OUT"))],
            "trl": trl_command(Path("DATA_DIR/train.jsonl"), Path("OUT"), Path("MODEL"))[1:],
        },
        "runs": runs,
        "tether_phases": phases,
    }

    def save() -> None:  # after every run, so a run cut short keeps what it measured
        result["load_average"] = os.getloadavg()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))

    save()
    for i in range(args.runs):
        for tool in ("tether", "trl"):
            out = fresh(f"{tool}{i}")
            if tool == "tether":
                cmd, e = [sys.executable, "-m", "tether.cli", *tether_argv(data, out)], env
            else:
                cmd, e = trl_command(data, out, model_dir), {**env, "HF_DATASETS_CACHE": str(out / "datasets")}
            r = run(cmd, e, out / "log.txt")
            saved = sorted(x.name for x in (out / "run" / ("final" if tool == "tether" else "")).glob("adapter_*"))
            assert saved, f"{tool}: no saved adapter in {out / 'run'}"
            runs[tool].append(r)
            save()
            print(
                f"run {i + 1} {tool:<6} {r['wall_s']:7.1f} s wall, {r['cpu_s']:7.1f} s CPU, "
                f"{r['peak_rss_mb']:6.0f} MB, others {r['other_processes_cores']:.2f} core",
                flush=True,
            )
    med = {t: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for t, rs in runs.items()}
    pairwise = [b["wall_s"] / a["wall_s"] for a, b in zip(runs["tether"], runs["trl"])]
    result["summary"] = summary = {
        "tether_median_s": med["tether"]["wall_s"],
        "trl_median_s": med["trl"]["wall_s"],
        "speedup": med["trl"]["wall_s"] / med["tether"]["wall_s"],
        "speedup_pairwise": pairwise,
        "tether_peak_rss_mb": med["tether"]["peak_rss_mb"],
        "trl_peak_rss_mb": med["trl"]["peak_rss_mb"],
    }
    save()
    print(
        f"\nmedian of {args.runs}: tether {summary['tether_median_s']:.1f} s, TRL {summary['trl_median_s']:.1f} s: "
        f"tether {summary['speedup']:.2f}x faster (pair by pair {', '.join(f'{x:.2f}' for x in pairwise)}); "
        f"peak RSS {summary['tether_peak_rss_mb']:.0f} / {summary['trl_peak_rss_mb']:.0f} MB"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
