"""A 1-seed micro protocol of `tether study bapo` end to end, checked against the results.json schema."""

import json

import pytest

from tether.studies.bapo import METRICS, BapoProtocol, run_study

MICRO_WORLD = dict(n_entities=8, vocab_size=320, hidden_size=32, num_layers=1, num_heads=2, batch_size=8,
                   pretrain_steps=10, sft_steps=10)


def test_micro_study_writes_results_report_and_figures(tmp_path):
    protocol = BapoProtocol(mode="micro", levels=[1, 2], methods=["dpo", "bapo"], seeds=[0], steps=2, batch_size=4,
                            base_max_new_tokens=8, eval_max_new_tokens=8, world=MICRO_WORLD)
    out = tmp_path / "study"
    first = run_study(out=out, protocol=protocol, only=[(2, "dpo"), (2, "bapo")])  # make demo's first look
    assert [(r["level"], r["method"]) for r in first["runs"]] == [(2, "dpo"), (2, "bapo")] and first["claims"] == []
    assert len(first["summary"]) == 2 and not (out / "report.md").exists()
    data = run_study(out=out, protocol=protocol)  # the rest

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["study"] == "bapo" and on_disk["protocol"]["levels"] == [1, 2]
    assert len(on_disk["runs"]) == 4  # 2 levels x 2 methods x 1 seed
    for run in on_disk["runs"]:
        assert {"level", "persona", "method", "seed", "seconds", "trace", *METRICS} <= run.keys()
        assert 0 <= run["knowledge"] <= 1 and 0 <= run["win_rate"] <= 1
        assert 0 <= run["persona_score"] <= run["style_match"] <= 1 and 0 <= run["base_style_match"] <= 1
        assert len(run["trace"]["step"]) == 2 and len(run["trace"]["logps_base"]) == 2
    assert len(on_disk["summary"]) == 4
    for row in on_disk["summary"]:
        for metric in ("knowledge_retained", "style_match", "persona_score", "base_style_match"):
            assert {"mean", "ci95_low", "ci95_high", "n"} <= row[metric].keys(), metric
    assert [type(c["holds"]) for c in on_disk["claims"]] == [bool, bool, bool] and all(c["numbers"] for c in on_disk["claims"])
    assert "h1_style_match_dpo" in on_disk["claims"][2]["numbers"] and type(on_disk["claims"][2]["secondary"]["holds"]) is bool
    for name in ("report.md", "retained_vs_heterogeneity.png", "personalization_vs_forgetting.png", "mechanism_logps.png"):
        assert (out / name).stat().st_size > 0, name
    assert "does not hold" in (out / "report.md").read_text() or "holds" in (out / "report.md").read_text()

    # a second invocation resumes: every run is found, nothing is trained again
    again = run_study(out=out, protocol=protocol)
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in data["runs"]]


def test_claims_by_hand_and_with_missing_methods():
    from tether.studies.report_bapo import claims

    def row(level, method, k, a, style, p):
        return {"level": level, "method": method, "knowledge_retained": {"mean": k}, "alignment_retained": {"mean": a},
                "style_match": {"mean": style}, "persona_score": {"mean": p}, "base_style_match": {"mean": 0.5}}

    summary = [row(1, "dpo", 1.0, 0.9, 0.8, 0.6), row(2, "dpo", 0.9, 0.7, 0.9, 0.4), row(1, "bapo", 1.0, 0.95, 0.78, 0.7),
               row(2, "bapo", 0.95, 0.9, 0.8, 0.45)]
    c = claims(summary, BapoProtocol(methods=["dpo", "bapo"]))
    assert c[0]["holds"] and c[0]["numbers"]["dpo_forgetting_h2"] == 1 - (0.9 + 0.7) / 2
    assert c[1]["holds"]
    assert not c[2]["holds"]  # style match 10 points below DPO at h = 2
    assert c[2]["numbers"]["h2_points_bapo_minus_dpo"] == pytest.approx(-10) and c[2]["numbers"]["h1_style_match_base"] == 0.5
    assert c[2]["secondary"]["holds"]  # on the persona score BAPO is above DPO at both levels
    assert [x["holds"] for x in claims(summary[2:], BapoProtocol(methods=["bapo"]))] == [False, False, False]
