"""Benchmark `tether world build` against issue 3's targets and print a markdown report.

Targets: the build takes <= 5 minutes on 2 CPU cores; the base model reaches >= 95% knowledge accuracy and
>= 0.9 general alignment, and scores low on personas of heterogeneity >= 2 (room to personalize).

    python benchmarks/world_build.py [--out benchmarks/results/world_build.json]

The build runs as a user would run it (`python -m tether.cli world build`) in a fresh, empty cache, then
once more to time the cache hit. Knowledge and alignment come from the world suite; the persona table
scores the base model's greedy answers to the held-out prompts under every persona.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    """CPU model, core count, torch threads and the current load average."""
    import torch

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_1_5_15": list(os.getloadavg())}  # fmt: skip


def timed_build(env: dict) -> tuple[float, float, str]:
    """Run `tether world build` in a subprocess; (wall seconds, its CPU seconds, its last output line)."""
    start, cpu = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(
        [sys.executable, "-m", "tether.cli", "world", "build", "--progress", "false"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"world build failed:\n{proc.stderr}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    return time.time() - start, cpu_seconds, proc.stdout.strip().splitlines()[-1]


def evaluate(model_dir: str) -> dict:
    """Knowledge, alignment and per-persona scores of the model in `model_dir` on the default world."""
    from tether.evaluate import score_responses
    from tether.generation import generate
    from tether.models import load_model, load_tokenizer
    from tether.stats import summarize
    from tether_lab.world import PERSONAS, WorldSettings, persona_score, world_suite
    from tether_lab.world.evaluation import prompts_of

    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    world = WorldSettings().world()
    start = time.time()
    suite = world_suite(model, tok, world)
    prompts = prompts_of(world, "test")
    answers = generate(model, tok, prompts, max_new_tokens=96)
    by_level = defaultdict(list)
    personas = {}
    for p in PERSONAS.values():
        scores = score_responses(partial(persona_score, world, p), prompts, answers)
        personas[p.name] = {"heterogeneity": p.heterogeneity, **summarize(scores)}
        by_level[p.heterogeneity] += scores
    return {
        "knowledge_accuracy": suite["knowledge_accuracy"],
        "general_alignment": suite["general_alignment"],
        "persona_score_by_heterogeneity": {k: summarize(v) for k, v in sorted(by_level.items())},
        "persona_scores": personas,
        "samples": suite["samples"],
        "eval_seconds": round(time.time() - start, 1),
    }


def report(result: dict) -> str:
    """The markdown section for docs/world_benchmark.md."""
    m, ev = result["machine"], result["eval"]
    k, a = ev["knowledge_accuracy"], ev["general_alignment"]

    def ci(x):
        return f"{x['mean']:.3f} [{x['ci95_low']:.3f}, {x['ci95_high']:.3f}] (n={x['n']})"

    lines = [
        f"Date: {result['date']}  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}; load average before/after: {m['load_average_1_5_15'][0]:.2f} / "
        f"{result['load_average_after'][0]:.2f}  ",
        "Command: `python benchmarks/world_build.py` (runs `tether world build` in an empty cache)",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| build <= 300 s | {result['build_seconds']:.0f} s wall, "
        f"{result.get('build_cpu_seconds', float('nan')):.0f} s CPU (cache hit: {result['cached_seconds']:.1f} s) "
        f"| {'yes' if result['build_seconds'] <= 300 else 'NO'} |",
        f"| knowledge accuracy >= 0.95 | {ci(k)} | {'yes' if k['mean'] >= 0.95 else 'NO'} |",
        f"| general alignment >= 0.9 | {ci(a)} | {'yes' if a['mean'] >= 0.9 else 'NO'} |",
        "",
        "Base model's persona score on held-out prompts, by heterogeneity (a persona-style answer scores 1.0):",
        "",
        "| heterogeneity | persona score (mean [95% CI]) |",
        "|---|---|",
    ]
    lines += [f"| {level} | {ci(s)} |" for level, s in ev["persona_score_by_heterogeneity"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/world_build.json"))
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "TETHER_CACHE": cache}
        build_seconds, cpu_seconds, line = timed_build(env)
        cached_seconds, _, _ = timed_build(env)
        model_dir = line.rsplit(": ", 1)[1]
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": info,
            "build_seconds": round(build_seconds, 1),
            "build_cpu_seconds": round(cpu_seconds, 1),
            "cached_seconds": round(cached_seconds, 1),
            "build_report": json.loads(Path(model_dir, "build_report.json").read_text()),
            "eval": evaluate(model_dir),
        }
    result["load_average_after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(report(result))


if __name__ == "__main__":
    main()
