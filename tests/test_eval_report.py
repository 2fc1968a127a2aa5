"""`tether eval --eval_file` (held-out preference metrics without training) and `tether report RUN_DIR`."""

import json

import pytest

from tether.cli import main
from tether.config import load_config
from tether.train import TrainConfig, train


@pytest.fixture(scope="module")
def lora_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    return train(load_config(TrainConfig, overrides=dict(
        model=str(model_dir), train_file=str(data_dir / "train.jsonl"), eval_file=str(data_dir / "eval.jsonl"),
        max_steps=4, batch_size=4, learning_rate=1e-2, lora=True, lora_r=4, beta=0.2, output_dir=str(out),
        progress=False, save_steps=0)))


def _eval(capsys, *args):
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_file_of_an_adapter_matches_the_training_run(lora_run, data_dir, capsys, tmp_path):
    out = tmp_path / "pairs.json"
    got = _eval(capsys, "--model", str(lora_run / "final"), "--eval_file", str(data_dir / "eval.jsonl"), "--beta", "0.2",
                "--out", str(out))
    final = json.loads((lora_run / "results.json").read_text())["final_eval"]
    agg = got["aggregate"]
    assert got["pairs_used"] == 12 and "pairs" not in got and got["ref_model"].endswith("(adapter disabled)")
    for ours, theirs in (("loss", "eval_loss"), ("reward_accuracy", "eval_reward_accuracy"), ("reward_margin", "eval_reward_margin"),
                         ("logps_chosen", "eval_logps_chosen"), ("logps_rejected", "eval_logps_rejected")):
        assert agg[ours]["mean"] == pytest.approx(final[theirs], rel=1e-4, abs=1e-5), ours
        assert agg[ours]["ci95_low"] <= agg[ours]["mean"] <= agg[ours]["ci95_high"] and agg[ours]["n"] == 12
    pairs = json.loads(out.read_text())["pairs"]
    assert len(pairs) == 12 and pairs[0]["source"].endswith("eval.jsonl:line 1") and "id" in pairs[0]
    p = pairs[0]
    assert p["reward_margin"] == pytest.approx(0.2 * ((p["logps_chosen"] - p["ref_logps_chosen"]) - (p["logps_rejected"] - p["ref_logps_rejected"])), abs=1e-4)


def test_eval_file_of_a_full_model_and_its_reference(model_dir, data_dir, capsys):
    from tether.cli import main as cli_main

    same = _eval(capsys, "--model", str(model_dir), "--ref_model", str(model_dir), "--eval_file", str(data_dir / "eval.jsonl"))
    assert same["aggregate"]["reward_margin"]["mean"] == 0.0 and same["aggregate"]["reward_accuracy"]["mean"] == 0.0
    assert len(same["pairs"]) == 12
    assert cli_main(["eval", "--model", str(model_dir), "--eval_file", str(data_dir / "eval.jsonl")]) == 2
    assert "needs --ref_model" in capsys.readouterr().err
