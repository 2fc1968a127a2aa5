"""Sharded checkpoints under FSDP2 with 2 CPU processes over gloo (tests/fsdp_engage.py, memory-efficient loading
on, as the shipped config): each process writes its own shards of the weights through
torch.distributed.checkpoint (checkpoints/step-N/weights/, no gather), a process killed while a checkpoint is
being written leaves it unfinished and the run resumes from the previous one, a newer checkpoint holding a
planted pickle is skipped without unpickling it, and the resumed run ends bit for bit where the uninterrupted
run ends, with final/ consolidated once. The storage itself (no pickle read): tests/test_shards.py."""

import pickle

from conftest import EFFICIENT_LOADING, FSDP2, TESTS, final_params, run_cli, same_weights
from test_shards import Payload

ENV = {"PYTHONPATH": f"{TESTS}:{TESTS.parent / 'src'}", **EFFICIENT_LOADING}


def test_kill_during_a_sharded_checkpoint_write_and_resume_bit_for_bit(model_dir, data_dir, tmp_path):
    args = [
        *("train", "--model", str(model_dir), "--train_file", str(data_dir / "train.jsonl"), "--learning_rate", "1e-2"),
        *("--max_steps", "5", "--save_steps", "2", "--save_total_limit", "0", "--batch_size", "4"),
        *("--progress", "false", "--max_length", "64", "--max_prompt_length", "32"),
    ]
    full = run_cli(*args, "--output_dir", str(tmp_path / "full"), launcher=FSDP2, env=ENV)
    assert full.returncode == 0, full.stderr[-3000:]
    run = tmp_path / "resumed"
    killed = run_cli(
        *args, "--output_dir", str(run), launcher=FSDP2, env={**ENV, "TETHER_CRASH_AT": "mid_checkpoint:4"}
    )
    assert killed.returncode != 0 and not (run / "final").exists()
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith("step-000004.tmp")) == ["step-000002"]
    shards = sorted(p.name for p in (ckpts / "step-000002" / "weights").iterdir())
    assert shards == [f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]  # one per process
    # a newer checkpoint with a planted pickle: damaged, skipped, never unpickled
    marker = tmp_path / "unpickled"
    planted = ckpts / "step-000003"
    planted.mkdir()
    for p in (ckpts / "step-000002").rglob("*"):
        target = planted / p.relative_to(ckpts / "step-000002")
        target.mkdir() if p.is_dir() else target.write_bytes(p.read_bytes())
    (planted / "weights" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    resumed = run_cli(*args, "--output_dir", str(run), "--resume", launcher=FSDP2, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-000003 is damaged" in resumed.stderr and "resumed from" in resumed.stderr
    assert str(ckpts / "step-000002") in resumed.stderr.split("resumed from")[1].splitlines()[0]
    assert not marker.exists()
    assert not any(p.name.startswith("step-000004.tmp") for p in ckpts.iterdir())  # the unfinished write is gone
    assert same_weights(tmp_path / "full", run)  # bit for bit
    assert "model.safetensors" in {p.name for p in (run / "final").iterdir()} and final_params(run)
