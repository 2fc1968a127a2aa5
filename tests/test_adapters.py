"""Adapters as models: a LoRA run's final/ given back as --model, `tether export --merge`, the model card."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from conftest import online_config, train_config
from tether.cli import main
from tether.models import load_model
from tether.train import online_train, train

LORA = dict(lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-2, max_steps=2)


@pytest.fixture(scope="module")
def lora_run(model_dir, data_dir, tmp_path_factory):
    return train(
        train_config(
            model_dir, data_dir, tmp_path_factory.mktemp("lora") / "run", eval_file=str(data_dir / "eval.jsonl"), **LORA
        )
    )


def _logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_final_has_a_real_model_card_and_the_run_records_versions(lora_run, data_dir):
    card = (lora_run / "final" / "README.md").read_text()
    for needed in (
        "base_model:",
        "method: dap; loss: dpo",
        "| lora_r | 4 |",
        str(data_dir / "train.jsonl"),
        "sha256:",
        "train_pairs = 48",
        "eval_pairs = 12",
        "eval_loss",
        "| torch | 2.13",
        "| peft |",
        "| transformers |",
        "tether export --merge",
    ):
        assert needed in card, needed
    results = json.loads((lora_run / "results.json").read_text())
    assert set(results["versions"]) >= {"tether", "torch", "transformers", "peft", "accelerate", "python"}
    assert results["distributed"] == {
        "distributed_type": "NO",
        "sharding": "none",
        "num_processes": 1,
        "parameters_sharded": False,
    }
    assert results["data_files"]["train"]["fingerprint"].startswith("sha256:")


def test_an_adapter_directory_loads_as_base_plus_adapter(lora_run, model_dir):
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    merged = load_model(lora_run / "final")
    peft = PeftModel.from_pretrained(load_model(model_dir), lora_run / "final")
    lora_b = [p for n, p in peft.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b)  # the adapter is not a no-op
    torch.testing.assert_close(_logits(merged, ids), _logits(peft, ids), rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(load_model(model_dir), ids))


def test_export_merge_writes_a_plain_model_with_its_tokenizer(lora_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", "--merge", str(lora_run / "final"), "--out", str(out)]) == 0
    assert (
        (out / "config.json").is_file()
        and (out / "tokenizer.json").is_file()
        and not (out / "adapter_config.json").exists()
    )
    assert "Merged plain model" in (out / "README.md").read_text()
    ids = torch.tensor([[2, 8, 11, 4]])
    torch.testing.assert_close(
        _logits(load_model(out), ids), _logits(load_model(lora_run / "final"), ids), rtol=0, atol=1e-6
    )
    assert main(["export", "--merge", str(lora_run / "final"), "--out", str(out)]) == 2  # never overwrites
    assert main(["export", "--merge", str(out), "--out", str(tmp_path / "x")]) == 2  # not an adapter
    err = capsys.readouterr().err
    assert "not an empty directory" in err and "not a PEFT adapter directory" in err


def test_train_from_an_adapter_trains_a_new_adapter_on_the_merged_model(lora_run, model_dir, data_dir, tmp_path):
    run = train(train_config(lora_run / "final", data_dir, tmp_path / "again", **LORA))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.693147, abs=1e-5)  # the new adapter starts at zero: policy == reference
    adapter_cfg = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((lora_run / "final").resolve())  # a chain of adapters
    ids = torch.tensor([[1, 5, 9, 14]])
    chained = PeftModel.from_pretrained(load_model(lora_run / "final"), run / "final")
    torch.testing.assert_close(_logits(load_model(run / "final"), ids), _logits(chained, ids), rtol=0, atol=1e-5)
    full = train(
        train_config(lora_run / "final", data_dir, tmp_path / "full", max_steps=1)
    )  # full fine-tuning of the merged model
    assert "model.embed_tokens.weight" in load_file(full / "final" / "model.safetensors")


def test_online_and_eval_take_an_adapter_directory(lora_run, prompt_file, tmp_path, capsys):  # noqa: F811
    run = online_train(
        online_config(
            lora_run / "final", prompt_file, tmp_path / "online", steps=1, phases=1, lora=True, lora_r=4, lora_alpha=8
        )
    )
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert "online DAP, reference = behavior (BPO)" in (run / "final" / "README.md").read_text()
    assert (
        main(
            [
                "eval",
                "--model",
                str(lora_run / "final"),
                "--suite",
                "knowledge",
                "--progress",
                "false",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 0
    )
    assert 0 <= json.loads((tmp_path / "e.json").read_text())["mean"] <= 1  # knowledge accuracy
