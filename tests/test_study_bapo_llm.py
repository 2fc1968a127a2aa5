"""The BAPO study on a chat model (protocol version 3): its rules on hand-made results, and the stages end to end
on the tiny test model (micro protocol)."""

import json
from dataclasses import replace

import pytest

from tether.config import TetherError
from tether_lab.studies import bapo_llm
from tether_lab.studies import bapo_llm_rules as rules
from tether_lab.studies.bapo_llm_rules import LlmBapoProtocol, value_at
from tether_lab.studies.verdicts import FAILS, HOLDS, NOT_TESTABLE, holm, paired_claim


def _pts(*pairs):
    return [{"step": i + 1, "gain": g, "net_loss": n} for i, (g, n) in enumerate(pairs)]


def test_values_are_read_between_measured_points_only():
    pts = _pts((0.1, 2), (0.2, 6), (0.4, 10))
    assert value_at(pts, 0.15) == pytest.approx(4.0)
    assert value_at(pts, 0.3) == pytest.approx(8.0)
    assert value_at(pts, 0.05) is None  # before the first measured point: never read off the base model
    assert value_at(pts, 0.5) is None  # past the last point
    assert value_at(_pts((0.3, 1), (0.5, 2)), 0.25) is None  # the first point is already past the gain
    assert value_at(_pts((0.1, 1), (0.3, 3), (0.1, 0), (0.4, 9)), 0.2) == pytest.approx(2.0)  # the FIRST crossing


def test_holm_and_three_valued_claims():
    strong = paired_claim("a", {s: 1.0 + 0.1 * s for s in range(5)})
    weak = paired_claim("b", {0: 0.5, 1: -0.4, 2: 0.3, 3: -0.2, 4: 0.1})
    few = paired_claim("c", {0: 1.0, 1: 2.0, 2: None, 3: None, 4: None})
    gated = paired_claim("d", {s: 1.0 for s in range(5)}, blocked_by=["dpo-brackets"])
    holm([strong, weak, few, gated])
    assert strong["verdict"] == HOLDS and strong["p_holm"] == pytest.approx(2 * strong["p_value"])
    assert weak["verdict"] == FAILS and weak["p_holm"] >= weak["p_value"]
    assert few["verdict"] == NOT_TESTABLE and "2 seed(s)" in few["reason"] and few["p_value"] is None
    assert gated["verdict"] == NOT_TESTABLE and "dpo-brackets" in gated["reason"]
    # Holm steps down: a p-value that would pass alone fails once a smaller one failed its stricter bar
    a, b = (
        paired_claim("x", {s: v for s, v in enumerate([0.1, 0.2, -0.05, 0.15, 0.1])}),
        paired_claim("y", {s: v for s, v in enumerate([0.3, 0.2, 0.25, 0.35, 0.3])}),
    )
    holm([a, b])
    assert b["verdict"] == HOLDS and (a["verdict"] == HOLDS) == (a["p_value"] <= 0.05)


def _run(kind, arm, pts, lr=2e-4, beta=0.1, lam=0.0):
    return {"kind": kind, "arm": arm, "points": pts, "learning_rate": lr, "beta": beta, "anchor_weight": lam}


def test_selection_rule_and_its_gates():
    p = LlmBapoProtocol()
    calibration = [
        _run("dpo", "dpo-a", _pts((0.1, 1), (0.3, 5)), lr=2e-4),  # brackets both, 1 point in [0.15, 0.25]... none
        _run("dpo", "dpo-b", _pts((0.05, 0), (0.16, 2), (0.2, 3), (0.3, 6)), lr=1e-4),  # brackets, 2 points inside
        _run("dpo", "dpo-c", _pts((0.2, 2), (0.4, 4))),  # crosses +0.15 before its first point
        _run("baseline", "ipo", _pts((0.1, 3), (0.2, 5))),  # at +0.15: 4
        _run("baseline", "slic", _pts((0.1, 1), (0.2, 2))),  # at +0.15: 1.5 → selected
        _run("bapo", "bapo-lam0.1", _pts((0.01, 0), (0.05, 0)), lam=0.1),  # never personalizes
        _run("bapo", "bapo-lam0.03", _pts((0.1, 0), (0.3, 1)), lam=0.03),
        _run("bapo", "bapo-lam0.01", _pts((0.1, 0), (0.2, 1), (0.3, 2)), lam=0.01),
        _run("bapo", "bapo-lam0.003", _pts((0.1, 1), (0.3, 2)), lam=0.003),
        _run("null", "null", _pts((0.0, 1), (0.01, 2))),
    ]
    selection, gates = rules.select(p, calibration)
    assert selection["arms"] == {
        "dpo": "dpo-b",
        "bapo": ["bapo-lam0.03", "bapo-lam0.01"],
        "baseline": "slic",
        "null": "null",
    }
    assert selection["eval_steps"]["dpo-b"] == [1, 2, 3, 4] and selection["eval_steps"]["null"] == [1, 2, 3, 4]
    assert all(g["passed"] for g in gates)
    _, gates = rules.select(p, [r for r in calibration if r["kind"] != "bapo" or r["arm"] == "bapo-lam0.1"])
    assert [g["gate"] for g in gates if not g["passed"]] == ["bapo-brackets"]


def _confirmatory(seed, persona, kind, arm, pts, lam=0.0):
    return {**_run(kind, arm, pts, lam=lam), "stage": "confirmatory", "persona": persona, "seed": seed}


def test_claims_from_hand_made_confirmatory_runs():
    p = LlmBapoProtocol()
    runs = []
    for s in p.seeds:  # DPO loses 10 + s questions by +0.15, BAPO's better λ 2
        runs += [
            _confirmatory(s, "simple", "dpo", "dpo", _pts((0.1, 5), (0.2, 15 + 2 * s), (0.3, 20))),
            _confirmatory(s, "simple", "bapo", "b1", _pts((0.1, 1), (0.2, 3), (0.3, 4)), 0.03),
            _confirmatory(s, "simple", "bapo", "b2", _pts((0.1, 9), (0.2, 9), (0.3, 9)), 0.01),
            _confirmatory(s, "simple", "baseline", "slic", _pts((0.1, 2), (0.2, 2), (0.3, 2))),
        ]
    gates = [{"gate": "data-simple", "passed": True}, {"gate": "data-enthusiastic", "passed": False}]
    c1, c2, c3, c4 = rules.claims({"protocol": p.to_dict(), "runs": runs, "gates": gates})
    assert c1["per_seed"][0] == pytest.approx(10.0 - 2.0) and c1["verdict"] == HOLDS
    assert c2["verdict"] == HOLDS
    assert c3["per_seed"][0] == pytest.approx(2.0 - 2.0) and c3["verdict"] == FAILS  # no better than SLiC
    assert c4["verdict"] == NOT_TESTABLE and "data-enthusiastic" in c4["reason"]
    stopped = rules.claims(
        {"protocol": p.to_dict(), "runs": runs, "gates": [{"gate": "null-measured", "passed": False}]}
    )
    assert all(c["verdict"] == NOT_TESTABLE for c in stopped)
    quick = rules.claims({"protocol": {**p.to_dict(), "quick": True}, "runs": runs, "gates": gates})
    assert all(c["verdict"] == NOT_TESTABLE and "quick" in c["reason"] for c in quick)


def _micro(model_dir) -> LlmBapoProtocol:
    return LlmBapoProtocol(
        model=str(model_dir), seeds=[0, 1], replication_seeds=[0], steps=4, batch_size=4, train_prompts=8,
        eval_prompts=4, max_new_tokens=8, dpo_learning_rates=[0.05], dpo_betas=[0.1], baselines=["ipo"],
        anchor_weights=[0.1, 10.0], dpo_eval_steps=[1, 2, 4], other_eval_steps=[2, 4],
    )  # fmt: skip


def test_micro_study_stops_at_a_failed_gate_and_resumes(model_dir, tmp_path, monkeypatch):
    p, out = _micro(model_dir), tmp_path / "s"
    monkeypatch.setattr(rules, "CHOSEN_WINS_MIN", 0.0)  # the toy model's "persona" data: let the data gates pass
    data = bapo_llm.run_study(out, p)
    assert [g["gate"] for g in data["gates"]][:2] == ["data-simple", "data-enthusiastic"]
    calib = [r for r in data["runs"] if r["stage"] == "calibration"]
    assert sorted(r["arm"] for r in calib) == sorted(a.name for a in p.arms())
    base_right = [c == "1" for c in json.loads((out / "base_eval.json").read_text())["correct"]]
    for r in calib:
        assert [pt["step"] for pt in r["points"]] == (p.dpo_eval_steps if r["kind"] == "dpo" else p.other_eval_steps)
        for pt in r["points"]:
            right = [c == "1" for c in pt["correct"]]
            lost = sum(b and not x for x, b in zip(right, base_right))
            assert pt["net_loss"] == lost - sum(x and not b for x, b in zip(right, base_right))
    text = (out / "report.md").read_text()
    assert text.index("## Gates") < text.index("## Claims")
    if data["stopped_at_gates"]:  # the toy model's curves do not bracket +0.15/+0.25: the study stops there
        assert not any(r["stage"] == "confirmatory" for r in data["runs"])
        assert all(c["verdict"] == NOT_TESTABLE for c in data["claims"]) and "stopped at the gate" in text
    with pytest.raises(TetherError, match="--resume"):
        bapo_llm.run_study(out, p)
    with pytest.raises(TetherError, match="steps: 4 → 5"):
        bapo_llm.run_study(out, replace(p, steps=5), resume=True)
    assert bapo_llm.run_study(out, p, resume=True)["runs"] == data["runs"]  # nothing re-run


def test_micro_confirmatory_stage_runs_the_selected_arms(model_dir, tmp_path, monkeypatch):
    p, out = replace(_micro(model_dir), personas=["simple"], seeds=[0], replication_seeds=[]), tmp_path / "s"
    monkeypatch.setattr(rules, "CHOSEN_WINS_MIN", 0.0)
    fixed = {"arms": {"dpo": "dpo-lr0.05-b0.1", "bapo": ["bapo-lam0.1"], "baseline": "ipo", "null": "null"},
             "eval_steps": {"dpo-lr0.05-b0.1": [2, 4], "bapo-lam0.1": [4], "ipo": [2], "null": [2, 4]}}  # fmt: skip
    monkeypatch.setattr(rules, "select", lambda p, runs: (fixed, [rules.gate("dpo-brackets", 1, "", True)]))
    data = bapo_llm.run_study(out, p)
    conf = {r["arm"]: [pt["step"] for pt in r["points"]] for r in data["runs"] if r["stage"] == "confirmatory"}
    assert conf == fixed["eval_steps"]
    assert all(c["verdict"] == NOT_TESTABLE for c in data["claims"])  # one seed: below the rule's five
    assert (out / "frontier-confirmatory-simple.png").stat().st_size > 0
