"""DoRA (PEFT `use_dora`) and QLoRA (a 4-bit base through bitsandbytes, `load_in_4bit`) adapters: they start equal
to the base, train, save as PEFT adapters, load back and merge (`tether export --merge`); DoRA under FSDP2 with 2
CPU processes equals one process; an online π_β copy of a DoRA adapter carries its magnitudes.

QLoRA runs where bitsandbytes is installed (its CPU backend runs 4-bit layers whose input width is a multiple of
64: the 128-wide toy model here); elsewhere those tests skip and say so."""

import importlib.util
import json
import math

import pytest
import torch

from conftest import (
    FSDP2,
    TESTS,
    assert_params_close,
    final_params,
    jsonl_rows,
    one_error_line,
    online_config,
    run_cli,
    train_config,
)
from tether.config import TetherError
from tether.models import load_adapter, load_model, load_tokenizer
from tether.train import train
from tether_lab.demo import toy_model

ENV = {"PYTHONPATH": f"{TESTS}:{TESTS.parent / 'src'}"}
NO_BNB = importlib.util.find_spec("bitsandbytes") is None


def logits(model, tokenizer):
    ids = torch.tensor([tokenizer("Which is bigger, a cat or a mouse?")["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def trained_adapter(model_dir, data_dir, out, **options):
    run = train(
        train_config(model_dir, data_dir, out, lora=True, lora_r=4, lora_alpha=8, learning_rate=1e-2, **options)
    )
    rows = jsonl_rows(run / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: the adapter is the base exactly
    return run / "final"


def test_dora_trains_saves_loads_and_merges(model_dir, data_dir, tmp_path):
    final = trained_adapter(model_dir, data_dir, tmp_path / "run", use_dora=True)
    assert json.loads((final / "adapter_config.json").read_text())["use_dora"] is True
    magnitudes = {k: v for k, v in final_params(final.parent).items() if "lora_magnitude_vector" in k}
    assert magnitudes  # the trained magnitudes are part of the adapter
    base = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    norms = {n: m.weight.norm(dim=1) for n, m in base.named_modules() if n.endswith("q_proj")}
    some = next(k for k in magnitudes if "q_proj" in k)
    layer = some.removeprefix("base_model.model.").split(".lora_magnitude_vector")[0]
    assert not torch.allclose(magnitudes[some], norms[layer])  # trained away from the base's column norms
    res = run_cli("export", "--merge", str(final), "--out", str(tmp_path / "merged"))
    assert res.returncode == 0, res.stderr
    torch.testing.assert_close(
        logits(load_model(tmp_path / "merged"), tok), logits(load_adapter(final).eval(), tok), rtol=0, atol=1e-5
    )


def test_dora_under_fsdp2_matches_one_process(model_dir, data_dir, tmp_path):
    args = [
        *("train", "--model", str(model_dir), "--train_file", str(data_dir / "train.jsonl"), "--max_steps", "3"),
        *("--learning_rate", "1e-2", "--save_steps", "0", "--progress", "false", "--max_length", "64"),
        *("--max_prompt_length", "32", "--lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--use_dora", "true"),
    ]
    one = run_cli(*args, "--batch_size", "8", "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(*args, "--batch_size", "4", "--output_dir", str(tmp_path / "two"), launcher=FSDP2, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_params_close(final_params(tmp_path / "one"), final_params(tmp_path / "two"), atol=1e-5)


def test_an_online_behavior_copy_of_a_dora_adapter_carries_its_magnitudes(model_dir, prompt_file, tmp_path):
    from tether.train.online_policy import OnlinePolicy

    cfg = online_config(model_dir, prompt_file, tmp_path / "x", lora=True, lora_r=4, lora_alpha=8, use_dora=True)
    policy = OnlinePolicy(cfg, "cpu")
    with torch.no_grad():  # as if trained: the factors and the magnitudes moved
        for name, p in policy.model.named_parameters():
            if ".default." in name:
                p.add_(0.05 * torch.randn_like(p))
    tok = load_tokenizer(model_dir)
    with policy.behavior() as m:
        before = logits(m, tok)
    policy.refresh_behavior()
    with policy.behavior() as m:
        after = logits(m, tok)
    with policy.merged() as m:
        trained = logits(m, tok)
    assert not torch.allclose(before, trained, atol=1e-4)
    torch.testing.assert_close(after, trained, rtol=0, atol=1e-6)


def test_dora_and_4bit_need_lora_and_dora_ensembles_are_refused(model_dir, prompt_file, tmp_path):
    for name in ("use_dora", "load_in_4bit"):
        with pytest.raises(TetherError, match=f"option '{name}' trains an adapter: it needs lora: true"):
            train_config(model_dir, prompt_file.parent, tmp_path, **{name: True})
    args = ["online", "--model", str(model_dir), "--prompt_file", str(prompt_file), "--oracle", "callable:x:y"]
    res = run_cli(*args, "--lora", "true", "--use_dora", "true", "--ensemble_size", "2", "--output_dir", str(tmp_path))
    assert "merging DoRA adapters (their magnitudes) is not defined" in one_error_line(res)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return toy_model(tmp_path_factory.mktemp("models") / "toy128", hidden_size=128, num_layers=2, vocab_size=400)


@pytest.mark.skipif(NO_BNB, reason="bitsandbytes is not installed (pip install bitsandbytes)")
def test_qlora_trains_on_a_4bit_base_saves_and_merges(wide_model, data_dir, tmp_path):
    from bitsandbytes.nn import Linear4bit

    from tether.train.optimization import load_policy

    cfg = train_config(wide_model, data_dir, tmp_path / "run", lora=True, lora_r=4, lora_alpha=8, load_in_4bit=True)
    policy = load_policy(cfg)
    assert isinstance(policy.get_base_model().model.layers[0].self_attn.q_proj.base_layer, Linear4bit)
    final = trained_adapter(wide_model, data_dir, tmp_path / "run", load_in_4bit=True)
    assert any(v.abs().sum() > 0 for k, v in final_params(final.parent).items() if "lora_B" in k)
    res = run_cli("export", "--merge", str(final), "--out", str(tmp_path / "merged"))  # onto the full-precision base
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.skipif(not NO_BNB, reason="bitsandbytes is installed")
def test_load_in_4bit_without_bitsandbytes_is_one_line(model_dir, data_dir, tmp_path):
    args = ["train", "--model", str(model_dir), "--train_file", str(data_dir / "train.jsonl"), "--lora", "true"]
    res = run_cli(*args, "--load_in_4bit", "true", "--output_dir", str(tmp_path / "x"))
    assert "option 'load_in_4bit': bitsandbytes is not installed (pip install bitsandbytes)" in one_error_line(res)
