"""Trackers: TensorBoard where logging_dir (or $TENSORBOARD_LOGGING_DIR) says, each step once after a crash and
--resume; trackio and mlflow through accelerate's trackers, into their local stores (skipped where the optional
extras `tether[trackio]` / `tether[mlflow]` are not installed); the console summary at the end of a run."""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys

import pytest

from conftest import run_cli


def toy_args(model_dir, data_dir, *extra):
    return [
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--eval_file",
        str(data_dir / "eval.jsonl"),
        "--max_steps",
        "4",
        "--batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--max_length",
        "64",
        "--progress",
        "false",
        "--write_report",
        "false",
        *extra,
    ]


def scalars(log_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))  # purges orphaned events (a restarted writer's purge step), as TensorBoard
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_tensorboard_in_logging_dir_and_each_step_once_after_resume(model_dir, data_dir, tmp_path):
    run, logs = tmp_path / "run", tmp_path / "tb"
    args = toy_args(model_dir, data_dir, "--report_to", "tensorboard", "--logging_dir", str(logs), "--save_steps", "2")
    crashed = run_cli(*args, "--output_dir", str(run), env={"TETHER_CRASH_AT": "after_step:3"})
    assert crashed.returncode == 17
    assert [s for s, _ in scalars(logs, "train/loss")] == [1, 2, 3]  # step 3 was logged, its checkpoint was not
    resumed = run_cli(*args, "--output_dir", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [s for s, _ in scalars(logs, "train/loss")] == [1, 2, 3, 4]  # step 3 once: the resumed run's
    assert [s for s, _ in scalars(logs, "eval/loss")] == [0, 4]
    assert not (run / "tensorboard").exists()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert scalars(logs, "train/loss")[2][1] == pytest.approx(rows[2]["loss"])

    env_logs = tmp_path / "from_env"
    fresh = run_cli(
        *toy_args(model_dir, data_dir, "--report_to", "tensorboard", "--output_dir", str(tmp_path / "r2")),
        env={"TENSORBOARD_LOGGING_DIR": str(env_logs)},
    )
    assert fresh.returncode == 0 and [s for s, _ in scalars(env_logs, "train/loss")] == [1, 2, 3, 4]


def test_console_summary_at_the_end_of_a_run(model_dir, data_dir, tmp_path):
    run = tmp_path / "run"
    res = run_cli(*toy_args(model_dir, data_dir, "--output_dir", str(run), "--write_report", "true"))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    results = json.loads((run / "results.json").read_text())
    assert f"run finished: {run} (4 steps)" in out
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["loss"])
    before, after = (float(v) for v in line.split()[1:3])
    assert before == pytest.approx(results["initial_eval"]["eval_loss"], rel=1e-3)
    assert after == pytest.approx(results["final_eval"]["eval_loss"], rel=1e-3)
    assert f"report:      {run / 'report.md'}" in out and f"final model: {run / 'final'}" in out


@pytest.mark.skipif(
    not (importlib.util.find_spec("trackio") and importlib.util.find_spec("mlflow")),
    reason="trackio and mlflow are optional extras (pip install -c constraints.txt 'tether[trackio,mlflow]')",
)
def test_trackio_and_mlflow_record_the_run_offline(model_dir, data_dir, tmp_path):
    run, store = tmp_path / "run", tmp_path / "trackio"
    env = {"TRACKIO_DIR": str(store), "MLFLOW_TRACKING_URI": "", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    res = run_cli(*toy_args(model_dir, data_dir, "--report_to", "trackio", "mlflow", "--output_dir", str(run)), env=env)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    # mlflow: the run's own store (no MLFLOW_TRACKING_URI), named after the run directory
    code = (
        "import json, sys, mlflow; c = mlflow.tracking.MlflowClient(sys.argv[1]);"
        "r = c.search_runs([c.get_experiment_by_name('tether').experiment_id])[0];"
        "h = c.get_metric_history(r.info.run_id, 'train/loss');"
        "print(json.dumps([r.info.run_name, [(m.step, m.value) for m in h]]))"
    )
    got = subprocess.run(
        [sys.executable, "-c", code, f"sqlite:///{(run / 'mlflow.db').resolve()}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert got.returncode == 0, got.stderr
    name, history = json.loads(got.stdout.strip().splitlines()[-1])
    assert name == "run" and [s for s, _ in history] == [1, 2, 3, 4]
    assert history[0][1] == pytest.approx(rows[0]["loss"])
    # trackio: its local store under $TRACKIO_DIR, project tether
    dbs = list(store.rglob("tether*.db"))
    assert dbs, sorted(p.name for p in store.rglob("*"))
    with sqlite3.connect(dbs[0]) as db:
        metrics = [json.loads(m) for (m,) in db.execute("select metrics from metrics")]
    losses = [m["train/loss"] for m in metrics if "train/loss" in m]
    assert losses == pytest.approx([r["loss"] for r in rows])
