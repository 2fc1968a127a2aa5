"""The BAPO study on an instruction-tuned chat model, on a micro protocol with the tiny test model."""

import json

from tether.studies.bapo_llm import METRICS, LlmBapoProtocol, run_study


def test_micro_study_writes_every_run_summary_and_claims(model_dir, tmp_path):
    protocol = LlmBapoProtocol(model=str(model_dir), personas=["concise"], steps=2, batch_size=4, train_prompts=8,
                               eval_prompts=4, max_new_tokens=8)
    data = run_study(out=tmp_path / "s", protocol=protocol)
    on_disk = json.loads((tmp_path / "s" / "results.json").read_text())
    assert on_disk["protocol"]["model"] == str(model_dir) and len(on_disk["runs"]) == 2
    for run in on_disk["runs"]:
        assert all(isinstance(run[m], float) for m in METRICS)
        assert 0 <= run["knowledge_retained"] <= 1 and 0 <= run["win_rate"] <= 1
    assert {row["method"] for row in data["summary"]} == {"dpo", "bapo"}
    assert len(data["claims"]) == 3 and all(isinstance(c["holds"], bool) for c in data["claims"])
    assert "does NOT hold" in (tmp_path / "s" / "report.md").read_text() or "HOLDS" in (tmp_path / "s" / "report.md").read_text()
    assert run_study(out=tmp_path / "s", protocol=protocol)["runs"] == on_disk["runs"]  # resumes: nothing re-run
