"""`tether online` under FSDP2 with 2 CPU processes, against a 1-process run (final weights within 1e-5).

As in test_fsdp.py, the 2-process runs go through tests/fsdp_engage.py (accelerate engages FSDP only on GPUs);
from there on it is accelerate's FSDP2 preparation (`fully_shard` per decoder layer, the embedding/output tail
and the root) of the policy and of every frozen copy, and tether's loop. Exact comparison with one process is
possible: every response is sampled from its own generator seeded by its position in the prompt stream, so the
same pairs are drawn whatever the split (the ledgers are compared too). Covered: full fine-tuning with a π_β
snapshot (K > 1), BAPO's base answers from a frozen π_sft copy, evaluation generation with an odd number of
prompts, a checkpoint written under sharding; LoRA ensembles (n = 2 exact merge with an EMA reference; n = 2
linear merge with π_β, BAPO and evaluation); gradient checkpointing (against 2-process data parallel: see that
test); a process without usable pairs in a step (a live sharded π_sft reference); and a kill/resume (slow).
"""

import json
from pathlib import Path

import pytest

from conftest import (
    FSDP2,
    LAUNCH,
    PROCESS_ATOL,
    assert_params_close,
    assert_really_sharded,
    final_params,
    jsonl_rows,
    run_cli,
)
from tether_lab.demo import toy_preferences, write_jsonl

TESTS = Path(__file__).parent
ENV = {"PYTHONPATH": f"{TESTS}:{TESTS.parent / 'src'}"}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    rows = toy_preferences(64, seed=5)
    return write_jsonl(
        [{"prompt": r["prompt"], "reference": r["chosen"]} for r in rows],
        tmp_path_factory.mktemp("prompts") / "prompts.jsonl",
    )


def args(model_dir, prompt_file, *extra):
    return [
        "online",
        "--model",
        str(model_dir),
        "--prompt_file",
        str(prompt_file),
        "--oracle",
        "callable:toy_oracles:shorter",
        "--steps",
        "4",
        "--phases",
        "2",
        "--prompts_per_step",
        "4",
        "--max_new_tokens",
        "12",
        "--learning_rate",
        "1e-2",
        "--save_steps",
        "0",
        "--progress",
        "false",
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
        "--oracle_backoff",
        "0",
        *extra,
    ]


def ledger(run_dir):
    rows = jsonl_rows(run_dir / "ledger.jsonl")
    return [(r["step"], r["slot"], r["response_ids"], r["label"], r.get("base_ids")) for r in rows]


def both(model_dir, prompt_file, tmp_path, *extra):
    """The same online run with 1 process and with 2 processes under FSDP2; returns (one, two) run directories."""
    one = run_cli(*args(model_dir, prompt_file, *extra), "--output_dir", str(tmp_path / "one"), env=ENV)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(*args(model_dir, prompt_file, *extra), "--output_dir", str(tmp_path / "two"), launcher=FSDP2, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_really_sharded(tmp_path / "two")
    assert ledger(tmp_path / "one") == ledger(tmp_path / "two")  # the same pairs, labels and base answers
    return tmp_path / "one", tmp_path / "two"


def test_fsdp2_online_full_finetuning_bapo_with_evaluation_matches_one_process(model_dir, prompt_file, tmp_path):
    # π_β is a sharded frozen copy (K = 2), π_sft another (BAPO's y_b); 5 eval prompts split 3 + 2 (one padded)
    one, two = both(
        model_dir,
        prompt_file,
        tmp_path,
        "--method",
        "bapo",
        "--eval_file",
        str(prompt_file),
        "--eval_prompts",
        "5",
        "--save_steps",
        "2",
    )
    assert_params_close(final_params(one), final_params(two), atol=PROCESS_ATOL)  # final/: whole tensors
    assert "model.safetensors" in {p.name for p in (two / "final").iterdir()}
    assert all(r["base_ids"] for r in map(json.loads, (two / "ledger.jsonl").read_text().splitlines()))
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1["final_eval"] == r2["final_eval"] and r2["final_eval"]["eval_n"] == 5
    assert {"optim_shard_0.json", "optim_shard_1.json", "optim_shard_1.safetensors"} <= {
        p.name for p in (two / "checkpoints" / "step-000002").iterdir()
    }


@pytest.mark.parametrize(
    "extra",
    [
        ["--ensemble_size", "2", "--ensemble_merge", "exact", "--reference", "ema", "--ema_rate", "0.5"],
        [
            "--ensemble_size",
            "2",
            "--ensemble_merge",
            "linear",
            "--method",
            "bapo",
            "--eval_file",
            "PROMPTS",
            "--eval_prompts",
            "3",
        ],
    ],
    ids=["exact-ema", "linear-bapo-eval"],
)
def test_fsdp2_online_lora_ensemble_matches_one_process(model_dir, prompt_file, tmp_path, extra):
    extra = [str(prompt_file) if a == "PROMPTS" else a for a in extra]
    one, two = both(model_dir, prompt_file, tmp_path, "--lora", "true", "--lora_r", "4", "--lora_alpha", "8", *extra)
    a, b = final_params(one), final_params(two)
    assert_params_close(a, b, atol=PROCESS_ATOL)  # the merged ensemble's adapter
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)
    r1, r2 = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert r1.get("final_eval") == r2.get("final_eval")


def test_fsdp2_online_lora_with_gradient_checkpointing_equals_two_process_data_parallel(
    model_dir, prompt_file, tmp_path
):
    # with checkpointing each pair's sequences run whole, and 2 x 2 pairs vs 1 x 4 pairs change the float summation
    # order: a 1-process run ends ~1.6e-5 away (Adam amplifies it on near-zero gradients), and so does plain data
    # parallel with 2 processes. The sharded run must equal that 2-process run: the same pairs, the same splits.
    common = args(
        model_dir,
        prompt_file,
        "--lora",
        "true",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--ensemble_size",
        "2",
        "--method",
        "bapo",
        "--gradient_checkpointing",
        "true",
    )
    ddp = run_cli(*common, "--output_dir", str(tmp_path / "ddp"), launcher=LAUNCH + ["-m", "tether.cli"], env=ENV)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    two = run_cli(*common, "--output_dir", str(tmp_path / "two"), launcher=FSDP2, env=ENV)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_really_sharded(tmp_path / "two")
    assert ledger(tmp_path / "ddp") == ledger(tmp_path / "two")
    assert_params_close(final_params(tmp_path / "ddp"), final_params(tmp_path / "two"), atol=1e-6)


def test_fsdp2_online_a_process_without_pairs_joins_with_weight_zero(model_dir, prompt_file, tmp_path):
    # one prompt per process and an oracle that ties on some prompts: in some steps one process has no usable pair
    # and must still make the reference's and the policy's forward and backward calls (π_sft a live sharded copy)
    one, two = both(
        model_dir,
        prompt_file,
        tmp_path,
        "--oracle",
        "callable:toy_oracles:shorter_ties_on_s",
        "--prompts_per_step",
        "2",
        "--steps",
        "6",
        "--phases",
        "3",
        "--reference",
        "initial",
    )
    rows = jsonl_rows(two / "ledger.jsonl")
    usable = {(r["step"], r["slot"]): r["label"] is not None for r in rows}
    assert any(usable[(s, 0)] != usable[(s, 1)] for s in range(6))  # the idle-process path ran
    assert_params_close(final_params(one), final_params(two), atol=PROCESS_ATOL)


@pytest.mark.slow
def test_fsdp2_online_kill_and_resume_matches_the_uninterrupted_run(model_dir, prompt_file, tmp_path):
    common = args(
        model_dir,
        prompt_file,
        "--save_steps",
        "2",
        "--lora",
        "true",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--ensemble_size",
        "2",
        "--reference",
        "ema",
        "--ema_rate",
        "0.5",
    )
    full = run_cli(*common, "--output_dir", str(tmp_path / "full"), launcher=FSDP2, env=ENV)
    assert full.returncode == 0, full.stderr[-3000:]
    crashed = run_cli(
        *common, "--output_dir", str(tmp_path / "resumed"), launcher=FSDP2, env={**ENV, "TETHER_CRASH_AFTER_STEP": "3"}
    )
    assert crashed.returncode != 0 and not (tmp_path / "resumed" / "final").exists()
    ckpt = tmp_path / "resumed" / "checkpoints" / "step-000002"
    assert {"optim_shard_0.json", "optim_shard_1.json", "optim_shard_1.safetensors", "weights"} <= {
        p.name for p in ckpt.iterdir()
    }  # each process's own shards of the weights (weights/) and of the optimizer state: nothing gathered
    resumed = run_cli(*common, "--output_dir", str(tmp_path / "resumed"), "--resume", launcher=FSDP2, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ledger(tmp_path / "full") == ledger(tmp_path / "resumed")  # step 3 replayed from the ledger
    assert_params_close(final_params(tmp_path / "full"), final_params(tmp_path / "resumed"), atol=1e-6)
