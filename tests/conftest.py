"""Shared fixtures: a tiny Llama and tokenizer trained locally on the toy task, and toy preference files."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tether_lab.demo import toy_model, toy_preferences, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep every cache the tests write (reference log-probs, built models) out of the user's home."""
    cache = tmp_path_factory.mktemp("tether-cache")
    old = os.environ.get("TETHER_CACHE")
    os.environ["TETHER_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("TETHER_CACHE", None)
    else:
        os.environ["TETHER_CACHE"] = old


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """One torch thread in the test process and its subprocesses: the models here are tiny, and on a busy
    2-core machine OpenMP spin-waiting with 2 threads makes them 10-100x slower."""
    import torch

    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    return toy_model(tmp_path_factory.mktemp("models") / "toy", hidden_size=32, num_layers=2, vocab_size=400)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    write_jsonl(toy_preferences(48, seed=1), d / "train.jsonl")
    write_jsonl(toy_preferences(12, seed=2), d / "eval.jsonl")
    write_jsonl(toy_preferences(16, seed=3, conversational=True), d / "conv.jsonl")
    return d


@pytest.fixture
def tokenizer(model_dir):
    from tether.models import load_tokenizer

    return load_tokenizer(model_dir)


def run_cli(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `tether ...` (or `accelerate launch ... tether ...`) in a fresh process, as a user would."""
    cmd = (launcher or [sys.executable, "-m", "tether.cli"]) + list(args)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=600)
