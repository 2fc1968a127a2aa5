"""The rules of the BPO study on a chat model, protocol version 5 (issue 24; docs/studies.md, "BPO on SmolLM2"):
settings, the cost model, every gate, the calibration rule, the seed count and the claims — fixed here, in code,
before any run of this version. Pure functions of results.json's data (no model, no torch).

History. Version 3 (β 0.1, lr grid {1e-4, 2e-4, 4e-4}; reports/bpo-smollm2/) stopped at its margin-at-half gate:
median β|h| 0.222 at T/2 (bar 1). Version 4 (β 1.0, lr grid {1e-5, 2e-5, 4e-5}; reports/bpo-smollm2-v4/) kept
lr·β and stopped at the same gate on 2026-12-03: 0.451. Neither computed a claim.

What version 4 taught. Its premise was wrong: it assumed the policy moves by about lr·β per step (plain SGD on
β·σ(−βh)·∇h). The optimizer is Adam, which divides each update by the gradient's own running scale, so the
policy moves by about lr per step whatever β is, and β|h| grows as β·lr (while σ(−βh) ≈ ½). The runs show it:
offline DPO at β 0.1, lr 1e-4 (version 3) and at β 1, lr 1e-5 (version 4) have the same β|h| at every step
(0.09, 0.11, 0.12 … at steps 9, 12, 15), i.e. |h| ten times smaller at β 1. Over both versions |h| at T/2 ≈
1.2·10⁴·lr nats (lr 4e-5: 0.35–0.45; 1e-4: 1.2; 4e-4: 5), and the win rate follows lr, not β (offline DPO at
lr 4e-5: 64.6%; at 1e-4: 78.6%; at 2e-4: 96.9%, the last two at β 0.1 where σ stays near ½).

Version 5 = version 4 with two changes, made after version 4 stopped and before any run of version 5:
    β            1.0 → 2.0, and
    lr grid      {1e-5, 2e-5, 4e-5} → {5e-5, 1e-4, 2e-4}: the learning rates that move the policy to the
                 calibration's range (version 3: 1e-4 landed at 78.6%), and β large enough that β|h| at T/2
                 reaches about 1.2 (lr 5e-5) to 2.4 (lr 1e-4) before σ's saturation slows it, so the bar of 1
                 is within reach at the rates the calibration can pick. The calibration rule (nearest 70%) is
                 unchanged; IPO takes the same β (its target margin 1/(2β) is 0.25).
    quick        lr 2e-5 → 1e-4 (the grid's middle).
Every gate, threshold, setting, metric, claim and the cost model are version 4's.

Regime (issue 24, item 2). The headline regime is (b), SmolLM2-135M-Instruct as π_sft with the `simple` persona's
programmatic score as the oracle (tether_lab.instructed: Flesch reading ease / 100). Why (b) and not a new world
recipe (a): protocol 2 on the world collapsed because the tiny world model has one deterministic house answer per
question, which is also the reference; a real chat model's T = 1 samples differ from each other on almost every
prompt, and a simpler answer is a small step from its usual one (the BAPO study's instructed data: the instructed
answer scores higher in 89% of pairs). A world recipe is not built in this version; the world study (protocol 2)
stays as it is. The replication is a second data seed (`--data_seed`), named in the report.

    π_sft        the model as it is; π_β samples at temperature 1, top-k 50, ≤ max_new_tokens new tokens
    π_gold       the same model prompted with the persona's instruction as its system message (a fixed model
                 that is better on the oracle: gate gold-wins); as a reference, π_gold(y|x) is π_sft's
                 log-probability of y after the instruction and x
    prompts      instructed.prompt_pool(data_seed): 1,632 training prompts (204 topics × 8 templates), each used
                 at most once per run (B·T = 256), in an order drawn by the run seed; 96 dev and 96 test prompts
                 on 48 held-out topics each; tuning runs evaluate on dev, study runs on test
    reference    π_sft's greedy answers to the evaluation prompts (so π_sft's own greedy win rate is 50%: ties)
    settings     DPO at offline (F = 1), BPO F = 2 and F = T (π_ref = π_β), on-policy (F = T, π_ref = π_sft),
                 π_ref = π_gold (F = T); IPO at F = 1 and F = 2; one LoRA adapter (r 16, α 32), β 2.0 (IPO
                 takes the same β: its target margin 1/(2β) is 0.25), the calibrated learning rate decaying
                 linearly to 0 (no warm-up), as in the paper's code. No LoRA
                 ensemble (protocol 2 had 3): it triples the update and does not fit; so at F = T with π_ref =
                 π_β, h = 0 at every step and the loss's gradient is β/2·∇h (the algorithm, not a defect)
    seeds        the run seed s is shared by every setting of a study seed (prompt order, sampling seeds, LoRA
                 initialisation): offline and F = 2 are the same run until T/2, so each claim is a paired
                 per-seed difference; tuning seeds TUNING_SEEDS are never study seeds

Metrics at every evaluation point (item 3), on the split's evaluation prompts: the greedy win rate against the
reference text (the paper's metric; the claims' metric), the mean persona score of one T = 1 sample per prompt
(`sampled_score`), and the win rate of that sample against a sample of π_sft drawn with other seeds
(`sampled_win_rate`); all against the annotations spent. Ties count one half. The samples of every evaluation use
the same seeds, so checkpoints and settings are compared on common random numbers.

Gates (item 1), checked in this order on the tuning seeds, each printed when decided; the first that fails stops
the study, and then every claim is not testable:
    gold-wins        π_gold's greedy win rate on dev ≥ 80%
    offline-lands    calibration: offline DPO on tuning seed 1000 at each learning rate of the grid; the rule
    offline-rising   (`calibrate`) keeps the rates whose final win rate is in [55%, 85%] and whose win rate at
                     T is above that at T/2 (still rising at T/2), and picks the one nearest 70%
    identical-pairs  on-policy DAP (π_ref = π_sft) at that rate, tuning seed 1000: ≤ 20% of its sampled pairs
                     have two identical answers
    margin-at-half   the same run: the median β|h| over the pairs of the T/8 steps around T/2 ≥ 1 (h as the
                     loss saw it, before each step's update)
    seeds            offline and BPO F = 2 on tuning seeds 1000 and 1001: the sd of claim 1's two paired
                     differences sets n, the fewest seeds (≥ 5) whose 95% t half-width is ≤ 4 points; the gate
                     fails when n exceeds the seeds the budget holds (`max_seeds`): the claims are then not
                     testable (underpowered), said, never run at a smaller n and judged

Claims (item 5): `claims`. The aggregate view (item 4): `aggregates` (studies/aggregate.py).

Budget (the machine: 2 cores). The cost model (`run_seconds`) takes the step costs measured in version 3's tuning
runs on 2 idle cores (the constants below; version 3 had assumed half the sampling cost): sampling 10.2 ms per
token row, evaluation 8.2 ms per token row (its batches are larger), a LoRA update on 8 pairs ≈ 5.4 s at 40 new
tokens (× 1.4 with a live reference, on-policy and π_gold), 20 s of fixed cost per run.

Full mode, 40 new tokens: a run ≈ 10.9 minutes (12.0 with a live reference); tuning (3 calibration runs, 4
pilots, the dev data) ≈ 79 minutes; one study seed (7 runs) ≈ 79 minutes; so 8 hours hold 5 study seeds (7.9 h
with the test data), and a pilot that asks for more makes the seeds gate fail (underpowered). Every run is saved
as it finishes; `--resume` continues across sittings. `--quick` (T = 8, 32 new tokens, 32 dev prompts, 2
evaluation points, one learning rate, the gate runs, no study seed): ≈ 12.5 minutes by the model; version 3's
took 5 min 21 s from a clean cache (BENCHMARKS.md).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field

from tether.config import TetherError
from tether.stats import t_interval, t_quantile
from tether_lab.studies.aggregate import aggregate
from tether_lab.studies.verdicts import HOLDS, failed_gates, gate, holm, paired_claim

VERSION = 5
TUNING_SEEDS = (1000, 1001)  # the gate pilots' run seeds, never a study seed
GOLD_WIN_MIN = 0.80
OFFLINE_RANGE = (0.55, 0.85)
OFFLINE_TARGET = 0.70  # the calibration picks the passing learning rate whose offline DPO lands nearest this
IDENTICAL_MAX = 0.20
RISE_MIN = 0.0  # points: offline DPO's win rate at T minus at T/2 must exceed this ("still rising at T/2")
MARGIN_MIN = 1.0  # median β|h| at T/2 of on-policy DAP (π_ref = π_sft)
HALF_WIDTH = 4.0  # points: the 95% t-interval half-width the seed count aims at (about half the paper's +8.2)
MIN_SEEDS = 5

# setting -> (phases F: "1", "2" or "T"; π_ref: behavior = π_β, sft = π_sft, gold = π_sft prompted as the persona)
SETTINGS = {
    "offline": ("1", "behavior"),
    "bpo-f2": ("2", "behavior"),
    "bpo-ft": ("T", "behavior"),
    "on-policy": ("T", "sft"),
    "gold-ref": ("T", "gold"),
}
LABELS = {
    "offline": "offline (F=1)",
    "bpo-f2": "BPO F=2",
    "bpo-ft": "BPO F=T",
    "on-policy": "on-policy, π_ref=π_sft (F=T)",
    "gold-ref": "π_ref=π_gold (F=T)",
}
METRICS = ("win_rate", "sampled_score", "sampled_win_rate")  # final values of a run (module docstring)
METRIC_LABELS = {
    "win_rate": "greedy win rate vs the reference text",
    "sampled_score": "sampled (T=1) mean persona score",
    "sampled_win_rate": "sampled win rate vs π_sft",
    "greedy_score": "greedy mean persona score",
}


@dataclass
class LlmBpoProtocol:
    """Protocol version 5 (set before any of its runs); the module docstring says why each number."""

    version: int = VERSION
    model: str = "smollm2-135m-instruct"
    persona: str = "simple"  # the oracle (its programmatic score) and π_gold (its instruction)
    data_seed: int = 0  # the prompt pool's split into train / dev / test topics, and π_sft's comparison samples
    quick: bool = False  # gates and curves only: never a verdict
    steps: int = 32  # T
    prompts_per_step: int = 8  # B: annotations B·T = 256 per run, each prompt of the pool used at most once
    max_new_tokens: int = 40
    eval_prompts: int = 96  # of the dev split (tuning runs) or the test split (study runs)
    eval_points: int = 4  # evaluations at T/4, T/2, 3T/4 and T (π_sft's, measured once, is step 0)
    heldout_topics: int = 48  # per held-out split, each in 2 templates: 96 dev and 96 test prompts
    train_prompts: int = 0  # the first N of the pool's training prompts (in the data seed's order); 0 = all
    beta: float = 2.0  # version 3: 0.1, version 4: 1.0 (module docstring)
    learning_rates: list[float] = field(default_factory=lambda: [5e-5, 1e-4, 2e-4])  # the calibration's grid
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))  # with DPO, on every study seed
    second_loss: str = "ipo"
    second_loss_settings: list[str] = field(default_factory=lambda: ["offline", "bpo-f2"])
    lora_r: int = 16
    lora_alpha: int = 32
    temperature: float = 1.0
    top_k: int = 50
    budget_hours: float = 8.0

    def validate(self) -> None:
        """A protocol the rules can judge: known settings, T/2 an evaluated step, a learning-rate grid, enough
        held-out prompts."""
        unknown = [s for s in (*self.settings, *self.second_loss_settings) if s not in SETTINGS]
        if unknown:
            raise TetherError(f"protocol: unknown setting(s) {unknown}; choose from {', '.join(SETTINGS)}")
        if self.steps % self.eval_points or self.steps // 2 not in self.eval_steps() or self.steps % 2:
            raise TetherError(f"protocol: steps {self.steps} and eval_points {self.eval_points} must evaluate T/2")
        if not self.learning_rates:
            raise TetherError("protocol: learning_rates is empty (the calibration's grid)")
        if self.eval_prompts > 2 * self.heldout_topics:
            raise TetherError(f"protocol: eval_prompts {self.eval_prompts} > the {2 * self.heldout_topics} prompts of "
                              f"{self.heldout_topics} held-out topics")  # fmt: skip

    def phases(self, setting: str) -> int:
        return {"1": 1, "2": 2, "T": self.steps}[SETTINGS[setting][0]]

    def jobs(self) -> list[tuple[str, str]]:
        """(setting, loss) of every run of one study seed: the DPO settings, then the second loss's."""
        return [(s, "dpo") for s in self.settings] + [(s, self.second_loss) for s in self.second_loss_settings]

    def eval_steps(self) -> list[int]:
        every = self.steps // self.eval_points
        return [every * k for k in range(1, self.eval_points + 1)]

    def to_dict(self) -> dict:
        return asdict(self)


def quick_protocol(model: str = "smollm2-135m-instruct", data_seed: int = 0) -> LlmBpoProtocol:
    """`--quick`: the gates in order on a reduced regime (T = 8, 32 new tokens, 32 dev prompts, lr 1e-4 alone), no
    study seed: gates and curves, never a verdict."""
    return LlmBpoProtocol(
        model=model, data_seed=data_seed, quick=True, steps=8, max_new_tokens=32, eval_prompts=32, eval_points=2,
        learning_rates=[1e-4], settings=[], second_loss_settings=[],
    )  # fmt: skip


def tuning_jobs() -> list[tuple[str, int]]:
    """(setting, seed) of the pilots at the calibrated learning rate (DPO); offline on the first tuning seed is the
    calibration's own run."""
    a, b = TUNING_SEEDS
    return [("on-policy", a), ("bpo-f2", a), ("offline", b), ("bpo-f2", b)]


# ---------------------------------------------------------------- the cost model (module docstring, "Budget")

# measured on version 3's tuning runs (module docstring): offline DPO at lr 4e-4 sampled 32 steps × 16 rows × ≤ 40
# tokens in 209 s; its 4 evaluation points (96 prompts × a greedy and a sampled answer of ≤ 40 tokens) took 252 s
SAMPLE_S_PER_TOKEN_ROW = 209.3 / (32 * 16 * 40)
EVAL_S_PER_TOKEN_ROW = 252.0 / (4 * 2 * 96 * 40)
PROMPT_TOKENS = 40  # a chat prompt with SmolLM2's template
UPDATE_S_PER_PAIR_TOKEN = 7.0 / (8 * (PROMPT_TOKENS + 64))  # issue 24: ≈ 7 s per LoRA update on 8 such pairs
LIVE_REFERENCE_FACTOR = 1.4  # a live π_ref forward: 9.37 vs 6.69 s per LoRA DPO step (BENCHMARKS.md, issue 6)
RUN_OVERHEAD_S = 20.0  # loading the model and LoRA, the final adapter, results
DATA_S_PER_SPLIT_PROMPT = 3  # per held-out prompt: π_sft greedy, π_gold greedy, π_sft sampled (token rows ×)
MODEL_BUILD_S = 30.0  # a clean cache: SmolLM2's GGUF read and saved as safetensors, ≈ 25 s (docs/smollm2.md)


def run_seconds(p: LlmBpoProtocol, setting: str) -> float:
    """Estimated wall seconds of one run on 2 idle cores: T steps of sampling and update, the evaluation points
    (a greedy and a sampled answer per evaluation prompt), the fixed overhead."""
    sample = 2 * p.prompts_per_step * p.max_new_tokens * SAMPLE_S_PER_TOKEN_ROW
    update = p.prompts_per_step * (PROMPT_TOKENS + p.max_new_tokens) * UPDATE_S_PER_PAIR_TOKEN
    if SETTINGS[setting][1] in ("sft", "gold"):
        update *= LIVE_REFERENCE_FACTOR
    evaluation = p.eval_points * 2 * p.eval_prompts * p.max_new_tokens * EVAL_S_PER_TOKEN_ROW
    return p.steps * (sample + update) + evaluation + RUN_OVERHEAD_S


def data_seconds(p: LlmBpoProtocol, splits: int) -> float:
    return splits * DATA_S_PER_SPLIT_PROMPT * p.eval_prompts * p.max_new_tokens * SAMPLE_S_PER_TOKEN_ROW


def tuning_seconds(p: LlmBpoProtocol) -> float:
    """The calibration grid (offline DPO per learning rate), the pilots and the dev split's data."""
    grid = len(p.learning_rates) * run_seconds(p, "offline")
    return grid + sum(run_seconds(p, s) for s, _ in tuning_jobs()) + data_seconds(p, 1)


def seed_seconds(p: LlmBpoProtocol) -> float:
    return sum(run_seconds(p, s) for s, _ in p.jobs())


def max_seeds(p: LlmBpoProtocol) -> int:
    """The study seeds the budget holds after the tuning stage and the test split's data."""
    left = p.budget_hours * 3600 - tuning_seconds(p) - data_seconds(p, 1)
    return max(0, math.floor(left / seed_seconds(p))) if p.jobs() else 0


def estimated_seconds(p: LlmBpoProtocol, seeds: int, clean_cache: bool = False) -> float:
    study = seeds * seed_seconds(p) + (data_seconds(p, 1) if seeds else 0.0)
    return tuning_seconds(p) + study + (MODEL_BUILD_S if clean_cache else 0.0)


# ---------------------------------------------------------------- reading runs


def at_step(run: dict, metric: str, step: int) -> float | None:
    """A run's evaluated `metric` at `step` (None when that step was not evaluated)."""
    curves = run["curves"]
    return curves[metric][curves["step"].index(step)] if step in curves["step"] else None


def find(runs: list[dict], **setting) -> dict | None:
    return next((r for r in runs if all(r.get(k) == v for k, v in setting.items())), None)


def margin_window(p: LlmBpoProtocol | dict) -> list[int]:
    """The (0-based) steps around T/2 whose pairs the margin gate reads: T/8 of them (at least 2), centred."""
    steps = p["steps"] if isinstance(p, dict) else p.steps
    width = max(2, steps // 8)
    return list(range(steps // 2 - width // 2, steps // 2 - width // 2 + width))


def median_abs_margin(run: dict, steps: list[int]) -> float | None:
    """The median of β|h| over the usable pairs of `steps` (h as the loss saw it, before the step's update)."""
    values = [abs(m) for s in steps if s < len(run["pair_margins"]) for m in run["pair_margins"][s]]
    return statistics.median(values) if values else None


def identical_share(run: dict) -> float:
    return run["identical_pairs"] / max(1, run["ledger_rows"])


# ---------------------------------------------------------------- the gates, in the order they are checked


def gold_gate(win_rate: float) -> dict:
    return gate(
        "gold-wins",
        round(win_rate, 4),
        f"≥ {GOLD_WIN_MIN:g}",
        win_rate >= GOLD_WIN_MIN,
        "π_gold's greedy win rate against the reference text on the dev prompts (ties count one half)",
    )


def offline_check(p: LlmBpoProtocol, run: dict) -> tuple[float, float, bool, bool]:
    """(final win rate, its rise from T/2 to T in points, lands in OFFLINE_RANGE, still rising at T/2)."""
    final = run["win_rate"]
    half = at_step(run, "win_rate", p.steps // 2)
    rise = 100 * (final - half) if half is not None else float("nan")
    return final, rise, OFFLINE_RANGE[0] <= final <= OFFLINE_RANGE[1], rise > RISE_MIN


def calibrate(p: LlmBpoProtocol, runs: list[dict]) -> tuple[float | None, list[dict]]:
    """The calibration rule over offline DPO on the first tuning seed, one run per learning rate of the grid: of
    the learning rates whose run lands in OFFLINE_RANGE and is still rising at T/2 (its win rate at T above its
    win rate at T/2), the one landing nearest OFFLINE_TARGET (a tie: the smaller). Returns (that learning rate
    or None, the gates offline-lands and offline-rising, shown for the chosen rate, or for the rate nearest the
    target when none passes)."""
    checks = {r["learning_rate"]: offline_check(p, r) for r in runs}
    passing = [lr for lr, (_, _, lands, rising) in checks.items() if lands and rising]
    nearest = sorted(passing or checks, key=lambda lr: (abs(checks[lr][0] - OFFLINE_TARGET), lr))
    if not nearest:
        return None, [gate("offline-lands", None, "a calibration run", False, "no offline calibration run")]
    shown = nearest[0]
    final, rise, lands, rising = checks[shown]
    grid = "; ".join(f"lr {lr:g}: {100 * c[0]:.1f}%, {c[1]:+.1f} after T/2" for lr, c in sorted(checks.items()))
    gates = [
        gate("offline-lands", round(final, 4), f"in [{OFFLINE_RANGE[0]:g}, {OFFLINE_RANGE[1]:g}]", lands,
             f"offline DPO's final win rate at lr {shown:g} (grid: {grid})"),
        gate("offline-rising", round(rise, 2), f"> {RISE_MIN:g} points", rising,
             f"offline DPO's win rate at T minus at T/2, lr {shown:g}"),
    ]  # fmt: skip
    return (shown if passing else None), gates


def on_policy_gates(p: LlmBpoProtocol, run: dict) -> list[dict]:
    """On-policy DAP (F = T, π_ref = π_sft) on the first tuning seed: identical pairs and β|h| at T/2."""
    share, window = identical_share(run), margin_window(p)
    margin = median_abs_margin(run, window)
    return [
        gate("identical-pairs", round(share, 4), f"≤ {IDENTICAL_MAX:g}", share <= IDENTICAL_MAX,
             f"share of on-policy's sampled pairs whose two answers are identical ({run['identical_pairs']} of "
             f"{run['ledger_rows']})"),
        gate("margin-at-half", None if margin is None else round(margin, 3), f"≥ {MARGIN_MIN:g}",
             margin is not None and margin >= MARGIN_MIN,
             f"median β|h| of on-policy's pairs at steps {window[0] + 1}–{window[-1] + 1} (of T = {p.steps})"),
    ]  # fmt: skip


def seeds_needed(sd: float, half_width: float = HALF_WIDTH, least: int = MIN_SEEDS, most: int = 10_000) -> int:
    """The smallest n ≥ `least` (and ≥ 2: an interval needs two) whose 95% t-interval half-width
    t(0.975, n−1)·sd/√n is at most `half_width`."""
    n = max(2, least)
    while n < most and t_quantile(0.975, n - 1) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def pilot_differences(runs: list[dict]) -> list[float | None]:
    """Claim 1's paired difference on each tuning seed, in points: BPO F=2's final win rate minus offline's."""
    out = []
    for seed in TUNING_SEEDS:
        a, b = (find(runs, setting=s, loss="dpo", seed=seed) for s in ("bpo-f2", "offline"))
        out.append(None if a is None or b is None else 100 * (a["win_rate"] - b["win_rate"]))
    return out


def seed_plan(p: LlmBpoProtocol, runs: list[dict]) -> tuple[dict, dict]:
    """The number of study seeds from the two pilot seeds' spread (sd of claim 1's paired differences): enough
    for a ±HALF_WIDTH-point 95% t-interval, at least MIN_SEEDS; the gate `seeds` fails when the budget holds
    fewer (the claims are then not testable, underpowered: they are never run at a smaller n and judged)."""
    diffs = pilot_differences(runs)
    cap = max_seeds(LlmBpoProtocol(model=p.model) if p.quick else p)  # quick: what the full protocol's budget holds
    if None in diffs:
        return {"seeds": [], "needed": None, "max_seeds": cap}, gate("seeds", None, "two pilot seeds", False)
    sd = statistics.stdev(diffs)
    needed = seeds_needed(sd, HALF_WIDTH, MIN_SEEDS)
    plan = {"seeds": list(range(needed)) if needed <= cap else [], "needed": needed, "sd": round(sd, 3),
            "pilot_differences": [round(d, 3) for d in diffs], "max_seeds": cap}  # fmt: skip
    return plan, gate(
        "seeds", needed, f"≤ {cap} (the {p.budget_hours:g}-hour budget)", needed <= cap,
        f"seeds for a ±{HALF_WIDTH:g}-point 95% half-width, from the sd {sd:.2f} of BPO F=2 − offline on the "
        f"tuning seeds ({', '.join(f'{d:+.1f}' for d in diffs)} points); at least {MIN_SEEDS}",
    )  # fmt: skip


# ---------------------------------------------------------------- the claims

# (claim, setting a, setting b, loss): d = final greedy win rate of a − b, points, per study seed
CLAIMS = (
    ("1. BPO F=2 beats offline DAP (F=1), DPO", "bpo-f2", "offline", "dpo"),
    ("2. at F=T, π_ref=π_β beats π_ref=π_sft (on-policy DAP), DPO", "bpo-ft", "on-policy", "dpo"),
    ("3. at F=T, π_ref=π_β beats π_ref=π_gold (secondary), DPO", "bpo-ft", "gold-ref", "dpo"),
    ("4. BPO F=2 beats offline DAP (F=1), IPO", "bpo-f2", "offline", "ipo"),
)
REGIME_CHECK = ("5. fresh data pays off (the regime check): BPO F=T beats offline DAP, DPO", "bpo-ft", "offline", "dpo")


def study_runs(data: dict) -> list[dict]:
    return [r for r in data["runs"] if r["stage"] == "study"]


def differences(runs: list[dict], seeds: list[int], a: str, b: str, loss: str, metric: str = "win_rate") -> dict:
    """Per seed: 100 × (metric of setting a − of setting b) with `loss` (None where either run is missing)."""
    out = {}
    for s in seeds:
        ra, rb = (find(runs, setting=x, loss=loss, seed=s) for x in (a, b))
        out[s] = None if ra is None or rb is None else 100 * (ra[metric] - rb[metric])
    return out


def _blocking(data: dict) -> list[str]:
    """Why every claim is not testable, whatever the values: the failed gates, quick mode."""
    p, plan = data["protocol"], data.get("plan") or {}
    out = []
    for name in failed_gates(data.get("gates", [])):
        if name == "seeds" and plan.get("needed"):
            out.append(f"underpowered: the pilots' spread needs {plan['needed']} seeds for a ±{HALF_WIDTH:g}-point "
                       f"half-width, the budget holds {plan['max_seeds']}")  # fmt: skip
        else:
            out.append(name)
    if not data.get("gates"):
        out.append("no gate was checked")
    if p.get("quick"):
        out.append("quick mode (gates and curves only; no verdict)")
    return out


def claims(data: dict) -> list[dict]:
    """Claims 1–4, then the regime check 5, each "mean d > 0" over the planned study seeds (a one-sided t-test;
    not testable below the planned number). The regime check is tested first, alone at α (gatekeeping): unless
    it holds, claims 1–4 are not testable; when it holds, Holm's correction decides claims 1–4 together."""
    plan, runs = data.get("plan") or {}, study_runs(data)
    seeds, need = plan.get("seeds", []), max(2, MIN_SEEDS, plan.get("needed") or 0)
    blocked = _blocking(data)
    text, a, b, loss = REGIME_CHECK
    regime = holm([paired_claim(text, differences(runs, seeds, a, b, loss), 0.0, need, blocked)])[0]
    after = [] if regime["verdict"] == HOLDS or blocked else [f"the regime check (claim 5) {regime['verdict']}"]
    main = [
        paired_claim(t, differences(runs, seeds, a, b, loss), 0.0, need, blocked + after) for t, a, b, loss in CLAIMS
    ]
    return holm(main) + [regime]


def descriptive(data: dict) -> list[dict]:
    """Each claim's paired differences on the metrics that do not saturate (no verdict): 95% t-intervals."""
    plan, runs = data.get("plan") or {}, study_runs(data)
    out = []
    for text, a, b, loss in (*CLAIMS, REGIME_CHECK):
        row = {"claim": text}
        for metric in METRICS:
            values = [v for v in differences(runs, plan.get("seeds", []), a, b, loss, metric).values() if v is not None]
            row[metric] = t_interval(values) if values else None
        out.append(row)
    return out


def aggregates(data: dict, metric: str = "win_rate") -> list[dict]:
    """The aggregate view (studies/aggregate.py) of the study runs' final `metric`, in points: per setting, for
    each loss over its seeds, and over every loss and seed (stratified by loss) where the setting has two."""
    runs, rows = study_runs(data), []
    for setting in SETTINGS:
        strata: dict[str, list[float]] = {}
        for r in runs:
            if r["setting"] == setting:
                strata.setdefault(r["loss"], []).append(100 * r[metric])
        groups = [(loss, {loss: v}) for loss, v in strata.items()] + ([("all", strata)] if len(strata) > 1 else [])
        rows += [{"setting": setting, "losses": name, "metric": metric, **aggregate(g)} for name, g in groups]
    return rows
