"""The no-reference mode: a loss that reads no reference (simpo, orpo, cpo, sft) trains without one — no
reference model is loaded and no reference pass is run; with BAPO only the base responses' log π_ref(y_b) are
computed (once, before training); online it needs reference: none."""

import json
import math
import os
from pathlib import Path

import pytest

import tether.train.offline as offline
import tether.train.reference as reference
from conftest import online_config
from conftest import train_config as offline_config
from tether.train import online_train, train


@pytest.fixture(autouse=True)
def _toy_oracles_importable(monkeypatch):
    tests = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(tests)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _reference_label(run):
    return json.loads((run / "results.json").read_text())["reference"]


def _refuse(*args, **kwargs):
    raise AssertionError("a reference model was loaded or scored")


@pytest.mark.parametrize("precompute", [True, False])
def test_offline_simpo_loads_and_scores_no_reference(model_dir, data_dir, tmp_path, monkeypatch, precompute):
    monkeypatch.setattr(offline, "reference_table", _refuse)
    monkeypatch.setattr(reference, "load_reference_model", _refuse)
    monkeypatch.setattr(reference.LiveReference, "logps", _refuse)
    run = train(
        offline_config(
            model_dir,
            data_dir,
            tmp_path / "simpo",
            loss="simpo",
            precompute_ref_logps=precompute,
            eval_file=str(data_dir / "eval.jsonl"),
            write_report=False,
        )
    )
    assert _reference_label(run) == "none (loss simpo reads no reference)"
    rows = _metrics(run)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["eval_loss"]) for r in rows if "eval_loss" in r)
    assert rows[-1]["loss"] < rows[0]["loss"]
    results = json.loads((run / "results.json").read_text())
    assert results["final_eval"]["eval_reward_margin"] > results["initial_eval"]["eval_reward_margin"]


def test_offline_bapo_with_a_reference_free_loss_scores_only_the_base_responses(
    model_dir, data_dir, tmp_path, monkeypatch
):
    scored = []
    compute = reference.compute_logps_table

    def spy(ref, examples, keys, *args, **kwargs):
        scored.append(keys)
        return compute(ref, examples, keys, *args, **kwargs)

    monkeypatch.setattr(offline, "compute_logps_table", spy)
    monkeypatch.setattr(reference, "load_reference_model", _refuse)
    run = train(
        offline_config(
            model_dir,
            data_dir,
            tmp_path / "bapo-orpo",
            loss="orpo",
            method="bapo",
            base_max_new_tokens=8,
            write_report=False,
        )
    )
    assert scored == [("base0",)]  # y_b alone: no reference pass over y_w and y_l
    assert _reference_label(run).startswith("none for y_w, y_l; initial for the base responses")
    rows = _metrics(run)
    assert all("anchor" in r and "log_odds_ratio" in r and "nll" in r for r in rows)
    assert rows[0]["anchor"] == 0.0  # policy = reference at step 1: the hinge is 0


@pytest.mark.parametrize("method", ["dap", "bapo"])
def test_online_reference_none_trains_a_reference_free_loss(model_dir, prompt_file, tmp_path, method):  # noqa: F811
    run = online_train(
        online_config(
            model_dir,
            prompt_file,
            tmp_path / method,
            loss="cpo",
            reference="none",
            method=method,
            steps=2,
            phases=1,
            write_report=False,
        )
    )
    assert _reference_label(run) == "none (loss cpo reads no reference)"
    rows = _metrics(run)
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert ("anchor" in rows[-1]) == (method == "bapo")
