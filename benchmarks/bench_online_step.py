"""Seconds per online DPO step (sampling + annotation + update): `tether online` vs TRL's OnlineDPOTrainer.

Run (from the repository root):

    .venv/bin/python benchmarks/bench_online_step.py                 # tiny and 5m, 12 steps per run
    flags: --models tiny,5m --steps 12 --warmup 3 --threads 1 --new-tokens 32 --out PATH --workdir DIR

Method
- Models and prompts: the tiny (hidden 128 × 2 layers) and 5m (hidden 256 × 4 layers) Llamas and the 64-token
  prompts of benchmarks/bench_dpo_step.py (`build_workdir`), random init, float32, CPU, --threads torch threads.
- Same work on both sides: 8 prompts per step, 2 responses per prompt sampled at temperature 1.0, top-k 50,
  exactly --new-tokens new tokens (the random models never emit EOS early), a Python callable reward (the
  number of distinct words of the response, negated; the same function on both sides), DPO (sigmoid) with
  β = 0.1, plain torch AdamW (lr 1e-6, linear decay, no warm-up), clipping at 1.0, metrics logged every step.
- TRL: `trl.experimental.online_dpo.OnlineDPOTrainer`: samples from the current policy every step, a frozen
  reference copy (its default, π_ref = π_sft), generation through `model.generate` (no vLLM). tether samples
  every step too (phases = steps), twice: `reference: initial` (the same algorithm and work: one reference
  forward per step) and `reference: behavior` (BPO: log π_β comes from the sampling pass, no reference forward).
  TRL's OnlineDPOConfig defaults to gradient_checkpointing=True, which also turns the key/value cache off during
  generation (about 16× slower sampling here); the benchmark sets it to False, as tether does by default.
- Timing: wall-clock stamps at the end of every step (TRL: a TrainerCallback; tether: the loop's per-step hook),
  first --warmup steps dropped, median shown. Breakdown (averaged over ALL steps, warm-up included, so TRL's
  "update" also carries its start-up): tether's own per-phase timers (results.json "seconds"); TRL's
  `_generate` and reward calls are wrapped with timers, the rest of trainer.train() is "update".
Each run is its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_dpo_step import build_workdir  # noqa: E402

PROMPTS_PER_STEP, LR, BETA, SEED, TOP_K = 8, 1e-6, 0.1, 42, 50


def reward(prompts, responses):
    return [-float(len(set(r.split()))) for r in responses]


def trl_reward(prompts, completions, **kwargs):
    return reward(prompts, completions)


def prompts(work: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (work / "base.jsonl").read_text().splitlines()]
    return [r["prompt"] for r in rows[:n]]


def run_tether(work: Path, model: str, mode: str, steps: int, new_tokens: int) -> dict:
    from tether.config import load_config
    from tether.train import OnlineConfig, online, online_train

    stamps: list[float] = []
    original = online.crash_point
    online.crash_point = lambda name, step: (
        name == "after_step" and stamps.append(time.perf_counter()),
        original(name, step),
    )
    out = work / f"run_tether_{model}_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    pf = work / "prompts.jsonl"
    pf.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts(work, PROMPTS_PER_STEP * steps)))
    ref = dict(reference="initial" if mode == "initial" else "behavior", phases=steps)  # sample every step, like TRL
    cfg = load_config(
        OnlineConfig,
        None,
        dict(
            model=str(work / f"model_{model}"),
            prompt_file=str(pf),
            output_dir=str(out),
            oracle="callable:bench_online_step:reward",
            steps=steps,
            prompts_per_step=PROMPTS_PER_STEP,
            max_new_tokens=new_tokens,
            temperature=1.0,
            top_k=TOP_K,
            loss="dpo",
            beta=BETA,
            learning_rate=LR,
            lr_scheduler="linear",
            warmup_steps=0,
            max_grad_norm=1.0,
            seed=SEED,
            max_length=256,
            max_prompt_length=128,
            logging_steps=1,
            save_steps=0,
            progress=False,
            **ref,
        ),
    )
    online_train(cfg)
    res = json.loads((out / "results.json").read_text())
    return {"stamps": stamps, "breakdown": res["seconds"]}


def run_trl(work: Path, model: str, steps: int, new_tokens: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    stamps: list[float] = []
    spent = {"sample_s": 0.0, "annotate_s": 0.0}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    def timed(fn, key):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[key] += time.perf_counter() - t

        return wrapper

    path = work / f"model_{model}"
    args = OnlineDPOConfig(
        output_dir=str(work / f"run_trl_{model}"),
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        per_device_train_batch_size=PROMPTS_PER_STEP,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        optim="adamw_torch",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=BETA,
        loss_type="sigmoid",
        max_new_tokens=new_tokens,
        temperature=1.0,
        top_k=TOP_K,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    trainer = OnlineDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        reward_funcs=timed(trl_reward, "annotate_s"),
        args=args,
        processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts(work, PROMPTS_PER_STEP * steps)]),
        callbacks=[Clock()],
    )
    trainer.reward_funcs = [
        timed(f, "annotate_s") if not isinstance(f, torch.nn.Module) else f for f in trainer.reward_funcs
    ]
    trainer._generate = timed(trainer._generate, "sample_s")
    t0 = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t0
    return {
        "stamps": stamps,
        "breakdown": {**spent, "update_s": total - spent["sample_s"] - spent["annotate_s"], "total": total},
    }


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    if args.worker == "trl":
        res = run_trl(work, args.model, args.steps, args.new_tokens)
    else:
        res = run_tether(work, args.model, args.worker.split(":")[1], args.steps, args.new_tokens)
    Path(args.result).write_text(json.dumps(res))


def spawn(work: Path, tool: str, model: str, steps: int, threads: int, new_tokens: int) -> dict:
    result = work / f"result_{tool.replace(':', '_')}_{model}.json"
    log = result.with_suffix(".log")
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TQDM_DISABLE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        TETHER_CACHE=str(work / "tether_cache"),
        HF_DATASETS_CACHE=str(work / "hf_datasets"),
    )
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        "--model",
        model,
        "--steps",
        str(steps),
        "--work",
        str(work),
        "--result",
        str(result),
        "--threads",
        str(threads),
        "--new-tokens",
        str(new_tokens),
    ]
    with log.open("w") as f:
        code = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(
            f"{tool}/{model} failed (exit {code}); last lines of {log}:\n"
            + "".join(log.read_text().splitlines(True)[-25:])
        )
    return json.loads(result.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,5m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "online_step.json"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    models = args.models.split(",")
    work = Path(args.workdir or Path(os.environ.get("TMPDIR", "/tmp")) / "tether-bench-online")
    work.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)  # no OpenMP pool here that could spin (OMP_WAIT_POLICY=ACTIVE) during the runs
    build_workdir(work, models, PROMPTS_PER_STEP * args.steps)
    rows = []
    print(
        f"{'model':6} {'tool':22} {'s/step':>8} {'vs TRL':>7}   "
        "breakdown per step (sample / annotate / reference / update)"
    )
    for model in models:
        res = {
            tool: spawn(work, tool, model, args.steps, args.threads, args.new_tokens)
            for tool in ("trl", "tether:initial", "tether:behavior")
        }
        med = {}
        for tool, r in res.items():
            times = [b - a for a, b in zip(r["stamps"][:-1], r["stamps"][1:])][max(args.warmup - 1, 0) :]
            med[tool] = statistics.median(times)
        for tool, r in res.items():
            br = {k: v / args.steps for k, v in r["breakdown"].items() if k != "total"}
            parts = " / ".join(f"{br.get(k, 0.0):.3f}" for k in ("sample_s", "annotate_s", "reference_s", "update_s"))
            speed = med["trl"] / med[tool]
            print(f"{model:6} {tool:22} {med[tool]:8.3f} {speed:6.2f}×   {parts}")
            rows.append(
                {
                    "model": model,
                    "tool": tool,
                    "median_s_per_step": med[tool],
                    "speedup_vs_trl": speed,
                    "breakdown_s_per_step": br,
                    "steps": args.steps,
                    "warmup": args.warmup,
                }
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "threads": args.threads,
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                "new_tokens": args.new_tokens,
                "prompts_per_step": PROMPTS_PER_STEP,
                "load_average": os.getloadavg(),
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
