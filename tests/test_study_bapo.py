"""`tether study bapo` (study v2, world recipe 2): a micro protocol end to end, and the claim rules on
synthetic frontiers."""

import json

import pytest

from tether_lab.studies.bapo import BapoProtocol, run_study
from tether_lab.studies.report_bapo import at_gain, claims, curves, retention_at

MICRO_WORLD = dict(
    n_entities=8,
    vocab_size=320,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    batch_size=8,
    pretrain_steps=10,
    sft_steps=10,
)


def test_micro_study_writes_results_report_and_figures(tmp_path):
    protocol = BapoProtocol(
        mode="micro",
        seeds=[0],
        steps=4,
        eval_every=2,
        batch_size=4,
        anchor_weights=[0.1, 1.0],
        nll_weights=[1.0],
        base_max_new_tokens=8,
        eval_max_new_tokens=8,
        world=MICRO_WORLD,
    )
    out = tmp_path / "study"
    first = run_study(out=out, protocol=protocol, only=[(1, "dpo"), (2, "dpo")])  # make demo's first look
    assert [(r["level"], r["method"]) for r in first["runs"]] == [(1, "dpo"), (2, "dpo")] and first["claims"] == []
    assert not (out / "report.md").exists()
    data = run_study(out=out, protocol=protocol)  # the rest

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["study"] == "bapo" and on_disk["protocol"]["world_seed"] == 0
    # DPO at both levels; IPO, SLiC, DPO+NLL (one α) and BAPO (two λ) at the frontier level
    assert sorted((r["level"], r["method"], r["knob"]) for r in on_disk["runs"]) == [
        (1, "dpo", None),
        (2, "bapo", 0.1),
        (2, "bapo", 1.0),
        (2, "dpo", None),
        (2, "dpo+nll", 1.0),
        (2, "ipo", None),
        (2, "slic", None),
    ]
    assert 0 <= on_disk["precheck"]["greedy_is_house"] <= 1 and on_disk["precheck"]["median_logp_base"] < 0
    for run in on_disk["runs"]:
        assert [p["step"] for p in run["points"]] == [2, 4]
        for p in run["points"]:
            for d in ("greedy", "sampled"):
                assert {"gain", "retention", "style_match", "correct", "alignment"} <= p[d].keys()
                assert -100 <= p[d]["gain"] <= 100 and 0 <= p[d]["style_match"] <= 1
        assert len(run["trace"]["logps_base"]) == 4
    assert len(on_disk["claims"]) == 3 and all(
        type(c["holds"]) is bool and type(c["sampled"]["holds"]) is bool for c in on_disk["claims"]
    )
    assert not any(c["holds"] for c in on_disk["claims"])  # one seed can never make a verdict
    text = (out / "report.md").read_text()
    assert text.index("Pre-check") < text.index("Claims") and "world seed 0" in text
    for name in ("frontier.png", "dpo_by_heterogeneity.png", "mechanism_logps.png"):
        assert (out / name).stat().st_size > 0, name
    pairs = [
        json.loads(line)
        for line in (out / "data/personas/casual-list/preferences_train.jsonl").read_text().splitlines()
    ]
    assert pairs and all(
        "registry" in p["rejected"][0]["content"]
        or "'s" in p["rejected"][0]["content"]
        or "- " in p["rejected"][0]["content"]
        or len(p["rejected"][0]["content"].split()) > 12
        for p in pairs
    )  # never the house style

    again = run_study(out=out, protocol=protocol)  # resumes: nothing is trained again
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in data["runs"]]


def _run(level, method, seed, points, knob=None):
    return {
        "level": level,
        "method": method,
        "knob": knob,
        "anchor_form": "hinge" if method == "bapo" else None,
        "seed": seed,
        "points": [
            {"step": 10 * (i + 1), "greedy": {"gain": g, "retention": r}, "sampled": {"gain": g, "retention": r}}
            for i, (g, r) in enumerate(points)
        ],
    }


def test_interpolation_on_a_frontier():
    curve = [(0.0, 1.0), (5.0, 0.9), (15.0, 0.7)]
    assert at_gain(curve, 10.0) == pytest.approx(0.8)
    assert at_gain(curve, 20.0) is None
    assert at_gain([(0.0, 1.0), (12.0, 0.5), (8.0, 0.4), (20.0, 0.3)], 10.0) == pytest.approx(
        1 - 0.5 * 10 / 12
    )  # first crossing


def _synthetic(n_seeds, bapo_ret=0.95, lam_curve=True):
    runs = []
    for s in range(n_seeds):
        wobble = 0.01 * (s % 3)
        runs += [
            _run(1, "dpo", s, [(10, 0.9 - wobble), (20, 0.8)]),
            _run(2, "dpo", s, [(10, 0.7 - wobble), (30, 0.5)]),
            _run(2, "ipo", s, [(20, 0.8 - wobble)]),
            _run(2, "slic", s, [(5, 0.9)]),
        ]  # SLiC never reaches +10
        runs += [
            _run(2, "bapo", s, [(4, 1.0), (8, 0.99)], knob=1.0),
            _run(2, "bapo", s, [(12, bapo_ret - wobble), (28, 0.96)], knob=0.1),
        ]
    protocol = {
        "seeds": list(range(n_seeds)),
        "levels": [1, 2],
        "frontier_level": 2,
        "target_gain": 10.0,
        "methods": ["dpo", "ipo", "slic", "bapo"],
    }
    return {"protocol": protocol, "runs": runs}


def test_claim_rules_on_synthetic_frontiers():
    data = _synthetic(5)
    c1, c2, c3 = claims(data)
    # claim 1: DPO's forgetting at +10 is 0.3 + wobble at h = 2 and 0.1 + wobble at h = 1: d = 0.2 on every seed
    assert c1["holds"] and c1["interval"]["mean"] == pytest.approx(0.2)
    # claim 2: IPO is the best baseline at +10 (0.9 − wobble/2: halfway to (20, 0.8 − wobble)); BAPO's λ = 0.1 curve
    # gives 1 − (1 − 0.95 + wobble)·10/12; its λ curve ((0,1), (8, .99), (28, .96)) gives .99 − .03·2/20 = .987
    assert retention_at(data["runs"], 2, "ipo", 0, "greedy", 10.0) == pytest.approx(0.9)
    assert retention_at(data["runs"], 2, "bapo", 0, "greedy", 10.0) == pytest.approx(
        max(1 - 0.05 * 10 / 12, 0.99 - 0.03 * 2 / 20)
    )
    assert c2["holds"] and c2["interval"]["ci95_low"] > 0 and c2["seeds_without_value"] == []
    assert len(curves(data["runs"], 2, "bapo", 0, "greedy")) == 3  # two λ runs by steps, one across λ
    # claim 3: BAPO's best gain retaining ≥ 0.95 is 28 (0.96), DPO's best 30: within 5 points on every seed
    assert c3["holds"] and c3["interval"]["mean"] == pytest.approx(-2)
    assert c1["sampled"]["holds"] == c1["holds"]


def test_claim_rules_need_five_seeds_and_a_value_on_every_seed():
    assert not any(c["holds"] for c in claims(_synthetic(4)))  # 4 seeds: no verdict
    data = _synthetic(5)
    data["runs"] = [r for r in data["runs"] if not (r["method"] == "bapo" and r["seed"] == 3)]
    c2 = claims(data)[1]
    assert not c2["holds"] and c2["seeds_without_value"] == [3]
    worse = claims(_synthetic(5, bapo_ret=0.5))[1]  # BAPO forgets more than IPO at +10 on its λ = 0.1 curve, but its
    assert worse["holds"]  # λ curve still reaches +10 retaining .987: the best curve counts
