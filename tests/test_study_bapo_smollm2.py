"""The BAPO frontier study on an instruction-tuned chat model: a micro protocol with the tiny test model, and the
verdict rules on hand-made results."""

import json
from dataclasses import replace

import pytest

from tether_lab.studies import bapo_smollm2 as study
from tether_lab.studies.bapo_smollm2 import LlmBapoProtocol, claims, curve, run_study


def _micro(model_dir) -> LlmBapoProtocol:
    return LlmBapoProtocol(
        model=str(model_dir),
        seeds=[0, 1],
        steps=4,
        dpo_eval_steps=[2, 4],
        anchor_weights=[0.1, 10.0],
        batch_size=4,
        train_prompts=8,
        eval_prompts=4,
        max_new_tokens=8,
        learning_rate=0.05,
    )


def test_micro_frontier_study(model_dir, tmp_path):
    protocol = _micro(model_dir)
    out = tmp_path / "s"
    data = run_study(out=out, protocol=protocol)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["protocol"]["anchor_weights"] == [0.1, 10.0] and on_disk["protocol"]["seeds"] == [0, 1]
    runs = on_disk["runs"]
    assert sorted((r["seed"], r["method"], r["anchor_weight"]) for r in runs) == [
        (s, m, w) for s in (0, 1) for m, w in (("bapo", 0.1), ("bapo", 10.0), ("dpo", 0.0))
    ]
    base_right = [c == "1" for c in json.loads((out / "base_eval.json").read_text())["correct"]]
    for r in runs:
        assert [p["step"] for p in r["points"]] == ([2, 4] if r["method"] == "dpo" else [4])
        for p in r["points"]:  # every number of a point follows from its per-question answers and the base's
            right = [c == "1" for c in p["correct"]]
            assert len(right) == len(base_right) == 399
            assert p["knowledge"] == pytest.approx(sum(right) / 399)
            assert p["right_to_wrong"] == sum(b and not x for x, b in zip(right, base_right))
            assert p["wrong_to_right"] == sum(x and not b for x, b in zip(right, base_right))
            assert p["retained"] == pytest.approx(1 - p["right_to_wrong"] / sum(base_right))
            assert p["gain"] == pytest.approx(p["persona_score"] - data["base"]["persona_score"])
    assert not (out / "runs" / "dpo-s0" / "final").exists()  # the study keeps metrics, not models
    assert len(data["claims"]) == 2 and all(isinstance(c["holds"], bool) for c in data["claims"])
    text = (out / "report.md").read_text()
    assert "HOLDS" in text or "does NOT hold" in text
    assert all((out / f).stat().st_size > 0 for f in ("frontier.png", "mechanism_logps.png"))
    assert run_study(out=out, protocol=protocol)["runs"] == runs  # resumes: nothing re-run

    # DPO's step-2 point is a 2-step run (constant rate): its checkpoint was evaluated, not the final adapter
    dpo = next(r for r in runs if r["method"] == "dpo" and r["seed"] == 0)
    assert dpo["points"][0]["correct"] != dpo["points"][1]["correct"]  # the rate is high enough to tell steps apart
    short = replace(protocol, steps=2)
    run_dir = tmp_path / "short"
    study.train(study._train_config(short, out / "data" / "simple.jsonl", run_dir, out, 0.0, 0, save_every=0))
    tok = study.load_tokenizer(protocol.model)
    base = json.loads((out / "base_eval.json").read_text())
    again = study._evaluate_run(run_dir, [2], short, tok, base)[0]
    assert (again["correct"], again["persona_score"], again["sample"]) == (
        dpo["points"][0]["correct"],
        dpo["points"][0]["persona_score"],
        dpo["points"][0]["sample"],
    )
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["loss"] == pytest.approx(
        dpo["trace"]["loss"][1], abs=1e-6
    )


def _pt(gain, retained, step=20):
    return {"step": step, "gain": gain, "retained": retained, "right_to_wrong": 0, "wrong_to_right": 0}


def _results(seeds_bapo: dict, seeds_dpo: dict) -> dict:
    runs = []
    for s, pts in seeds_dpo.items():
        runs.append(
            {
                "method": "dpo",
                "anchor_weight": 0.0,
                "seed": s,
                "points": [_pt(g, r, k) for k, (g, r) in zip((5, 10, 20), pts)],
            }
        )
    for s, by_lam in seeds_bapo.items():
        runs += [
            {"method": "bapo", "anchor_weight": lam, "seed": s, "points": [_pt(g, r)]} for lam, (g, r) in by_lam.items()
        ]
    return {"protocol": {"target_gain": 0.1}, "runs": runs}


def test_verdict_rules_on_hand_made_frontiers():
    dpo = {0: [(0.05, 0.95), (0.2, 0.8), (0.4, 0.7)], 1: [(0.1, 0.9), (0.3, 0.8), (0.5, 0.6)]}
    bapo = {
        0: {1.0: (0.05, 0.99), 0.1: (0.15, 0.97), 0.01: (0.3, 0.9)},
        1: {1.0: (0.02, 1.0), 0.1: (0.2, 0.98), 0.01: (0.4, 0.9)},
    }
    data = _results(bapo, dpo)
    # BAPO's curve runs from the base across λ, largest first; DPO's along its steps
    assert curve(data["runs"], "bapo", 0) == [(0.0, 1.0), (0.05, 0.99), (0.15, 0.97), (0.3, 0.9)]
    c1, c2 = claims(data)
    # seed 0 at gain 0.1: DPO 0.95 + (0.8 − 0.95)·(0.05/0.15) = 0.90; BAPO 0.99 + (0.97 − 0.99)·0.5 = 0.98
    assert c1["per_seed"][0] == pytest.approx(0.08)
    # seed 1: DPO reaches 0.1 exactly at its first point (0.9); BAPO 1.0 + (0.98 − 1.0)·(0.08/0.18)
    assert c1["per_seed"][1] == pytest.approx(1.0 - 0.02 * 0.08 / 0.18 - 0.9)
    assert c1["holds"] is True and c1["interval"]["n"] == 2
    # claim 2: BAPO's best gain retaining ≥ 0.95 minus DPO's best: 0.15 − 0.4 and 0.2 − 0.5
    assert c2["per_seed"] == {0: pytest.approx(-0.25), 1: pytest.approx(-0.3)} and c2["holds"] is False

    # a seed whose BAPO never reaches the target gain gives no value, and the claim cannot hold
    bapo[1] = {1.0: (0.01, 1.0), 0.1: (0.05, 0.99), 0.01: (0.08, 0.98)}
    c1 = claims(_results(bapo, dpo))[0]
    assert c1["per_seed"][1] is None and c1["seeds_without_value"] == [1] and c1["holds"] is False
    # one seed is below the protocol's floor of two
    c1 = claims(_results({0: bapo[0]}, {0: dpo[0]}))[0]
    assert c1["per_seed"][0] == pytest.approx(0.08) and c1["holds"] is False
