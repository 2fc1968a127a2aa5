"""Memory and time of training without a reference (SimPO, tether's no-reference mode) against DPO.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_reference_free.py                     # hidden 512 × 6 layers, 24 steps
    .venv/bin/python benchmarks/bench_reference_free.py --hidden 256 --layers 4 --steps 8 --out results.json

Each setting trains the same model on the same pairs in its own process (`tether train`), so peak RSS
(ru_maxrss of that process) covers everything it did: imports, loading, base responses, reference pass(es),
training. Settings:

    dpo-live         loss dpo, precompute_ref_logps false: a frozen copy of the model scores every batch
    dpo-precomputed  loss dpo, precompute_ref_logps true: one reference pass over the data before training
    simpo            loss simpo: no reference model, no reference pass
    bapo-dpo         method bapo + dpo: base responses y_b, reference log-probs of y_w, y_l and y_b precomputed
    bapo-simpo       method bapo + simpo: base responses y_b, only log π_ref(y_b) precomputed

Printed per setting: peak RSS (MB), wall seconds of the whole process and of the training steps (from
metrics.jsonl's elapsed_s) and what the run's reference was (results.json). Peak memory does not depend on
the machine's load; the times do: record them from an idle machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = {
    "dpo-live": ["--loss", "dpo", "--precompute_ref_logps", "false"],
    "dpo-precomputed": ["--loss", "dpo", "--precompute_ref_logps", "true"],
    "simpo": ["--loss", "simpo"],
    "bapo-dpo": ["--loss", "dpo", "--method", "bapo", "--base_max_new_tokens", "32"],
    "bapo-simpo": ["--loss", "simpo", "--method", "bapo", "--base_max_new_tokens", "32"],
}


def build(work: Path, hidden: int, layers: int, pairs: int) -> tuple[Path, Path]:
    from tether_lab.demo import toy_model, toy_preferences, write_jsonl

    model = toy_model(work / "model", hidden_size=hidden, num_layers=layers, vocab_size=2048)
    write_jsonl(toy_preferences(pairs, seed=1), work / "train.jsonl")
    return model, work / "train.jsonl"


def run(name: str, model: Path, data: Path, out: Path, steps: int, threads: int) -> dict:
    args = [sys.executable, "-m", "tether.cli", "train", "--model", str(model), "--train_file", str(data)]
    args += ["--output_dir", str(out), "--max_steps", str(steps), "--batch_size", "8", "--learning_rate", "1e-5"]
    args += ["--save_steps", "0", "--progress", "false", "--write_report", "false", "--max_length", "128"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TETHER_CACHE": str(out.parent / f"cache-{name}")}
    log = out.parent / f"{name}.log"
    t0 = time.perf_counter()
    with log.open("w") as err:
        proc = subprocess.Popen(args + SETTINGS[name], env=env, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak RSS, not the largest child's so far
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: {log.read_text()[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    return {
        "setting": name,
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "process_s": round(wall, 2),
        "train_s": rows[-1]["elapsed_s"],
        "reference": results.get("reference"),
        "final_loss": rows[-1]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--settings", default=",".join(SETTINGS))
    p.add_argument("--out", default=None, help="also write the rows as JSON to this file")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, data = build(work, a.hidden, a.layers, pairs=8 * a.steps)
        rows = [run(n, model, data, work / n, a.steps, a.threads) for n in a.settings.split(",")]
    print(f"model hidden {a.hidden} × {a.layers} layers, {a.steps} steps of 8 pairs, {a.threads} thread(s)")
    print(f"{'setting':16s} {'peak RSS MB':>11s} {'process s':>9s} {'train s':>8s}  reference")
    for r in rows:
        print(
            f"{r['setting']:16s} {r['peak_rss_mb']:11.1f} {r['process_s']:9.2f} {r['train_s']:8.2f}  {r['reference']}"
        )
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
