"""DeepSpeed ZeRO-2/3 through accelerate: the shipped configs, and a 2-process run where it can run at all.

What was found on this CPU machine (deepspeed 0.19.8 from PyPI, in a side environment): DeepSpeed's own CPU
accelerator works (communication over gloo, its shared-memory op built with ninja), and accelerate's
`_prepare_deepspeed` builds a ZeRO-2 engine on CPU processes. But accelerate 1.15 engages DeepSpeed only for GPU
processes: AcceleratorState switches to DEEPSPEED only when ACCELERATE_USE_DEEPSPEED is set and cpu is False;
with cpu=True (tether on a machine without GPU) it runs plain data parallel (MULTI_CPU), which tether refuses,
and with cpu=False on a machine without GPU PartialState finds no backend and every process runs alone
(num_processes 1). Setting the DeepSpeed state after the Accelerator is made (as tests/fsdp_engage.py does for
FSDP2) does not hold: the distributed type reads MULTI_CPU again by the first backward, so accelerate never calls
DeepSpeed's `engine.step()` and the weights never move. So the run test skips here and says why; under DeepSpeed
tether keeps refusing resumable checkpoints, its own gradient accumulation and `tether online`. What it would
check on 2 GPUs: a ZeRO-2 and a ZeRO-3 run record their sharding and end within 1e-4 of a 1-process run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_params_close, final_params, run_cli

EXAMPLES = Path(__file__).parents[1] / "examples" / "accelerate"


@pytest.mark.parametrize("stage", [2, 3])
def test_shipped_deepspeed_configs(stage):
    cfg = yaml.safe_load((EXAMPLES / f"deepspeed_zero{stage}.yaml").read_text())
    ds = cfg["deepspeed_config"]
    assert cfg["distributed_type"] == "DEEPSPEED" and ds["zero_stage"] == stage
    assert ds["gradient_accumulation_steps"] == 1 and ds["zero3_init_flag"] is False  # what tether's loop needs
    if stage == 3:
        assert ds["zero3_save_16bit_model"] is True  # final/ consolidated by DeepSpeed


def _why_not() -> str | None:
    if importlib.util.find_spec("deepspeed") is None and torch.cuda.device_count() < 2:
        return (
            "deepspeed is not installed (pip install deepspeed), and it could not engage here anyway: accelerate "
            "1.15 engages DeepSpeed only on GPU processes, and this machine has no 2 GPUs (see the module docstring)"
        )
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install deepspeed)"
    if torch.cuda.device_count() < 2:
        return (
            "needs 2 GPUs: accelerate 1.15 engages DeepSpeed only on GPU processes "
            f"(this machine has {torch.cuda.device_count()} GPU(s); on CPU it would run plain data parallel, "
            "which tether refuses)"
        )
    return None


@pytest.mark.skipif(_why_not() is not None, reason=_why_not() or "")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_gpus_match_one(model_dir, data_dir, tmp_path, stage):
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
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(EXAMPLES / f"deepspeed_zero{stage}.yaml"),
        "--num_processes",
        "2",
        "-m",
        "tether.cli",
    ]
    two = run_cli(*args, "--batch_size", "4", "--output_dir", str(tmp_path / "two"), launcher=launcher)
    assert two.returncode == 0, two.stderr
    setup = json.loads((tmp_path / "two" / "results.json").read_text())["distributed"]
    assert setup["sharding"] == f"deepspeed-zero{stage}"
    assert_params_close(final_params(tmp_path / "one"), final_params(tmp_path / "two"), atol=1e-4)
