"""BAPO: base responses generated once by the reference and cached; the anchor in the training loss."""

import json

import pytest
import torch

from conftest import assert_params_close, final_params, jsonl_rows, train_config
from tether.train import train


def metrics(run_dir):
    return jsonl_rows(run_dir / "metrics.jsonl")


def test_bapo_with_zero_weight_equals_dpo(model_dir, data_dir, tmp_path):
    dpo = train(train_config(model_dir, data_dir, tmp_path / "dpo"))
    bapo = train(
        train_config(model_dir, data_dir, tmp_path / "bapo", method="bapo", anchor_weight=0.0, base_max_new_tokens=8)
    )
    # the base rows share the forward pass but carry zero weight: same losses and parameters
    assert [m["loss"] for m in metrics(dpo)] == pytest.approx([m["loss"] for m in metrics(bapo)], abs=1e-6)
    assert_params_close(final_params(dpo), final_params(bapo), atol=1e-6)
    assert {"anchor", "logps_base", "anchor_active"} <= metrics(bapo)[0].keys()


def test_base_responses_are_the_references_greedy_answers_and_cached(model_dir, data_dir, tmp_path, monkeypatch):
    import tether.base_responses as bapo
    from tether.models import load_model

    seen = {}
    real = bapo.generate_ids

    def spy(model, tokenizer, prompts, **kw):
        out = real(model, tokenizer, prompts, **kw)
        seen.update({tuple(p): o for p, o in zip(prompts, out)})
        return out

    monkeypatch.setattr(bapo, "generate_ids", spy)
    cache = tmp_path / "cache" / "reflogps"
    run = train(
        train_config(
            model_dir, data_dir, tmp_path / "a", method="bapo", base_max_new_tokens=6, ref_cache_dir=str(cache)
        )
    )
    assert seen and metrics(run)[0]["anchor"] == pytest.approx(0.0, abs=1e-4)  # policy == reference at step 1

    model = load_model(model_dir).eval()
    prompt, response = next(iter(seen.items()))
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt) :].tolist()
    eos = model.config.eos_token_id
    assert response == greedy[: greedy.index(eos) + 1] if eos in greedy else response == greedy

    def fail(*a, **k):
        raise AssertionError("base responses regenerated although cached")

    monkeypatch.setattr(bapo, "generate_ids", fail)
    train(
        train_config(
            model_dir, data_dir, tmp_path / "b", method="bapo", base_max_new_tokens=6, ref_cache_dir=str(cache)
        )
    )


def test_squared_anchor_holds_base_likelihood_near_the_reference(model_dir, data_dir, tmp_path):
    # measured on held-out prompts: the squared anchor IS the squared drift of log π(y_b) from the reference
    kw = dict(
        max_steps=12,
        learning_rate=2e-3,
        base_max_new_tokens=12,
        anchor_form="squared",
        eval_file=str(data_dir / "eval.jsonl"),
    )
    dpo = train(train_config(model_dir, data_dir, tmp_path / "dpo", method="bapo", anchor_weight=0.0, **kw))
    bapo = train(train_config(model_dir, data_dir, tmp_path / "bapo", method="bapo", anchor_weight=1.0, **kw))
    dpo_eval = json.loads((dpo / "results.json").read_text())["final_eval"]
    bapo_eval = json.loads((bapo / "results.json").read_text())["final_eval"]
    assert dpo_eval["eval_anchor"] > 0.2 and bapo_eval["eval_anchor"] < dpo_eval["eval_anchor"] / 2
    assert bapo_eval["eval_reward_accuracy"] == 1.0  # and it still learns the preference
