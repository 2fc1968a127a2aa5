"""benchmarks/memory_table.py, the per-GPU memory table of docs/scaling.md: its parameter counts equal real models'
(a grouped-query Llama and its PEFT LoRA adapter), and the page holds the table the script prints. Its prediction
for the 2-process CPU run is checked against the measured memory in tests/test_fsdp_loading.py (slow)."""

import importlib.util
import subprocess
import sys

import torch

from conftest import ROOT


def memory_table():
    spec = importlib.util.spec_from_file_location("memory_table", ROOT / "benchmarks" / "memory_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["memory_table"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_parameter_counts_equal_a_real_model_and_adapter():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    mt = memory_table()
    config = dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2
    ) | dict(vocab_size=50, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**config))
    shape = mt.Shape.of(config)
    assert shape.params() == sum(p.numel() for p in model.parameters())
    assert shape.layer_params() == sum(p.numel() for p in model.model.layers[0].parameters())
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert shape.lora_params(4) == sum(p.numel() for n, p in peft.named_parameters() if "lora_" in n)


def test_the_scaling_page_holds_the_table_the_script_prints():
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_table.py")], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() in (ROOT / "docs" / "scaling.md").read_text()
