"""The offline loop end to end: equivalences that must hold exactly (or within a stated tolerance)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import LAUNCH, assert_params_close, final_params, jsonl_rows, run_cli, train_config
from tether.train import train


def test_accumulation_matches_one_big_batch(model_dir, data_dir, tmp_path):
    big = train(train_config(model_dir, data_dir, tmp_path / "big", batch_size=8))
    small = train(train_config(model_dir, data_dir, tmp_path / "small", batch_size=2, gradient_accumulation_steps=4))
    # same pairs per step; only the order of float additions differs (tolerance 1e-5 on weights ~1e-1)
    assert_params_close(final_params(big), final_params(small), atol=1e-5)
    assert not torch.equal(
        final_params(big)["lm_head.weight"], load_file(model_dir / "model.safetensors")["lm_head.weight"]
    )


def test_precomputed_reference_equals_live(model_dir, data_dir, tmp_path):
    pre = train(train_config(model_dir, data_dir, tmp_path / "pre", precompute_ref_logps=True))
    live = train(train_config(model_dir, data_dir, tmp_path / "live", precompute_ref_logps=False))
    assert_params_close(final_params(pre), final_params(live), atol=1e-6)
    assert (
        reference_label(pre) == "initial, log-probs precomputed" and reference_label(live) == "initial (a frozen copy)"
    )
    assert "- reference: initial, log-probs precomputed" in (pre / "final" / "README.md").read_text()


def reference_label(run_dir):
    return json.loads((run_dir / "results.json").read_text())["reference"]


def test_one_reference_object_for_every_mode(model_dir, tokenizer, tmp_path):
    from tether.data import COMPLETION_KEYS, collate, load_preference_records, tokenize_records
    from tether.models import add_lora, load_model
    from tether.train.reference import RecordedReference, model_reference
    from tether_lab.demo import toy_preferences, write_jsonl

    policy = add_lora(load_model(model_dir), 4, 8, 0.0, None, seed=1)
    for module in policy.modules():  # a non-zero adapter, so the policy differs from its base
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)
    base = model_reference("base", load_model(model_dir))
    off = model_reference("off", policy, adapter_off=True)
    on = model_reference("on", policy)
    rows = toy_preferences(3, seed=4)
    examples, _ = tokenize_records(
        load_preference_records(write_jsonl(rows, tmp_path / "three.jsonl")), tokenizer, 64, 32
    )
    batch = collate(examples, tokenizer.pad_token_id, COMPLETION_KEYS)
    policy.train()
    got = off.logps(batch, 2)
    assert policy.training and not got.requires_grad  # scored in eval mode without gradients, training mode restored
    torch.testing.assert_close(got, base.logps(batch, 2), atol=1e-5, rtol=0)  # the adapter disabled = the base
    assert not torch.allclose(on.logps(batch, 2), got, atol=1e-3)
    assert off.weights_fingerprint() == base.weights_fingerprint() != on.weights_fingerprint()
    assert RecordedReference("behavior").logps(batch, 2, got) is got
    with pytest.raises(ValueError, match="must be given"):
        RecordedReference("behavior").logps(batch, 2)


def test_lora_disabled_adapter_reference_equals_copied_reference(model_dir, data_dir, tmp_path):
    kw = dict(lora=True, lora_r=4, lora_alpha=8, precompute_ref_logps=False, learning_rate=1e-2)
    disabled = train(train_config(model_dir, data_dir, tmp_path / "off", **kw))
    copied = train(train_config(model_dir, data_dir, tmp_path / "copy", ref_model=str(model_dir), **kw))
    assert_params_close(final_params(disabled), final_params(copied), atol=1e-6)
    metrics = jsonl_rows(disabled / "metrics.jsonl")
    assert metrics[0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # the adapter starts at zero: policy == reference


def test_reference_cache_is_reused(model_dir, data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    train(
        train_config(
            model_dir, data_dir, tmp_path / "a", ref_cache_dir=str(cache), eval_file=str(data_dir / "eval.jsonl")
        )
    )
    assert len(list(cache.glob("*.pt"))) == 2  # train and eval sets

    import tether.train.offline as offline

    def fail(*a, **k):
        raise AssertionError("reference log-probs recomputed although cached")

    monkeypatch.setattr(offline, "compute_logps_table", fail)
    train(
        train_config(
            model_dir, data_dir, tmp_path / "b", ref_cache_dir=str(cache), eval_file=str(data_dir / "eval.jsonl")
        )
    )
    with pytest.raises(AssertionError, match="recomputed"):  # other tokenization settings: another fingerprint
        train(train_config(model_dir, data_dir, tmp_path / "c", ref_cache_dir=str(cache), max_prompt_length=3))


def test_kill_and_resume_is_bit_identical(model_dir, data_dir, tmp_path):
    # LoRA with dropout on, so the resumed run must also restore the RNG state to match
    args = [
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--learning_rate",
        "1e-2",
        "--max_steps",
        "7",
        "--batch_size",
        "4",
        "--save_steps",
        "2",
        "--lora",
        "true",
        "--lora_r",
        "4",
        "--lora_dropout",
        "0.2",
        "--disable_dropout",
        "false",
        "--progress",
        "false",
    ]
    full = run_cli(*args, "--output_dir", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    crashed = run_cli(*args, "--output_dir", str(tmp_path / "resumed"), env={"TETHER_CRASH_AFTER_STEP": "5"})
    assert crashed.returncode == 17  # died abruptly after step 5; newest checkpoint is step 4
    assert not (tmp_path / "resumed" / "final").exists()
    again = run_cli(*args, "--output_dir", str(tmp_path / "resumed"))
    assert again.returncode == 2 and "--resume" in again.stderr  # never overwrite a run silently
    resumed = run_cli(*args, "--output_dir", str(tmp_path / "resumed"), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = final_params(tmp_path / "full"), final_params(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in jsonl_rows(tmp_path / "resumed" / "metrics.jsonl")]
    assert steps == list(range(1, 8))
    full_losses = [r["loss"] for r in jsonl_rows(tmp_path / "full" / "metrics.jsonl")]
    resumed_losses = [r["loss"] for r in jsonl_rows(tmp_path / "resumed" / "metrics.jsonl")]
    assert full_losses == resumed_losses


def test_two_processes_match_one(model_dir, data_dir, tmp_path):
    args = [
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--learning_rate",
        "1e-3",
        "--max_steps",
        "3",
        "--save_steps",
        "0",
        "--progress",
        "false",
    ]
    one = run_cli(*args, "--batch_size", "8", "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    # accelerate's `--cpu` flag always starts ONE process; `--multi_gpu` on a machine without GPUs starts 2 CPU
    # processes that talk over gloo
    launcher = [*LAUNCH, "-m", "tether.cli"]
    two = run_cli(*args, "--batch_size", "4", "--output_dir", str(tmp_path / "two"), launcher=launcher)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "results.json").read_text())["num_processes"] == 2
    # DDP averages two half-batch gradients: equal to the full batch up to float summation order
    assert_params_close(final_params(tmp_path / "one"), final_params(tmp_path / "two"), atol=1e-5)
    l1 = [r["loss"] for r in jsonl_rows(tmp_path / "one" / "metrics.jsonl")]
    l2 = [r["loss"] for r in jsonl_rows(tmp_path / "two" / "metrics.jsonl")]
    assert l1 == pytest.approx(l2, abs=1e-5)
