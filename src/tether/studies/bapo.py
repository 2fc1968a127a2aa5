"""`tether study bapo`: does personalizing with DPO-family losses make the embedded world's base model forget,
more so as the persona moves away from the house style, and does BAPO's anchor prevent it?

Protocol: for each heterogeneity level (a persona 1, 2, 3 (, 4) style dimensions away from the house style),
each method and each seed, fine-tune the world's base model on that persona's preference pairs with the
same steps, batch and learning rate, then measure on held-out prompts: knowledge accuracy (multiple choice
over every fact), general alignment (gold score of greedy answers), personalization — the style match (how far
the answers moved to the persona's style, right or wrong; the primary measure) and the persona score (the same,
gated on the answer being correct, so it mixes forgetting in) — and win rate against the base model's own answers
on the persona score. The DPO-family baselines run as BAPO with λ = 0 — identical to plain DPO (a test
checks it) — so that log π_θ of the base responses is logged for them too (the mechanism figure).
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from tqdm.auto import tqdm

from ..config import load_config
from ..evaluate import multiple_choice_correct, score_responses
from ..stats import win_rates
from ..generation import generate
from ..models import load_model, load_tokenizer
from ..train import TrainConfig, train
from ..files import write_text_atomic
from .common import StudyResults, set_threads, summarize_runs
from .report_bapo import claims, figures, report

log = logging.getLogger("tether")

# the personas form a chain: each level adds one more dimension away from the house style
PERSONA_BY_LEVEL = {1: "casual", 2: "casual-list", 3: "elaborate-casual-list", 4: "elaborate-casual-list-technical"}
METHODS = {
    "dpo": dict(loss="dpo", anchor_weight=0.0),
    "ipo": dict(loss="ipo", anchor_weight=0.0),
    "slic": dict(loss="slic", anchor_weight=0.0),
    "dpo+nll": dict(loss="dpo", anchor_weight=0.0, nll_weight=1.0),
    "bapo": dict(loss="dpo"),  # anchor_weight from the protocol
}
METRICS = ("knowledge", "knowledge_retained", "alignment", "alignment_retained", "style_match", "persona_score",
           "win_rate", "base_style_match", "base_persona_score")


@dataclass
class BapoProtocol:
    mode: str = "quick"
    levels: list[int] = field(default_factory=lambda: [1, 3])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 40  # full mode: 45 runs in ≤ 75 min at 1 thread on a loaded 2-core machine (see README "Studies")
    batch_size: int = 16
    learning_rate: float = 3e-4  # chosen by run_pilot (README "Studies")
    beta: float = 0.1
    anchor_weight: float = 0.1  # chosen by run_pilot
    base_max_new_tokens: int = 96
    eval_max_new_tokens: int = 96
    world: dict = field(default_factory=dict)  # WorldSettings overrides (the default world when empty)

    @classmethod
    def for_mode(cls, quick: bool) -> BapoProtocol:
        if quick:  # the full protocol on fewer levels and one seed: 15 minutes with the world build
            return cls()
        return cls(mode="full", levels=[1, 2, 3], seeds=[0, 1, 2])


def _world_data(out: Path, protocol: BapoProtocol):
    from ..world import ensure_base_model, export_world
    from ..world.build import WorldSettings

    settings = WorldSettings(**{**protocol.world, "progress": True})
    base_dir = ensure_base_model(settings)
    world = settings.world()
    data = out / "data"
    if not (data / "world.json").exists():
        export_world(world, data, personas=[PERSONA_BY_LEVEL[lv] for lv in protocol.levels], overwrite=True)
    return world, base_dir, data


def _evaluate(model_dir, world, persona: str | None, base_answers: list[str] | None, protocol) -> tuple[dict, list[str]]:
    """Knowledge, alignment, and (with a persona) style match, persona score and win rate vs the base's answers."""
    from ..world.evaluation import prompts_of
    from ..world.rewards import alignment_score, persona_score, style_match
    from ..world.styles import get_persona

    model, tok = load_model(model_dir).eval(), load_tokenizer(model_dir)
    knowledge = multiple_choice_correct(model, tok, world.multiple_choice(), batch_size=64)
    prompts = prompts_of(world, "test")
    answers = generate(model, tok, prompts, max_new_tokens=protocol.eval_max_new_tokens, batch_size=64)
    aligned = score_responses(partial(alignment_score, world), prompts, answers)
    out = {"knowledge": _mean(knowledge), "alignment": _mean(aligned)}
    if persona is not None:
        target = get_persona(persona)
        scorer, styler = partial(persona_score, world, target), partial(style_match, world, target)
        mine = score_responses(scorer, prompts, answers)
        out["style_match"] = _mean(score_responses(styler, prompts, answers))
        out["persona_score"] = _mean(mine)
        if base_answers is not None:
            theirs = score_responses(scorer, prompts, base_answers)
            out["base_style_match"] = _mean(score_responses(styler, prompts, base_answers))
            out["base_persona_score"] = _mean(theirs)
            out["win_rate"] = _mean(win_rates(mine, theirs))
        out["sample"] = {"prompt": prompts[0][-1]["content"], "response": answers[0]}
    return out, answers


def _mean(values) -> float:
    return sum(values) / len(values)


def run_study(quick: bool = True, out: str | Path = "out/study-bapo", protocol: BapoProtocol | None = None,
              threads: int | None = None, only: list[tuple[int, str]] | None = None) -> dict:
    """Run (or resume) the study; write results.json, figures and report.md into `out`.

    `out` also receives what the study needs but does not report: data/ (the exported world), cache/ (base
    responses and reference log-probs, computed by the first run of each persona) and runs/ (each run's config
    and metrics.jsonl; models are deleted once evaluated). `threads` sets torch's intra-op threads (None: as is).
    `only` = [(level, method), ...] runs just those settings and returns the summary of the runs done so far,
    without claims, figures or report (a later call without `only` runs the rest and writes them).
    """
    protocol = protocol or BapoProtocol.for_mode(quick)
    out = Path(out)
    set_threads(threads)
    t_start = time.perf_counter()
    results = StudyResults(out, "bapo", asdict(protocol))
    world, base_dir, data = _world_data(out, protocol)

    base_file = out / "base_eval.json"
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        metrics, answers = _evaluate(base_dir, world, None, None, protocol)
        base = {"metrics": metrics, "answers": answers}
        write_text_atomic(base_file, json.dumps(base))

    settings = [(lv, m, s) for lv in protocol.levels for m in protocol.methods for s in protocol.seeds
                if only is None or (lv, m) in only]
    bar = tqdm(settings, desc="study bapo", unit="run")
    for level, method, seed in bar:
        if results.find(level=level, method=method, seed=seed):
            continue
        bar.set_postfix_str(f"level {level} {method} seed {seed}")
        persona = PERSONA_BY_LEVEL[level]
        run_dir = out / "runs" / f"h{level}-{method}-s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts over
        overrides = {"anchor_weight": protocol.anchor_weight, **METHODS[method]}
        cfg = load_config(TrainConfig, None, dict(
            model=str(base_dir), train_file=str(data / "personas" / persona / "preferences_train.jsonl"),
            output_dir=str(run_dir), method="bapo", beta=protocol.beta, learning_rate=protocol.learning_rate,
            max_steps=protocol.steps, batch_size=protocol.batch_size, seed=seed, warmup_steps=0,
            lr_scheduler="linear", save_steps=0, progress=False, write_report=False, eval_batch_size=64,
            base_max_new_tokens=protocol.base_max_new_tokens, ref_cache_dir=str(out / "cache" / "reflogps"),
            max_length=256, max_prompt_length=64, **overrides,
        ))
        t0 = time.perf_counter()
        train(cfg)
        metrics, _ = _evaluate(run_dir / "final", world, persona, base["answers"], protocol)
        shutil.rmtree(run_dir / "final")  # the study keeps metrics, not models
        metrics["knowledge_retained"] = metrics["knowledge"] / base["metrics"]["knowledge"]
        metrics["alignment_retained"] = metrics["alignment"] / base["metrics"]["alignment"]
        trace = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results.add({
            "level": level, "persona": persona, "method": method, "seed": seed, **metrics,
            "seconds": round(time.perf_counter() - t0, 1),
            "trace": {k: [row[k] for row in trace] for k in ("step", "loss", "logps_chosen", "logps_rejected", "logps_base")},
        })

    runs = results.data["runs"]
    results.data["base"] = base["metrics"]
    results.data["summary"] = summarize_runs(runs, ("level", "method"), METRICS)
    if only is not None:
        return {**results.data, "claims": []}
    results.data["claims"] = claims(results.data["summary"], protocol)
    results.data["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    results.save()
    figures(results.data, out)
    write_text_atomic(out / "report.md", report(results.data))
    return results.data


PILOT_LEARNING_RATES = (3e-5, 1e-4, 3e-4)
PILOT_ANCHOR_WEIGHTS = (0.1, 1.0, 10.0)
PILOT_LEVEL, PILOT_SEED = 2, 100


def run_pilot(out: str | Path = "out/study-bapo-pilot", threads: int | None = None) -> dict:
    """How the protocol's learning rate and BAPO's default λ were chosen, on a tuning seed (100) that no study
    uses, at heterogeneity 2, with the study's steps and batch otherwise:
    1. learning rate: the one of PILOT_LEARNING_RATES (3e-5, 1e-4, 3e-4) at which DPO reaches the highest style
       match (a choice about the baseline personalizing, blind to forgetting);
    2. λ: among PILOT_ANCHOR_WEIGHTS (0.1, 1, 10) at that learning rate, the smallest whose general alignment
       retained is ≥ 0.95 (else the one retaining most).

    History: the first pilot (60 steps) chose the learning rate by the highest *persona score*. That score is
    gated on the answer being correct, so as DPO moved toward the persona's style and began answering the wrong
    attribute, the gated score fell: it mixed forgetting into personalization, and the rule picked the learning
    rate at which DPO barely moved (3e-5). Rule 1 was changed to the ungated style match before any study seed
    was run under the new protocol. The new rule was first run at 60 steps (it chose 3e-4 and λ = 0.1); measured
    run times on the loaded machine then showed that the full mode would not fit in 75 minutes at 60 steps, so
    the steps were cut to 40 and the pilot rerun at 40, again before any study seed's outcome was seen.

    Writes pilot.json and pilot.md into `out` and returns the choices with every pilot run."""
    out = Path(out)
    base = BapoProtocol(mode="pilot", levels=[PILOT_LEVEL], seeds=[PILOT_SEED])
    rows = []
    for lr in PILOT_LEARNING_RATES:
        # anchor_weight does not act on DPO; fixed so the pilot does not depend on the default it chooses
        proto = BapoProtocol(**{**asdict(base), "learning_rate": lr, "anchor_weight": 1.0, "methods": ["dpo"]})
        data = run_study(out=out / f"dpo-lr{lr:g}", protocol=proto, threads=threads)
        rows += [{"sweep": "learning_rate", "value": lr, **_pilot_metrics(data)}]
    best_lr = max((r for r in rows if r["sweep"] == "learning_rate"), key=lambda r: r["style_match"])["value"]
    for lam in PILOT_ANCHOR_WEIGHTS:
        proto = BapoProtocol(**{**asdict(base), "learning_rate": best_lr, "anchor_weight": lam, "methods": ["bapo"]})
        data = run_study(out=out / f"bapo-lam{lam:g}-lr{best_lr:g}", protocol=proto, threads=threads)
        rows += [{"sweep": "anchor_weight", "value": lam, **_pilot_metrics(data)}]
    lam_rows = [r for r in rows if r["sweep"] == "anchor_weight"]
    good = [r for r in lam_rows if r["alignment_retained"] >= 0.95]
    best_lam = min(good, key=lambda r: r["value"])["value"] if good else max(lam_rows, key=lambda r: r["alignment_retained"])["value"]
    result = {"learning_rate": best_lr, "anchor_weight": best_lam, "protocol": asdict(base), "runs": rows}
    write_text_atomic(out / "pilot.json", json.dumps(result, indent=1))
    b = rows[0]
    lines = [f"# BAPO study pilot (tuning seed {PILOT_SEED}, heterogeneity {PILOT_LEVEL}, {base.steps} steps × batch {base.batch_size})",
             "", "\n\n".join(inspect.cleandoc(run_pilot.__doc__).split("\n\n")[:2]), "",
             f"Base model: style match {b['base_style_match']:.3f}, persona score {b['base_persona_score']:.3f}.", "",
             "| sweep | value | knowledge retained | alignment retained | style match | persona score | win rate | seconds |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['sweep']} | {r['value']:g} | {r['knowledge_retained']:.3f} | {r['alignment_retained']:.3f} | "
              f"{r['style_match']:.3f} | {r['persona_score']:.3f} | {r['win_rate']:.3f} | {r['seconds']} |" for r in rows]
    lines += ["", f"Chosen: learning rate {best_lr:g}, λ = {best_lam:g}.", ""]
    write_text_atomic(out / "pilot.md", "\n".join(lines))
    return result


def _pilot_metrics(data: dict) -> dict:
    run = data["runs"][0]
    keys = ("knowledge_retained", "alignment_retained", "style_match", "persona_score", "win_rate", "base_style_match",
            "base_persona_score", "seconds", "sample")
    return {k: run[k] for k in keys}
