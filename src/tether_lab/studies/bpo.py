"""`tether study bpo` (protocol v2): does anchoring online DAP to the behavior model (BPO, docs/methods.md §5)
pay off, and is one extra data-collection phase (F = 2) enough? Reproduces the comparison of Xu et al.
(arXiv 2406.12168) on the embedded world with one annotation budget (B·T prompts) for every setting.

Why a v2: in v1 (reports/bpo/ before this protocol) every setting landed within ~3 points of every other, for
reasons the protocol set: π_sft sampled uniformly random styles (offline pairs already covered the target style
and never went stale), the margins at F = T were identically 0 (π_ref = π_β = π_θ at every step, so DPO and SLiC
gave the same update up to scale), the budget was 32 steps, and 3 seeds with unpaired means.

Design (and why):
- World: the DEFAULT world recipe (WorldSettings() defaults, pinned field by field in the protocol's `world`),
  its seed `--world_seed` (default 0: world, base model and splits).
- π_sft: the world base model fine-tuned on correct answers in *skewed* random styles (world/policies.py,
  recipe v2, `rare_persona` = the oracle's persona): on each dimension where the persona differs from the house
  style (elaborate, casual) π_sft's data takes the persona's pole with probability 0.1; the other two dimensions
  are fair coins. So the oracle's preferred answers are rare under π_sft (1% of its data is elaborate AND casual,
  81% neither): offline pairs mostly compare two poor answers, and go stale as the policy moves toward the persona.
- Oracle: the gold persona score of elaborate-casual (heterogeneity 2), `world:persona=elaborate-casual`.
  Prompts: the train-split questions, each used at most once per pass. Evaluation: greedy answers to all 315
  test-split questions, win rate against the house-style answer by the same oracle (ties count one half).
- π_β with non-zero margins: every setting trains the official code's LoRA ensemble (n = 3 adapters, each with
  its own seed and AdamW, merged linearly as in PEFT's add_weighted_adapter — train/online_policy.py). π_β is the
  merged ensemble at the phase start, the trained policies are the members, so even at F = T (one optimizer step
  per collected batch, K = 1) log π_θ − log π_β is not identically 0. Why the ensemble and not K ≥ 2 steps per
  batch (replay): it exists already (no change to train/), it is what the paper's code does, and it keeps one
  fresh batch per optimizer step, so the annotation budget stays B·T for every setting. Every setting uses the
  same ensemble, so the settings differ only in where the pairs come from (F) and in π_ref.
- Settings (DPO, the main comparison): offline (F = 1; π_ref = π_β = π_sft), BPO F = 2, F = 4, F = T
  (π_ref = π_β), on-policy (F = T, π_ref = π_sft) and π_ref = π_gold (F = T, a fixed model: π_sft fine-tuned
  further on elaborate-casual answers). IPO and SLiC at F = 1 and F = 2 (`extra_losses`, `extra_seeds`) are in
  the protocol's reach but not in the full mode: the pilot measured 280-430 s per 128-step run with two runs side
  by side on the shared machine, so the 30 DPO runs alone take about 90 minutes with --workers 2.
- Budget: T = 128 optimizer steps × B = 8 prompts = 1024 annotations per run (≥ 128 steps asked by the issue; B
  set by the 90-minute budget on a shared core, see report.md); 5 seeds 0-4 shared by all settings (same prompt
  stream and sampling seeds: common random numbers), so every claim is a paired per-seed difference with a
  Student-t interval (report_bpo.py).
- β and learning rate: from a pilot of offline DPO only (`--pilot`), on tuning seed 100 (never a study seed), by
  a rule fixed in code (`pilot_choice`) before looking: of the grid PILOT_BETAS × PILOT_LEARNING_RATES, the pair
  whose offline DPO final win rate is closest to the middle of the headroom above a tie with the house answer,
  (max(initial, 0.5) + 1)/2 — it must learn the rare poles and not saturate, so that settings can differ; a tie
  (within 1 point) goes to the larger β (larger margins, where the reference can matter). See `pilot_record`
  (data/bpo_pilot.json) and report.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from tether.config import TetherError, load_config
from tether.files import read_json, write_text_atomic
from tether.loss_table import LOSSES as LOSS_TABLE
from tether_lab.world.settings import NOT_FINGERPRINTED, WorldSettings

# torch, tqdm and the report are imported inside the functions: `tether --help` builds this study's parser

log = logging.getLogger("tether")

LOSSES = tuple(name for name, entry in LOSS_TABLE.items() if entry.reference)  # an arm's π_ref is the point
# setting -> (phases as a function of T, reference)
SETTINGS = {
    "offline": (lambda t: 1, "behavior"),
    "bpo-f2": (lambda t: 2, "behavior"),
    "bpo-f4": (lambda t: 4, "behavior"),
    "bpo-ft": (lambda t: t, "behavior"),
    "on-policy": (lambda t: t, "initial"),
    "gold-ref": (lambda t: t, "fixed"),  # the π_ref = π_gold ablation
}
METRICS = ("win_rate", "initial_win_rate", "eval_reward", "annotations", "identical_pairs", "ties", "seconds")
PROTOCOL_VERSION = 2
PILOT_SEED = 100
PILOT_BETAS = (0.1, 0.3)
PILOT_LEARNING_RATES = (3e-5, 1e-4, 3e-4)


def pinned_world() -> dict:
    """Every setting of the default world recipe, written out so that a change of defaults cannot change the study."""
    return {k: v for k, v in asdict(WorldSettings()).items() if k not in NOT_FINGERPRINTED}


@dataclass
class BpoProtocol:
    version: int = PROTOCOL_VERSION
    mode: str = "quick"
    losses: list[str] = field(default_factory=lambda: ["dpo"])  # the main comparison: every setting, every seed
    settings: list[str] = field(default_factory=lambda: list(SETTINGS))
    seeds: list[int] = field(default_factory=lambda: [0])
    extra_losses: list[str] = field(default_factory=list)  # IPO/SLiC, at extra_settings on extra_seeds
    extra_settings: list[str] = field(default_factory=lambda: ["offline", "bpo-f2"])
    extra_seeds: list[int] = field(default_factory=list)
    steps: int = 128  # T
    prompts_per_step: int = 8  # B; budget = B·T annotations (pairs) for every setting
    learning_rate: float = 3e-4  # from the pilot (module docstring, pilot_record)
    beta: float = 0.3  # from the pilot
    persona: str = "elaborate-casual"
    rare_prob: float = 0.1  # π_sft's skew: probability of each of the persona's non-house poles in its data
    ensemble_size: int = 3  # LoRA ensemble; π_β = the merged ensemble
    ensemble_merge: str = "linear"
    lora_r: int = 16
    lora_alpha: int = 32
    eval_points: int = 4  # evaluations during training (every T / eval_points steps) besides before/after
    eval_prompts: int = 0  # 0 = every test-split prompt
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_k: int = 50
    world_seed: int = 0
    world: dict = field(default_factory=pinned_world)  # the default world recipe, pinned
    models: dict = field(default_factory=dict)  # further world.policies.OnlineModelSettings overrides (tests)

    @classmethod
    def for_mode(cls, quick: bool, world_seed: int = 0) -> BpoProtocol:
        if (
            quick
        ):  # T = 16, one seed, four settings (no π_gold to build): a smoke run in ≤ 15 minutes, not the study's result
            return cls(
                world_seed=world_seed, steps=16, settings=["offline", "bpo-f2", "bpo-ft", "on-policy"], eval_points=2
            )
        # IPO/SLiC (extra_losses) do not fit the 90-minute budget on the shared 2-core machine (module docstring)
        return cls(mode="full", seeds=[0, 1, 2, 3, 4], steps=128, world_seed=world_seed)

    def model_settings(self):
        from tether_lab.world.policies import OnlineModelSettings

        world = {**self.world, **self.models.get("world", {}), "seed": self.world_seed}
        return OnlineModelSettings(
            **{**self.models, "world": world, "rare_persona": self.persona, "rare_prob": self.rare_prob}
        )


def _models_and_data(out: Path, protocol: BpoProtocol):
    from tether_lab.world.export import prompt_records
    from tether_lab.world.policies import ensure_gold_model, ensure_sft_model

    settings = protocol.model_settings()
    sft = ensure_sft_model(settings)
    needs_gold = "gold-ref" in protocol.settings or "gold-ref" in protocol.extra_settings
    gold = ensure_gold_model(protocol.persona, settings) if needs_gold else None
    world = settings.world_settings().world()
    data = out / "data"
    for split in ("train", "test"):
        path = data / f"prompts_{split}.jsonl"
        if not path.exists():
            data.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in prompt_records(world, split)))
    return sft, gold, data


def _jobs(protocol: BpoProtocol) -> list[tuple[int, str, str]]:
    """(seed, setting, loss): the main comparison seed-major (an interrupted study has whole seeds), then the
    extra losses, also seed-major."""
    main = [(seed, s, loss) for seed in protocol.seeds for s in protocol.settings for loss in protocol.losses]
    extra = [
        (seed, s, loss)
        for seed in protocol.extra_seeds
        for s in protocol.extra_settings
        for loss in protocol.extra_losses
    ]
    return main + extra


STEP_FIELDS = {
    "loss": "loss",
    "margin": "reward_margin",
    "pairs": "pairs",
    "ties": "tie",
    "identical": "identical",
    "annotations": "annotations",
}


def _run_one(
    protocol: BpoProtocol, setting: str, loss: str, seed: int, sft: Path, gold: Path | None, data: Path, run_dir: Path
) -> dict:
    from tether.train import OnlineConfig, online_train

    phases, reference = SETTINGS[setting][0](protocol.steps), SETTINGS[setting][1]
    cfg = load_config(
        OnlineConfig,
        None,
        dict(
            model=str(sft),
            prompt_file=str(data / "prompts_train.jsonl"),
            eval_file=str(data / "prompts_test.jsonl"),
            eval_prompts=protocol.eval_prompts,
            output_dir=str(run_dir),
            oracle=f"world:persona={protocol.persona}",
            steps=protocol.steps,
            phases=phases,
            prompts_per_step=protocol.prompts_per_step,
            reference=reference,
            ref_model=str(gold) if reference == "fixed" else None,
            loss=loss,
            beta=protocol.beta,
            learning_rate=protocol.learning_rate,
            lr_scheduler="linear",
            warmup_steps=0,
            seed=seed,
            lora=True,
            lora_r=protocol.lora_r,
            lora_alpha=protocol.lora_alpha,
            ensemble_size=protocol.ensemble_size,
            ensemble_merge=protocol.ensemble_merge,
            temperature=protocol.temperature,
            top_k=protocol.top_k,
            max_new_tokens=protocol.max_new_tokens,
            eval_max_new_tokens=protocol.max_new_tokens,
            max_length=192,
            max_prompt_length=64,
            save_steps=0,
            eval_steps=max(1, protocol.steps // protocol.eval_points),
            eval_batch_size=64,
            progress=False,
            write_report=False,
        ),
    )
    t0 = time.perf_counter()
    online_train(cfg)
    res = read_json(run_dir / "results.json")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [(0, 0, res["initial_eval"])] + [(r["step"], r["annotations"], r) for r in rows if "eval_win_rate" in r]
    evals.append((protocol.steps, res["annotations"], res["final_eval"]))
    shutil.rmtree(run_dir / "final", ignore_errors=True)  # the study keeps metrics, not models
    fin = res["final_eval"]
    return {
        "setting": setting,
        "loss": loss,
        "seed": seed,
        "phases": phases,
        "reference": reference,
        "win_rate": fin["eval_win_rate"],
        "win_rate_ci95": [fin["eval_win_rate_ci95_low"], fin["eval_win_rate_ci95_high"]],
        "initial_win_rate": res["initial_eval"]["eval_win_rate"],
        "eval_reward": fin["eval_reward"],
        "eval_n": fin["eval_n"],
        "annotations": res["annotations"],
        "identical_pairs": res["identical_pairs"],
        "ties": res["ties"],
        "seconds": round(time.perf_counter() - t0, 1),
        "loop_seconds": res["seconds"],
        "evals": {
            "step": [s for s, _, _ in evals],
            "annotations": [a for _, a, _ in evals],
            "win_rate": [e["eval_win_rate"] for _, _, e in evals],
        },
        "rare_poles": rare_pole_shares(run_dir / "ledger.jsonl", protocol),
        # one entry per optimizer step (None where a step had no usable pair)
        "trace": {name: [r.get(key) for r in rows if "pairs" in r] for name, key in STEP_FIELDS.items()},
    }


def rare_pole_shares(ledger: Path, protocol: BpoProtocol, parts: int = 4) -> dict:
    """Of the responses π_β sampled in each quarter of the run (from the run's ledger.jsonl), the share that carry
    each of the persona's non-house poles (style feature > 0.5, world/rewards.py; a response stating no fact sits
    at 0.5): does the policy ever produce the answers the oracle prefers, and does it keep producing them?"""
    from tether_lab.world.rewards import style_features
    from tether_lab.world.styles import DIMENSIONS, get_persona

    world = protocol.model_settings().world_settings().world()
    rare = [d for d, pole in get_persona(protocol.persona).style.poles().items() if pole != DIMENSIONS[d][0]]
    counts = [[0, dict.fromkeys(rare, 0)] for _ in range(parts)]
    for line in ledger.read_text().splitlines():
        row = json.loads(line)
        part = counts[min(parts - 1, row["step"] * parts // protocol.steps)]
        for text in row["responses"]:
            feats = style_features(world, text)
            part[0] += 1
            for d in rare:
                part[1][d] += feats[d] > 0.5
    return {d: [round(c[1][d] / c[0], 4) if c[0] else None for c in counts] for d in rare}


def run_study(
    quick: bool = True,
    out: str | Path = "out/study-bpo",
    protocol: BpoProtocol | None = None,
    threads: int | None = None,
    world_seed: int = 0,
    workers: int = 1,
    shard: tuple[int, int] | None = None,
) -> dict:
    """Run (or resume) the study; write results.json (protocol first), figures and report.md into `out`.

    `out` also receives data/ (the prompt files) and runs/ (each run's config, metrics.jsonl and ledger; models
    are deleted once evaluated). π_sft and π_gold are cached under the tether cache directory. With `workers`
    > 1 the runs are dealt round-robin to that many processes (each a study of its own in out/shards/K, with
    `threads` torch threads), whose runs are gathered into `out` at the end; a rerun resumes every shard."""
    from tqdm.auto import tqdm

    from tether_lab.studies.common import StudyResults, set_threads

    protocol = protocol or BpoProtocol.for_mode(quick, world_seed)
    out = Path(out)
    set_threads(threads)
    t_start = time.perf_counter()
    results = StudyResults(out, "bpo", asdict(protocol))
    sft, gold, data = _models_and_data(out, protocol)
    if protocol.mode != "pilot":
        results.data["pilot"] = pilot_record()
    results.data["models"] = {"sft": str(sft), "gold": str(gold) if gold else None}
    results.data.setdefault("model_build_seconds", round(time.perf_counter() - t_start, 1))
    if workers > 1:
        _run_workers(protocol, out, threads, workers, results)
    jobs = _jobs(protocol)[shard[0] :: shard[1]] if shard else _jobs(protocol)
    bar = tqdm(jobs, desc="study bpo" + (f" shard {shard[0]}" if shard else ""), unit="run")
    for seed, setting, loss in bar:
        if results.find(setting=setting, loss=loss, seed=seed):
            continue
        bar.set_postfix_str(f"{setting} {loss} seed {seed}")
        run_dir = out / "runs" / f"{setting}-{loss}-s{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)  # a run killed midway starts over
        results.add(_run_one(protocol, setting, loss, seed, sft, gold, data, run_dir))
        finish(results.data, out, figures_too=False)  # the report is current after every run
        results.save()
    finish(results.data, out)
    results.data["wall_seconds_this_invocation"] = round(time.perf_counter() - t_start, 1)
    results.save()
    return results.data


def _shard_main(protocol: dict, out: str, threads: int | None, shard: tuple[int, int]) -> None:
    run_study(out=out, protocol=BpoProtocol(**protocol), threads=threads, shard=shard)


def _run_workers(protocol: BpoProtocol, out: Path, threads: int | None, workers: int, results) -> None:
    """Run the shards in `workers` processes, then add their runs to `results` in the study's job order."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    dirs = [out / "shards" / str(k) for k in range(workers)]
    procs = [
        ctx.Process(target=_shard_main, args=(asdict(protocol), str(d), threads, (k, workers)))
        for k, d in enumerate(dirs)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    done = [run for d in dirs if (d / "results.json").is_file() for run in read_json(d / "results.json")["runs"]]
    for seed, setting, loss in _jobs(protocol):
        run = next((r for r in done if (r["seed"], r["setting"], r["loss"]) == (seed, setting, loss)), None)
        if run is not None and not results.find(setting=setting, loss=loss, seed=seed):
            results.add(run)
    failed = [k for k, proc in enumerate(procs) if proc.exitcode != 0]
    if failed:
        raise TetherError(
            f"study workers {failed} stopped with an error (their output is above); their finished runs are kept "
            f"in {out / 'shards'}: rerun the same command to resume"
        )


def finish(data: dict, out: Path, figures_too: bool = True) -> None:
    """summary, prechecks, claims, figures and report.md from the runs so far (also for a partial study)."""
    from tether_lab.studies.common import summarize_runs
    from tether_lab.studies.report_bpo import claims, figures, prechecks, report

    data["summary"] = summarize_runs(data["runs"], ("setting", "loss"), METRICS)
    data["precheck"] = prechecks(data["runs"], data["protocol"])
    data["claims"] = claims(data["runs"], data["protocol"])
    if figures_too:
        figures(data, out)
    write_text_atomic(out / "report.md", report(data))


def pilot_choice(rows: list[dict], initial: float) -> dict:
    """The rule, fixed before the pilot ran: the (β, learning rate) whose offline DPO final win rate is closest to
    the middle of the headroom above a tie with the house answer, (max(initial, 0.5) + 1)/2; candidates within
    1 point of the closest go to the larger β, then the smaller learning rate.

    Why not v1's (initial + 1)/2: under the skewed π_sft the initial win rate is about 6% (its greedy answers
    lose to the house answer on format or detail, dimensions the persona shares with house), and a policy that
    merely writes the house style ties every question: 50%, close to (0.06 + 1)/2. That target would choose a
    learning rate at which DPO only has to copy the common house poles, never the rare persona poles (elaborate,
    casual) that make offline data stale. Seen in a 16-step timing run of the quick protocol (seed 100, before
    the pilot), not in any pilot or study result."""
    target = (max(initial, 0.5) + 1) / 2
    best = min(abs(r["final_win_rate"] - target) for r in rows)
    near = [r for r in rows if abs(r["final_win_rate"] - target) <= best + 0.01]
    pick = max(near, key=lambda r: (r["beta"], -r["learning_rate"]))
    return {"beta": pick["beta"], "learning_rate": pick["learning_rate"], "rule_target": target}


def run_pilot(
    out: str | Path = "out/study-bpo-pilot",
    threads: int | None = None,
    steps: int = 128,
    world_seed: int = 0,
    betas: tuple[float, ...] = PILOT_BETAS,
) -> dict:
    """Offline DPO on tuning seed PILOT_SEED over PILOT_BETAS × PILOT_LEARNING_RATES at the full protocol's T and B;
    writes pilot.json (every run's final win rate, loss and margin, and the choice) into `out`."""
    out = Path(out)
    base = BpoProtocol.for_mode(False, world_seed)
    rows = []
    for beta in betas:  # a subset of PILOT_BETAS runs part of the grid (two processes); rerun whole to collect
        for lr in PILOT_LEARNING_RATES:
            proto = dataclasses.replace(
                base,
                mode="pilot",
                losses=["dpo"],
                settings=["offline"],
                seeds=[PILOT_SEED],
                extra_losses=[],
                extra_seeds=[],
                steps=steps,
                beta=beta,
                learning_rate=lr,
            )
            data = run_study(out=out / f"beta{beta:g}-lr{lr:g}", protocol=proto, threads=threads)
            run = data["runs"][0]
            rows.append(
                {
                    "beta": beta,
                    "learning_rate": lr,
                    "final_win_rate": round(run["win_rate"], 4),
                    "initial_win_rate": run["initial_win_rate"],
                    "final_loss": data["precheck"]["offline_dpo_final_loss"],
                    "final_margin": data["precheck"]["offline_dpo_final_margin"],
                    "seconds": run["seconds"],
                }
            )
    result = {
        "seed": PILOT_SEED,
        "steps": steps,
        "prompts_per_step": base.prompts_per_step,
        "persona": base.persona,
        "initial_win_rate": rows[0]["initial_win_rate"],
        "runs": rows,
        "chosen": pilot_choice(rows, rows[0]["initial_win_rate"]),
    }
    write_text_atomic(out / "pilot.json", json.dumps(result, indent=1))
    return result


def add_bpo_arguments(parser) -> None:
    """The options of `tether study bpo`."""
    import os

    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 seed, T = 16, offline / BPO F=2 / F=T / on-policy (full: seeds 0-4, T = 128, also F=4 and "
        "π_ref=π_gold); DPO, same B, learning rate and β. With --model: the gates, in order until one fails, on a "
        "reduced regime (T = 8), no study seed, never a verdict (5.3 minutes for SmolLM2 on 2 cores from an empty "
        "cache, measured)",
    )
    parser.add_argument(
        "--pilot", action="store_true", help="rerun the pilot that chose β and the learning rate (tuning seed 100)"
    )
    parser.add_argument(
        "--world_seed", type=int, default=0, help="seed of the embedded world: its facts, its base model and its splits"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of each study process")
    parser.add_argument(
        "--workers", type=int, default=1, help="processes that share the runs (each with --threads threads)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="study directory (default: out/study-bpo, out/study-bpo-quick or out/study-bpo-pilot; with --model: "
        "out/study-bpo-MODEL[-quick])",
    )


def check_world_seed(value: int) -> int:
    if value < 0:
        raise TetherError(f"option '--world_seed' must be >= 0, got {value}")
    return value


def run_from_args(args) -> int:
    from tether_lab.studies.report_bpo import summary_table

    world_seed = check_world_seed(args.world_seed)
    for name in ("threads", "workers"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise TetherError(f"option '--{name}' must be >= 1, got {getattr(args, name)}")
    if args.pilot:
        out = args.out or "out/study-bpo-pilot"
        result = run_pilot(out, threads=args.threads, world_seed=world_seed)
        print(json.dumps(result, indent=1))
        return 0
    out = args.out or ("out/study-bpo-quick" if args.quick else "out/study-bpo")
    data = run_study(quick=args.quick, out=out, threads=args.threads, world_seed=world_seed, workers=args.workers)
    print(summary_table(data))
    print(f"study written to {out} (results.json, report.md, figures)")
    return 0


def pilot_record() -> dict:
    """The pilot's grid and choice, shipped in data/bpo_pilot.json (results.json keeps it under "pilot").

    From `tether study bpo --pilot --threads 1` (2026-11-25, two processes side by side on the loaded machine),
    before any study seed ran. Offline DPO plateaus at the house tie (~49%) at every learning rate: the rare poles
    are not learnt from π_sft's pairs. The rule's target (75%) is out of reach; the closest is lr 3e-4 (β 0.1:
    48.9%, β 0.3: 48.7%, within 1 point: the larger β)."""
    return json.loads(resources.files("tether_lab.studies").joinpath("data/bpo_pilot.json").read_text(encoding="utf-8"))
