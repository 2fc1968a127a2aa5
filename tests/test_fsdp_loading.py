"""Memory-efficient loading under FSDP2 (`fsdp_cpu_ram_efficient_loading: true`) with 2 CPU processes over gloo.

Only the first process reads the weights; the second builds the model empty (meta) and receives its shards when
the model is sharded, before BAPO's base responses and the reference log-probs, which are computed on the sharded
model (every process making the same forward calls). The runs go through tests/fsdp_engage.py with the
environment `accelerate launch` sets from such a config (conftest.EFFICIENT_LOADING); TETHER_TEST_MEMORY makes
every process record the bytes of real parameters it held right after loading and its peak resident memory.
Checked: the second process held no weight after loading, and the final weights equal a 1-process run (1e-5) —
offline LoRA + BAPO + evaluation on an odd number of examples, offline full fine-tuning with a sharded frozen
reference and gradient accumulation, online full fine-tuning + BAPO + evaluation, online LoRA with a sharded
fixed reference; and (slow) on a 1.08 GB random-init model the second process's peak memory with and without it.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import (
    EFFICIENT_LOADING,
    FSDP2,
    PROCESS_ATOL,
    TESTS,
    assert_params_close,
    assert_really_sharded,
    final_params,
    jsonl_rows,
    run_cli,
)
from test_memory_table import memory_table
from tether_lab.demo import toy_preferences, write_jsonl

ENV = {"PYTHONPATH": f"{TESTS}:{TESTS.parent / 'src'}"}


def common(model_dir, *extra):
    return [
        *("--model", str(model_dir), "--learning_rate", "1e-2", "--save_steps", "0", "--progress", "false"),
        *("--max_length", "64", "--max_prompt_length", "32", *extra),
    ]


def memory_records(directory: Path) -> list[dict]:
    return [json.loads((directory / f"rank_{r}.json").read_text()) for r in range(2)]


def one_and_two(tmp_path, one_args, two_args):
    """The same run with 1 process and with 2 under FSDP2 with memory-efficient loading; returns (one, two) run
    directories and the two processes' memory records."""
    one = run_cli(*one_args, "--output_dir", str(tmp_path / "one"), env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    (tmp_path / "memory").mkdir()
    env = {**ENV, **EFFICIENT_LOADING, "TETHER_TEST_MEMORY": str(tmp_path / "memory")}
    two = run_cli(*two_args, "--output_dir", str(tmp_path / "two"), launcher=FSDP2, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_really_sharded(tmp_path / "two", efficient_loading=True)
    first, second = memory_records(tmp_path / "memory")
    assert first["loaded_bytes"] > 0 and second["loaded_bytes"] == 0  # only the first process read the weights
    return tmp_path / "one", tmp_path / "two"


def test_offline_lora_bapo_with_evaluation(model_dir, data_dir, tmp_path):
    # 11 evaluation pairs: the second process's share is padded to the first's (its padded result dropped)
    write_jsonl(toy_preferences(11, seed=2), tmp_path / "eval11.jsonl")
    args = [
        "train",
        *common(model_dir, "--train_file", str(data_dir / "train.jsonl"), "--max_steps", "3"),
        *("--lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--method", "bapo", "--base_max_new_tokens", "8"),
        *("--eval_file", str(tmp_path / "eval11.jsonl")),
    ]
    one, two = one_and_two(tmp_path, [*args, "--batch_size", "8"], [*args, "--batch_size", "4"])
    assert_params_close(final_params(one), final_params(two), atol=1e-5)
    r1, r2 = (json.loads((d / "results.json").read_text())["final_eval"] for d in (one, two))
    assert r1["eval_loss"] == pytest.approx(r2["eval_loss"], abs=1e-5)
    assert r1["eval_anchor"] == pytest.approx(r2["eval_anchor"], abs=1e-4)  # the same base responses


def test_offline_full_finetuning_with_a_sharded_frozen_reference_and_accumulation(model_dir, data_dir, tmp_path):
    args = [
        "train",
        *common(model_dir, "--train_file", str(data_dir / "train.jsonl"), "--max_steps", "3"),
        *("--precompute_ref_logps", "false", "--eval_file", str(data_dir / "eval.jsonl")),
    ]
    two_batch = ["--batch_size", "2", "--gradient_accumulation_steps", "2"]
    one, two = one_and_two(tmp_path, [*args, "--batch_size", "8"], [*args, *two_batch])
    assert json.loads((two / "results.json").read_text())["reference"] == "initial (a frozen copy)"
    assert_params_close(final_params(one), final_params(two), atol=1e-5)


def online_args(model_dir, prompt_file, *extra):
    return [
        "online",
        *common(model_dir, "--prompt_file", str(prompt_file), "--oracle", "callable:toy_oracles:shorter"),
        *("--steps", "4", "--phases", "2", "--prompts_per_step", "4", "--max_new_tokens", "12"),
        *("--oracle_backoff", "0", *extra),
    ]


def ledger(run_dir):
    return [(r["step"], r["slot"], r["response_ids"], r["label"]) for r in jsonl_rows(run_dir / "ledger.jsonl")]


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "bapo", "--eval_file", "PROMPTS", "--eval_prompts", "5"],
        ["--lora", "true", "--lora_r", "4", "--lora_alpha", "8", "--reference", "fixed", "--ref_model", "MODEL"],
    ],
    ids=["full-bapo-eval", "lora-fixed-reference"],
)
def test_online(model_dir, prompt_file, tmp_path, extra):
    extra = [{"PROMPTS": str(prompt_file), "MODEL": str(model_dir)}.get(a, a) for a in extra]
    args = online_args(model_dir, prompt_file, *extra)
    one, two = one_and_two(tmp_path, args, args)
    assert ledger(one) == ledger(two)  # the same pairs and labels
    assert_params_close(final_params(one), final_params(two), atol=PROCESS_ATOL)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1.get("final_eval") == r2.get("final_eval")


def big_model(path: Path, tokenizer_dir: Path) -> int:
    """A random-init Llama of 269M float32 parameters (1.08 GB) with the toy tokenizer; returns its weight bytes."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.slow
def test_the_second_process_never_holds_the_whole_model(model_dir, tmp_path):
    """Peak resident memory of each process over a 1-step LoRA run on a 1.08 GB model, with and without
    memory-efficient loading (about 70 s a run here). MALLOC_MMAP_THRESHOLD_ makes glibc give every large freed
    buffer back at once, so the resident memory follows the live tensors (by default glibc keeps the freed
    receive buffers of the broadcast, and the second process's peak was 3.1 GB either way: docs/scaling.md)."""
    weights = big_model(tmp_path / "big", model_dir)
    write_jsonl(toy_preferences(4, seed=1), tmp_path / "train.jsonl")
    args = [
        "train",
        *common(tmp_path / "big", "--train_file", str(tmp_path / "train.jsonl"), "--max_steps", "1"),
        *("--batch_size", "1", "--max_length", "24", "--max_prompt_length", "12", "--lora", "true", "--lora_r", "4"),
        *("--write_report", "false"),
    ]
    rise = {}
    for efficient in (True, False):
        memory = tmp_path / f"memory-{efficient}"
        memory.mkdir()
        env = {**ENV, **EFFICIENT_LOADING, "TETHER_TEST_MEMORY": str(memory), "MALLOC_MMAP_THRESHOLD_": "131072"}
        env["FSDP_CPU_RAM_EFFICIENT_LOADING"] = str(efficient).lower()
        res = run_cli(*args, "--output_dir", str(tmp_path / f"run-{efficient}"), launcher=FSDP2, env=env)
        assert res.returncode == 0, res.stderr[-3000:]
        first, second = memory_records(memory)
        assert first["loaded_bytes"] > weights  # the model and its LoRA adapter
        assert second["loaded_bytes"] == (0 if efficient else first["loaded_bytes"])
        rise[efficient] = [(r["peak_kb"] - r["start_kb"]) * 1024 for r in (first, second)]
    print({k: [f"{b / 1e9:.2f} GB" for b in v] for k, v in rise.items()})  # docs/scaling.md quotes these
    assert rise[True][1] < weights  # its half of the weights and a layer at a time, never the whole model
    assert rise[False][1] - rise[True][1] > 0.9 * weights  # the whole copy it loaded without it is gone
    assert rise[True][0] > weights  # the first process did read them whole
    predicted = memory_table().cpu_test_prediction()  # benchmarks/memory_table.py: tensors only, no runtime
    assert predicted["weights"] == weights
    for measured, bound in ((rise[True][1], predicted["efficient"]), (rise[False][1], predicted["whole_first"])):
        assert bound <= measured <= bound + 0.5e9  # the rest: modules imported after the start, gloo, the allocator
