"""`tether study bpo` (protocol v2): a 1-seed micro protocol end to end, checked against the results.json schema;
the claim rules on synthetic runs; the skewed π_sft recipe; --world_seed."""

import json
import random
from collections import Counter

import pytest

from tether.config import TetherError
from tether_lab.studies.bpo import METRICS, SETTINGS, BpoProtocol, check_world_seed, pilot_choice, run_study

# the default world's facts (the world oracle judges against them) with a tiny, briefly trained model
MICRO_MODELS = dict(
    world=dict(hidden_size=32, num_layers=1, num_heads=2, batch_size=8, pretrain_steps=5, sft_steps=5),
    sft_steps=3,
    gold_steps=3,
    batch_size=8,
    styles_per_question=1,
)


def test_micro_study_writes_results_report_and_figures(tmp_path):
    protocol = BpoProtocol(
        mode="micro",
        seeds=[0],
        steps=4,
        prompts_per_step=2,
        eval_points=2,
        eval_prompts=4,
        max_new_tokens=8,
        extra_losses=["ipo"],
        extra_seeds=[0],
        ensemble_size=2,
        lora_r=2,
        lora_alpha=4,
        models=MICRO_MODELS,
    )
    out = tmp_path / "study"
    data = run_study(out=out, protocol=protocol)

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["study"] == "bpo" and on_disk["protocol"]["steps"] == 4 and on_disk["protocol"]["version"] == 2
    assert on_disk["protocol"]["world"]["hidden_size"] == 192  # the default world recipe is pinned in the protocol
    assert len(on_disk["runs"]) == len(SETTINGS) + 2  # every setting with DPO, then IPO at F = 1 and F = 2
    for run in on_disk["runs"]:
        assert {"setting", "loss", "seed", "phases", "reference", "trace", "evals", *METRICS} <= run.keys()
        assert 0 <= run["win_rate"] <= 1 and 0 <= run["initial_win_rate"] <= 1 and run["annotations"] <= 8
        assert run["evals"]["step"][0] == 0 and run["evals"]["step"][-1] == 4 and run["evals"]["annotations"][0] == 0
        assert {k: len(v) for k, v in run["trace"].items()} == dict.fromkeys(
            ("loss", "margin", "pairs", "ties", "identical", "annotations"), 4
        )
    assert {r["phases"] for r in on_disk["runs"] if r["setting"] == "offline"} == {1}
    assert {r["phases"] for r in on_disk["runs"] if r["setting"] == "bpo-f4"} == {4}
    assert {r["reference"] for r in on_disk["runs"] if r["setting"] == "gold-ref"} == {"fixed"}
    assert {(r["setting"], r["loss"]) for r in on_disk["runs"] if r["loss"] == "ipo"} == {
        ("offline", "ipo"),
        ("bpo-f2", "ipo"),
    }
    assert {"offline_dpo_final_loss", "bpo_ft_loss_mid"} <= on_disk["precheck"].keys()
    assert len(on_disk["summary"]) == len(SETTINGS) + 2
    assert [type(c["holds"]) for c in on_disk["claims"]] == [bool] * 6  # 5 main claims + 1 for IPO
    for name in ("report.md", "win_rate_vs_F.png", "win_rate_vs_annotations.png", "loss_margin.png"):
        assert (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert text.index("## Prechecks") < text.index("## Final win rate") < text.index("## Claims")
    assert "world seed **0**" in text

    again = run_study(out=out, protocol=protocol)  # resumes: nothing is trained again
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in data["runs"]]


def _runs(table: dict[str, list[float]], loss: str = "dpo") -> list[dict]:
    return [{"setting": s, "loss": loss, "seed": i, "win_rate": w} for s, ws in table.items() for i, w in enumerate(ws)]


def test_claim_rules_on_synthetic_runs():
    from tether_lab.studies.report_bpo import claims

    base = [0.50, 0.60, 0.55, 0.70, 0.65]
    shift = lambda d, noise=(0, 0, 0, 0, 0): [b + d + e for b, e in zip(base, noise)]  # noqa: E731
    table = {
        "offline": base,
        "bpo-f2": shift(0.05, (0.01, -0.01, 0.02, -0.02, 0)),  # +5 points ± 2: holds
        "on-policy": shift(0.06, (0.01, -0.01, 0.02, -0.02, 0.005)),  # F=2 is 1 point behind: within the 2-point margin
        "bpo-ft": shift(0.07, (0.03, -0.03, 0.02, -0.02, 0)),
        "gold-ref": shift(0.07, (-0.02, 0.02, 0.01, -0.01, 0)),
    }
    c = claims(_runs(table), {"losses": ["dpo"]})
    assert [x["holds"] for x in c] == [True, True, False, False, True]
    assert abs(c[0]["difference"]["mean"] - 5) < 1e-9 and c[0]["difference"]["n"] == 5
    assert c[2]["difference"]["ci95_low"] < 0 < c[2]["difference"]["ci95_high"]  # +1 point, noise ±3: not shown
    # a large mean gap with one seed reversed is not a claim: the interval decides, not the means
    noisy = dict(table, **{"bpo-f2": [b + d for b, d in zip(base, (0.20, 0.20, 0.20, 0.20, -0.30))]})
    assert not claims(_runs(noisy), {"losses": ["dpo"]})[0]["holds"]
    # only paired seeds count; a missing setting or a single paired seed does not hold
    assert not claims(_runs({"offline": base, "bpo-f2": [0.9]}), {"losses": ["dpo"]})[0]["holds"]
    assert not claims(_runs({"offline": base}), {"losses": ["dpo"]})[0]["holds"]
    extra = claims(
        _runs(table) + _runs({"offline": base[:3], "bpo-f2": [0.6, 0.7, 0.65]}, "ipo"),
        {"losses": ["dpo"], "extra_losses": ["ipo"]},
    )
    assert extra[-1]["secondary"] and extra[-1]["holds"] and extra[-1]["difference"]["n"] == 3


def test_world_verdicts_are_three_valued_with_the_regime_check_first():
    from tether_lab.studies.report_bpo import claims, verdicts

    base = [0.50, 0.60, 0.55, 0.70, 0.65]
    up = lambda d: [b + d + e for b, e in zip(base, (0.01, -0.01, 0.02, -0.02, 0))]  # noqa: E731
    good = {"offline": base, "bpo-f2": up(0.05), "on-policy": up(0.06), "bpo-ft": up(0.07), "gold-ref": up(0.10)}
    said = verdicts(claims(_runs(good), {"losses": ["dpo"]}))
    assert [v["verdict"] for v in said] == ["holds", "holds", "holds", "does not hold", "holds"]  # each is judged
    assert all(v["reason"] is None for v in said)
    stuck = dict(good, **{"bpo-ft": base})  # the regime check fails: the others say nothing
    said = verdicts(claims(_runs(stuck), {"losses": ["dpo"]}))
    assert said[-1] == {"verdict": "does not hold", "reason": None}
    assert all(
        v["verdict"] == "not testable" and v["reason"].startswith("the regime check, claim 5") for v in said[:-1]
    )
    few = verdicts(claims(_runs({"offline": base, "bpo-f2": [0.9]}), {"losses": ["dpo"]}))[0]
    assert few["verdict"] == "not testable" and few["reason"].startswith("fewer than 2")
    quick = verdicts(claims(_runs(good), {"losses": ["dpo"]}), True)
    assert all(v["verdict"] == "not testable" and v["reason"].startswith("quick") for v in quick)


def test_prechecks_average_the_trace_windows():
    from tether_lab.studies.report_bpo import prechecks

    def run(setting, losses):
        return {
            "setting": setting,
            "loss": "dpo",
            "seed": 0,
            "annotations": 10,
            "trace": {"loss": losses, "margin": [0.0] * len(losses), "ties": [1] * len(losses)},
        }

    runs = [
        run("offline", [0.7] * 18 + [0.5, None]),
        run("offline", [0.7] * 18 + [0.3, 0.3]),
        run("bpo-ft", [0.7] * 9 + [0.6, 0.4] + [0.7] * 9),
    ]
    pre = prechecks(runs, {})
    assert abs(pre["offline_dpo_final_loss"] - 0.4) < 1e-9  # last tenth (2 steps) per run, a step without pairs skipped
    assert abs(pre["bpo_ft_loss_mid"] - 0.5) < 1e-9  # steps 10-11 of 20
    assert abs(pre["tie_fraction"] - 2.0) < 1e-9


def test_pilot_rule():
    rows = [
        {"beta": b, "learning_rate": lr, "final_win_rate": w}
        for b, lr, w in ((0.1, 1e-4, 0.55), (0.1, 3e-4, 0.74), (0.3, 1e-4, 0.52), (0.3, 3e-4, 0.745), (0.3, 1e-3, 0.95))
    ]
    assert pilot_choice(rows, 0.5) == {
        "beta": 0.3,
        "learning_rate": 3e-4,
        "rule_target": 0.75,
    }  # 0.74 and 0.745 tie: larger β
    assert pilot_choice(rows[:2], 0.1) == {
        "beta": 0.1,
        "learning_rate": 3e-4,
        "rule_target": 0.75,
    }  # target above the house tie
    assert pilot_choice(rows[:2], 0.2 + 0.5)["learning_rate"] == 3e-4  # target 0.85


def test_skewed_sft_recipe_has_its_own_fingerprint_and_makes_the_persona_rare():
    from tether_lab.world.policies import OnlineModelSettings, skewed_style
    from tether_lab.world.styles import get_persona

    v1, v2 = OnlineModelSettings(), OnlineModelSettings(rare_persona="elaborate-casual")
    assert v1.fingerprint("sft") == "f337db663ee9"  # v1 (uniform) rebuilds under the fingerprint it always had
    assert v2.fingerprint("sft") != v1.fingerprint("sft") and v2.fingerprint("gold") != v1.fingerprint("gold")
    assert OnlineModelSettings(rare_persona="elaborate-casual", rare_prob=0.2).fingerprint("sft") != v2.fingerprint(
        "sft"
    )
    rng = random.Random(0)
    styles = [skewed_style(get_persona("elaborate-casual").style, 0.1, rng) for _ in range(4000)]
    poles = Counter((s.length, s.tone) for s in styles)
    assert poles[("elaborate", "casual")] < 0.02 * len(styles) and poles[("terse", "formal")] > 0.75 * len(styles)
    assert (
        0.4 < sum(s.format == "list" for s in styles) / len(styles) < 0.6
    )  # a dimension the persona shares with house: fair
    for bad, match in (
        (dict(rare_persona="nobody"), "rare_persona"),
        (dict(rare_persona="house"), "rare_persona"),
        (dict(rare_persona="elaborate-casual", rare_prob=1.5), "rare_prob"),
    ):
        with pytest.raises(TetherError, match=match):
            OnlineModelSettings(**bad).validate()


def test_world_seed_option():
    assert check_world_seed(3) == 3
    with pytest.raises(TetherError, match="--world_seed"):
        check_world_seed(-1)
    proto = BpoProtocol.for_mode(True, world_seed=7)
    assert (
        proto.model_settings().world_settings().seed == 7 and proto.model_settings().world_settings().hidden_size == 192
    )
    assert proto.model_settings().fingerprint("sft") != BpoProtocol.for_mode(True).model_settings().fingerprint("sft")


def test_world_seed_cli_errors_are_one_line(capsys):
    from tether.cli import main

    assert main(["study", "bpo", "--quick", "--world_seed", "-2", "--out", "/nonexistent/x"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--world_seed" in err[0] and ">= 0" in err[0]
    with pytest.raises(SystemExit):
        main(["study", "bpo", "--world_seed", "two"])
    assert "--world_seed" in capsys.readouterr().err


def test_workers_share_the_runs_and_gather_them_in_job_order(tmp_path):
    protocol = BpoProtocol(
        mode="micro",
        settings=["offline", "bpo-ft", "on-policy"],
        seeds=[0],
        steps=2,
        prompts_per_step=2,
        eval_points=1,
        eval_prompts=2,
        max_new_tokens=4,
        ensemble_size=1,
        lora_r=2,
        lora_alpha=4,
        models=MICRO_MODELS,
    )
    data = run_study(out=tmp_path / "study", protocol=protocol, threads=1, workers=2)
    assert [r["setting"] for r in data["runs"]] == ["offline", "bpo-ft", "on-policy"]
    shard0 = json.loads((tmp_path / "study" / "shards" / "0" / "results.json").read_text())
    assert [r["setting"] for r in shard0["runs"]] == ["offline", "on-policy"]  # round-robin
    assert json.loads((tmp_path / "study" / "results.json").read_text())["claims"]


def test_rare_pole_shares_read_the_ledger_by_quarter(tmp_path):
    from tether_lab.studies.bpo import rare_pole_shares
    from tether_lab.world.styles import HOUSE, get_persona, render

    protocol = BpoProtocol(steps=4)
    world = protocol.model_settings().world_settings().world()
    q = world.questions("train")[0]
    persona, house = (render(world, q.entity, q.attribute, s) for s in (get_persona("elaborate-casual").style, HOUSE))
    casual = render(world, q.entity, q.attribute, get_persona("casual").style)
    rows = [
        {"step": 0, "responses": [persona, house]},
        {"step": 1, "responses": [house, house]},
        {"step": 2, "responses": [casual, house]},
        {"step": 3, "responses": [house, house]},
    ]
    (tmp_path / "ledger.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rare_pole_shares(tmp_path / "ledger.jsonl", protocol) == {
        "length": [0.5, 0.0, 0.0, 0.0],
        "tone": [0.5, 0.0, 0.5, 0.0],
    }
