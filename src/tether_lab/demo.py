"""A toy preference task and a tiny model for it: the demo's and the tests' smallest real workload.

Prompts ask about an object's colour; the chosen answer is a polite full sentence, the rejected one a
curt fragment. A tiny Llama (random init) learns to prefer the polite style within a few dozen steps.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

OBJECTS = ["apple", "sky", "leaf", "sun", "rose", "sea", "snow", "coal", "lime", "plum", "sand", "ink", "gold", "rust"]
COLOURS = ["red", "blue", "green", "yellow", "pink", "teal", "white", "black", "olive", "purple", "tan", "navy"]


def toy_preferences(n: int, seed: int = 0, conversational: bool = False) -> list[dict]:
    """n preference records in TRL's standard (or conversational) format, with an "id" field."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        obj, col = rng.choice(OBJECTS), rng.choice(COLOURS)
        prompt = f"What colour is the {obj}?"
        chosen = f"The {obj} is {col}, I believe. Thank you for asking!"
        rejected = rng.choice([f"{col}.", f"dunno, {col}?", f"{obj}: {col}"])
        if conversational:
            rows.append(
                {
                    "id": i,
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": chosen}],
                    "rejected": [{"role": "assistant", "content": rejected}],
                }
            )
        else:
            rows.append({"id": i, "prompt": prompt + "\n", "chosen": chosen, "rejected": rejected})
    return rows


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def toy_model(
    path: str | Path, hidden_size: int = 64, num_layers: int = 2, vocab_size: int = 512, seed: int = 0
) -> Path:
    """Train a tokenizer on the toy task's text, build a tiny Llama for it, save both to `path`."""
    from tether_lab.tiny import tiny_llama, train_tokenizer

    texts = []
    for r in toy_preferences(400, seed=seed + 1):
        texts += [r["prompt"], r["chosen"], r["rejected"]]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_llama(tok, hidden_size=hidden_size, num_layers=num_layers, seed=seed)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_demo(out: str | Path = "out/demo", steps: int = 40) -> dict:
    """Build the toy model and data, train it with DPO and print what it learned (before vs after)."""
    import shutil

    from tether.config import load_config
    from tether.train import TrainConfig, train

    out = Path(out)
    shutil.rmtree(out / "run", ignore_errors=True)
    model = toy_model(out / "model") if not (out / "model" / "config.json").exists() else out / "model"
    write_jsonl(toy_preferences(256, seed=1), out / "train.jsonl")
    write_jsonl(toy_preferences(64, seed=2), out / "eval.jsonl")
    cfg = load_config(
        TrainConfig,
        None,
        dict(
            model=str(model),
            train_file=str(out / "train.jsonl"),
            eval_file=str(out / "eval.jsonl"),
            output_dir=str(out / "run"),
            learning_rate=5e-4,
            max_steps=steps,
            batch_size=8,
            warmup_steps=4,
            eval_steps=10,
            save_steps=20,
            max_length=64,
            max_prompt_length=32,
        ),
    )
    run_dir = train(cfg)
    results = json.loads((run_dir / "results.json").read_text())
    before, after = results["initial_eval"], results["final_eval"]
    print(f"\nDPO on the toy task ({steps} steps, held-out pairs: {results['eval_pairs']})")
    print(f"{'held-out metric':<28}{'before':>10}{'after':>10}")
    for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"):
        print(f"{key:<28}{before['eval_' + key]:>10.3f}{after['eval_' + key]:>10.3f}")
    print(
        f"\nrun directory: {run_dir} (config.yaml, metrics.jsonl, checkpoints/, final/; "
        "report.md with curves in plots/)"
    )
    return results


def _clock(t0: float) -> str:
    m, s = divmod(int(time.perf_counter() - t0), 60)
    return f"[{m}:{s:02d}]"


def main() -> None:
    """`make demo`: the toy DPO run above (seconds); a first study table — DPO (by steps) vs BAPO (by λ) on the
    embedded world (recipe 2) at heterogeneity 2 (four of the quick BAPO study's eight runs, after the world's base
    model is built on first use); then the rest of the quick BAPO study and the quick BPO study, each ending with
    its summary table."""
    from tether_lab.studies import bapo, bpo
    from tether_lab.studies.report_bapo import summary_table as bapo_table
    from tether_lab.studies.report_bpo import summary_table as bpo_table

    t0 = time.perf_counter()
    run_demo()
    print(
        f"\n{_clock(t0)} next, a first study table: DPO vs BAPO on the embedded world at heterogeneity 2 (4 of the "
        f"quick BAPO study's 8 runs; the first time, the world's base model is built first: {BUILD_MINUTES_LOADED})\n",
        flush=True,
    )
    bapo_out = Path("out/demo/study-bapo-quick")
    first = bapo.run_study(quick=True, out=bapo_out, only=[(2, "dpo"), (2, "bapo")])
    print(bapo_table(first))  # the claims need every arm (and 5 seeds): the quick study's table below states them
    print(
        f"\n{_clock(t0)} first look done. The rest: the quick BAPO study's other 4 runs (about {REST_MINUTES['bapo']} "
        f"min on 2 cores) and the quick BPO study (about {REST_MINUTES['bpo']} min, plus {REST_MINUTES['bpo_build']} "
        f"the first time, to build the recipe-1 world and its skewed π_sft): about {sum(REST_MINUTES.values())} "
        "minutes more from a clean cache. Ctrl-C stops; `make demo` again resumes.\n",
        flush=True,
    )
    for name, study, table in (("BAPO", bapo, bapo_table), ("BPO", bpo, bpo_table)):
        out = Path(f"out/demo/study-{name.lower()}-quick")
        t1 = time.perf_counter()
        data = study.run_study(quick=True, out=out)
        print(
            f"\n{_clock(t0)} quick {name} study: {time.perf_counter() - t1:.0f} s; report in {out}/report.md, "
            "figures beside it\n"
        )
        print(table(data), flush=True)


# minutes the rest of `make demo` takes on the 2-core machine under other load (BENCHMARKS.md "make demo")
REST_MINUTES = {"bapo": 7, "bpo": 8, "bpo_build": 14}  # bpo_build: the recipe-1 world (~10) and its skewed π_sft (~4)
BUILD_MINUTES_LOADED = (
    "about 3.5 minutes on an idle 2-core machine (the same 1,100 steps as recipe 1's), 11-15 under heavy load"
)


if __name__ == "__main__":
    main()
