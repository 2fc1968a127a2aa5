"""Shared fixtures and helpers: a tiny Llama and tokenizer trained locally on the toy task, toy preference and
prompt files; the configs of short toy runs, their final weights, and the CLI in a fresh process. Test modules
import the helpers from here (`from conftest import train_config, final_params`); the fixtures need no import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tether.config import load_config
from tether.data import Example, collate
from tether.losses import objective
from tether.train import OnlineConfig, TrainConfig
from tether_lab.demo import toy_model, toy_preferences, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# two CPU processes under accelerate (plain data parallel); FSDP2 adds the driver that engages accelerate's FSDP2
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]
FSDP2 = LAUNCH + [str(TESTS / "fsdp_engage.py")]
# 2 processes against 1 in `tether online` (learning rate 1e-2, AdamW): the gradients differ by float rounding (sums
# in another order), and Adam's first steps map a near-zero gradient to a step of up to ±lr, so single weights may
# differ by a few 1e-5 on some CPUs (3.7e-5 seen on an AVX-512/AMX machine); 1e-4 is 1% of one step, far below a
# wrong update
PROCESS_ATOL = 1e-4
# what `accelerate launch` sets from a config with fsdp_version: 2 and fsdp_cpu_ram_efficient_loading: true
EFFICIENT_LOADING = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


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


@pytest.fixture(scope="session")
def prompt_file(tmp_path_factory) -> Path:
    """64 toy prompts, each with a reference answer (for the online loop's evaluation)."""
    d = tmp_path_factory.mktemp("prompts")
    rows = toy_preferences(64, seed=5)
    return write_jsonl([{"prompt": r["prompt"], "reference": r["chosen"]} for r in rows], d / "prompts.jsonl")


@pytest.fixture
def tokenizer(model_dir):
    from tether.models import load_tokenizer

    return load_tokenizer(model_dir)


def run_cli(*args: str, env: dict | None = None, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    """Run `tether ...` (or `accelerate launch ... tether ...`) in a fresh process, as a user would."""
    cmd = (launcher or [sys.executable, "-m", "tether.cli"]) + list(args)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=600)


def train_config(model_dir, data_dir, out, **overrides) -> TrainConfig:
    """A 3-step offline toy run (batch 8, no checkpoints, no progress bar), with `overrides`."""
    base = dict(
        model=str(model_dir),
        train_file=str(data_dir / "train.jsonl"),
        output_dir=str(out),
        learning_rate=1e-3,
        max_steps=3,
        batch_size=8,
        save_steps=0,
        progress=False,
        max_length=64,
        max_prompt_length=32,
    )
    return load_config(TrainConfig, None, {**base, **overrides})


def online_config(model_dir, prompt_file, out, **overrides) -> OnlineConfig:
    """A 4-step online toy run (F = 2, 4 prompts per step, the `shorter` toy oracle), with `overrides`."""
    base = dict(
        model=str(model_dir),
        prompt_file=str(prompt_file),
        output_dir=str(out),
        oracle="callable:toy_oracles:shorter",
        steps=4,
        phases=2,
        prompts_per_step=4,
        max_new_tokens=12,
        learning_rate=1e-2,
        save_steps=0,
        progress=False,
        max_length=64,
        max_prompt_length=32,
        oracle_backoff=0.0,
    )
    return load_config(OnlineConfig, None, {**base, **overrides})


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a run's final/ (the adapter's with LoRA)."""
    final = run_dir / "final"
    name = "adapter_model.safetensors" if (final / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(final / name)


def assert_params_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def jsonl_rows(path: Path) -> list[dict]:
    """Every line of a .jsonl file, parsed (strict: a torn line fails the test)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def assert_really_sharded(run_dir: Path, efficient_loading: bool = False) -> None:
    """The run's results.json says FSDP2 engaged over 2 processes (with memory-efficient loading or not) and the
    parameters really were shards."""
    setup = json.loads((run_dir / "results.json").read_text())["distributed"]
    assert setup == {
        "distributed_type": "FSDP",
        "sharding": "fsdp2",
        "num_processes": 2,
        "efficient_loading": efficient_loading,
        "parameters_sharded": True,
    }


def one_error_line(res) -> str:
    lines = [line for line in res.stderr.splitlines() if line.startswith("tether: error:")]
    assert res.returncode == 2 and len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    return lines[0]


def same_weights(a: Path, b: Path) -> bool:
    pa, pb = final_params(a), final_params(b)
    return pa.keys() == pb.keys() and all((pa[k] == pb[k]).all() for k in pa)


def snapshot(d: Path) -> dict:
    """Every file under d with its bytes and modification time (but the lock file, which holds its holder's pid)."""
    return {
        str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.name != ".tether-lock"
    }


def lora_run_args(model_dir: Path, train_file: Path, cache: Path) -> list[str]:
    """`tether train` arguments of a small LoRA run with dropout on (a resume must bring the RNG state back too):
    6 steps of 4 pairs, a checkpoint every 2 steps."""
    return [
        *("train", "--model", str(model_dir), "--train_file", str(train_file), "--learning_rate", "1e-2"),
        *("--max_steps", "6", "--batch_size", "4", "--save_steps", "2", "--lora", "true", "--lora_r", "4"),
        *("--lora_dropout", "0.2", "--disable_dropout", "false", "--progress", "false", "--ref_cache_dir", str(cache)),
    ]


def online_run_args(model_dir: Path, prompt_file: Path) -> list[str]:
    """`tether online` arguments (but the oracle) of a small run: 6 steps of 4 prompts in 3 phases, a checkpoint
    every 2 steps."""
    return [
        *("online", "--model", str(model_dir), "--prompt_file", str(prompt_file), "--steps", "6", "--phases", "3"),
        *("--prompts_per_step", "4", "--max_new_tokens", "12", "--learning_rate", "1e-2", "--save_steps", "2"),
        *("--progress", "false", "--max_length", "64", "--max_prompt_length", "32", "--oracle_backoff", "0"),
    ]


# ---------------------------------------------------------------------------------------------- models from a config

VOCAB = 512  # of the models `tiny` builds


def tiny(arch: str, attn: str = "sdpa", **extra):
    """A random-init causal LM from a config: llama (tiny_llama's shape), qwen2 (biased q/k/v projections,
    grouped-query attention) or smollm2 (SmolLM2-135M's head layout: 9 query and 3 key/value heads of 64, tied
    embeddings, rope θ 1e5; 2 layers instead of 30); `extra` goes to the config."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "rope_theta": 1e5}
    config_class, model_class, shape = {
        "llama": (LlamaConfig, LlamaForCausalLM, {**small, "num_key_value_heads": 4}),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM, {**small, "num_key_value_heads": 2, "tie_word_embeddings": False}),
        "smollm2": (LlamaConfig, LlamaForCausalLM, {**smollm2, "num_key_value_heads": 3, "tie_word_embeddings": True}),
    }[arch]
    torch.manual_seed(0)
    model = model_class(config_class(vocab_size=VOCAB, num_hidden_layers=2, **shape, **extra))
    model.config._attn_implementation = attn
    return model.float()


def mixed_examples(n: int = 5, seed: int = 1) -> list[Example]:
    """Prompts of mixed length, long chosen and short rejected answers, BAPO's base responses of any length."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        return torch.randint(3, VOCAB, (int(torch.randint(lo, hi + 1, (), generator=g)),), generator=g).tolist()

    return [
        Example(ids(1, 24), {"chosen": ids(10, 40), "rejected": ids(1, 6), "base": ids(1, 30)}, f"r{i}")
        for i in range(n)
    ]


def objective_defaults(method: str) -> dict:
    """`losses.objective`'s options of an offline run with `method` (dap or bapo) at the defaults."""
    from tether.train.optimization import objective_options

    cfg = TrainConfig(model="m", train_file="f", method=method)
    cfg.validate()
    return objective_options(cfg)


def loss_and_grads(model, batch, n_keys, ref, **scoring):
    """(summed log-probs, the objective's loss, every parameter's gradient) of one batch; `scoring`: sequence_logps's
    padding_free and chunk_size."""
    from tether.logprobs import sequence_logps

    sums, counts = sequence_logps(model, **batch, n_keys=n_keys, **scoring)
    loss, _ = objective(sums, counts, ref, n_keys, **objective_defaults("bapo" if n_keys == 3 else "dap"))
    model.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return sums.detach(), loss.detach(), grads


def max_deviation(a, b) -> tuple[float, float]:
    """(|Δ loss|, max |Δ gradient|) between two `loss_and_grads` results."""
    assert a[2].keys() == b[2].keys() and a[2]
    return (a[1] - b[1]).abs().item(), max((a[2][k] - b[2][k]).abs().max().item() for k in a[2])


def batch_of(examples, keys=("chosen", "rejected", "base")):
    """`data.collate`'s batch of `examples` (pad id 0), key-major."""
    return collate(examples, pad_id=0, keys=keys)
