"""Sampling throughput and the online step with each sampler, on SmolLM2-135M-Instruct (issue 25): vLLM's server
(`--sampler vllm`) vs tether's own sampler vs transformers' `model.generate`.

Run on an IDLE machine, from the repository root (needs `make smollm2` and `make vllm`):

    .venv/bin/python benchmarks/bench_sampling.py --vllm_python .venv-vllm/bin/python
    flags: --rows 16,64 --new-tokens 64 --repeats 3 --steps 8 --phases 4 --prompts-per-step 8 --skip-online
           --skip-vllm (tether's sampler and generate only) --out PATH --workdir DIR

Method
- Throughput: rows/2 chat prompts × 2 samples each (pairs, as the online loop samples), temperature 1, top-k 50,
  exactly --new-tokens new tokens (no early stop: tether's sampler without EOS ids, `generate` with
  min_new_tokens, vLLM with ignore_eos), float32; best of --repeats after one warm-up call. tokens/s = rows × new
  tokens / seconds. tether's sampler and `generate` run in a worker with 2 torch threads; vLLM's server computes on
  both cores (VLLM_CPU_OMP_THREADS_BIND=0-1, VLLM_CPU_NUM_OF_RESERVED_CPU=0) and is timed from the client (HTTP, its
  scheduler and detokenization included), one request per prompt with n = 2, as `--sampler vllm` sends them.
- The matmul-bound limit: a new token costs 2·P FLOPs (P = SmolLM2's parameters, the tied head counted once), so
  no sampler exceeds F / (2·P) tokens/s at the measured float32 matmul peak F (1024² matmuls, 2 threads, best of
  10, measured in the worker just before); each result is also given as a fraction of that limit.
- The online step: `tether online` on SmolLM2 with LoRA (r 16), --steps steps in --phases phases (so a weight sync
  at every phase start), --prompts-per-step prompts, up to --new-tokens tokens, a Python reward (distinct words,
  negated); seconds per step = the run's own elapsed time / steps (a server's start is outside it), with the
  breakdown of results.json and the sync time. Thread placement: with tether's sampler the trainer has both cores
  (2 torch threads); with vLLM the server computes on core 1 (VLLM_CPU_OMP_THREADS_BIND=1) and the trainer runs on
  core 0 (taskset -c 0, 1 torch thread), so neither spins against the other — and each waits while the other
  works (sampling, then re-scoring and the update), so half the machine idles in each part of a step.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo_step import matmul_flops  # noqa: E402

MODEL = "smollm2-135m-instruct"
TOPICS = "bees rivers cities clocks bread music winter ships gardens stars trains paper".split()


def chat_prompts(n: int) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]} ({i})."}] for i in range(n)]


def distinct_words(prompts, responses):
    """The reward of the online runs (a Python callable oracle): fewer distinct words is better."""
    return [-float(len(set(r.split()))) for r in responses]


# ------------------------------------------------------------------------------------------------ the worker


def local_throughput(rows_list: list[int], new_tokens: int, repeats: int, ids_out: Path) -> dict:
    """tether's sampler and model.generate on 2 torch threads, the matmul peak, the prompts' ids for vLLM."""
    import torch

    from tether.generation import prompt_ids
    from tether.models import load_model, load_tokenizer

    torch.set_num_threads(2)
    peak, _ = matmul_flops(2)
    model, tok = load_model(MODEL).eval(), load_tokenizer(MODEL)
    params = sum(p.numel() for p in model.parameters())  # tied embeddings are one parameter
    out = {"matmul_gflops": peak / 1e9, "parameters": params, "limit_tok_s": peak / (2 * params), "rows": {}}
    ids = {}
    for rows in rows_list:
        prompts = [prompt_ids(tok, p) for p in chat_prompts(rows // 2)]
        ids[rows] = prompts
        runs = {"tether": tether_sample, "generate": hf_generate}
        out["rows"][rows] = {
            name: best_seconds(functools.partial(fn, model, tok, prompts, new_tokens), repeats)
            for name, fn in runs.items()
        }
    ids_out.write_text(json.dumps(ids))
    return out


def tether_sample(model, tok, prompts, new_tokens: int) -> None:
    from tether.sampling import sample_responses

    seeds = list(range(len(prompts)))
    sample_responses(model, prompts, seeds, n=2, max_new_tokens=new_tokens, pad_id=tok.pad_token_id)  # no EOS ids


def hf_generate(model, tok, prompts, new_tokens: int) -> None:
    import torch

    from tether.generation import left_pad

    x, mask = left_pad(prompts, tok.pad_token_id, "cpu")
    with torch.no_grad():
        model.generate(
            input_ids=x,
            attention_mask=mask,
            do_sample=True,
            top_k=50,
            num_return_sequences=2,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------------------ vLLM and runs


def start_server(python: str, work: Path, cores: str):
    from tether.models import resolve_model_path
    from tether.vllm_server import ManagedServer, free_port, server_command

    os.environ.update(VLLM_CPU_OMP_THREADS_BIND=cores, VLLM_CPU_NUM_OF_RESERVED_CPU="0", VLLM_CPU_KVCACHE_SPACE="2")
    port = free_port()
    command = server_command(python, resolve_model_path(MODEL), port, max_lora_rank=16, dtype="float32")
    server = ManagedServer(command, work / f"server-{cores}.log", "127.0.0.1", port)
    server.wait_ready(900)
    return server


def vllm_throughput(server, ids: dict, new_tokens: int, repeats: int) -> dict:
    from tether.vllm_client import BASE_MODEL, VllmClient

    client = VllmClient(server.url)
    sampling = dict(max_tokens=new_tokens, temperature=1.0, top_k=50, top_p=1.0, ignore_eos=True)
    out = {}
    for rows, prompts in ids.items():
        seeds = [i * 1000 for i in range(len(prompts))]
        ask = functools.partial(client.complete_all, BASE_MODEL, prompts, seeds, 2, sampling)
        out[int(rows)] = best_seconds(ask, repeats)
    return out


def online_run(work: Path, name: str, args, extra: list[str], env: dict, prefix: list[str] = ()) -> dict:
    """One `tether online` run; its seconds per step and results.json's breakdown."""
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*prefix, sys.executable, "-m", "tether.cli", "online", "--model", MODEL, "--prompt_file"]
    cmd += [str(work / "prompts.jsonl"), "--oracle", "callable:bench_sampling:distinct_words", "--output_dir", str(out)]
    cmd += ["--steps", str(args.steps), "--phases", str(args.phases), "--prompts_per_step", str(args.prompts_per_step)]
    cmd += ["--max_new_tokens", str(args.new_tokens), "--lora", "true", "--lora_r", "16", "--lora_alpha", "32"]
    cmd += ["--learning_rate", "1e-5", "--save_steps", "0", "--progress", "false", "--max_length", "192", *extra]
    full_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    with open(work / f"{name}.log", "w") as log:
        subprocess.run(cmd, env={**full_env, **env}, stdout=log, stderr=subprocess.STDOUT, check=True)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    last = metrics[-1]
    return {
        "s_per_step": last["elapsed_s"] / args.steps,
        "seconds": results["seconds"],
        "sync_s": last.get("sync_s"),
        "syncs": last.get("syncs"),
    }


def table(res: dict) -> str:
    limit = res["local"]["limit_tok_s"]
    lines = [f"matmul peak {res['local']['matmul_gflops']:.0f} GFLOP/s → limit {limit:.0f} tokens/s (2·P per token)"]
    lines.append("| rows | sampler | s | tokens/s | of the limit |")
    lines.append("|---|---|---|---|---|")
    for rows, times in res["local"]["rows"].items():
        both = {**times, **({"vLLM (2 cores)": res["vllm"][int(rows)]} if "vllm" in res else {})}
        for name, s in both.items():
            tok_s = int(rows) * res["new_tokens"] / s
            lines.append(f"| {rows} | {name} | {s:.2f} | {tok_s:.0f} | {tok_s / limit:.0%} |")
    for name, run in res.get("online", {}).items():
        lines.append(f"online step, {name}: {run['s_per_step']:.2f} s/step; {run['seconds']}; sync {run['sync_s']} s")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vllm_python", default=os.environ.get("TETHER_VLLM_PYTHON", ".venv-vllm/bin/python"))
    p.add_argument("--rows", default="16,64")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--phases", type=int, default=4)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--skip-online", action="store_true", help="skip the online-step comparison")
    p.add_argument(
        "--skip-vllm", action="store_true", help="tether's sampler and generate only (no vLLM environment needed)"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "sampling.json"))
    p.add_argument("--workdir", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "tether-bench-sampling"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    work = Path(args.workdir)
    rows = [int(r) for r in args.rows.split(",")]
    if args.worker:
        res = local_throughput(rows, args.new_tokens, args.repeats, work / "ids.json")
        return (work / "local.json").write_text(json.dumps(res))
    work.mkdir(parents=True, exist_ok=True)
    worker = [sys.executable, __file__, "--worker", "--workdir", str(work), "--rows", args.rows]
    worker += ["--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    subprocess.run(worker, env={**os.environ, "OMP_NUM_THREADS": "2"}, check=True)
    res = {"new_tokens": args.new_tokens, "local": json.loads((work / "local.json").read_text())}
    if not args.skip_vllm:
        server = start_server(args.vllm_python, work, "0-1")
        try:
            res["vllm"] = vllm_throughput(
                server, json.loads((work / "ids.json").read_text()), args.new_tokens, args.repeats
            )
        finally:
            server.stop()
    if not (args.skip_online or args.skip_vllm):
        res["online"] = online_step(work, args)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))


def online_step(work: Path, args) -> dict:
    """The online step with each sampler, the threads placed as the module docstring says."""
    prompts = chat_prompts(args.steps * args.prompts_per_step)
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": m}) + "\n" for m in prompts))
    runs = {"tether (2 threads)": online_run(work, "online-tether", args, [], {"OMP_NUM_THREADS": "2"})}
    server = start_server(args.vllm_python, work, "1")
    try:
        vllm = ["--sampler", "vllm", "--vllm_url", server.url]
        runs["vLLM (server core 1, trainer core 0)"] = online_run(
            work, "online-vllm", args, vllm, {"OMP_NUM_THREADS": "1"}, prefix=["taskset", "-c", "0"]
        )
    finally:
        server.stop()
    return runs


if __name__ == "__main__":
    main()
