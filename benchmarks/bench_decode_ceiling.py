"""What one decoding step of SmolLM2-135M-Instruct can cost at best on this CPU (issue 25): its matrix products
alone, at the sampler's batch, with each layer's weights distinct as in the model (so they stream from memory
rather than sit in cache), against the 1024² matmul peak that sets BENCHMARKS.md's "matmul-bound limit".

Run on an IDLE machine, from the repository root (no model weights needed: the shapes are SmolLM2's):

    .venv/bin/python benchmarks/bench_decode_ceiling.py [--rows 16,64] [--threads 2] [--repeats 5]

Method: for each row count, 30 layers' worth of float32 weights of SmolLM2's shapes (q 576→576, k and v 576→192,
o 576→576, gate and up 576→1536, down 1536→576) plus the tied head (576→49,152), one product per weight per step
in model order, best of --repeats steps after a warm-up. Prints the products' GFLOP/s, the tokens/s a sampler
would reach if the step were these products and nothing else (rows / step seconds), and that as a fraction of
the matmul-bound limit (peak / 2·P tokens/s) — the most a sampler that runs each product once can reach here.
Raw JSON: benchmarks/results/decode_ceiling.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo_step import matmul_flops  # noqa: E402

HIDDEN, INTER, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49_152
# q, k, v, o, gate, up, down
LAYER_SHAPES = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, INTER), (HIDDEN, INTER)]
LAYER_SHAPES.append((INTER, HIDDEN))
PARAMETERS = 134_515_008  # SmolLM2-135M's parameters, the tied head counted once (as bench_sampling counts them)


def step_seconds(rows: int, repeats: int) -> tuple[float, float]:
    weights = [torch.randn(k, n) for _ in range(LAYERS) for k, n in LAYER_SHAPES] + [torch.randn(HIDDEN, VOCAB)]
    inputs = {k: torch.randn(rows, k) for k in (HIDDEN, INTER)}
    flops = sum(2 * rows * w.shape[0] * w.shape[1] for w in weights)

    def step():
        for w in weights:
            inputs[w.shape[0]] @ w

    step()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return best, flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16,64", help="comma-separated batch sizes (rows decoded together)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per row count (best is kept)")
    ap.add_argument("--out", default="benchmarks/results/decode_ceiling.json", help="raw JSON output")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    peak, _ = matmul_flops(a.threads)
    limit = peak / (2 * PARAMETERS)
    out = {"threads": a.threads, "matmul_gflops": peak / 1e9, "limit_tok_s": limit, "rows": {}}
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; matmul-bound limit {limit:.0f} tokens/s")
    for rows in (int(r) for r in a.rows.split(",")):
        seconds, flops = step_seconds(rows, a.repeats)
        tok_s = rows / seconds
        gflops = flops / seconds / 1e9
        out["rows"][rows] = {"step_seconds": seconds, "gflops": gflops, "tok_s": tok_s, "of_limit": tok_s / limit}
        print(
            f"{rows} rows: products alone {seconds * 1e3:.1f} ms per step, {flops / seconds / 1e9:.0f} GFLOP/s, "
            f"{tok_s:.0f} tokens/s = {tok_s / limit:.0%} of the limit"
        )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
