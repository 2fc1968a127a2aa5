"""A 1-seed micro protocol of `tether study bpo` end to end, checked against the results.json schema."""

import json

from tether.studies.bpo import METRICS, BpoProtocol, run_study

# the default world's facts (the world oracle judges against them) with a tiny, briefly trained model
MICRO_MODELS = dict(world=dict(hidden_size=32, num_layers=1, num_heads=2, batch_size=8, pretrain_steps=5, sft_steps=5),
                    sft_steps=3, gold_steps=3, batch_size=8, styles_per_question=1)


def test_micro_study_writes_results_report_and_figures(tmp_path):
    protocol = BpoProtocol(mode="micro", losses=["dpo", "ipo"], seeds=[0], steps=2, prompts_per_step=2, eval_points=2,
                           eval_prompts=4, max_new_tokens=8, models=MICRO_MODELS)
    out = tmp_path / "study"
    data = run_study(out=out, protocol=protocol)

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["study"] == "bpo" and on_disk["protocol"]["steps"] == 2
    assert len(on_disk["runs"]) == 4 * 2 + 1  # 4 settings x 2 losses + the π_gold ablation (DPO only)
    for run in on_disk["runs"]:
        assert {"setting", "loss", "seed", "phases", "reference", "trace", *METRICS} <= run.keys()
        assert 0 <= run["win_rate"] <= 1 and 0 <= run["initial_win_rate"] <= 1 and run["annotations"] <= 4
        assert run["trace"]["step"][0] == 0 and run["trace"]["step"][-1] == 2
    assert {r["phases"] for r in on_disk["runs"] if r["setting"] == "offline"} == {1}
    assert {r["reference"] for r in on_disk["runs"] if r["setting"] == "gold-ref"} == {"fixed"}
    assert len(on_disk["summary"]) == 9
    for row in on_disk["summary"]:
        assert {"mean", "ci95_low", "ci95_high", "n"} <= row["win_rate"].keys()
    assert [type(c["holds"]) for c in on_disk["claims"]] == [bool, bool, bool] and all(c["numbers"] for c in on_disk["claims"])
    for name in ("report.md", "win_rate_vs_F.png", "win_rate_over_training.png"):
        assert (out / name).stat().st_size > 0, name
    assert "## Claims" in (out / "report.md").read_text()

    again = run_study(out=out, protocol=protocol)  # resumes: nothing is trained again
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in data["runs"]]


def test_claims_by_hand():
    from tether.studies.report_bpo import claims

    def row(setting, loss, w):
        return {"setting": setting, "loss": loss, "win_rate": {"mean": w}}

    s = [row("offline", "dpo", 0.80), row("bpo-f2", "dpo", 0.85), row("on-policy", "dpo", 0.86), row("bpo-ft", "dpo", 0.90),
         row("gold-ref", "dpo", 0.91)]
    c = claims(s, {"losses": ["dpo"]})
    assert c[0]["holds"] and c[1]["holds"] and not c[2]["holds"]  # 85 ≥ 86 − 2; π_gold is ahead of π_β
    assert abs(c[1]["numbers"]["dpo_difference"] + 1) < 1e-9
    assert not claims(s[:2], {"losses": ["dpo"]})[1]["holds"]  # a missing setting does not hold
