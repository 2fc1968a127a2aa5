"""The rules of the BAPO study on a chat model, protocol version 3: settings, gates, the calibration's selection
rule and the claims — fixed here, in code, before any run of this version (docs/studies.md, "BAPO on SmolLM2").

Pure functions of results.json's data (no model, no torch), so a reader can check every verdict by hand.

Vocabulary. An *arm* is one training configuration (a loss, its β and learning rate, BAPO's λ); a *run* is an arm
trained on one seed's data, evaluated at some of its steps (constant learning rate, so step k of a run is a k-step
run). Each evaluation *point* has a persona *gain* (the persona's score of the greedy held-out answers minus the
base model's) and the *net knowledge loss* on the 399-question probe: questions flipped right → wrong minus those
flipped wrong → right, relative to the base model (positive = knowledge lost).

A curve is a run's points in step order. Its value at gain g is read between the two MEASURED points around the
first crossing of g — linear between them — and only when a measured point lies below g before it (never from the
base model, never past the last point); otherwise the value was not measured and is None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tether_lab.studies.verdicts import NOT_TESTABLE, failed_gates, gate, holm, paired_claim

VERSION = 3
TUNING_OFFSET = 1000  # the calibration's data and model seed: data_seed + 1000, never a study seed
CHOSEN_WINS_MIN = 0.80  # gate: the chosen answer beats the rejected on the persona score in this share of pairs
MIN_SEEDS = 5  # claims on the primary persona
MIN_REPLICATION_SEEDS = 3  # the replication persona's claim
MAX_EVAL_STEPS = 4  # evaluation points per confirmatory run, placed from the calibration curves


@dataclass
class Arm:
    """One training configuration. `kind`: dpo | baseline | bapo | null (SFT on the base model's own greedy
    answers: the NLL term alone, β so small that the preference term's gradient is nil)."""

    name: str
    kind: str
    loss: str = "dpo"
    learning_rate: float = 2e-4
    beta: float = 0.1
    anchor_weight: float = 0.0
    nll_weight: float = 0.0


NULL_BETA = 1e-6  # the null run's β: the DPO term's gradient is β·σ(−βh)·∇h ≤ 5e-7·∇h next to the NLL term's


def calibration_arms(p: LlmBapoProtocol) -> list[Arm]:
    """Every arm of the calibration stage: DPO over the lr × β grid, the baselines (IPO, SLiC, DPO+NLL) and
    BAPO over λ at the first grid point's lr and β, and the null run."""
    lr0, beta0 = p.dpo_learning_rates[0], p.dpo_betas[0]
    arms = [Arm(f"dpo-lr{lr:g}-b{b:g}", "dpo", "dpo", lr, b) for lr in p.dpo_learning_rates for b in p.dpo_betas]
    arms += [
        Arm(name, "baseline", loss, lr0, beta0, nll_weight=nll)
        for name, loss, nll in (("ipo", "ipo", 0.0), ("slic", "slic", 0.0), ("dpo+nll", "dpo", p.nll_weight))
        if name in p.baselines
    ]
    arms += [Arm(f"bapo-lam{lam:g}", "bapo", "dpo", lr0, beta0, anchor_weight=lam) for lam in p.anchor_weights]
    return arms + [Arm("null", "null", "dpo", lr0, NULL_BETA, nll_weight=1.0)]


@dataclass
class LlmBapoProtocol:
    """Protocol version 3 (set before any of its runs). Personas: `simple` carries the claims, `enthusiastic`
    replicates claim 1. Model, LoRA shape, data size, 48 new tokens, 20 steps, batch 8 and lr 2e-4 / β 0.1 are
    version 2's; new in 3: the calibration grid, the null run, matched gains at +0.15 and +0.25 (DPO's first
    measured point of version 2, step 5, was already at +0.37), own data per seed, and the gates."""

    version: int = VERSION
    model: str = "smollm2-135m-instruct"
    personas: list[str] = field(default_factory=lambda: ["simple", "enthusiastic"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    replication_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_seed: int = 0  # data of study seed s: data_seed + s; of the calibration: data_seed + TUNING_OFFSET
    train_prompts: int = 150
    eval_prompts: int = 50
    steps: int = 20
    batch_size: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    max_new_tokens: int = 48
    data_temperature: float = 0.7
    dpo_learning_rates: list[float] = field(default_factory=lambda: [2e-4, 1e-4])
    dpo_betas: list[float] = field(default_factory=lambda: [0.1, 0.5])  # the larger β: the tighter KL constraint
    baselines: list[str] = field(default_factory=lambda: ["ipo", "slic", "dpo+nll"])
    nll_weight: float = 1.0  # α of DPO+NLL
    anchor_weights: list[float] = field(default_factory=lambda: [0.003, 0.01, 0.03, 0.1])
    dpo_eval_steps: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 10, 20])
    other_eval_steps: list[int] = field(default_factory=lambda: [1, 2, 3, 5, 10, 20])
    matched_gains: list[float] = field(default_factory=lambda: [0.15, 0.25])
    quick: bool = False  # gates and calibration curves only (one persona, a reduced grid): never a verdict

    def arms(self) -> list[Arm]:
        return calibration_arms(self)

    def to_dict(self) -> dict:
        return asdict(self)


def quick_protocol(model: str = "smollm2-135m-instruct", data_seed: int = 0) -> LlmBapoProtocol:
    """`--quick`: the primary persona, DPO at lr 2e-4 / β 0.1, BAPO at λ 0.01, the null run, 10 steps."""
    return LlmBapoProtocol(
        model=model, personas=["simple"], seeds=[], replication_seeds=[], data_seed=data_seed, steps=10,
        dpo_learning_rates=[2e-4], dpo_betas=[0.1], baselines=[], anchor_weights=[0.01],
        dpo_eval_steps=[1, 2, 3, 5, 10], other_eval_steps=[1, 2, 3, 5, 10], quick=True,
    )  # fmt: skip


# ---------------------------------------------------------------- reading curves


def value_at(points: list[dict], gain: float, key: str = "net_loss") -> float | None:
    """`key` where the curve (points in step order) first reaches `gain`, read between measured points only."""
    for before, after in zip(points, points[1:]):
        if after["gain"] >= gain:
            if before["gain"] >= gain:
                return None  # crossed before the first measured point: not measured
            t = (gain - before["gain"]) / (after["gain"] - before["gain"])
            return before[key] + t * (after[key] - before[key])
    return None


def brackets(points: list[dict], gains: list[float]) -> bool:
    return all(value_at(points, g) is not None for g in gains)


def best_at(runs: list[dict], gain: float) -> float | None:
    """The lowest net knowledge loss at `gain` over several runs' curves (a method's frontier over its knob)."""
    values = [v for r in runs if (v := value_at(r["points"], gain)) is not None]
    return min(values) if values else None


# ---------------------------------------------------------------- gates and the selection rule


def chosen_wins(rows: list[dict]) -> float:
    return sum(r["chosen_score"] > r["rejected_score"] for r in rows) / max(1, len(rows))


def data_gate(persona: str, share: float) -> dict:
    return gate(
        f"data-{persona}",
        round(share, 4),
        f"≥ {CHOSEN_WINS_MIN:g}",
        share >= CHOSEN_WINS_MIN,
        "share of tuning pairs whose chosen answer has the higher persona score",
    )


def select(p: LlmBapoProtocol, calibration: list[dict]) -> tuple[dict, list[dict]]:
    """The rule, applied to the calibration runs of the primary persona: returns (selection, gates).

    DPO       the grid arm whose measured points bracket every matched gain, with the most measured points
              between the lowest and highest gain (ties: the smaller lr, then the smaller β);
    BAPO      of the λ whose curves bracket every matched gain, the two largest (the most anchoring that still
              personalizes as far);
    baseline  of IPO, SLiC and DPO+NLL bracketing the lowest matched gain, the lowest net knowledge loss there;
    null      the null run;
    steps     per selected arm, for each matched gain the last measured step below it and the first at or above
              it (the null run takes DPO's), topped up from the earliest calibration steps to MAX_EVAL_STEPS.
    """
    gains, lo, hi = p.matched_gains, min(p.matched_gains), max(p.matched_gains)
    by_kind = {k: [r for r in calibration if r["kind"] == k] for k in ("dpo", "baseline", "bapo", "null")}

    dpo_ok = [r for r in by_kind["dpo"] if brackets(r["points"], gains)]
    dpo_ok.sort(key=lambda r: (-sum(lo <= pt["gain"] <= hi for pt in r["points"]), r["learning_rate"], r["beta"]))
    bapo_ok = sorted((r for r in by_kind["bapo"] if brackets(r["points"], gains)), key=lambda r: -r["anchor_weight"])
    base_ok = [(v, r["arm"]) for r in by_kind["baseline"] if (v := value_at(r["points"], lo)) is not None]
    null = by_kind["null"][0] if by_kind["null"] else None

    chosen = {
        "dpo": dpo_ok[0]["arm"] if dpo_ok else None,
        "bapo": [r["arm"] for r in bapo_ok[:2]],
        "baseline": min(base_ok)[1] if base_ok else None,
        "null": "null" if null else None,
    }
    steps = {r["arm"]: eval_steps(r["points"], gains) for r in calibration if r["arm"] in selected_arms(chosen)}
    if chosen["null"] and chosen["dpo"]:
        steps["null"] = steps[chosen["dpo"]]
    gates = [
        gate(
            "dpo-brackets",
            [r["arm"] for r in dpo_ok],
            "≥ 1 DPO arm",
            bool(dpo_ok),
            f"DPO arms whose measured points bracket each matched gain {gains}",
        ),
        gate(
            "bapo-brackets",
            chosen["bapo"],
            "≥ 1 λ",
            bool(bapo_ok),
            f"BAPO λ whose measured points bracket each matched gain {gains}",
        ),
        gate(
            "null-measured",
            len(null["points"]) if null else 0,
            "≥ 1 point",
            bool(null and null["points"]),
            "the null run's churn is measured",
        ),
        gate(
            "baseline-brackets",
            chosen["baseline"],
            "≥ 1 baseline",
            bool(base_ok) or not p.baselines,
            f"a baseline's measured points bracket +{lo:g} (gates claim 3 only)",
        ),
    ]
    return {"arms": chosen, "eval_steps": steps}, gates


def selected_arms(chosen: dict) -> list[str]:
    """The arm names of a selection's "arms" (a name, a list of names, or None per kind)."""
    return [n for v in chosen.values() for n in (v if isinstance(v, list) else [v]) if n]


def eval_steps(points: list[dict], gains: list[float]) -> list[int]:
    steps: set[int] = set()
    for g in gains:
        for before, after in zip(points, points[1:]):
            if after["gain"] >= g:
                steps |= {before["step"], after["step"]}
                break
    for pt in points:
        if len(steps) >= MAX_EVAL_STEPS:
            break
        steps.add(pt["step"])
    return sorted(steps)[:MAX_EVAL_STEPS]


# ---------------------------------------------------------------- claims


STOPPING_GATES = ("dpo-brackets", "bapo-brackets", "null-measured")  # and the primary persona's data gate


def claims(data: dict) -> list[dict]:
    """The four claims with their verdicts (Holm over the testable ones). d > 0 means BAPO loses less knowledge."""
    p = data["protocol"]
    gates = data.get("gates", [])
    failed = failed_gates(gates)
    stop = [g for g in failed if g in STOPPING_GATES or g == "data-" + p["personas"][0]]
    runs = [r for r in data["runs"] if r["stage"] == "confirmatory"]
    primary, lo = p["personas"][0], min(p["matched_gains"])
    out = []
    for g in p["matched_gains"]:
        out.append(
            paired_claim(
                f"{primary}: at a persona gain of +{g:g}, BAPO loses less knowledge than DPO",
                _differences(runs, primary, p["seeds"], "dpo", g),
                0.0,
                MIN_SEEDS,
                stop + _quick(p),
            )
        )
    out.append(
        paired_claim(
            f"{primary}: at +{lo:g}, BAPO loses less knowledge than the best baseline the calibration selected",
            _differences(runs, primary, p["seeds"], "baseline", lo),
            0.0,
            MIN_SEEDS,
            stop + [g for g in failed if g == "baseline-brackets"] + _quick(p),
        )
    )
    if len(p["personas"]) > 1:
        second = p["personas"][1]
        out.append(
            paired_claim(
                f"replication, {second}: at +{lo:g}, BAPO loses less knowledge than DPO",
                _differences(runs, second, p["replication_seeds"], "dpo", lo),
                0.0,
                MIN_REPLICATION_SEEDS,
                stop + [g for g in failed if g == f"data-{second}"] + _quick(p),
            )
        )
    return holm(out)


def _quick(p: dict) -> list[str]:
    return ["quick mode (gates and curves only; no verdict)"] if p.get("quick") else []


def _differences(runs, persona, seeds, other_kind, gain) -> dict:
    """Per seed: the other method's net knowledge loss at `gain` minus BAPO's frontier's (None if unmeasured)."""
    out = {}
    for s in seeds:
        mine = [r for r in runs if r["persona"] == persona and r["seed"] == s]
        bapo = best_at([r for r in mine if r["kind"] == "bapo"], gain)
        other = best_at([r for r in mine if r["kind"] == other_kind], gain)
        out[s] = None if bapo is None or other is None else other - bapo
    return out


def untestable(c: dict) -> bool:
    return c["verdict"] == NOT_TESTABLE
