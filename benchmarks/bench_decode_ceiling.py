"""What one decoding step of a Llama-style model (bench_sampling's, SmolLM2-135M-Instruct, by default) can cost at
best on this CPU (issue 25): its matrix products alone, at the sampler's batch, with each layer's weights distinct
as in the model (so they stream from memory rather than sit in cache), against the 1024² matmul peak that sets
BENCHMARKS.md's "matmul-bound limit".

Run on an IDLE machine, from the repository root (only the model's config.json is read, never its weights):

    .venv/bin/python benchmarks/bench_decode_ceiling.py [--model NAME_OR_DIR] [--rows 16,64] [--threads 2]

Method: for each row count, random float32 weights of the model's shapes, read from its config (SmolLM2-135M: 30
layers of q 576→576, k and v 576→192, o 576→576, gate and up 576→1536, down 1536→576, and the tied head
576→49,152), one product per weight per step in model order, best of --repeats steps after a warm-up. Prints
the products' GFLOP/s, the tokens/s a sampler would reach if the step were these products and nothing else
(rows / step seconds), and that as a fraction of the matmul-bound limit (peak / 2·P tokens/s) — the most a
sampler that runs each product once can reach here.
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
from bench_sampling import MODEL  # noqa: E402  (the sampler benchmark's model)


def model_shapes(model: str) -> tuple[list[tuple[int, int]], int]:
    """(every weight's (in, out) in one step's order: each layer's q, k, v, o, gate, up, down, then the head; the
    parameter count, a tied head counted once as bench_sampling counts it) from the model's config.json."""
    from transformers import AutoConfig

    from tether.models import resolve_model_path

    c = AutoConfig.from_pretrained(resolve_model_path(model))
    hidden, inter, vocab = c.hidden_size, c.intermediate_size, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, getattr(c, "num_key_value_heads", c.num_attention_heads) * head_dim
    layer = [(hidden, q), (hidden, kv), (hidden, kv), (q, hidden), (hidden, inter), (hidden, inter), (inter, hidden)]
    shapes = layer * c.num_hidden_layers + [(hidden, vocab)]
    norms = (2 * c.num_hidden_layers + 1) * hidden
    embed = vocab * hidden * (1 if c.tie_word_embeddings else 2)
    return shapes, sum(k * n for k, n in shapes[:-1]) + embed + norms


def step_seconds(shapes: list[tuple[int, int]], rows: int, repeats: int) -> tuple[float, float]:
    weights = [torch.randn(k, n) for k, n in shapes]
    inputs = {k: torch.randn(rows, k) for k in {k for k, _ in shapes}}
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
    ap.add_argument("--model", default=MODEL, help="a built-in name or a local directory (its config.json is read)")
    ap.add_argument("--rows", default="16,64", help="comma-separated batch sizes (rows decoded together)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per row count (best is kept)")
    ap.add_argument("--out", default="benchmarks/results/decode_ceiling.json", help="raw JSON output")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    shapes, parameters = model_shapes(a.model)
    peak, _ = matmul_flops(a.threads)
    limit = peak / (2 * parameters)
    out = {
        "model": a.model,
        "parameters": parameters,
        "threads": a.threads,
        "matmul_gflops": peak / 1e9,
        "limit_tok_s": limit,
        "rows": {},
    }
    print(f"matmul peak {peak / 1e9:.0f} GFLOP/s; matmul-bound limit {limit:.0f} tokens/s")
    for rows in (int(r) for r in a.rows.split(",")):
        seconds, flops = step_seconds(shapes, rows, a.repeats)
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
