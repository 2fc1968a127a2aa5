"""Peak memory of the log-prob head (LM head + log-softmax + gather, forward and backward): whole vs chunked.

Run (from the repository root; no model needed, the head is built at SmolLM2-135M's shape):

    .venv/bin/python benchmarks/bench_logprob_head.py                  # T = 1,152 and 3,072 positions
    flags: --positions 1152,3072 --hidden 576 --vocab 49152 --chunks 0,256,64 --out PATH

Method
- The head alone, as `tether.logprob_head.head_logps` runs it inside a training step: hidden states (T, H) that
  require a gradient, a bias-free `nn.Linear(H, V)` (frozen, as under LoRA, or trained, as in full fine-tuning),
  labels (T,); forward, then backward of a weighted sum of the log-probs. T = 1,152 is 8 pairs × 2 completions ×
  72 tokens (the job of `bench_job.py`), 3,072 = 8 × 3 (BAPO) × 128.
- Memory is load-independent, so no timing is taken (the script prints none). Peak = the process's resident
  high-water mark during forward + backward (VmHWM, restarted just before through /proc/self/clear_refs) minus
  what was resident just before: the inputs, the weight and its gradient buffer (trained head) are allocated
  before and not counted; tensors this large are mmap-ed by malloc and returned when freed, so the mark follows
  the live tensors. For the whole head (chunk 0) it is what `gather_logps(head(hidden), labels)` holds: the
  logits, their softmax and their gradient. Linux only.
- Each setting runs in its own worker process (one torch thread) after a tiny warm-up step on small tensors, so
  kernel initialisation is not counted and nothing is reused between settings.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_mib(positions: int, hidden: int, vocab: int, chunk: int, trained: bool) -> dict:
    """Peak resident memory (MiB) of one forward + backward of the head above what was resident before it, and the
    log-prob sum (a sanity value)."""
    import torch

    from tether.logprob_head import head_logps

    torch.set_num_threads(1)

    def inputs(t, v):
        g = torch.Generator().manual_seed(0)
        head = torch.nn.Linear(hidden, v, bias=False)
        with torch.no_grad():
            head.weight.normal_(0, hidden**-0.5, generator=g)
        head.weight.requires_grad_(trained)
        if trained:
            head.weight.grad = torch.zeros_like(head.weight)  # the gradient buffer exists before the step
        h = torch.randn(t, hidden, generator=g, requires_grad=True)
        return head, h, torch.randint(0, v, (t,), generator=g), torch.linspace(-1, 1, t)

    def step(head, h, labels, weights, c):
        out = head_logps(head, h, labels, c)
        (out * weights).sum().backward()
        return out

    step(*inputs(8, 64), min(chunk, 4))  # kernels and their scratch space initialised outside the measurement
    args = inputs(positions, vocab)
    gc.collect()
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from what is resident now
    out = step(*args, chunk)
    peak = _status_kib("VmHWM") - before
    return {"peak_mib": peak / 1024, "logits_mib": positions * vocab * 4 / 2**20, "sum_logps": float(out.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--positions", default="1152,3072")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--chunks", default="0,256,64")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "logprob_head_memory.json"))
    p.add_argument("--worker", nargs=3, type=int, metavar=("T", "CHUNK", "TRAINED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        t, chunk, trained = args.worker
        print(json.dumps(peak_mib(t, args.hidden, args.vocab, chunk, bool(trained))))
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    rows = []
    for t in map(int, args.positions.split(",")):
        for trained in (0, 1):
            for chunk in map(int, args.chunks.split(",")):
                cmd = [sys.executable, __file__, "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
                cmd += ["--worker", str(t), str(chunk), str(trained)]
                res = json.loads(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
                rows.append({"positions": t, "head": "trained" if trained else "frozen", "chunk": chunk, **res})
                print(
                    f"T {t:5d}  {rows[-1]['head']:<7}  chunk {chunk:4d}: peak {res['peak_mib']:8.1f} MiB "
                    f"(one T × V float32 logits tensor: {res['logits_mib']:.1f} MiB; Σ log p {res['sum_logps']:.3f})",
                    flush=True,
                )
    settings = {"hidden": args.hidden, "vocab": args.vocab, "threads": 1}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
