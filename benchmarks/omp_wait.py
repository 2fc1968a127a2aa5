"""Which OpenMP waiting policy should `import tether` set? Candidates timed on a training step, alone and next to
one busy process.

Run (from the repository root):

    .venv/bin/python benchmarks/omp_wait.py                 # a few minutes on an idle 2-core machine
    flags: --rounds 3 --steps 12 --threads 2 --workload dpo5m|world --out PATH  (candidates: the CANDIDATES table below)

torch's CPU build uses GNU OpenMP (libgomp; MKL runs on it too), so the knobs are OMP_WAIT_POLICY and
GOMP_SPINCOUNT (KMP_BLOCKTIME is Intel OpenMP's and does nothing here). libgomp: ACTIVE = spin until work
arrives; PASSIVE = sleep at once; neither set = spin GOMP_SPINCOUNT iterations (default 300,000; 1,000 when there
are more threads than CPUs) and then sleep; GOMP_SPINCOUNT=N sets that bound.

Workloads (--workload): "dpo5m" = one full-weight DPO-shaped training step of the 5m Llama of bench_dpo_step.py
(hidden 256 × 4 layers, vocab 2048): forward + backward over 16 rows × 128 tokens, fused AdamW; "world" = one
step of the world build's language-model training (world/build.py's model: hidden 192 × 4 layers, vocab 1024;
32 rows × 96 tokens, AdamW, gradient clipping) — small matrices, so OpenMP's waiting weighs more. --steps steps,
the first 2 dropped, median seconds per step. Each (candidate, scenario) runs in its own process, candidates
alternate within a round, and the median over rounds is reported. Scenarios: "alone" (no process of this
script competes; the machine's other load is printed as "others") and "busy" (one extra process spinning in a
Python loop for the whole run — one core's worth of competition, the case tether's PASSIVE default was chosen for).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_dpo_step import busy_cpu_s  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "ACTIVE": {"OMP_WAIT_POLICY": "ACTIVE"},
    "libgomp default (spin 300k)": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "GOMP_SPINCOUNT=100": {"GOMP_SPINCOUNT": "100"},
    "PASSIVE + GOMP_SPINCOUNT=1000": {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"},
}


def step_worker(steps: int, threads: int, workload: str) -> None:
    """Time `steps` training steps; print one JSON line {"step_s": [...]}."""
    import torch  # first: libgomp reads its settings when torch loads it, so tether's own default cannot apply

    from tether_lab.tiny import tiny_llama, train_tokenizer

    torch.set_num_threads(threads)
    world = workload == "world"
    tok = train_tokenizer(
        [f"word{i} text{i % 97} more{i % 13}" for i in range(3000)], vocab_size=1024 if world else 2048
    )
    if world:
        model = tiny_llama(
            tok, hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512, max_position_embeddings=256, seed=0
        )
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01, betas=(0.9, 0.98))
    else:
        model = tiny_llama(tok, hidden_size=256, num_layers=4, max_position_embeddings=512, seed=0)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, fused=True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, len(tok), (32, 96) if world else (16, 128), generator=gen)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        if world:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            logps = (
                torch.log_softmax(model(input_ids=ids).logits[:, :-1], dim=-1)
                .gather(-1, ids[:, 1:, None])
                .squeeze(-1)
                .sum(-1)
            )
            loss = -torch.nn.functional.logsigmoid(0.1 * (logps[:8] - logps[8:])).mean()
        loss.backward()
        if world:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    print(json.dumps({"step_s": times}))


def run_one(env_extra: dict, busy: bool, steps: int, threads: int, workload: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(env_extra, PYTHONPATH=str(ROOT / "src"))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        t0, busy0 = time.perf_counter(), busy_cpu_s()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(steps), str(threads), workload],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        wall, busy_all = time.perf_counter() - t0, busy_cpu_s() - busy0
    finally:
        if hog:
            hog.kill()
            hog.wait()
    times = json.loads(proc.stdout.strip().splitlines()[-1])["step_s"][2:]
    return {"median_step_s": statistics.median(times), "cores_busy_during_run": busy_all / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "omp_wait.json"))
    p.add_argument(
        "--workload", choices=("dpo5m", "world"), default="dpo5m", help="the step timed (see the module docstring)"
    )
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return step_worker(int(args.worker[0]), int(args.worker[1]), args.worker[2])
    rows: dict[str, dict[str, list]] = {name: {"alone": [], "busy": []} for name in CANDIDATES}
    for r in range(args.rounds):
        for scenario in ("alone", "busy"):
            for name, env in CANDIDATES.items():
                res = run_one(env, scenario == "busy", args.steps, args.threads, args.workload)
                rows[name][scenario].append(res)
                print(
                    f"round {r + 1} {scenario:<5} {name:<28} {res['median_step_s']:.3f} s/step "
                    f"(all processes kept {res['cores_busy_during_run']:.2f} cores busy)",
                    flush=True,
                )
    med = {n: {s: statistics.median(x["median_step_s"] for x in v[s]) for s in v} for n, v in rows.items()}
    print(f"\nmedian s/step over {args.rounds} rounds; vs ACTIVE alone and vs PASSIVE busy (targets: ≤ 1.10, ≤ 1.20)")
    for n, m in med.items():
        print(
            f"  {n:<28} alone {m['alone']:.3f} ({m['alone'] / med['ACTIVE']['alone']:.2f}× ACTIVE)   "
            f"busy {m['busy']:.3f} ({m['busy'] / med['PASSIVE']['busy']:.2f}× PASSIVE)"
        )
    Path(args.out).write_text(
        json.dumps(
            {
                "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                "threads": args.threads,
                "workload": args.workload,
                "steps": args.steps,
                "median": med,
                "runs": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
