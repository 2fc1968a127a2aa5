"""`tether study bapo --model smollm2-135m-instruct`: BAPO vs DPO and its baselines with LoRA on a real chat model,
protocol version 3 (the rules: bapo_llm_rules.py; the report: report_bapo_llm.py).

Stages, each run saved to results.json as it finishes (an interrupted study continues with `--resume`):
1. calibration, on a tuning data seed (data_seed + 1000) of the primary persona: DPO over an lr × β grid, IPO,
   SLiC, DPO+NLL and BAPO over λ, all by steps, and the null run; the gates are checked and printed, and the
   selection rule picks the confirmatory arms and their evaluation steps. A failed gate stops the study there.
2. confirmatory: for each study seed s, its own preference data (data seed data_seed + s) and model seed s; the
   selected arms on the primary persona (seeds `seeds`) and on the replication persona (`replication_seeds`).

Data (tether_lab.instructed): for each training prompt, chosen = the model's answer WITH the persona's instruction,
rejected = its answer without, both sampled at temperature 0.7, top-k 50, seeded by the data seed. The null run
trains on chosen = the base model's own greedy answer. Every evaluation point: the 399-question knowledge probe
(per-question right/wrong, so churn is exact) and the persona scores of greedy answers to 50 held-out prompts, on
the LoRA weights merged into the base.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from tether.config import TetherError, load_config
from tether.evaluate import multiple_choice_correct
from tether.files import read_json_lines, write_text_atomic
from tether.generation import generate
from tether.stats import win_rates
from tether_lab.instructed import general_prompts, get_instructed_persona, instructed_preference_records
from tether_lab.probes import knowledge_questions
from tether_lab.studies import bapo_llm_rules as rules
from tether_lab.studies.bapo_llm_rules import TUNING_OFFSET, Arm, LlmBapoProtocol
from tether_lab.studies.common import StudyResults, set_threads

log = logging.getLogger("tether")


# ---------------------------------------------------------------- data and measurements


def _data(out: Path, p: LlmBapoProtocol, persona: str, data_seed: int, model, tok) -> Path:
    """The persona's preference file of one data seed under out/data (generated once)."""
    path = out / "data" / f"{persona}-data{data_seed}.jsonl"
    if path.exists():
        return path
    prompts = general_prompts("train")[: p.train_prompts]
    kw = dict(max_new_tokens=p.max_new_tokens, do_sample=True, temperature=p.data_temperature, top_k=50,
              batch_size=16, progress=True)  # fmt: skip
    default = _default_answers(out, p, data_seed, model, tok, prompts, kw)
    records = instructed_preference_records(
        model, tok, get_instructed_persona(persona), prompts, default=default, seed=10 * data_seed + 2, **kw
    )
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return path


def _default_answers(out, p, data_seed, model, tok, prompts, kw) -> list[str]:
    """The uninstructed sampled answers of a data seed (shared by both personas' data of that seed)."""
    path = out / "data" / f"default-data{data_seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    answers = generate(model, tok, prompts, seed=10 * data_seed + 1, **kw)
    write_text_atomic(path, json.dumps(answers))
    return answers


def _null_data(out: Path, p: LlmBapoProtocol, data_file: Path, model, tok) -> Path:
    """The null run's pairs: chosen = the base model's greedy answer to the prompt, rejected as in `data_file`."""
    path = data_file.with_name(data_file.stem + "-null.jsonl")
    if path.exists():
        return path
    greedy_path = out / "data" / "greedy.json"
    prompts = general_prompts("train")[: p.train_prompts]
    if greedy_path.exists():
        greedy = json.loads(greedy_path.read_text())
    else:
        greedy = generate(model, tok, prompts, max_new_tokens=p.max_new_tokens, batch_size=16, progress=True)
        write_text_atomic(greedy_path, json.dumps(greedy))
    rows = [
        {**r, "chosen": [{"role": "assistant", "content": greedy[r["id"]]}]}
        for r in read_json_lines(data_file)
        if greedy[r["id"]].strip() and greedy[r["id"]] != r["rejected"][0]["content"]
    ]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def measure(model, tok, p: LlmBapoProtocol) -> dict:
    """Per-question probe results, and each persona's scores of the greedy held-out answers."""
    correct = multiple_choice_correct(model, tok, knowledge_questions(), batch_size=32)
    answers = generate(model, tok, general_prompts("test")[: p.eval_prompts], max_new_tokens=p.max_new_tokens,
                       batch_size=16)  # fmt: skip
    scores = {name: [get_instructed_persona(name).score(a) for a in answers] for name in p.personas}
    return {"correct": "".join("1" if c else "0" for c in correct), "scores": scores, "answers": answers}


def point(step: int, m: dict, base: dict, persona: str) -> dict:
    """One evaluation point relative to the base model's measurement."""
    right, base_right = [c == "1" for c in m["correct"]], [c == "1" for c in base["correct"]]
    lost = sum(b and not r for r, b in zip(right, base_right, strict=True))
    gained = sum(r and not b for r, b in zip(right, base_right, strict=True))
    mine, theirs = m["scores"][persona], base["scores"][persona]
    return {
        "step": step, "knowledge": _mean(right), "right_to_wrong": lost, "wrong_to_right": gained,
        "net_loss": lost - gained, "retained": 1 - lost / max(1, sum(base_right)),
        "persona_score": _mean(mine), "gain": _mean(mine) - _mean(theirs),
        "win_rate": _mean(win_rates(mine, theirs)), "correct": m["correct"], "sample": m["answers"][0],
    }  # fmt: skip


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _evaluate_run(run_dir: Path, steps: list[int], p: LlmBapoProtocol, tok, base: dict, persona: str) -> list[dict]:
    """A point per evaluated step: the step's LoRA tensors (the final adapter, or a checkpoint's) merged into the
    base weights (PEFT's merge_and_unload on a fresh copy), then measured."""
    from safetensors.torch import load_file

    from tether.models import load_adapter

    points = []
    for step in steps:
        model = load_adapter(run_dir / "final").eval()
        if step != p.steps:
            weights = load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")
            result = model.load_state_dict(weights, strict=False)
            mine = {n for n, _ in model.named_parameters() if "lora_" in n}
            if result.unexpected_keys or set(weights) != mine:
                raise TetherError(f"{run_dir}: checkpoint of step {step} does not match the adapter")
        merged = model.merge_and_unload().eval()
        points.append(point(step, measure(merged, tok, p), base, persona))
    return points


# ---------------------------------------------------------------- one run


def _save_every(steps: list[int], last: int) -> int:
    """A checkpoint interval that hits every evaluated step before the last (0: none needed)."""
    inner = [s for s in steps if s != last]
    return math.gcd(*inner) if inner else 0


def train_config(p: LlmBapoProtocol, arm: Arm, data_file: Path, run_dir: Path, out: Path, seed: int, steps: list[int]):
    """DPO and the baselines run as BAPO with λ = 0 (the same objective; log π_θ(y_b) is then logged for them
    too); the null run is plain DAP on its own pairs. Padded batches and a whole LM head: protocol 3's runs began
    before tether packed batches by default, and a resumed study computes as its first runs did."""
    from tether.train import TrainConfig

    return load_config(TrainConfig, None, dict(
        model=p.model, train_file=str(data_file), output_dir=str(run_dir),
        method="dap" if arm.kind == "null" else "bapo", anchor_weight=None if arm.kind == "null" else arm.anchor_weight,
        loss=arm.loss, beta=arm.beta, nll_weight=arm.nll_weight, learning_rate=arm.learning_rate,
        lr_scheduler="constant", warmup_steps=0, max_steps=p.steps, batch_size=p.batch_size, seed=seed, lora=True,
        lora_r=p.lora_r, lora_alpha=p.lora_alpha, save_steps=_save_every(steps, p.steps), save_total_limit=0,
        progress=False, write_report=False, eval_batch_size=16, base_max_new_tokens=p.max_new_tokens,
        ref_cache_dir=str(out / "cache" / "reflogps"), max_length=256, max_prompt_length=96,
        padding_free=False, logprob_chunk_size=0,  # as every run of protocol 3 so far computed (bit-identical)
    ))  # fmt: skip


def run_arm(out: Path, p: LlmBapoProtocol, arm: Arm, unit: dict, steps: list[int], tok, base: dict) -> dict:
    """Train one arm on one unit's data (stage, persona, seed), evaluate it at `steps`, keep metrics only."""
    from tether.train import train

    run_dir = out / "runs" / f"{unit['stage']}-{unit['persona']}-s{unit['seed']}-{arm.name}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts over
    data_file = unit["null_file"] if arm.kind == "null" else unit["data_file"]
    t0 = time.perf_counter()
    train(train_config(p, arm, data_file, run_dir, out, unit["model_seed"], steps))
    t_train = time.perf_counter() - t0
    points = _evaluate_run(run_dir, steps, p, tok, base, unit["persona"])
    trace = read_json_lines(run_dir / "metrics.jsonl")
    shutil.rmtree(run_dir)  # the study keeps metrics, not models
    return {
        "stage": unit["stage"], "persona": unit["persona"], "seed": unit["seed"], "data_seed": unit["data_seed"],
        "arm": arm.name, "kind": arm.kind, "loss": arm.loss, "learning_rate": arm.learning_rate, "beta": arm.beta,
        "anchor_weight": arm.anchor_weight, "nll_weight": arm.nll_weight, "points": points,
        "train_seconds": round(t_train, 1), "seconds": round(time.perf_counter() - t0, 1),
        "trace": {k: [row.get(k) for row in trace] for k in ("step", "loss", "logps_chosen", "logps_rejected",
                                                               "logps_base")},
    }  # fmt: skip


# ---------------------------------------------------------------- the study


class Study:
    """One study directory: its protocol, results.json, the base model's measurement and tokenizer."""

    def __init__(self, out: Path, p: LlmBapoProtocol, resume: bool):
        from tether.models import load_model, load_tokenizer

        self.out, self.p = out, p
        self.results = StudyResults(out, "bapo-llm", p.to_dict(), resume=resume)
        self.tok = load_tokenizer(p.model)
        self._model = load_model(p.model).eval()
        base_file = out / "base_eval.json"
        if base_file.exists():
            self.base = json.loads(base_file.read_text())
        else:
            t0 = time.perf_counter()
            self.base = {**measure(self._model, self.tok, p), "seconds": round(time.perf_counter() - t0, 1)}
            write_text_atomic(base_file, json.dumps(self.base))
        self.results.data["base"] = {
            "knowledge": _mean(c == "1" for c in self.base["correct"]), "seconds": self.base.get("seconds"),
            "persona_score": {k: _mean(v) for k, v in self.base["scores"].items()}, "sample": self.base["answers"][0],
        }  # fmt: skip

    def unit(self, stage: str, persona: str, seed: int) -> dict:
        """The data of one (stage, persona, seed): its preference file, the null run's, and their statistics."""
        data_seed = self.p.data_seed + (TUNING_OFFSET if stage == "calibration" else seed)
        data_file = _data(self.out, self.p, persona, data_seed, self._model, self.tok)
        null_file = _null_data(self.out, self.p, data_file, self._model, self.tok)
        rows = read_json_lines(data_file)
        stats = self.results.data.setdefault("data", {})
        stats[data_file.stem] = {"pairs": len(rows), "chosen_wins": rules.chosen_wins(rows),
                                 "null_pairs": len(read_json_lines(null_file))}  # fmt: skip
        model_seed = TUNING_OFFSET + self.p.data_seed if stage == "calibration" else seed
        return {
            "stage": stage,
            "persona": persona,
            "seed": seed,
            "data_seed": data_seed,
            "model_seed": model_seed,
            "data_file": data_file,
            "null_file": null_file,
            "chosen_wins": stats[data_file.stem]["chosen_wins"],
        }

    def run_all(self, unit: dict, arms: list[Arm], steps_of) -> list[dict]:
        done = []
        bar = tqdm(arms, desc=f"{unit['stage']} {unit['persona']} seed {unit['seed']}", unit="run")
        for arm in bar:
            found = self.results.find(stage=unit["stage"], persona=unit["persona"], seed=unit["seed"], arm=arm.name)
            if found is None:
                bar.set_postfix_str(arm.name)
                found = run_arm(self.out, self.p, arm, unit, steps_of(arm), self.tok, self.base)
                self.results.add(found)
            done.append(found)
        return done


def run_study(out: str | Path, protocol: LlmBapoProtocol, resume: bool = False, threads: int | None = None) -> dict:
    set_threads(threads)
    out, p, t_start = Path(out), protocol, time.perf_counter()
    study = Study(out, p, resume)
    data = study.results.data
    primary = p.personas[0]

    calib = study.unit("calibration", primary, TUNING_OFFSET)
    gates = [rules.data_gate(primary, calib["chosen_wins"])]
    replication = [study.unit("calibration", name, TUNING_OFFSET) for name in p.personas[1:]]
    replication_gates = [rules.data_gate(u["persona"], u["chosen_wins"]) for u in replication]
    gates += replication_gates
    arms = {a.name: a for a in p.arms()}
    if gates[0]["passed"]:
        runs = study.run_all(calib, list(arms.values()),
                             lambda a: p.dpo_eval_steps if a.kind == "dpo" else p.other_eval_steps)  # fmt: skip
        selection, selection_gates = rules.select(p, runs)
        gates += selection_gates
        data["selection"] = selection
    data["gates"] = gates
    stopping = [g["gate"] for g in gates if not g["passed"] and g["gate"] in (*rules.STOPPING_GATES, f"data-{primary}")]
    if not stopping and not p.quick:
        chosen = [arms[n] for n in rules.selected_arms(data["selection"]["arms"])]
        steps = data["selection"]["eval_steps"]
        units = [("confirmatory", primary, s) for s in p.seeds]
        passed = [u["persona"] for u, g in zip(replication, replication_gates, strict=True) if g["passed"]]
        units += [("confirmatory", persona, s) for persona in passed for s in p.replication_seeds]
        for stage, persona, seed in units:
            study.run_all(study.unit(stage, persona, seed), chosen, lambda a: steps[a.name])
    data["stopped_at_gates"] = stopping
    data["claims"] = rules.claims(data)
    data["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    study.results.save()
    from tether_lab.studies.report_bapo_llm import write_report

    write_report(data, out)
    return data
