"""torch_dtype and gradient checkpointing: what changes (dtype of weights, memory) and what must not (the math)."""

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_params_close, final_params, online_config, train_config
from tether.data import COMPLETION_KEYS, collate, load_preference_records, tokenize_records
from tether.logprobs import is_checkpointing, sequence_logps
from tether.losses import objective
from tether.models import load_model
from tether.train import online_train, train
from tether.train.optimization import load_policy, objective_options


def _batch(data_dir, tokenizer, n=4):
    examples, _ = tokenize_records(load_preference_records(data_dir / "train.jsonl"), tokenizer, 64, 32)
    return collate(examples[:n], tokenizer.pad_token_id, COMPLETION_KEYS)


def _loss_and_grads(cfg, batch):
    torch.manual_seed(0)
    model = load_policy(cfg).train()
    ref = torch.linspace(-30.0, -10.0, batch["input_ids"].size(0))  # any fixed reference log-probs
    sums, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], 2)
    loss, _ = objective(sums, counts, ref, 2, **objective_options(cfg))
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(model_dir, data_dir, tokenizer, tmp_path, lora):
    batch = _batch(data_dir, tokenizer)
    kw = dict(lora=lora, lora_r=4, lora_alpha=8)
    loss0, grads0 = _loss_and_grads(train_config(model_dir, data_dir, tmp_path / "a", **kw), batch)
    loss1, grads1 = _loss_and_grads(
        train_config(model_dir, data_dir, tmp_path / "b", gradient_checkpointing=True, **kw), batch
    )
    assert loss1 == pytest.approx(loss0, abs=1e-5)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=0, atol=1e-5, msg=name)
    if lora:  # with LoRA B = 0 at init, so only B gets a gradient at step 0; it must not be all zero
        assert any(g.abs().sum() > 0 for g in grads1.values())


def test_gradient_checkpointing_is_really_on_and_training_matches(model_dir, data_dir, tmp_path):
    cfg = train_config(
        model_dir, data_dir, tmp_path / "x", gradient_checkpointing=True, lora=True, lora_r=4, lora_alpha=8
    )
    model = load_policy(cfg)
    assert is_checkpointing(model)
    kw = dict(max_steps=2, learning_rate=1e-2, lora=True, lora_r=4, lora_alpha=8)
    plain = train(train_config(model_dir, data_dir, tmp_path / "plain", **kw))
    ckpt = train(train_config(model_dir, data_dir, tmp_path / "ckpt", gradient_checkpointing=True, **kw))
    assert_params_close(final_params(plain), final_params(ckpt), atol=1e-5)


def test_online_gradient_checkpointing_matches(model_dir, prompt_file, tmp_path):  # noqa: F811
    kw = dict(steps=2, phases=1, lora=True, lora_r=4, lora_alpha=8)
    plain = online_train(online_config(model_dir, prompt_file, tmp_path / "plain", **kw))
    ckpt = online_train(online_config(model_dir, prompt_file, tmp_path / "ckpt", gradient_checkpointing=True, **kw))
    assert_params_close(final_params(plain), final_params(ckpt), atol=1e-5)


def test_bfloat16_base_keeps_a_float32_adapter_and_trains(model_dir, data_dir, tmp_path):
    cfg = train_config(
        model_dir,
        data_dir,
        tmp_path / "bf16",
        torch_dtype="bfloat16",
        lora=True,
        lora_r=4,
        lora_alpha=8,
        max_steps=1,
        learning_rate=1e-2,
        batch_size=2,
    )
    model = load_policy(cfg)
    dtypes = {("lora_" in n): p.dtype for n, p in model.named_parameters()}
    assert dtypes == {True: torch.float32, False: torch.bfloat16}
    run = train(cfg)
    adapter = final_params(run)
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # the step moved the adapter


def test_full_finetuning_in_bfloat16_saves_bfloat16_and_auto_reads_it_back(model_dir, data_dir, tmp_path):
    run = train(train_config(model_dir, data_dir, tmp_path / "bf16", torch_dtype="bfloat16", max_steps=1, batch_size=2))
    weights = load_file(run / "final" / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert next(load_model(run / "final", "auto").parameters()).dtype == torch.bfloat16
    assert next(load_model(run / "final", "float32").parameters()).dtype == torch.float32
    assert next(load_model(model_dir, "float16").parameters()).dtype == torch.float16


def test_online_and_eval_load_in_the_asked_dtype(model_dir, prompt_file, tmp_path, monkeypatch):  # noqa: F811
    from tether.cli import main
    from tether.train.online_policy import OnlinePolicy

    cfg = online_config(
        model_dir,
        prompt_file,
        tmp_path / "o",
        torch_dtype="bfloat16",
        lora=True,
        lora_r=4,
        lora_alpha=8,
        ensemble_size=2,
    )
    policy = OnlinePolicy(cfg, "cpu")
    dtypes = {("lora_" in n): p.dtype for n, p in policy.model.named_parameters()}
    assert dtypes == {
        True: torch.float32,
        False: torch.bfloat16,
    }  # every adapter (ensemble, behavior, merged) in float32
    import tether.models as models

    seen = []
    real = models.load_model
    monkeypatch.setattr(
        models, "load_model", lambda name, dtype: seen.append(dtype) or real(name, dtype)
    )  # eval imports it late
    assert (
        main(
            [
                "eval",
                "--model",
                str(model_dir),
                "--suite",
                "knowledge",
                "--torch_dtype",
                "bfloat16",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    assert seen == ["bfloat16"]
