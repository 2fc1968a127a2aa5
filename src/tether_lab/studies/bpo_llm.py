"""`tether study bpo --model smollm2-135m-instruct`: online DAP at one annotation budget on a real chat model, with
an instructed persona's score as the oracle — protocol version 5 (the rules, the regime and the budget:
bpo_llm_rules.py; the report: report_bpo_llm.py).

Stages, each run saved to results.json as it finishes (an interrupted study continues with `--resume`):
1. data: the prompt pool's split for `--data_seed`; on the dev split, π_sft's greedy answers (the reference
   texts) and samples (the comparison of `sampled_win_rate`), and π_sft and π_gold measured → gate gold-wins;
2. calibration: offline DPO on the first tuning seed at each learning rate of the grid → offline-lands,
   offline-rising, and the learning rate of every later run;
3. pilots: on-policy DAP (→ identical-pairs, margin-at-half), then offline and BPO F = 2 on both tuning seeds
   (→ seeds: how many study seeds);
4. the study seeds 0 .. n−1, every setting and loss, evaluated on the test split.
Each gate is printed when it is decided; the first that fails stops the study (`--quick`: stages 1–3 on a reduced
regime, never a verdict).

A run is tether's own online loop (`tether.train.online.OnlineRun`) with three additions of the study's
(`StudyRun`): every evaluation also samples one T = 1 answer per prompt (the sampled score and the win rate
against π_sft's sample); the per-pair β·h the loss saw at each step is recorded (the margin gate); and for
π_ref = π_gold the reference is `PromptedReference`, π_sft scoring the same completions after the persona's
instruction. π_sft's own evaluation (step 0 of every run) is measured once per split.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from tether.config import TetherError, load_config
from tether.data import Example, collate
from tether.files import read_json, read_json_lines, write_text_atomic
from tether.generation import completion_text, eos_token_ids, generate_ids, prompt_ids
from tether.logprobs import sequence_logps
from tether.registry import register
from tether.sampling import sample_responses
from tether.stats import win_rates
from tether.train.online import OnlineRun
from tether.train.reference import Reference
from tether_lab.instructed import get_instructed_persona, prompt_pool
from tether_lab.studies import bpo_llm_rules as rules
from tether_lab.studies.bpo_llm_rules import LABELS, SETTINGS, TUNING_SEEDS, LlmBpoProtocol
from tether_lab.studies.common import StudyResults, set_threads

# an environment installed before tether_lab declared this oracle still finds it (pyproject.toml declares it too)
register("oracles", "instructed", "tether_lab.instructed:instructed_oracle")

MAX_PROMPT_TOKENS = 96
EVAL_BATCH = 32
POLICY_SAMPLE_SEED = 7_000_000  # + prompt index: the evaluated policy's T = 1 answers, the same at every point
SFT_SAMPLE_SEED = 8_000_000  # + prompt index: π_sft's comparison answers (other seeds: an independent draw)


# ---------------------------------------------------------------- answers and measurements


def sampled_texts(model, tok, ids: list[list[int]], seed: int, p: LlmBpoProtocol) -> list[str]:
    """One answer per prompt at the protocol's temperature and top-k; prompt i uses seed + i."""
    eos, out = eos_token_ids(model, tok), []
    for start in range(0, len(ids), EVAL_BATCH):
        chunk = ids[start : start + EVAL_BATCH]
        seeds = [seed + i for i in range(start, start + len(chunk))]
        got = sample_responses(model, chunk, seeds, n=1, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                               top_k=p.top_k, eos_ids=eos, pad_id=tok.pad_token_id)  # fmt: skip
        out += [completion_text(tok, rows[0], eos) for rows in got.ids]
    return out


def greedy_texts(model, tok, ids: list[list[int]], p: LlmBpoProtocol) -> list[str]:
    eos = eos_token_ids(model, tok)
    rows = generate_ids(model, tok, ids, max_new_tokens=p.max_new_tokens, batch_size=EVAL_BATCH)
    return [completion_text(tok, r, eos) for r in rows]


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def sampled_metrics(score, prompts: list, answers: list[str], sft_answers: list[str]) -> dict:
    """The sampled answers' mean score, and their win rate against π_sft's sampled answers (ties one half)."""
    mine, theirs = score(prompts, answers), score(prompts, sft_answers)
    return {"eval_sampled_score": _mean(mine), "eval_sampled_win_rate": _mean(win_rates(mine, theirs))}


def measure_model(model, tok, rows: list[dict], score, p: LlmBpoProtocol, instruction: bool = False) -> dict:
    """π_sft (or, with `instruction`, π_gold: the persona's instruction in front) on a split's rows, with the
    evaluation's keys: greedy win rate vs the reference and mean score, and the sampled metrics."""
    persona = get_instructed_persona(p.persona)
    prompts = [r["prompt"] for r in rows]
    ids = [prompt_ids(tok, persona.messages(x) if instruction else x) for x in prompts]
    greedy = greedy_texts(model, tok, ids, p)
    mine, refs = score(prompts, greedy), score(prompts, [r["reference"] for r in rows])
    sampled = sampled_texts(model, tok, ids, POLICY_SAMPLE_SEED, p)
    return {
        "eval_win_rate": _mean(win_rates(mine, refs)),
        "eval_reward": _mean(mine),
        "eval_reference_reward": _mean(refs),
        "eval_n": len(rows),
        **sampled_metrics(score, prompts, sampled, [r["sft_sample"] for r in rows]),
        "sample": greedy[0] if greedy else "",
    }


# ---------------------------------------------------------------- the study's run


class PromptedReference(Reference):
    """π_ref = π_gold: π_sft (the LoRA base, adapter off) scoring each completion of the batch after the persona's
    instruction instead of the batch's own prompt. `instructed` maps a prompt's token ids to the instructed
    prompt's."""

    def __init__(self, open_model, instructed: dict[tuple, list[int]], pad_id: int):
        super().__init__("π_gold: π_sft prompted with the persona's instruction")
        self.open, self.instructed, self.pad_id = open_model, instructed, pad_id

    def logps(self, batch, n_keys, recorded=None):
        ids, attention, completion = (batch[k].cpu() for k in ("input_ids", "attention_mask", "completion_mask"))
        pairs = ids.size(0) // n_keys
        examples = []
        for i in range(pairs):
            rows = [i + k * pairs for k in range(n_keys)]  # key-major: the same prompt in every key's row
            start = int(completion[rows[0]].nonzero()[0])
            prompt = tuple(ids[rows[0], :start].tolist())
            comps = {f"k{k}": ids[r, start : int(attention[r].sum())].tolist() for k, r in enumerate(rows)}
            examples.append(Example(self.instructed[prompt], comps, f"pair {i}"))
        keys = tuple(f"k{k}" for k in range(n_keys))
        device = batch["input_ids"].device
        gold = {k: v.to(device) for k, v in collate(examples, self.pad_id, keys).items()}
        with self.open() as model:
            return sequence_logps(model, gold["input_ids"], gold["attention_mask"], gold["completion_mask"], n_keys)[0]


class StudyRun(OnlineRun):
    """An online run with the study's measurements (module docstring). `initial_eval`: π_sft's measurement on
    the evaluation split, returned as the run's step-0 evaluation; `gold`: π_ref = π_gold."""

    def __init__(self, cfg, p: LlmBpoProtocol, initial_eval: dict, gold: bool = False):
        super().__init__(cfg, resume=False)
        self.study_protocol, self.initial_eval = p, dict(initial_eval)
        self.persona = get_instructed_persona(p.persona)
        self.sft_answers = [r.extra["sft_sample"] for r in self.eval_set]
        if gold:
            instructed = {
                tuple(ids): prompt_ids(self.tokenizer, self.persona.messages(rec.prompt))
                for rec, ids in zip(self.prompts, self.prompt_ids)
            }
            self.reference = PromptedReference(self.policy.initial, instructed, self.tokenizer.pad_token_id)
        self.pair_margins: list[list[float]] = []  # per step: β·h of every usable pair, as the loss saw it
        self._margins: list[float] = []
        train_step = self.policy.step

        def recording_step(*args, **kwargs):
            stats, grad_norm, lr = train_step(*args, **kwargs)
            if "reward_margin" in stats:
                self._margins += stats["reward_margin"].tolist()
            return stats, grad_norm, lr

        self.policy.step = recording_step

    def step(self, step: int) -> dict:
        self._margins = []
        row = super().step(step)
        self.pair_margins.append([round(m, 4) for m in self._margins])
        return row

    def evaluate(self) -> dict:
        if self.initial_eval is not None:  # before training: π_sft, measured once for the split
            out, self.initial_eval = self.initial_eval, None
            return out
        out = super().evaluate()
        ids = [list(x) for x in self.eval_ids]
        with self.policy.merged() as model:
            answers = sampled_texts(model, self.tokenizer, ids, POLICY_SAMPLE_SEED, self.study_protocol)
        prompts = [r.prompt for r in self.eval_set]
        sampled = sampled_metrics(self.annotator.oracle.score, prompts, answers, self.sft_answers)
        return {**out, **sampled, "sample": answers[0] if answers else ""}


def online_config(p: LlmBpoProtocol, setting: str, loss: str, seed: int, lr: float, files: dict, run_dir: Path):
    """The run's options: π_ref = π_gold runs as `reference: initial` whose reference StudyRun replaces."""
    from tether.train import OnlineConfig

    reference = {"behavior": "behavior", "sft": "initial", "gold": "initial"}[SETTINGS[setting][1]]
    return load_config(OnlineConfig, None, dict(
        model=p.model, prompt_file=str(files["train"]), eval_file=str(files["eval"]), output_dir=str(run_dir),
        oracle=f"instructed:{p.persona}", steps=p.steps, phases=p.phases(setting), prompts_per_step=p.prompts_per_step,
        reference=reference, loss=loss, beta=p.beta, learning_rate=lr, lr_scheduler="linear", warmup_steps=0,
        seed=seed, lora=True, lora_r=p.lora_r, lora_alpha=p.lora_alpha, temperature=p.temperature, top_k=p.top_k,
        max_new_tokens=p.max_new_tokens, eval_max_new_tokens=p.max_new_tokens, eval_batch_size=EVAL_BATCH,
        max_prompt_length=MAX_PROMPT_TOKENS, max_length=MAX_PROMPT_TOKENS + p.max_new_tokens, save_steps=0,
        eval_steps=p.steps // p.eval_points, progress=False, write_report=False, oracle_backoff=0.0,
    ))  # fmt: skip


CURVE_KEYS = {"win_rate": "eval_win_rate", "greedy_score": "eval_reward", "sampled_score": "eval_sampled_score",
              "sampled_win_rate": "eval_sampled_win_rate"}  # fmt: skip
TRACE_KEYS = {"loss": "loss", "margin": "reward_margin", "pairs": "pairs", "identical": "identical", "ties": "tie"}


def run_record(run_dir: Path, job: dict, pair_margins: list[list[float]], score) -> dict:
    """What the study keeps of a finished run: its final metrics, the curves at every evaluation against the
    annotations spent, per-step traces (the loss's terms; `score`'s mean over every answer π_β sampled, identical
    pairs too) and β·h."""
    res = read_json(run_dir / "results.json")
    rows = read_json_lines(run_dir / "metrics.jsonl")
    points = [(0, 0, res["initial_eval"])] + [(r["step"], r["annotations"], r) for r in rows if "eval_win_rate" in r]
    points.append((res["steps"], res["annotations"], res["final_eval"]))
    curves = {"step": [s for s, _, _ in points], "annotations": [a for _, a, _ in points]}
    curves |= {name: [e.get(key) for _, _, e in points] for name, key in CURVE_KEYS.items()}
    behavior: dict[int, list[float]] = {}
    for row in read_json_lines(run_dir / "ledger.jsonl"):
        behavior.setdefault(row["step"], []).extend(score([row["prompt"]] * 2, row["responses"]))
    trace = {name: [r.get(key) for r in rows if "pairs" in r] for name, key in TRACE_KEYS.items()}
    trace["behavior_score"] = [round(_mean(behavior[s]), 4) if s in behavior else None for s in range(res["steps"])]
    return {
        **job,
        **{name: curves[name][-1] for name in CURVE_KEYS},
        "curves": curves,
        "annotations": res["annotations"],
        "identical_pairs": res["identical_pairs"],
        "ties": res["ties"],
        "ledger_rows": res["ledger_rows"],
        "reference_label": res.get("reference"),
        "pair_margins": pair_margins,
        "trace": trace,
        "loop_seconds": res["seconds"],
        "sample": res["final_eval"].get("sample"),
    }


# ---------------------------------------------------------------- the study


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


class Study:
    """One study directory: its protocol, results.json, the prompt files and π_sft's and π_gold's measurements."""

    def __init__(self, out: Path, p: LlmBpoProtocol, resume: bool):
        from tether.models import load_tokenizer

        self.out, self.p = out, p
        self.pool = prompt_pool(p.data_seed, p.heldout_topics)
        train = self.pool["train"][: p.train_prompts or None]
        if len(train) < p.steps * p.prompts_per_step:
            raise TetherError(f"protocol: {len(train)} training prompts for B·T = {p.steps * p.prompts_per_step}: "
                              "a run would reuse prompts; use fewer steps or more prompts")  # fmt: skip
        self.score = persona_oracle(p).score  # an unknown persona fails here, before anything is written
        self.tok = load_tokenizer(p.model)
        self.results = StudyResults(out, "bpo-llm", p.to_dict(), resume=resume)
        self.train_file = out / "data" / f"train-data{p.data_seed}-n{len(train)}.jsonl"
        if not self.train_file.exists():
            _write_jsonl(self.train_file, [{"prompt": x} for x in train])

    def split(self, name: str) -> dict:
        """The evaluation split `name` (dev | test): its file (prompt, π_sft's greedy answer as the reference text,
        π_sft's sampled answer) and π_sft's and π_gold's measurements on it, made once and kept under out/data."""
        p, stem = self.p, self.out / "data" / f"{name}-data{self.p.data_seed}-n{self.p.eval_prompts}"
        path, measured = stem.with_suffix(".jsonl"), stem.with_name(stem.name + "-models.json")
        if not measured.exists():
            from tether.models import load_model

            model, prompts = load_model(p.model).eval(), self.pool[name][: p.eval_prompts]
            ids = [prompt_ids(self.tok, x) for x in prompts]
            refs, samples = (
                greedy_texts(model, self.tok, ids, p),
                sampled_texts(model, self.tok, ids, SFT_SAMPLE_SEED, p),
            )
            # a prompt π_sft answers with nothing has no reference text to compare with: left out (eval_n says)
            rows = [{"prompt": x, "reference": r, "sft_sample": s} for x, r, s in zip(prompts, refs, samples) if r]
            _write_jsonl(path, rows)
            models = {who: measure_model(model, self.tok, rows, self.score, p, instruction=who == "gold")
                      for who in ("sft", "gold")}  # fmt: skip
            write_text_atomic(measured, json.dumps(models, indent=1))
        models = read_json(measured)
        self.results.data.setdefault("reference_models", {})[name] = models
        return {"train": self.train_file, "eval": path, "sft": models["sft"], "gold": models["gold"]}

    def run(self, stage: str, setting: str, loss: str, seed: int, lr: float) -> dict:
        """One run (found in results.json, or trained now and saved there as soon as it finishes)."""
        job = {"stage": stage, "setting": setting, "loss": loss, "seed": seed, "learning_rate": lr}
        found = self.results.find(**job)
        if found is not None:
            return found
        split = self.split("dev" if stage == "tuning" else "test")
        run_dir = self.out / "runs" / f"{stage}-{setting}-{loss}-s{seed}-lr{lr:g}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts over
        t0 = time.perf_counter()
        name = f"{stage} run {LABELS[setting]} {loss.upper()} seed {seed} lr {lr:g}"
        tqdm.write(f"{name}: started (about {rules.run_seconds(self.p, setting) / 60:.0f} min by the cost model)")
        cfg = online_config(self.p, setting, loss, seed, lr, split, run_dir)
        run = StudyRun(cfg, self.p, split["sft"], gold=SETTINGS[setting][1] == "gold")
        run.run()
        record = {
            **run_record(run_dir, job, run.pair_margins, self.score),
            "seconds": round(time.perf_counter() - t0, 1),
        }
        tqdm.write(f"{name}: final greedy win rate {100 * record['win_rate']:.1f}% ({record['seconds'] / 60:.1f} min)")
        shutil.rmtree(run_dir / "final", ignore_errors=True)  # the study keeps metrics, not models
        self.results.add(record)
        return record


def persona_oracle(p: LlmBpoProtocol):
    from tether.oracles import load_oracle

    return load_oracle(f"instructed:{p.persona}")


def announce(g: dict) -> dict:
    tqdm.write(f"gate {g['gate']}: {g['value']} (rule {g['threshold']}): {'passed' if g['passed'] else 'FAILED'}")
    return g


def tuning_stage(study: Study) -> list[dict]:
    """Stages 1–3 (module docstring): the gates in their order, up to the first that fails; sets the calibrated
    learning rate and the seed plan in results.json."""
    p, data = study.p, study.results.data
    gates = [announce(rules.gold_gate(study.split("dev")["gold"]["eval_win_rate"]))]
    if not gates[-1]["passed"]:
        return gates
    calibration = [study.run("tuning", "offline", "dpo", TUNING_SEEDS[0], lr) for lr in p.learning_rates]
    lr, found = rules.calibrate(p, calibration)
    gates += [announce(g) for g in found]
    data["learning_rate"] = lr
    if lr is None:
        return gates
    on_policy = study.run("tuning", "on-policy", "dpo", TUNING_SEEDS[0], lr)
    gates += [announce(g) for g in rules.on_policy_gates(p, on_policy)]
    if not all(g["passed"] for g in gates):
        return gates
    pilots = [study.run("tuning", s, "dpo", seed, lr) for s, seed in rules.tuning_jobs()]
    plan, found = rules.seed_plan(p, [*calibration, *pilots])
    data["plan"] = plan
    return gates + [announce(found)]


def run_study(out: str | Path, protocol: LlmBpoProtocol, resume: bool = False, threads: int | None = None) -> dict:
    """Run (or, with `resume`, continue) the study in `out`; writes results.json, report.md and the figures."""
    set_threads(threads)
    out, p, t_start = Path(out), protocol, time.perf_counter()
    p.validate()
    study = Study(out, p, resume)
    data = study.results.data
    data["gates"] = tuning_stage(study)
    data["stopped_at_gates"] = [g["gate"] for g in data["gates"] if not g["passed"]]
    if not data["stopped_at_gates"] and not p.quick:
        seeds = data["plan"]["seeds"]
        jobs = [(seed, setting, loss) for seed in seeds for setting, loss in p.jobs()]
        for seed, setting, loss in tqdm(jobs, desc="study seeds", unit="run"):
            study.run("study", setting, loss, seed, data["learning_rate"])
    data["claims"] = rules.claims(data)
    data["descriptive"] = rules.descriptive(data)
    data["aggregates"] = [row for m in rules.METRICS for row in rules.aggregates(data, m)]
    data["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    study.results.save()
    from tether_lab.studies.report_bpo_llm import write_report

    write_report(data, out)
    return data
