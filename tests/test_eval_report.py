"""`tether eval --eval_file` (held-out preference metrics without training) and `tether report RUN_DIR`."""

import json

import pytest

from conftest import online_config
from tether.cli import main
from tether.config import load_config
from tether.train import TrainConfig, train


@pytest.fixture(scope="module")
def lora_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "lora"
    return train(
        load_config(
            TrainConfig,
            overrides=dict(
                model=str(model_dir),
                train_file=str(data_dir / "train.jsonl"),
                eval_file=str(data_dir / "eval.jsonl"),
                max_steps=4,
                batch_size=4,
                learning_rate=1e-2,
                lora=True,
                lora_r=4,
                beta=0.2,
                output_dir=str(out),
                progress=False,
                save_steps=0,
                report_to=["tensorboard"],
            ),
        )
    )


def _eval(capsys, *args):
    assert main(["eval", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_file_of_an_adapter_matches_the_training_run(lora_run, data_dir, capsys, tmp_path):
    out = tmp_path / "pairs.json"
    got = _eval(
        capsys,
        "--model",
        str(lora_run / "final"),
        "--eval_file",
        str(data_dir / "eval.jsonl"),
        "--beta",
        "0.2",
        "--out",
        str(out),
    )
    final = json.loads((lora_run / "results.json").read_text())["final_eval"]
    agg = got["aggregate"]
    assert got["pairs_used"] == 12 and "pairs" not in got and got["ref_model"].endswith("(adapter disabled)")
    for ours, theirs in (
        ("loss", "eval_loss"),
        ("reward_accuracy", "eval_reward_accuracy"),
        ("reward_margin", "eval_reward_margin"),
        ("logps_chosen", "eval_logps_chosen"),
        ("logps_rejected", "eval_logps_rejected"),
    ):
        assert agg[ours]["mean"] == pytest.approx(final[theirs], rel=1e-4, abs=1e-5), ours
        assert agg[ours]["ci95_low"] <= agg[ours]["mean"] <= agg[ours]["ci95_high"] and agg[ours]["n"] == 12
    pairs = json.loads(out.read_text())["pairs"]
    assert len(pairs) == 12 and pairs[0]["source"].endswith("eval.jsonl:line 1") and "id" in pairs[0]
    p = pairs[0]
    assert p["reward_margin"] == pytest.approx(
        0.2 * ((p["logps_chosen"] - p["ref_logps_chosen"]) - (p["logps_rejected"] - p["ref_logps_rejected"])), abs=1e-4
    )


def test_eval_of_a_run_takes_its_beta_lengths_and_reference(lora_run, data_dir, capsys):
    """`tether eval --model RUN/final` measures as the run did (β 0.2 here, not the default 0.1), says so, and a
    flag overrides the run's value."""
    final = json.loads((lora_run / "results.json").read_text())["final_eval"]
    got = _eval(capsys, "--model", str(lora_run / "final"), "--eval_file", str(data_dir / "eval.jsonl"))
    assert got["beta"] == 0.2 and got["aggregate"]["loss"]["mean"] == pytest.approx(final["eval_loss"], rel=1e-4)
    taken = got["options_from_run"]["taken"]
    assert got["options_from_run"]["config"] == str(lora_run / "config.yaml") and taken["beta"] == 0.2
    assert taken["loss"] == "dpo" and taken["max_length"] == 512 and taken["max_prompt_length"] == 256
    assert (
        main(["eval", "--model", str(lora_run / "final"), "--eval_file", str(data_dir / "eval.jsonl"), "--beta", "1"])
        == 0
    )
    out, err = capsys.readouterr()
    over = json.loads(out)
    assert over["beta"] == 1.0 and over["options_from_run"]["overridden"] == {"beta": {"run": 0.2, "given": 1.0}}
    assert (
        f"tether eval: from {lora_run / 'config.yaml'}: loss dpo" in err and "overridden: --beta 1.0 (run: 0.2)" in err
    )
    assert over["aggregate"]["loss"]["mean"] != pytest.approx(got["aggregate"]["loss"]["mean"])


def test_eval_needs_a_file_or_a_suite(lora_run, capsys):
    """No silent default: without --eval_file or --suite, tether eval says what to give."""
    assert main(["eval", "--model", str(lora_run / "final")]) == 2
    assert "say what to evaluate on: --eval_file PAIRS or --suite NAME" in capsys.readouterr().err


def test_eval_file_of_a_full_model_and_its_reference(model_dir, data_dir, capsys):
    from tether.cli import main as cli_main

    same = _eval(
        capsys, "--model", str(model_dir), "--ref_model", str(model_dir), "--eval_file", str(data_dir / "eval.jsonl")
    )
    assert same["aggregate"]["reward_margin"]["mean"] == 0.0 and same["aggregate"]["reward_accuracy"]["mean"] == 0.0
    assert len(same["pairs"]) == 12
    assert cli_main(["eval", "--model", str(model_dir), "--eval_file", str(data_dir / "eval.jsonl")]) == 2
    assert "needs --ref_model" in capsys.readouterr().err


def test_every_run_writes_a_report_with_curves(lora_run, tmp_path):
    text = (lora_run / "report.md").read_text()
    assert "## Before / after training" in text and "| eval_loss |" in text and "## Configuration" in text
    assert "- train: 48 records, 48 pairs kept" in text
    for stem in ("loss", "reward_accuracy", "margins", "logps", "learning_rate", "grad_norm"):
        assert f"![{stem}](plots/{stem}.png)" in text
        assert (lora_run / "plots" / f"{stem}.png").stat().st_size > 1000
    assert not (lora_run / "plots" / "win_rate.png").exists()  # an online curve: not in an offline run


def test_report_command_tolerates_a_torn_metrics_line(lora_run, tmp_path, capsys):
    metrics, report = (lora_run / "metrics.jsonl").read_bytes(), (lora_run / "report.md").read_bytes()
    try:
        with (lora_run / "metrics.jsonl").open("a") as f:
            f.write('{"step": 5, "loss": 0.')  # a run killed mid-write
        (lora_run / "report.md").unlink()
        assert main(["report", str(lora_run)]) == 0
        assert (lora_run / "report.md").is_file() and str(lora_run / "report.md") in capsys.readouterr().out
    finally:
        (lora_run / "metrics.jsonl").write_bytes(metrics)
        (lora_run / "report.md").write_bytes(report)
    assert main(["report", str(tmp_path)]) == 2
    assert "not a tether run directory" in capsys.readouterr().err


def test_tensorboard_scalars_use_trl_names_with_before_and_after(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = [p.parent for p in lora_run.rglob("events.out.tfevents.*")]
    assert events
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/logits/chosen",
        "train/logits/rejected",
        "train/learning_rate",
        "train/grad_norm",
        "eval/loss",
        "eval/rewards/margins",
        "eval/logits/chosen",
    ):
        assert tag in tags, (tag, sorted(tags))
    steps = [e.step for e in acc.Scalars("eval/rewards/margins")]
    assert steps == [0, 4]  # before and after training
    assert acc.Scalars("eval/rewards/margins")[0].value == 0.0  # the policy starts as the reference


def test_online_run_report_has_win_rate_annotations_ties_and_time(model_dir, tmp_path, monkeypatch):
    from pathlib import Path

    from tether.train import online_train
    from tether_lab.demo import toy_preferences, write_jsonl

    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # the toy oracles
    rows = toy_preferences(24, seed=5)
    prompts = write_jsonl([{"prompt": r["prompt"], "reference": r["chosen"]} for r in rows], tmp_path / "p.jsonl")
    run = online_train(
        online_config(
            model_dir,
            prompts,
            tmp_path / "online",
            eval_file=str(prompts),
            eval_prompts=4,
            eval_steps=2,
            max_new_tokens=8,
            eval_max_new_tokens=8,
        )
    )
    text = (run / "report.md").read_text()
    assert text.startswith("# Run report") and "online run of" in text and "## Time per phase" in text
    assert "| eval_win_rate |" in text and "annotations" in text
    for stem in ("win_rate", "annotations", "ties", "time", "loss"):
        assert (run / "plots" / f"{stem}.png").is_file(), stem


def test_eval_file_reports_every_loss_when_asked(lora_run, data_dir, capsys):
    from tether.loss_table import NAMES

    args = ["--model", str(lora_run / "final"), "--eval_file", str(data_dir / "eval.jsonl")]
    got = _eval(capsys, *args, "--beta", "0.2", "--label_smoothing", "0.1", "--loss", "robust", "--losses", "all")
    assert list(got["losses"]) == list(NAMES)
    assert got["losses"]["robust"]["mean"] == pytest.approx(got["aggregate"]["loss"]["mean"], abs=1e-6)
    assert got["losses"]["exo_pair"]["beta"] == 0.2 and got["losses"]["simpo"]["beta"] == 0.2  # --beta for all
    assert all(v["n"] == 12 for v in got["losses"].values())
    # only reference-free losses: no reference is loaded, and each loss takes its own default β
    free = _eval(capsys, *args, "--loss", "simpo", "--losses", "orpo", "cpo")
    assert free["ref_model"] is None and free["beta"] == 2.0 and free["losses"]["orpo"]["beta"] == 0.1
    assert "ref_logps_chosen" not in free["aggregate"]
    default_beta = _eval(capsys, *args, "--losses", "exo_pair")
    assert "needs option 'label_smoothing'" in default_beta["losses"]["exo_pair"]["skipped"]
