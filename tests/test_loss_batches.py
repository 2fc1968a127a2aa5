"""Losses that are not a mean over pairs (aot sorts across the batch; sft is a token mean over it) take the
micro-batch of one process as their batch, as TRL does (docs/losses.md): 2 processes × b equal 1 process × b
with 2 accumulation steps, and differ from 1 process × 2b."""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli


def _args(model_dir, data_dir, out, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--loss",
        "aot",
        "--learning_rate",
        "1e-2",
        "--max_steps",
        "2",
        "--save_steps",
        "0",
        "--progress",
        "false",
        "--write_report",
        "false",
        "--output_dir",
        str(out),
        *extra,
    ]


def _weights(run):
    return load_file(run / "final" / "model.safetensors")


@pytest.mark.slow
def test_two_processes_equal_accumulation_not_one_big_batch(model_dir, data_dir, tmp_path):
    runs = {
        "accum": ["--batch_size", "4", "--gradient_accumulation_steps", "2"],
        "big": ["--batch_size", "8"],
    }
    for name, extra in runs.items():
        res = run_cli(*_args(model_dir, data_dir, tmp_path / name, *extra))
        assert res.returncode == 0, res.stderr
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "tether.cli"]
    res = run_cli(*_args(model_dir, data_dir, tmp_path / "two", "--batch_size", "4"), launcher=launcher)
    assert res.returncode == 0, res.stderr
    two, accum, big = (_weights(tmp_path / n) for n in ("two", "accum", "big"))
    for k in two:
        torch.testing.assert_close(two[k], accum[k], rtol=0, atol=1e-5, msg=k)
    losses = {n: _losses(tmp_path / n) for n in ("two", "accum", "big")}
    assert losses["two"] == pytest.approx(losses["accum"], abs=1e-5)
    # step 1: policy = reference, every sorted δ is 0; step 2: the same pairs, sorted in other batches
    matched = max(abs(a - b) for a, b in zip(losses["two"], losses["accum"]))
    assert abs(losses["two"][1] - losses["big"][1]) > 10 * matched + 1e-5, (losses, matched)


def _losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
