"""The reward-model oracle on the accelerator: `oracle_dtype`, `oracle_device` and batched scoring; and in a
multi-process run one process (the main one) holds the oracle and scores every process's pairs in one call,
sharing the labels (2 CPU processes, plain data parallel: the same ledger as one process)."""

import math

import pytest
import torch

from conftest import LAUNCH, TESTS, jsonl_rows, one_error_line, online_config, online_run_args, run_cli
from tether.config import TetherError, check_config
from tether.oracles import load_oracle

ENV = {"PYTHONPATH": f"{TESTS}:{TESTS.parent / 'src'}"}


@pytest.fixture(scope="module")
def reward_model(model_dir, tmp_path_factory):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from tether.models import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_labels, cfg.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rm")
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


PROMPTS = ["What colour is the sky?\n", [{"role": "user", "content": "And grass?"}], "Name a fruit.\n"] * 2
RESPONSES = ["Blue.", "Green, I believe, most of the time.", "A pear", "Grey at night", "Green.", "An apple, or two"]


def test_batched_scores_equal_one_at_a_time_in_the_input_order(reward_model):
    batched = load_oracle(f"reward-model:{reward_model}", batch_size=4, device="cpu")
    alone = [
        load_oracle(f"reward-model:{reward_model}", batch_size=1).score([p], [r]) for p, r in zip(PROMPTS, RESPONSES)
    ]
    scores = batched.score(PROMPTS, RESPONSES)
    assert all(math.isfinite(s) for s in scores) and len(set(scores)) == len(scores)
    assert scores == pytest.approx([s for (s,) in alone], abs=1e-5)  # longest-first batches, answers in order


def test_oracle_dtype_and_device(reward_model):
    oracle = load_oracle(f"reward-model:{reward_model}", dtype="bfloat16", device="auto", default_device="cpu")
    assert {p.dtype for p in oracle.model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in oracle.model.parameters()} == {"cpu"}
    full = load_oracle(f"reward-model:{reward_model}").score(PROMPTS, RESPONSES)
    assert oracle.score(PROMPTS, RESPONSES) == pytest.approx(full, abs=0.05)  # bf16 weights, float32 logits
    if not torch.cuda.is_available():
        with pytest.raises(TetherError, match="oracle_device': cuda asked, but this machine has no GPU"):
            load_oracle(f"reward-model:{reward_model}", device="cuda")


def test_a_bad_oracle_device_is_one_line(model_dir, prompt_file, tmp_path):
    res = run_cli(
        *online_run_args(model_dir, prompt_file),
        "--oracle",
        "callable:toy_oracles:shorter",
        "--oracle_device",
        "gpu0",
        "--output_dir",
        str(tmp_path / "x"),
        env=ENV,
    )
    assert "option 'oracle_device' must be auto, cpu, cuda or cuda:N, got 'gpu0'" in one_error_line(res)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("oracle_dtype", "int8", "option 'oracle_dtype' must be one of auto, float32, bfloat16, float16, got 'int8'"),
        ("oracle_batch_size", 0, "option 'oracle_batch_size' must be > 0, got 0"),
        ("oracle_batch_size", -3, "option 'oracle_batch_size' must be > 0, got -3"),
        ("oracle_device", "cuda:x", "option 'oracle_device' must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    ],
)
def test_bad_oracle_options_from_python(model_dir, prompt_file, tmp_path, option, value, message):
    """The command line's checks hold for a config built in Python: one line naming the option; nothing written."""
    with pytest.raises(TetherError) as e:
        check_config(online_config(model_dir, prompt_file, tmp_path / "x", **{option: value}))
    assert str(e.value).splitlines() == [f"{message}; see --help for the list of options"]
    assert not (tmp_path / "x").exists()


def ledger(run_dir):
    return [
        (r["step"], r["slot"], r["response_ids"], r["scores"], r["label"]) for r in jsonl_rows(run_dir / "ledger.jsonl")
    ]


@pytest.mark.parametrize("oracle", ["reward-model", "callable"])
def test_two_processes_one_oracle(model_dir, prompt_file, reward_model, tmp_path, oracle):
    if oracle == "reward-model":
        extra = ["--oracle", f"reward-model:{reward_model}", "--oracle_dtype", "bfloat16", "--oracle_batch_size", "3"]
    else:
        extra = ["--oracle", "callable:toy_oracles:shorter_where"]
    args = [*online_run_args(model_dir, prompt_file), *extra, "--save_steps", "0"]
    env = {**ENV, "TOY_ORACLE_LOG": str(tmp_path / "calls.log")}
    one = run_cli(*args, "--output_dir", str(tmp_path / "one"), env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    (tmp_path / "calls.log").unlink(missing_ok=True)
    two = run_cli(*args, "--output_dir", str(tmp_path / "two"), launcher=LAUNCH + ["-m", "tether.cli"], env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert ledger(tmp_path / "one") == ledger(tmp_path / "two")  # the same pairs, scores and labels
    if oracle == "callable":  # 6 steps of 4 prompts: one call per step with that step's pending pairs, by process 0
        calls = [line.split() for line in (tmp_path / "calls.log").read_text().splitlines()]
        rows = jsonl_rows(tmp_path / "two" / "ledger.jsonl")
        asked = [2 * sum(r["step"] == s and r["status"] != "identical" for r in rows) for s in range(6)]
        assert calls == [["0", str(n)] for n in asked if n]
