"""`tether study bapo --model smollm2-135m-instruct`: DPO vs BAPO with LoRA on a real instruction-tuned model,
compared on their trade-off frontiers (protocol version 2).

Personalization data comes from the model itself (`tether_lab.instructed`): for each training prompt (no
instruction), chosen = the model's answer WITH the persona's instruction, rejected = its answer without (both
sampled at temperature 0.7, top-k 50, seeded). The persona is `simple` (explain to a ten-year-old; Flesch reading
ease); version 1's `concise` is dropped: at 48 new tokens its instructed answer scored higher in only 46% of
the pairs, so its data carried almost no signal. BAPO's base responses y_b are the model's greedy answers.

Each method sweeps its own knob with a fresh LoRA adapter per run, constant learning rate, no warm-up (so step k
of a run is a k-step run):
    DPO     one run per seed, evaluated at each of `dpo_eval_steps`: a frontier by steps
    BAPO    one run per λ of `anchor_weights` (hinge anchor) per seed, evaluated at the last step: a frontier
            across λ (λ → ∞ is the base model, λ = 0 is DPO). The grid spans the crossover of the anchor's
            per-pair gradient (λ) with DPO's (β·σ(−β·h) = 0.05 at the start) by about a decade each side.
Every evaluation point measures, on the shipped 399-question knowledge probe and on 50 held-out prompts:
    knowledge          multiple-choice accuracy (raw)
    retained           the fraction of the questions the base model got right that are still right
    churn              questions flipped right → wrong and wrong → right relative to the base model
    persona score      the persona's score of the greedy answers (no instruction in the prompt); gain = score − base's
    win rate vs base   the answer's persona score beats the base's answer's on the same prompt (ties half)

Verdicts (`claims`, rules fixed in code before any run of this protocol): curves of (gain, retained) per seed,
each starting at the base model (0, 1); a method's retention at a matched gain g is read where its curve first
reaches g (linear between the two points around it). Per seed one number, then a Student-t interval over seeds
on the paired (same seed) differences.
    1. At a persona gain of `target_gain`, BAPO retains more knowledge than DPO: d = BAPO − DPO retention; holds
       when every seed has d, there are ≥ MIN_SEEDS seeds, and the 95% t-interval of d lies above 0.
    2. BAPO reaches a persona gain within 0.05 of DPO's best while retaining ≥ 0.95: d = (BAPO's highest gain over
       its points with retained ≥ 0.95, the base's 0 included) − (DPO's highest gain); holds when ≥ MIN_SEEDS
       seeds and the 95% t-interval of d lies above −0.05.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from tether.config import load_config
from tether.evaluate import multiple_choice_correct
from tether.files import write_text_atomic
from tether.generation import generate
from tether.models import load_adapter, load_model, load_tokenizer
from tether.stats import win_rates
from tether.train import TrainConfig, train
from tether_lab.instructed import general_prompts, get_instructed_persona, instructed_preference_records
from tether_lab.probes import knowledge_questions
from tether_lab.studies.common import StudyResults, set_threads
from tether_lab.studies.report_bapo import at_gain, verdict

log = logging.getLogger("tether")
MIN_SEEDS = 2  # the protocol's floor; two seeds give a t-interval with 1 degree of freedom (t = 12.7): wide
MIN_RETAINED = 0.95
WITHIN = 0.05


@dataclass
class LlmBapoProtocol:
    """Set before any run of version 2. Learning rate, β, LoRA shape, data and step size are version 1's (set once,
    without a pilot); the schedule is constant so DPO's checkpoints are its frontier by steps. 20 steps: at
    version 1's 30 steps with a decaying rate DPO had already moved the persona score +0.43, far past BAPO's."""

    version: int = 2
    model: str = "smollm2-135m-instruct"
    persona: str = "simple"
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    train_prompts: int = 150
    eval_prompts: int = 50
    steps: int = 20
    dpo_eval_steps: list[int] = field(default_factory=lambda: [5, 10, 20])
    batch_size: int = 8
    learning_rate: float = 2e-4
    beta: float = 0.1
    anchor_weights: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    target_gain: float = 0.10  # persona-score points over the base's, where retention is compared (claim 1)
    lora_r: int = 16
    lora_alpha: int = 32
    max_new_tokens: int = 48
    data_temperature: float = 0.7

    def arms(self) -> list[tuple[str, float]]:
        """(method, λ) of every run, seeds aside; DPO runs as BAPO with λ = 0 (the same objective, and log π_θ(y_b)
        is logged for it too)."""
        return [("dpo", 0.0)] + [("bapo", lam) for lam in self.anchor_weights]


def protocol_for(model: str, quick: bool = False, seeds: list[int] | None = None) -> LlmBapoProtocol:
    """The CLI's protocols: seeds 0 and 1 (≈ 58 minutes for SmolLM2 on 2 cores), or with `quick` seed 0 only (≈ 33, estimated);
    `seeds` replaces the seed list."""
    proto = LlmBapoProtocol(model=model, seeds=[0] if quick else [0, 1])
    if seeds:
        proto.seeds = list(seeds)
    return proto


def _data(out: Path, protocol: LlmBapoProtocol, model, tok) -> Path:
    """The persona's preference file under out/data (generated once)."""
    path = out / "data" / f"{protocol.persona}.jsonl"
    if path.exists():
        return path
    prompts = general_prompts("train")[: protocol.train_prompts]
    kw = dict(
        max_new_tokens=protocol.max_new_tokens,
        do_sample=True,
        temperature=protocol.data_temperature,
        top_k=50,
        batch_size=16,
        progress=True,
    )
    default = generate(model, tok, prompts, seed=1, **kw)
    rows = instructed_preference_records(
        model, tok, get_instructed_persona(protocol.persona), prompts, default=default, seed=2, **kw
    )
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
    return path


def _measure(model, tok, protocol: LlmBapoProtocol) -> dict:
    prompts = general_prompts("test")[: protocol.eval_prompts]
    correct = multiple_choice_correct(model, tok, knowledge_questions(), batch_size=32)
    answers = generate(model, tok, prompts, max_new_tokens=protocol.max_new_tokens, batch_size=16)
    score = get_instructed_persona(protocol.persona).score
    return {
        "correct": "".join("1" if c else "0" for c in correct),
        "persona_scores": [score(a) for a in answers],
        "answers": answers,
    }


def point(step: int, m: dict, base: dict) -> dict:
    """One evaluation point relative to the base model's measurement."""
    right, base_right = [c == "1" for c in m["correct"]], [c == "1" for c in base["correct"]]
    kept = sum(r and b for r, b in zip(right, base_right, strict=True))
    persona, base_persona = _mean(m["persona_scores"]), _mean(base["persona_scores"])
    return {
        "step": step,
        "knowledge": _mean(right),
        "retained": kept / max(1, sum(base_right)),
        "right_to_wrong": sum(b and not r for r, b in zip(right, base_right)),
        "wrong_to_right": sum(r and not b for r, b in zip(right, base_right)),
        "persona_score": persona,
        "gain": persona - base_persona,
        "win_rate": _mean(win_rates(m["persona_scores"], base["persona_scores"])),
        "correct": m["correct"],
        "sample": m["answers"][0],
    }


def _mean(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


def _evaluate_run(run_dir: Path, steps: list[int], protocol: LlmBapoProtocol, tok, base: dict) -> list[dict]:
    """A point per evaluated step: the final adapter, or a checkpoint's LoRA tensors loaded into it."""
    from safetensors.torch import load_file

    model = load_adapter(run_dir / "final").eval()
    final = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    points = []
    for step in steps:
        weights = (
            final
            if step == protocol.steps
            else load_file(run_dir / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors")
        )
        result = model.load_state_dict(weights, strict=False)
        if result.unexpected_keys or set(weights) != set(final):
            raise RuntimeError(f"{run_dir}: checkpoint of step {step} does not match the adapter")
        points.append(point(step, _measure(model, tok, protocol), base))
    return points


def run_study(
    quick: bool = True,
    out: str | Path = "out/study-bapo-smollm2",
    protocol: LlmBapoProtocol | None = None,
    threads: int | None = None,
) -> dict:
    set_threads(threads)
    protocol = protocol or protocol_for(LlmBapoProtocol.model, quick=quick)
    out = Path(out)
    t_start = time.perf_counter()
    results = StudyResults(out, "bapo-llm", asdict(protocol))
    base_model, tok = load_model(protocol.model).eval(), load_tokenizer(protocol.model)
    base_file = out / "base_eval.json"
    reused = {
        "training data": (out / "data" / f"{protocol.persona}.jsonl").exists(),
        "base evaluation": base_file.exists(),
    }
    t0 = time.perf_counter()
    data_file = _data(out, protocol, base_model, tok)
    data_seconds = time.perf_counter() - t0
    if base_file.exists():
        base = json.loads(base_file.read_text())
    else:
        t0 = time.perf_counter()
        base = {**_measure(base_model, tok, protocol), "seconds": round(time.perf_counter() - t0, 1)}
        write_text_atomic(base_file, json.dumps(base))
    del base_model
    results.data["data"] = _data_stats(data_file)
    results.data["base"] = {
        "knowledge": _mean(c == "1" for c in base["correct"]),
        "persona_score": _mean(base["persona_scores"]),
        "seconds": base.get("seconds"),
        "sample": base["answers"][0],
    }

    todo = [(arm, s) for s in protocol.seeds for arm in protocol.arms()]  # seed by seed: a cut run has whole seeds
    bar = tqdm(todo, desc="study bapo (LLM)", unit="run")
    for (method, lam), seed in bar:
        if results.find(method=method, anchor_weight=lam, seed=seed):
            continue
        name = f"{method}-s{seed}" if method == "dpo" else f"bapo-lam{lam:g}-s{seed}"
        bar.set_postfix_str(name)
        run_dir = out / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts over
        eval_steps = sorted(set(protocol.dpo_eval_steps) | {protocol.steps}) if method == "dpo" else [protocol.steps]
        t0 = time.perf_counter()
        train(_train_config(protocol, data_file, run_dir, out, lam, seed, save_every=_save_every(eval_steps)))
        t_train = time.perf_counter() - t0
        points = _evaluate_run(run_dir, eval_steps, protocol, tok, base)
        shutil.rmtree(run_dir / "final")  # the study keeps metrics, not models
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        trace = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results.add(
            {
                "method": method,
                "anchor_weight": lam,
                "seed": seed,
                "points": points,
                "train_seconds": round(t_train, 1),
                "seconds": round(time.perf_counter() - t0, 1),
                "trace": {
                    k: [row.get(k) for row in trace]
                    for k in ("step", "loss", "logps_chosen", "logps_rejected", "logps_base")
                },
            }
        )

    results.data["claims"] = claims(results.data)
    results.data["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    results.data["data_seconds_this_invocation"] = round(data_seconds, 1)
    results.data["reused_this_invocation"] = [k for k, v in reused.items() if v]
    results.save()
    figures(results.data, out)
    write_text_atomic(out / "report.md", report(results.data))
    return results.data


def _save_every(steps: list[int]) -> int:
    """A checkpoint interval that hits every evaluated step before the last (0: none needed)."""
    inner = steps[:-1]
    return math.gcd(*inner) if inner else 0


def _train_config(
    protocol: LlmBapoProtocol, data_file: Path, run_dir: Path, out: Path, lam: float, seed: int, save_every: int
):
    return load_config(
        TrainConfig,
        None,
        dict(
            model=protocol.model,
            train_file=str(data_file),
            output_dir=str(run_dir),
            method="bapo",
            anchor_weight=lam,
            beta=protocol.beta,
            learning_rate=protocol.learning_rate,
            lr_scheduler="constant",
            warmup_steps=0,
            max_steps=protocol.steps,
            batch_size=protocol.batch_size,
            seed=seed,
            lora=True,
            lora_r=protocol.lora_r,
            lora_alpha=protocol.lora_alpha,
            save_steps=save_every,
            save_total_limit=0,
            progress=False,
            write_report=False,
            eval_batch_size=16,
            base_max_new_tokens=protocol.max_new_tokens,
            ref_cache_dir=str(out / "cache" / "reflogps"),
            max_length=256,
            max_prompt_length=96,
        ),
    )


def _data_stats(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    chosen, rejected = [r["chosen_score"] for r in rows], [r["rejected_score"] for r in rows]
    return {
        "pairs": len(rows),
        "chosen_score": _mean(chosen),
        "rejected_score": _mean(rejected),
        "chosen_scores_higher": sum(c > r for c, r in zip(chosen, rejected)) / max(1, len(rows)),
    }


# ---------------------------------------------------------------- verdicts (from results.json alone)


def curve(runs: list[dict], method: str, seed: int, key: str = "retained") -> list[tuple[float, float]]:
    """(gain, key) from the base model (0, base value) along DPO's steps, or across BAPO's λ from the largest."""
    start = {"retained": 1.0, "right_to_wrong": 0.0, "wrong_to_right": 0.0}[key]
    mine = [r for r in runs if r["method"] == method and r["seed"] == seed]
    if method == "dpo":
        pts = [p for r in mine for p in r["points"]]
    else:
        pts = [r["points"][-1] for r in sorted(mine, key=lambda r: -r["anchor_weight"])]
    return [(0.0, start)] + [(p["gain"], p[key]) for p in pts]


def best_gain(runs, method, seed, min_retained: float | None = None) -> float | None:
    pts = curve(runs, method, seed) if any(r["method"] == method and r["seed"] == seed for r in runs) else []
    ok = [g for g, r in pts if min_retained is None or r >= min_retained]
    return max(ok) if ok else None


def claims(data: dict) -> list[dict]:
    p, runs = data["protocol"], data["runs"]
    seeds, g = sorted({r["seed"] for r in runs}), p["target_gain"]
    ret = {m: {s: at_gain(curve(runs, m, s), g) for s in seeds} for m in ("bapo", "dpo")}
    d1 = {s: None if None in (ret["bapo"][s], ret["dpo"][s]) else ret["bapo"][s] - ret["dpo"][s] for s in seeds}
    bg = {s: best_gain(runs, "bapo", s, MIN_RETAINED) for s in seeds}
    dg = {s: best_gain(runs, "dpo", s) for s in seeds}
    d2 = {s: None if None in (bg[s], dg[s]) else bg[s] - dg[s] for s in seeds}
    return [
        {
            "claim": f"at a persona gain of +{g:g} over the base, BAPO retains more knowledge than DPO",
            **verdict(d1, 0.0, MIN_SEEDS),
            "bapo_retained": ret["bapo"],
            "dpo_retained": ret["dpo"],
        },
        {
            "claim": f"BAPO reaches a persona gain within {WITHIN:g} of DPO's best while retaining ≥ {MIN_RETAINED}",
            **verdict(d2, -WITHIN, MIN_SEEDS),
            "bapo_best_gain_retaining": bg,
            "dpo_best_gain": dg,
        },
    ]


# ---------------------------------------------------------------- figures and report


def _arm_label(run: dict) -> str:
    return "DPO" if run["method"] == "dpo" else f"BAPO λ={run['anchor_weight']:g}"


def _plot_curve(ax, pts, label=None, **style) -> None:
    """A curve from the base model: its first segment dashed (nothing was measured between the base and the first
    point: fewer steps, or a λ between ∞ and the largest), the rest solid."""
    ax.plot(*zip(*pts[:2]), ls="--", **{k: v for k, v in style.items() if k != "marker"})
    ax.plot(*zip(*pts[1:]), label=label, **style)


def figures(data: dict, out: Path) -> list[Path]:
    """frontier.png: knowledge retained against persona gain, DPO by steps and BAPO across λ, every seed (thin)
    and their mean (thick), the unmeasured segment from the base dashed, beside right→wrong and wrong→right flips
    along the same curves; mechanism_logps.png: log π_θ of chosen, rejected and base answers during training (lowest seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tether_lab.studies.report_bapo import _save, trace_figure

    p, runs = data["protocol"], data["runs"]
    seeds = sorted({r["seed"] for r in runs})
    paths = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    for ax, key, label in zip(
        axes,
        ("retained", "right_to_wrong", "wrong_to_right"),
        ("knowledge retained (of the base's right answers)", "questions right → wrong", "questions wrong → right"),
    ):
        for i, (method, name) in enumerate((("dpo", "DPO (by steps)"), ("bapo", "BAPO (across λ, largest first)"))):
            per_seed = [
                curve(runs, method, s, key)
                for s in seeds
                if any(r["method"] == method and r["seed"] == s for r in runs)
            ]
            for c in per_seed:
                _plot_curve(ax, c, color=f"C{i}", lw=0.7, alpha=0.5)
            if per_seed and len({len(c) for c in per_seed}) == 1:
                mean = [tuple(sum(v) / len(v) for v in zip(*pts)) for pts in zip(*per_seed)]
                _plot_curve(ax, mean, color=f"C{i}", lw=2.2, marker="o", label=f"{name}, mean of {len(per_seed)} seeds")
        ax.axvline(p["target_gain"], color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"persona gain ({p['persona']} score over the base's)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{p['model']}: knowledge against personalization (thin: each seed)", fontsize=10)
    paths.append(_save(plt, fig, out / "frontier.png"))
    seed = min(seeds) if seeds else 0
    mine = sorted((r for r in runs if r["seed"] == seed), key=lambda r: (r["method"] != "dpo", -r["anchor_weight"]))
    paths.append(
        trace_figure(
            plt,
            [(_arm_label(r), r["trace"]) for r in mine],
            f"seed {seed}: log π_θ during training",
            out / "mechanism_logps.png",
        )
    )
    return paths


def _num(v, digits: int = 3, sign: bool = False) -> str:
    return "–" if v is None else f"{v:{'+' if sign else ''}.{digits}f}"


def _ci(c: dict, digits: int = 3) -> str:
    i = c["interval"]
    if i.get("mean") is None:
        return "no value"
    if i.get("ci95_low") is None:
        return f"{i['mean']:+.{digits}f} (one seed: no interval)"
    return f"{i['mean']:+.{digits}f} [{i['ci95_low']:+.{digits}f}, {i['ci95_high']:+.{digits}f}] (n = {i['n']})"


def report(data: dict) -> str:
    p, base, d = data["protocol"], data["base"], data["data"]
    seeds = sorted({r["seed"] for r in data["runs"]})
    lines = [
        f"# BAPO vs DPO on {p['model']}: frontiers (protocol version {p['version']})",
        "",
        f"Persona `{p['persona']}`; LoRA r {p['lora_r']} (α {p['lora_alpha']}), {p['batch_size']} pairs per step, constant lr "
        f"{p['learning_rate']:g}, β {p['beta']}; DPO evaluated at steps {', '.join(map(str, sorted(set(p['dpo_eval_steps']) | {p['steps']})))}; "
        f"BAPO (hinge anchor) at λ ∈ {{{', '.join(f'{x:g}' for x in p['anchor_weights'])}}}, evaluated at step {p['steps']}; "
        f"seeds {seeds}; {p['train_prompts']} training prompts, {p['eval_prompts']} held-out prompts, the 399-question knowledge probe.",
        "",
        f"Pre-check — base model: knowledge {base['knowledge']:.3f}; {p['persona']} score {base['persona_score']:.3f}. "
        f"Training data (the model's own answers with vs without the instruction): {d['pairs']} pairs, chosen score "
        f"{d['chosen_score']:.3f}, rejected {d['rejected_score']:.3f}, chosen higher in {100 * d['chosen_scores_higher']:.0f}% of pairs.",
        "",
        "![frontiers](frontier.png)",
        "",
        "Verdicts (rules fixed in code before the runs; per seed one number, Student-t 95% interval over seeds of the "
        "paired difference):",
        "",
    ]
    for c in data["claims"]:
        state = "HOLDS" if c["holds"] else "does NOT hold"
        lines.append(
            f"- **{state}**: {c['claim']} — difference {_ci(c)}; per seed "
            + ", ".join(f"{s}: {_num(v, sign=True)}" for s, v in c["per_seed"].items())
        )
    early = {
        r["seed"]: r["points"][0]
        for r in data["runs"]
        if r["method"] == "dpo" and r["points"][0]["gain"] > p["target_gain"]
    }
    if early:
        lines += [
            "",
            "DPO passes the target gain before its first evaluated step on seed(s) "
            + ", ".join(
                f"{s} (step {pt['step']}: gain {pt['gain']:+.3f}, retained {pt['retained']:.3f})"
                for s, pt in sorted(early.items())
            )
            + f": there its retention at +{p['target_gain']:g} is read on the straight line from the base model (0, 1) to that "
            "point, an assumption about the unmeasured first steps.",
        ]
    if len(seeds) < 5:
        lines += [
            "",
            f"{len(seeds)} seed(s): an interval over so few seeds is wide (with 2 seeds t = 12.7), and a "
            "verdict rests on them alone; `--seeds 0,1,2,3,4` runs five.",
        ]
    lines += [
        "",
        "Every evaluation point (gain = persona score − the base's; churn counts questions of the 399):",
        "",
        "| seed | method | step | persona score | gain | win vs base | knowledge | retained | right→wrong | wrong→right |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(data["runs"], key=lambda r: (r["seed"], r["method"] != "dpo", -r["anchor_weight"])):
        for pt in r["points"]:
            lines.append(
                f"| {r['seed']} | {_arm_label(r)} | {pt['step']} | {pt['persona_score']:.3f} | {pt['gain']:+.3f} | "
                f"{pt['win_rate']:.2f} | {pt['knowledge']:.3f} | {pt['retained']:.3f} | {pt['right_to_wrong']} | {pt['wrong_to_right']} |"
            )
    lines += [
        "",
        "Retention at matched persona gain (interpolated on each seed's curve; – = the curve never reaches it):",
        "",
        "| gain | " + " | ".join(f"DPO s{s} | BAPO s{s}" for s in seeds) + " |",
        "|---|" + "---|---|" * len(seeds),
    ]
    for g in sorted({0.05, p["target_gain"], 0.2, 0.3}):
        lines.append(
            f"| +{g:g} | "
            + " | ".join(
                f"{_num(at_gain(curve(data['runs'], 'dpo', s), g))} | "
                f"{_num(at_gain(curve(data['runs'], 'bapo', s), g))}"
                for s in seeds
            )
            + " |"
        )
    lines += [
        "",
        "![log-probs during training](mechanism_logps.png)",
        "",
        f"Sample (first held-out prompt): base — {base['sample']!r}",
    ]
    for r in data["runs"]:
        if r["seed"] == min(seeds):
            lines.append(f"- {_arm_label(r)}, step {r['points'][-1]['step']}: {r['points'][-1]['sample']!r}")
    reused = data.get("reused_this_invocation")
    lines += [
        "",
        f"Wall time of the invocation that wrote this: {data.get('wall_seconds_this_invocation', 0) / 60:.1f} min"
        + (
            f" ({' and '.join(reused)} reused from an earlier invocation in the same directory)."
            if reused
            else f" (training data {data.get('data_seconds_this_invocation', 0) / 60:.1f} min, base evaluation "
            f"{(base.get('seconds') or 0) / 60:.1f} min)."
        ),
        "",
    ]
    return "\n".join(lines)
