"""Sharded training under FSDP2 with 2 CPU processes, against a 1-process run (final weights within 1e-5).

accelerate 1.15 engages FSDP only on GPUs; on this CPU machine `accelerate launch --use_fsdp` runs plain data
parallel. So the 2-process runs here go through tests/fsdp_engage.py, which sets the accelerator state that a
GPU launch with `--use_fsdp --fsdp_version 2` sets; from there on it is accelerate's own FSDP2 preparation
(`fully_shard` on every decoder layer and the root) and tether's loop. Covered: full fine-tuning with gradient
accumulation and gradient checkpointing, LoRA on sharded weights, BAPO's base responses (generation) and the
reference precompute, held-out evaluation, checkpoint/resume, the consolidated final/ and the refusal when
sharding is asked but not engaged.
`tether online` under FSDP2: tests/test_fsdp_online.py.
"""

import json
import sys
from pathlib import Path

import pytest
import yaml

from conftest import FSDP2, TESTS, assert_params_close, assert_really_sharded, final_params, run_cli


def args(model_dir, data_dir, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--learning_rate",
        "1e-2",
        "--max_steps",
        "3",
        "--save_steps",
        "0",
        "--progress",
        "false",
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
        *extra,
    ]


def both(model_dir, data_dir, tmp_path, one_batch: list[str], two_batch: list[str], *extra):
    """The same run with 1 process (plain) and 2 processes under FSDP2; returns (one, two) run directories."""
    one = run_cli(*args(model_dir, data_dir, *extra), *one_batch, "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    env = {"PYTHONPATH": f"{TESTS}:{Path(__file__).parents[1] / 'src'}"}
    two = run_cli(
        *args(model_dir, data_dir, *extra), *two_batch, "--output_dir", str(tmp_path / "two"), launcher=FSDP2, env=env
    )
    assert two.returncode == 0, two.stderr
    return tmp_path / "one", tmp_path / "two"


def test_fsdp2_full_finetuning_with_accumulation_and_checkpointing_matches_one_process(model_dir, data_dir, tmp_path):
    two_batch = ["--batch_size", "2", "--gradient_accumulation_steps", "2", "--gradient_checkpointing", "true"]
    one, two = both(model_dir, data_dir, tmp_path, ["--batch_size", "8"], two_batch)
    assert_really_sharded(two)
    assert_params_close(final_params(one), final_params(two), atol=1e-5)  # final/ is consolidated: whole tensors
    assert "model.safetensors" in {p.name for p in (two / "final").iterdir()}


def test_fsdp2_lora_bapo_with_evaluation_matches_one_process(model_dir, data_dir, tmp_path):
    extra = [
        "--lora",
        "true",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--method",
        "bapo",
        "--base_max_new_tokens",
        "8",
        "--eval_file",
        str(data_dir / "eval.jsonl"),
    ]
    one, two = both(model_dir, data_dir, tmp_path, ["--batch_size", "8"], ["--batch_size", "4"], *extra)
    assert_really_sharded(two)
    a, b = final_params(one), final_params(two)
    assert_params_close(a, b, atol=1e-5)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["final_eval"]["eval_loss"] == pytest.approx(r2["final_eval"]["eval_loss"], abs=1e-5)
    assert r1["final_eval"]["eval_anchor"] == pytest.approx(
        r2["final_eval"]["eval_anchor"], abs=1e-4
    )  # same base responses


@pytest.mark.slow
def test_fsdp2_kill_and_resume_matches_the_uninterrupted_run(model_dir, data_dir, tmp_path):
    env = {"PYTHONPATH": f"{TESTS}:{Path(__file__).parents[1] / 'src'}"}
    common = args(
        model_dir,
        data_dir,
        "--batch_size",
        "4",
        "--max_steps",
        "5",
        "--save_steps",
        "2",
        "--lora",
        "true",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
    )
    full = run_cli(*common, "--output_dir", str(tmp_path / "full"), launcher=FSDP2, env=env)
    assert full.returncode == 0, full.stderr
    crashed = run_cli(
        *common, "--output_dir", str(tmp_path / "resumed"), launcher=FSDP2, env={**env, "TETHER_CRASH_AFTER_STEP": "3"}
    )
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "final").exists()
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000002"
    assert {"optim_shard_0.json", "optim_shard_1.json", "optim_shard_1.safetensors", "weights"} <= {
        p.name for p in ckpt.iterdir()
    }  # each process's own shards of the weights (weights/) and of the optimizer state: nothing gathered
    resumed = run_cli(*common, "--output_dir", str(tmp_path / "resumed"), "--resume", launcher=FSDP2, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert_params_close(final_params(tmp_path / "full"), final_params(tmp_path / "resumed"), atol=1e-6)


def test_a_launch_that_asks_for_fsdp_and_gets_none_refuses(model_dir, data_dir, tmp_path):
    # the trap: on CPU processes accelerate runs --use_fsdp as plain data parallel (MULTI_CPU), silently
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(TESTS.parent / "examples" / "accelerate" / "fsdp.yaml"),
        "--num_processes",
        "2",
        "-m",
        "tether.cli",
    ]  # the shipped config
    res = run_cli(
        *args(model_dir, data_dir, "--batch_size", "4"), "--output_dir", str(tmp_path / "x"), launcher=launcher
    )
    assert res.returncode != 0
    assert "asked for FSDP but accelerate engaged MULTI_CPU with 2 process(es)" in res.stderr
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_shipped_fsdp_config_is_an_fsdp2_accelerate_config():
    cfg = yaml.safe_load((TESTS.parent / "examples" / "accelerate" / "fsdp.yaml").read_text())
    fsdp = cfg["fsdp_config"]
    assert cfg["distributed_type"] == "FSDP" and fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
