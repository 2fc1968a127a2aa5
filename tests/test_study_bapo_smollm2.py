"""The BAPO study on an instruction-tuned chat model, on a micro protocol with the tiny test model."""

import json

import pytest

from tether.studies.bapo_smollm2 import METRICS, LlmBapoProtocol, run_study


def test_micro_study_writes_every_run_summary_and_claims(model_dir, tmp_path):
    protocol = LlmBapoProtocol(model=str(model_dir), personas=["concise"], steps=2, batch_size=4, train_prompts=8,
                               eval_prompts=4, max_new_tokens=8)
    data = run_study(out=tmp_path / "s", protocol=protocol)
    on_disk = json.loads((tmp_path / "s" / "results.json").read_text())
    assert on_disk["protocol"]["model"] == str(model_dir) and len(on_disk["runs"]) == 2
    for run in on_disk["runs"]:
        assert all(isinstance(run[m], float) for m in METRICS)
        assert 0 <= run["knowledge_retained"] <= 1 and 0 <= run["win_rate"] <= 1
        for m in METRICS:  # the kept items are the ones the metric averages
            assert sum(run["items"][m]) / len(run["items"][m]) == pytest.approx(run[m], abs=1e-9)
    # one seed: CIs over items; the claims carry the paired BAPO - DPO difference over the same items
    assert all(row[m]["over"] == "items" and row[m]["n"] == len(on_disk["runs"][0]["items"][m])
               for row in data["summary"] for m in METRICS)
    bapo, dpo = (next(r for r in on_disk["runs"] if r["method"] == m) for m in ("bapo", "dpo"))
    kl_claim = next(c for c in data["claims"] if "KL" in c["claim"])
    assert kl_claim["difference"]["mean"] == pytest.approx(bapo["kl"] - dpo["kl"], abs=1e-6)
    assert kl_claim["difference"]["ci95_low"] <= kl_claim["difference"]["mean"] <= kl_claim["difference"]["ci95_high"]
    assert {row["method"] for row in data["summary"]} == {"dpo", "bapo"}
    assert len(data["claims"]) == 3 and all(isinstance(c["holds"], bool) for c in data["claims"])
    assert "does NOT hold" in (tmp_path / "s" / "report.md").read_text() or "HOLDS" in (tmp_path / "s" / "report.md").read_text()
    assert all((tmp_path / "s" / f).stat().st_size > 0 for f in ("tradeoff.png", "mechanism_logps.png"))
    assert run_study(out=tmp_path / "s", protocol=protocol)["runs"] == on_disk["runs"]  # resumes: nothing re-run
