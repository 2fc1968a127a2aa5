"""The BPO study on a chat model (protocol version 5): the aggregate statistics against their formulas, the gates,
the calibration rule, the seed count and the claims on hand-made results, the cost model's budgets, the prompt
pool, π_gold as a reference, and the stages end to end on the tiny test model."""

import json
import math
import random
import statistics
from dataclasses import replace

import pytest

from tether.config import TetherError
from tether.stats import t_quantile
from tether_lab.instructed import pool_topics, prompt_pool
from tether_lab.studies import aggregate as agg
from tether_lab.studies import bpo_llm
from tether_lab.studies import bpo_llm_rules as rules
from tether_lab.studies.bpo_llm_rules import TUNING_SEEDS, LlmBpoProtocol
from tether_lab.studies.verdicts import FAILS, HOLDS, NOT_TESTABLE

# ---------------------------------------------------------------- the aggregate view


def test_median_iqm_and_mean_follow_their_definitions():
    xs = [9.0, 1.0, 4.0, 7.0, 3.0, 100.0, 5.0, 6.0]  # sorted 1 3 4 5 6 7 9 100: ⌊8/4⌋ = 2 cut from each end
    assert agg.iqm(xs) == pytest.approx((4 + 5 + 6 + 7) / 4)
    assert agg.iqm([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # ⌊3/4⌋ = 0: nothing cut, the mean
    assert agg.median(xs) == pytest.approx(5.5) and agg.median([3.0, 1.0, 2.0]) == 2.0
    assert agg.percentile([0.0, 10.0, 20.0], 0.25) == pytest.approx(5.0)  # linear between order statistics


def test_stratified_bootstrap_of_the_mean_matches_its_standard_error():
    """Redrawing n_s runs within each stratum s, the pooled mean's variance is Σ_s (n_s/N)² σ_s²/n_s (σ_s² the
    stratum's plug-in variance): the bootstrap's spread and its percentile interval follow that formula."""
    rng = random.Random(3)
    strata = {"dpo": [rng.gauss(60, 5) for _ in range(8)], "ipo": [rng.gauss(40, 15) for _ in range(12)]}
    n = sum(map(len, strata.values()))
    se = math.sqrt(sum((len(v) / n) ** 2 * statistics.pvariance(v) / len(v) for v in strata.values()))
    out = agg.stratified_bootstrap(strata, "mean", replicates=20_000, seed=1)
    assert out["value"] == pytest.approx(statistics.fmean([x for v in strata.values() for x in v]))
    assert (out["ci95_high"] - out["ci95_low"]) / (2 * 1.96) == pytest.approx(se, rel=0.05)
    assert out["ci95_low"] < out["value"] < out["ci95_high"] and out["n"] == 20
    # unstratified resampling also redraws how many runs come from each stratum: a wider interval here
    pooled = agg.stratified_bootstrap({"all": [x for v in strata.values() for x in v]}, "mean", 20_000, seed=1)
    assert pooled["ci95_high"] - pooled["ci95_low"] > out["ci95_high"] - out["ci95_low"]
    # constant strata: every replicate pools 2 2 5 5 5, so each interval is its point
    constant = agg.aggregate({"a": [2.0, 2.0], "b": [5.0, 5.0, 5.0]}, replicates=200)
    assert {s: c["value"] for s, c in constant.items()} == pytest.approx({"median": 5.0, "iqm": 4.0, "mean": 3.8})
    assert all(c["ci95_low"] == pytest.approx(c["value"]) == c["ci95_high"] for c in constant.values())


# ---------------------------------------------------------------- gates, calibration, seeds


def _run(setting="offline", seed=TUNING_SEEDS[0], lr=2e-4, win=(0.5, 0.6, 0.7), loss="dpo", **extra):
    steps = [0, 16, 32][: len(win)] if len(win) == 3 else [0, 8, 16, 24, 32]
    return {"stage": extra.pop("stage", "tuning"), "setting": setting, "loss": loss, "seed": seed,
            "learning_rate": lr, "win_rate": win[-1], "curves": {"step": steps, "win_rate": list(win)},
            "identical_pairs": 10, "ledger_rows": 256, "pair_margins": [], **extra}  # fmt: skip


def test_calibration_picks_the_passing_rate_nearest_the_target():
    p = LlmBpoProtocol()
    runs = [
        _run(lr=1e-4, win=(0.5, 0.52, 0.56)),  # lands, rising, 14 points from 70
        _run(lr=2e-4, win=(0.5, 0.60, 0.66)),  # lands, rising, 4 from 70 → chosen
        _run(lr=4e-4, win=(0.5, 0.75, 0.71)),  # nearest 70 but falling after T/2
    ]
    lr, gates = rules.calibrate(p, runs)
    assert lr == 2e-4 and [g["passed"] for g in gates] == [True, True]
    assert gates[1]["value"] == pytest.approx(6.0)
    lr, gates = rules.calibrate(p, runs[2:])
    assert lr is None and [(g["gate"], g["passed"]) for g in gates] == [
        ("offline-lands", True),
        ("offline-rising", False),
    ]
    lr, gates = rules.calibrate(p, [_run(win=(0.5, 0.8, 0.9))])  # saturated: rising but above 85%
    assert lr is None and not gates[0]["passed"] and gates[1]["passed"]


def test_on_policy_gates_read_identical_pairs_and_the_margins_around_half():
    p = LlmBpoProtocol()  # T = 32: the window is steps 14..17 (0-based)
    assert rules.margin_window(p) == [14, 15, 16, 17] and rules.margin_window({"steps": 8}) == [3, 4]
    margins = [[0.0]] * 14 + [[-3.0, 0.5], [2.0], [-0.9], [0.2, 0.1]] + [[9.0]] * 14
    run = _run("on-policy", pair_margins=margins, identical_pairs=51, ledger_rows=256)
    identical, margin = rules.on_policy_gates(p, run)
    assert margin["value"] == pytest.approx(0.7) and not margin["passed"]
    assert identical["value"] == round(51 / 256, 4) and identical["passed"]
    run["pair_margins"][15] = [2.0, 2.0, 2.0]
    run["identical_pairs"] = 52
    identical, margin = rules.on_policy_gates(p, run)
    assert margin["passed"] and not identical["passed"]  # 52/256 > 20%


def test_seed_count_from_two_pilot_seeds():
    for sd in (0.0, 3.0, 4.5, 6.0):
        n = rules.seeds_needed(sd)
        assert n >= rules.MIN_SEEDS and t_quantile(0.975, n - 1) * sd / math.sqrt(n) <= rules.HALF_WIDTH
        assert n == rules.MIN_SEEDS or t_quantile(0.975, n - 2) * sd / math.sqrt(n - 1) > rules.HALF_WIDTH
    p = LlmBpoProtocol()
    a, b = TUNING_SEEDS

    def pilots(d_a, d_b):
        return [
            *(_run("offline", a, win=(0.5, 0.6, 0.6)), _run("bpo-f2", a, win=(0.5, 0.6, 0.6 + d_a / 100))),
            *(_run("offline", b, win=(0.5, 0.6, 0.62)), _run("bpo-f2", b, win=(0.5, 0.6, 0.62 + d_b / 100))),
        ]

    plan, g = rules.seed_plan(p, pilots(5.0, 7.0))  # sd √2: five seeds
    assert g["passed"] and plan["needed"] == 5 and plan["seeds"] == [0, 1, 2, 3, 4]
    assert plan["sd"] == pytest.approx(math.sqrt(2), abs=1e-3)
    plan, g = rules.seed_plan(p, pilots(-4.0, 8.0))  # sd 8.5: more seeds than the budget holds
    assert not g["passed"] and plan["needed"] > rules.max_seeds(p) and plan["seeds"] == []
    plan, g = rules.seed_plan(p, pilots(1.0, 1.0)[:3])
    assert not g["passed"] and plan["needed"] is None


def test_the_budget_arithmetic_of_the_docstring():
    full, quick = LlmBpoProtocol(), rules.quick_protocol()
    assert rules.max_seeds(full) == 5 and rules.estimated_seconds(full, 5) <= full.budget_hours * 3600
    assert rules.estimated_seconds(full, 5) / 3600 == pytest.approx(7.9, abs=0.05)
    assert rules.run_seconds(full, "offline") / 60 == pytest.approx(10.9, abs=0.05)
    assert rules.seed_seconds(full) / 60 == pytest.approx(79, abs=0.5)
    assert rules.estimated_seconds(quick, 0, clean_cache=True) <= 15 * 60
    assert rules.max_seeds(quick) == 0 and quick.jobs() == []
    assert len(full.jobs()) == 7 and full.eval_steps() == [8, 16, 24, 32] and quick.eval_steps() == [4, 8]


# ---------------------------------------------------------------- claims


def _study(table: dict, seeds=range(5), loss="dpo") -> list[dict]:
    return [
        _run(s, seed, win=(0.5, w), loss=loss, stage="study") for s, ws in table.items() for seed, w in zip(seeds, ws)
    ]


def _data(runs, gates=None, plan=None, quick=False):
    gates = [{"gate": "seeds", "passed": True}] if gates is None else gates
    plan = plan or {"seeds": [0, 1, 2, 3, 4], "needed": 5, "max_seeds": 7}
    return {"protocol": {**LlmBpoProtocol(quick=quick).to_dict()}, "runs": runs, "gates": gates, "plan": plan}


def test_claims_regime_check_first_then_holm():
    base = [0.50, 0.60, 0.55, 0.70, 0.65]
    up = lambda d, e=(0.01, -0.01, 0.02, -0.02, 0.0): [b + d + x for b, x in zip(base, e)]  # noqa: E731
    table = {"offline": base, "bpo-f2": up(0.06), "bpo-ft": up(0.08), "gold-ref": up(0.08)}
    table["on-policy"] = [x - d for x, d in zip(table["bpo-ft"], (0.02, -0.03, 0.04, -0.02, 0.01))]  # +0.4 ± 3
    runs = _study(table) + _study({"offline": base, "bpo-f2": up(0.05)}, loss="ipo")
    c1, c2, c3, c4, c5 = rules.claims(_data(runs))
    assert c5["claim"].startswith("5.") and c5["verdict"] == HOLDS
    assert c1["per_seed"][0] == pytest.approx(7.0) and c1["verdict"] == HOLDS and c1["p_holm"] >= c1["p_value"]
    assert c2["verdict"] == FAILS and c2["interval"]["mean"] == pytest.approx(0.4)
    assert c3["verdict"] == FAILS and c3["p_value"] == 1.0 and c4["verdict"] == HOLDS  # c3: no difference at all
    # the regime check fails: claims 1–4 are not testable (not "does not hold")
    flat = dict(table, **{"bpo-ft": base})
    *main, regime = rules.claims(_data(_study(flat)))
    assert regime["verdict"] == FAILS
    assert all(c["verdict"] == NOT_TESTABLE and "regime check (claim 5) does not hold" in c["reason"] for c in main)
    # a failed gate, an underpowered plan, quick mode, missing seeds
    for data, reason in (
        (_data(runs, gates=[{"gate": "gold-wins", "passed": False}]), "gate gold-wins failed"),
        (_data(runs, gates=[{"gate": "seeds", "passed": False}], plan={"seeds": [], "needed": 12, "max_seeds": 7}),
         "underpowered: the pilots' spread needs 12 seeds"),
        (_data(runs, quick=True), "quick mode"),
    ):  # fmt: skip
        out = rules.claims(data)
        assert all(c["verdict"] == NOT_TESTABLE and reason in c["reason"] for c in out), (reason, out[-1]["reason"])
    *main, regime = rules.claims(_data(runs, plan={"seeds": list(range(6)), "needed": 6, "max_seeds": 7}))
    assert regime["verdict"] == NOT_TESTABLE and "5 seed(s) with a value, the rule needs 6" in regime["reason"]
    assert all(c["verdict"] == NOT_TESTABLE and "(claim 5) not testable" in c["reason"] for c in main)


def test_aggregates_per_setting_pool_losses_stratified():
    runs = _study({"offline": [0.5, 0.6, 0.7]}, seeds=range(3)) + _study({"offline": [0.2, 0.3]}, range(2), "ipo")
    rows = {r["losses"]: r for r in rules.aggregates({"runs": runs}) if r["setting"] == "offline"}
    assert set(rows) == {"dpo", "ipo", "all"}
    assert rows["all"]["mean"]["value"] == pytest.approx(46.0) and rows["all"]["median"]["value"] == pytest.approx(50.0)
    assert rows["dpo"]["iqm"]["value"] == pytest.approx(60.0) and rows["all"]["mean"]["n"] == 5


# ---------------------------------------------------------------- the prompt pool and π_gold as a reference


def test_prompt_pool_splits_topics_by_data_seed():
    pool, other = prompt_pool(0), prompt_pool(1)
    assert len(pool["train"]) >= 1000 and len(pool["dev"]) == len(pool["test"]) == 96
    assert len(pool_topics()) == len(set(pool_topics()))

    def topics(prompts):
        return {p[0]["content"] for p in prompts}

    assert not topics(pool["dev"]) & topics(pool["train"]) and not topics(pool["test"]) & topics(pool["dev"])
    assert pool == prompt_pool(0) and pool["test"] != other["test"]
    with pytest.raises(ValueError, match="heldout_topics"):
        prompt_pool(0, heldout_topics=200)


def test_prompted_reference_scores_completions_after_the_instruction(model_dir, tokenizer):
    import torch

    from tether.data import Example, collate
    from tether.generation import prompt_ids
    from tether.logprobs import sequence_logps
    from tether.models import eval_mode, load_model
    from tether_lab.instructed import get_instructed_persona

    model, persona = load_model(model_dir).eval(), get_instructed_persona("simple")
    prompts = [[{"role": "user", "content": "What is snow?"}], [{"role": "user", "content": "Why is sleep good?"}]]
    plain = [prompt_ids(tokenizer, x) for x in prompts]
    instructed = {tuple(ids): prompt_ids(tokenizer, persona.messages(x)) for x, ids in zip(prompts, plain)}
    comps = [{"chosen": [5, 6, 7], "rejected": [8, 9]}, {"chosen": [10], "rejected": [11, 12, 13, 14]}]
    batch = collate([Example(ids, c, "t") for ids, c in zip(plain, comps)], tokenizer.pad_token_id)
    ref = bpo_llm.PromptedReference(lambda: eval_mode(model), instructed, tokenizer.pad_token_id)
    got = ref.logps(batch, 2)
    for i, key in [(0, "chosen"), (1, "chosen"), (0, "rejected"), (1, "rejected")]:
        one = collate([Example(instructed[tuple(plain[i])], {"y": comps[i][key]}, "t")], tokenizer.pad_token_id, ("y",))
        with torch.no_grad():
            want = sequence_logps(model, one["input_ids"], one["attention_mask"], one["completion_mask"])[0]
        assert got[i + 2 * (key == "rejected")].item() == pytest.approx(want.item(), abs=1e-4)


# ---------------------------------------------------------------- the stages end to end on the tiny model


def _micro(model_dir, **kw) -> LlmBpoProtocol:
    return LlmBpoProtocol(
        model=str(model_dir), steps=4, prompts_per_step=2, max_new_tokens=6, eval_prompts=4, eval_points=2,
        heldout_topics=4, train_prompts=32, learning_rates=[1e-2], settings=["offline", "bpo-f2", "gold-ref"],
        second_loss_settings=[], lora_r=2, lora_alpha=4, **kw,
    )  # fmt: skip


def test_micro_study_stops_at_the_first_failed_gate_and_resumes(model_dir, tmp_path, monkeypatch):
    p, out = _micro(model_dir), tmp_path / "s"
    monkeypatch.setattr(rules, "GOLD_WIN_MIN", 1.01)  # no π_gold passes: the study stops before any run
    data = bpo_llm.run_study(out, p)
    assert [g["gate"] for g in data["gates"]] == ["gold-wins"] and data["stopped_at_gates"] == ["gold-wins"]
    assert data["runs"] == [] and all(c["verdict"] == NOT_TESTABLE for c in data["claims"])
    sft = data["reference_models"]["dev"]["sft"]
    assert sft["eval_win_rate"] == 0.5 and sft["eval_n"] == 4  # π_sft's greedy answers ARE the reference texts
    rows = [json.loads(x) for x in next((out / "data").glob("dev-*.jsonl")).read_text().splitlines()]
    assert [r["prompt"] for r in rows] == prompt_pool(0, 4)["dev"][:4] and all("sft_sample" in r for r in rows)
    text = (out / "report.md").read_text()
    assert text.index("## Gates") < text.index("## Claims") and "stopped at the gate gold-wins" in text
    assert "Data seed **0**" in text
    bpo_llm.run_study(out, p)  # no finished run yet: a rerun needs no --resume
    with pytest.raises(TetherError, match="steps: 4 → 8"):
        bpo_llm.run_study(out, replace(p, steps=8), resume=True)


def test_micro_study_runs_every_stage_and_keeps_finished_runs(model_dir, tmp_path, monkeypatch):
    lenient = dict(GOLD_WIN_MIN=0.0, OFFLINE_RANGE=(0.0, 1.0), RISE_MIN=-101.0, IDENTICAL_MAX=1.0, MARGIN_MIN=0.0,
                   MIN_SEEDS=1, HALF_WIDTH=1e9)  # fmt: skip
    for name, value in lenient.items():  # the tiny model's curves: let every gate pass
        monkeypatch.setattr(rules, name, value)
    p, out = _micro(model_dir), tmp_path / "s"
    data = bpo_llm.run_study(out, p)
    assert [g["gate"] for g in data["gates"]] == [
        "gold-wins", "offline-lands", "offline-rising", "identical-pairs", "margin-at-half", "seeds"
    ] and not data["stopped_at_gates"]  # fmt: skip
    tuning = {(r["setting"], r["seed"]) for r in data["runs"] if r["stage"] == "tuning"}
    assert tuning == {("offline", 1000), ("on-policy", 1000), ("bpo-f2", 1000), ("offline", 1001), ("bpo-f2", 1001)}
    study = [r for r in data["runs"] if r["stage"] == "study"]
    assert data["plan"]["seeds"] == [0, 1]  # at least two
    assert [(r["seed"], r["setting"]) for r in study] == [
        (s, x) for s in (0, 1) for x in ("offline", "bpo-f2", "gold-ref")
    ]
    for r in data["runs"]:
        assert r["curves"]["step"] == [0, 2, 4] and r["curves"]["annotations"][0] == 0
        assert all(0 <= r["curves"][m][-1] <= 1 for m in ("win_rate", "sampled_score", "sampled_win_rate"))
        assert len(r["pair_margins"]) == 4 and len(r["trace"]["behavior_score"]) == 4
        for step, margins in enumerate(r["pair_margins"]):  # the recorded β·h average to the logged margin
            if r["trace"]["margin"][step] is not None:
                assert statistics.fmean(margins) == pytest.approx(r["trace"]["margin"][step], abs=1e-3)
    gold = next(r for r in study if r["setting"] == "gold-ref")
    assert gold["reference_label"].startswith("π_gold") and data["reference_models"].keys() == {"dev", "test"}
    offline, f2 = (next(r for r in study if r["setting"] == s) for s in ("offline", "bpo-f2"))
    assert offline["curves"]["win_rate"][1] == f2["curves"]["win_rate"][1]  # the same run until T/2
    assert {c["verdict"] for c in data["claims"]} <= {HOLDS, FAILS, NOT_TESTABLE}
    ipo = next(c for c in data["claims"] if c["claim"].startswith("4."))
    assert ipo["verdict"] == NOT_TESTABLE and ipo["per_seed"] == {0: None, 1: None}  # no IPO run in this protocol
    assert (out / "curves-study.png").stat().st_size > 0 and (out / "training-tuning.png").stat().st_size > 0
    with pytest.raises(TetherError, match="--resume"):
        bpo_llm.run_study(out, p)
    assert bpo_llm.run_study(out, p, resume=True)["runs"] == data["runs"]  # nothing trained again


def test_cli_errors_name_the_option(capsys):
    from tether.cli import main

    for args, word in ((["--model", "x", "--world_seed", "3"], "--world_seed"), (["--data_seed", "2"], "--data_seed"),
                       (["--model", "x", "--workers", "2"], "--workers")):  # fmt: skip
        assert main(["study", "bpo", *args, "--out", "/nonexistent/x"]) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and word in err[0], err


def test_the_instructed_oracle_is_a_persona_score():
    from tether.oracles import load_oracle
    from tether_lab.instructed import get_instructed_persona

    oracle = load_oracle("instructed:simple")
    answers = ["Snow is cold. It is white.", "Precipitation crystallizes atmospherically."]
    assert oracle.score(["q", "q"], answers) == [get_instructed_persona("simple").score(a) for a in answers]
    assert oracle.id == "instructed:simple"
    with pytest.raises(TetherError, match="option 'oracle': unknown instructed persona 'nobody'"):
        load_oracle("instructed:nobody")


def test_a_protocol_the_rules_cannot_judge_is_refused_before_anything_is_written(model_dir, tmp_path):
    for bad, match in (
        (dict(settings=["offline", "bpo-f3"]), "unknown setting"),
        (dict(eval_points=3, steps=6), "must evaluate T/2"),
        (dict(train_prompts=4), "4 training prompts for B·T = 8"),
        (dict(eval_prompts=9), "eval_prompts 9 > the 8 prompts"),
        (dict(persona="nobody"), "unknown instructed persona"),
    ):
        with pytest.raises(TetherError, match=match):
            bpo_llm.run_study(tmp_path / "s", replace(_micro(model_dir), **bad))
        assert not (tmp_path / "s").exists()


def test_quick_mode_runs_the_gates_and_never_a_verdict(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(rules, "GOLD_WIN_MIN", 0.0)
    monkeypatch.setattr(rules, "OFFLINE_RANGE", (0.0, 1.0))
    monkeypatch.setattr(rules, "RISE_MIN", -101.0)
    p = replace(_micro(model_dir), quick=True, settings=[], second_loss_settings=[])
    data = bpo_llm.run_study(tmp_path / "q", p)
    assert {r["stage"] for r in data["runs"]} == {"tuning"} and len(data["runs"]) >= 2
    assert all(c["verdict"] == NOT_TESTABLE and "quick mode" in c["reason"] for c in data["claims"])
    assert "quick mode" in (tmp_path / "q" / "report.md").read_text()


def test_the_command_builds_the_protocol(monkeypatch, tmp_path, capsys):
    from tether.cli import main

    seen = {}

    def fake_run(out, protocol, resume, threads):
        seen.update(out=out, protocol=protocol, resume=resume)
        (tmp_path / "report.md").write_text("the report")

    monkeypatch.setattr(bpo_llm, "run_study", fake_run)
    argv = ["study", "bpo", "--model", "smollm2-135m-instruct", "--data_seed", "3", "--out", str(tmp_path)]
    assert main([*argv, "--quick", "--resume"]) == 0
    assert seen["protocol"] == rules.quick_protocol("smollm2-135m-instruct", 3) and seen["resume"]
    assert main(argv) == 0 and seen["protocol"] == LlmBpoProtocol(data_seed=3) and not seen["resume"]
    assert "the report" in capsys.readouterr().out
