"""`tether study bapo`: personalization against forgetting on the embedded world (recipe 2), compared on whole
trade-off frontiers.

World: recipe 2 (world/paraphrased_house.py) — a base model whose greedy answer is the house answer but with probability
≈ 0.4, personalization realms and held-out realms, rejected answers that are never the house answer. Each
heterogeneity level has two personas of matched answer length (PERSONAS_BY_LEVEL); seed s trains on persona
s mod 2 of its level, so the seeds cover both.

Each method sweeps its own knob; every run is evaluated at several step counts (checkpoints of a constant
learning rate, so step k of a run is a k-step run), so one run gives a curve:
  DPO, IPO, SLiC    by steps                      DPO + NLL   by steps, at each α of `nll_weights`
  BAPO              by steps at each λ of `anchor_weights` (× `anchor_forms`), and across λ at the last step.
Every evaluation point measures, on one question per fact of the held-out realms, greedy AND sampled (T = 1)
answers: personalization gain = 100 · (style match − the base model's), and retention = the fraction of answers
that state the fact correctly, relative to the base model's; plus multiple-choice knowledge and general alignment.
The baselines run as BAPO with λ = 0 — identical to plain DPO (a test checks it) — so that log π_θ(y_b) is logged
for them too. Verdicts (report_bapo.claims) compare methods at matched gain, paired by seed, with t-intervals.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

from tqdm.auto import tqdm

from tether.config import load_config
from tether.evaluate import multiple_choice_correct
from tether.files import write_text_atomic
from tether.generation import generate
from tether.logprobs import completion_logps_ids
from tether.models import load_model, load_tokenizer
from tether.train import TrainConfig, train
from tether_lab.studies.common import StudyResults, set_threads
from tether_lab.studies.report_bapo import claims, figures, report

log = logging.getLogger("tether")

# two personas per level, one without and one with the technical annotation, so lengths do not grow with the level
PERSONAS_BY_LEVEL = {1: ("casual", "technical"), 2: ("casual-list", "list-technical"), 3: ("casual-list-technical",)}
STEP_METHODS = {"dpo": dict(loss="dpo"), "ipo": dict(loss="ipo"), "slic": dict(loss="slic")}
DECODINGS = ("greedy", "sampled")


@dataclass
class BapoProtocol:
    """Fixed on the tuning seed 100 (never a study seed), before any study seed ran (docs/studies.md): at 40 steps
    a constant learning rate of 1e-3 collapses DPO's answers within 10 steps and 5e-4 makes them degenerate after
    20, while 3e-4 keeps them readable; λ spans the crossover of the anchor's per-pair gradient (λ) with DPO's
    (β·σ(−βh) ≤ 0.05) by about a decade each side. Quick mode is the full protocol's seed 0."""

    mode: str = "quick"
    world_seed: int = 0
    levels: list[int] = field(default_factory=lambda: [1, 2])
    frontier_level: int = 2  # where every method runs; at the other levels only DPO (claim 1)
    methods: list[str] = field(default_factory=lambda: ["dpo", "ipo", "slic", "dpo+nll", "bapo"])
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 40
    eval_every: int = 5  # evaluation points at eval_every, 2·eval_every, …, steps (cheap next to training)
    batch_size: int = 16
    learning_rate: float = 3e-4  # constant, no warm-up: step k of a run equals a k-step run
    beta: float = 0.1
    anchor_weights: list[float] = field(default_factory=lambda: [0.003, 0.03, 0.3])
    anchor_forms: list[str] = field(default_factory=lambda: ["hinge"])
    nll_weights: list[float] = field(default_factory=lambda: [1.0])
    target_gain: float = 10.0  # style points at which retention is compared (claims 1 and 2)
    base_max_new_tokens: int = 48
    eval_max_new_tokens: int = 48
    world: dict = field(default_factory=dict)  # WorldSettings overrides (recipe 2 is forced)

    @classmethod
    def for_mode(cls, quick: bool, world_seed: int = 0) -> BapoProtocol:
        if quick:
            return cls(world_seed=world_seed)
        return cls(mode="full", world_seed=world_seed, seeds=[0, 1, 2, 3, 4])

    def arms(self) -> list[tuple[int, str, float | None, str | None]]:
        """(level, method, knob, anchor form) of every run, seeds aside: DPO at every level; the rest at the
        frontier level."""
        out = []
        for level in self.levels:
            for m in self.methods:
                if level != self.frontier_level and m != "dpo":
                    continue
                if m == "bapo":
                    out += [(level, m, lam, form) for form in self.anchor_forms for lam in self.anchor_weights]
                elif m == "dpo+nll":
                    out += [(level, m, a, None) for a in self.nll_weights]
                else:
                    out.append((level, m, None, None))
        return out


def persona_for(protocol: BapoProtocol, level: int, seed: int) -> str:
    names = PERSONAS_BY_LEVEL[level]
    return names[seed % len(names)]


def world_settings(protocol: BapoProtocol):
    from tether_lab.world.settings import WorldSettings

    return WorldSettings(**{**protocol.world, "seed": protocol.world_seed, "recipe": 2, "progress": True})


def _world_data(out: Path, protocol: BapoProtocol):
    from tether_lab.world import ensure_base_model, export_world

    settings = world_settings(protocol)
    base_dir = ensure_base_model(settings)
    world = settings.world()
    data = out / "data"
    if not (data / "world.json").exists():
        personas = sorted({persona_for(protocol, lv, s) for lv in protocol.levels for s in protocol.seeds})
        export_world(world, data, personas=personas, rejected="never-house", overwrite=True, recipe=2)
    return world, base_dir, data


def _answers(model, tok, prompts, protocol, seed: int) -> dict[str, list[str]]:
    """Greedy and sampled (T = 1, no top-k) answers."""
    return {
        d: generate(
            model,
            tok,
            prompts,
            max_new_tokens=protocol.eval_max_new_tokens,
            do_sample=d == "sampled",
            temperature=1.0,
            top_k=0,
            batch_size=64,
            seed=seed,
        )
        for d in DECODINGS
    }


def _scores(world, items, answers: list[str]) -> dict[str, list[float]]:
    """Per item: fact stated correctly, general alignment."""
    from tether_lab.world.rewards import alignment_score, is_correct

    return {
        "correct": [float(is_correct(world, q.entity, q.attribute, a)) for q, a in zip(items, answers)],
        "alignment": [alignment_score(world, [{"role": "user", "content": q.text}], a) for q, a in zip(items, answers)],
    }


def _style(world, persona: str, answers: list[str]) -> float:
    from tether_lab.world.rewards import style_match
    from tether_lab.world.styles import get_persona

    p = get_persona(persona)
    return _mean([style_match(world, p, None, a) for a in answers])


def _mean(values) -> float:
    return sum(values) / len(values)


def _retained(value: float, base: float) -> float:
    """value / base; 1 when both are 0 (an untrained micro world), never a division by zero."""
    return value / base if base else float(value == base)


class Evaluator:
    """Everything measured at one evaluation point, on the held-out realms' questions."""

    def __init__(self, world, protocol: BapoProtocol):
        from tether_lab.world.paraphrased_house import eval_questions, heldout_realms

        self.world, self.protocol = world, protocol
        self.items = eval_questions(world)
        self.prompts = [[{"role": "user", "content": q.text}] for q in self.items]
        held = heldout_realms(world)
        self.mc = [m for m in world.multiple_choice() if m["id"].split("/")[0] in held]

    def measure(self, model, tok, seed: int) -> dict:
        answers = _answers(model, tok, self.prompts, self.protocol, seed)
        out = {"mc": _mean(multiple_choice_correct(model, tok, self.mc, batch_size=64))}
        for d in DECODINGS:
            s = _scores(self.world, self.items, answers[d])
            out[d] = {"correct": _mean(s["correct"]), "alignment": _mean(s["alignment"])}
        return out, answers

    def precheck(self, model, tok) -> dict:
        """On the base model: how often its greedy answer is the canonical house answer, and the median summed
        log π_ref of that answer (with the chat template's end tokens, as BAPO's anchor sees y_b)."""
        from tether_lab.world.build import chat_examples
        from tether_lab.world.styles import HOUSE, render

        house = [render(self.world, q.entity, q.attribute, HOUSE) for q in self.items]
        greedy = generate(model, tok, self.prompts, max_new_tokens=self.protocol.eval_max_new_tokens, batch_size=64)
        rows = chat_examples(tok, [(q.text, h) for q, h in zip(self.items, house)])
        logps = completion_logps_ids(
            model, [ids[:n] for ids, n in rows], [ids[n:] for ids, n in rows], tok.pad_token_id, 64
        )
        return {
            "greedy_is_house": _mean([float(g == h) for g, h in zip(greedy, house)]),
            "median_logp_base": median(logps),
            "n_prompts": len(house),
            "logp_base_quartiles": [sorted(logps)[len(logps) // 4], sorted(logps)[3 * len(logps) // 4]],
        }


def _base_eval(out: Path, base_dir: Path, evaluator: Evaluator, protocol: BapoProtocol) -> dict:
    path = out / "base_eval.json"
    if path.exists():
        return json.loads(path.read_text())
    model, tok = load_model(base_dir).eval(), load_tokenizer(base_dir)
    metrics, answers = evaluator.measure(model, tok, seed=0)
    base = {"metrics": metrics, "answers": answers, "precheck": evaluator.precheck(model, tok)}
    write_text_atomic(path, json.dumps(base))
    return base


def _run_name(level: int, method: str, knob, form, seed: int) -> str:
    knob_part = "" if knob is None else (f"-lam{knob:g}" if method == "bapo" else f"-a{knob:g}")
    form_part = "" if form in (None, "hinge") else f"-{form}"
    return f"h{level}-{method}{knob_part}{form_part}-s{seed}"


def _train_config(protocol, base_dir, data, persona, run_dir, out, method, knob, form, seed):
    overrides = dict(STEP_METHODS.get(method, {"loss": "dpo"}), anchor_weight=0.0)
    if method == "dpo+nll":
        overrides["nll_weight"] = knob
    if method == "bapo":
        overrides |= {"anchor_weight": knob, "anchor_form": form}
    return load_config(
        TrainConfig,
        None,
        dict(
            model=str(base_dir),
            train_file=str(data / "personas" / persona / "preferences_train.jsonl"),
            output_dir=str(run_dir),
            method="bapo",
            beta=protocol.beta,
            learning_rate=protocol.learning_rate,
            max_steps=protocol.steps,
            batch_size=protocol.batch_size,
            seed=seed,
            warmup_steps=0,
            lr_scheduler="constant",
            save_steps=protocol.eval_every,
            save_total_limit=0,
            progress=False,
            write_report=False,
            eval_batch_size=64,
            base_max_new_tokens=protocol.base_max_new_tokens,
            ref_cache_dir=str(out / "cache" / "reflogps"),
            max_length=256,
            max_prompt_length=64,
            **overrides,
        ),
    )


def _evaluate_run(
    run_dir: Path, base_dir: Path, evaluator: Evaluator, protocol: BapoProtocol, world, persona, base, seed
) -> list[dict]:
    """One point per checkpoint and the final model: step, mc, and per decoding correct, alignment, style match,
    gain and retention (relative to the base model's answers)."""
    from safetensors.torch import load_file

    tok = load_tokenizer(base_dir)
    points = []
    for step in range(protocol.eval_every, protocol.steps + 1, protocol.eval_every):
        if step == protocol.steps:
            model = load_model(run_dir / "final").eval()
        else:
            model = load_model(base_dir).eval()
            weights = load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")
            unexpected = model.load_state_dict(weights, strict=False).unexpected_keys
            assert not unexpected and set(weights) == {n for n, _ in model.named_parameters()}, (
                "checkpoint/model mismatch"
            )
        metrics, answers = evaluator.measure(model, tok, seed)
        point = {"step": step, "mc": metrics["mc"], "mc_retained": _retained(metrics["mc"], base["metrics"]["mc"])}
        for d in DECODINGS:
            m, b = metrics[d], base["metrics"][d]
            style, base_style = _style(world, persona, answers[d]), _style(world, persona, base["answers"][d])
            point[d] = {
                **m,
                "style_match": style,
                "gain": 100 * (style - base_style),
                "base_style_match": base_style,
                "retention": _retained(m["correct"], b["correct"]),
                "alignment_retained": _retained(m["alignment"], b["alignment"]),
                "sample": answers[d][0],
            }
        points.append(point)
    return points


def run_study(
    quick: bool = True,
    out: str | Path = "out/study-bapo",
    protocol: BapoProtocol | None = None,
    threads: int | None = None,
    only: list[tuple[int, str]] | None = None,
    resume: bool = True,
) -> dict:
    """Run (or resume) the study; write results.json, figures and report.md into `out`.

    `out` also receives what the study needs but does not report: data/ (the exported world), cache/ (base
    responses and reference log-probs) and runs/ (each run's config and metrics.jsonl; models and checkpoints are
    deleted once evaluated). `threads` sets torch's intra-op threads (None: as is).
    `only` = [(level, method), ...] runs just those arms and returns the runs done so far, without claims,
    figures or report (a later call without `only` runs the rest and writes them).
    """
    protocol = protocol or BapoProtocol.for_mode(quick)
    out = Path(out)
    set_threads(threads)
    t_start = time.perf_counter()
    results = StudyResults(out, "bapo", asdict(protocol), resume=resume)
    world, base_dir, data = _world_data(out, protocol)
    evaluator = Evaluator(world, protocol)
    base = _base_eval(out, base_dir, evaluator, protocol)
    results.data["precheck"] = base["precheck"]
    results.data["base"] = base["metrics"]

    todo = [(arm, s) for arm in protocol.arms() for s in protocol.seeds if only is None or arm[:2] in only]
    bar = tqdm(todo, desc="study bapo", unit="run")
    for (level, method, knob, form), seed in bar:
        if results.find(level=level, method=method, knob=knob, anchor_form=form, seed=seed):
            continue
        name = _run_name(level, method, knob, form, seed)
        bar.set_postfix_str(name)
        persona = persona_for(protocol, level, seed)
        run_dir = out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts over
        t0 = time.perf_counter()
        train(_train_config(protocol, base_dir, data, persona, run_dir, out, method, knob, form, seed))
        points = _evaluate_run(run_dir, base_dir, evaluator, protocol, world, persona, base, seed)
        shutil.rmtree(run_dir / "final")  # the study keeps metrics, not models
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        trace = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results.add(
            {
                "level": level,
                "persona": persona,
                "method": method,
                "knob": knob,
                "anchor_form": form,
                "seed": seed,
                "points": points,
                "seconds": round(time.perf_counter() - t0, 1),
                "trace": {
                    k: [row.get(k) for row in trace]
                    for k in ("step", "loss", "logps_chosen", "logps_rejected", "logps_base")
                },
            }
        )

    if only is not None:
        return {**results.data, "claims": []}
    results.data["claims"] = claims(results.data, protocol)
    results.data["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    results.save()
    figures(results.data, out)
    write_text_atomic(out / "report.md", report(results.data))
    return results.data
