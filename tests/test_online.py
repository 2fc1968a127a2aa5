"""The online (BPO) loop: sampling, oracles, the K/F schedule, ensemble merges, ledger resume, 2 processes."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import LAUNCH, PROCESS_ATOL, assert_params_close, final_params, jsonl_rows, online_config, run_cli
from tether.config import TetherError
from tether.logprobs import sequence_logps
from tether.models import load_model
from tether.oracles import Annotator, CallableOracle, load_oracle
from tether.sampling import filter_logits, sample_responses
from tether.train import online_train
from tether.train.online_policy import OnlinePolicy

TESTS = str(Path(__file__).parent)


def metrics(run_dir):
    return jsonl_rows(run_dir / "metrics.jsonl")


@pytest.fixture(autouse=True)
def _toy_oracles_importable(monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))


# ---------------------------------------------------------------------------------------------- sampling


def test_sampled_logps_equal_a_full_forward_and_do_not_depend_on_the_batch(model_dir, tokenizer):
    model = load_model(model_dir).eval()
    prompts = [tokenizer(f"What colour is the {w}?\n")["input_ids"] for w in ("sky", "grass", "sun")]
    kw = dict(n=2, max_new_tokens=10, top_k=20, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    together = sample_responses(model, prompts, [7, 8, 9], **kw)
    alone = sample_responses(model, prompts[1:2], [8], **kw)
    assert alone.ids[0] == together.ids[1]
    assert alone.logps[0] == pytest.approx(together.logps[1], abs=1e-4)
    assert together.ids[0][0] != together.ids[0][1]  # the two samples of a prompt use different random numbers
    for p, ids, logps in zip(prompts, together.ids, together.logps):
        for y, lp in zip(ids, logps):
            seq = torch.tensor([p + y])
            cm = torch.zeros_like(seq)
            cm[0, len(p) :] = 1
            full = sequence_logps(model, seq, torch.ones_like(seq), cm)[0].item()
            assert lp == pytest.approx(full, abs=1e-4)


def test_small_models_decode_on_one_thread_and_the_thread_count_is_restored(model_dir, tokenizer, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the rule applies under passive waiting (tether's default)
    model = load_model(model_dir).eval()
    prompts = [tokenizer(f"What colour is the {w}?\n")["input_ids"] for w in ("sky", "grass")]
    kw = dict(n=2, max_new_tokens=8, top_k=20, eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id)
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a: seen.append(torch.get_num_threads()))
    one = sample_responses(model, prompts, [1, 2], **kw)
    torch.set_num_threads(2)
    try:
        two = sample_responses(model, prompts, [1, 2], **kw)
        assert torch.get_num_threads() == 2  # restored after the token loop
    finally:
        torch.set_num_threads(1)
        hook.remove()
    assert one.ids == two.ids and sum(one.logps, []) == pytest.approx(sum(two.logps, []), abs=1e-5)
    assert seen[len(seen) // 2] == 2 and set(seen[len(seen) // 2 + 1 :]) == {1}  # prompt pass on 2, tokens on 1


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, 1.0)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, 1.0, 0, 0.75))[0]  # 0.5 + 0.3 reaches 0.75
    assert kept.tolist() == [True, True, False, False]
    assert torch.allclose(filter_logits(logits, 2.0, 0, 1.0), logits / 2)


# ---------------------------------------------------------------------------------------------- oracles


def test_annotator_labels_ties_noise_and_failures():
    calls = []

    def flaky(prompts, responses):
        calls.append(len(responses))
        if len(calls) <= 2:
            raise ConnectionError("busy")
        return [float(len(r)) for r in responses]

    notes = Annotator(CallableOracle(flaky), retries=3, backoff=0.0).annotate(
        ["p", "q"], [("aa", "a"), ("b", "c")], [1, 2]
    )
    assert len(calls) == 3  # two failures, then the answer
    assert [(n.label, n.status) for n in notes] == [(0, "ok"), (None, "tie")]

    def picky(prompts, responses):  # fails on any batch holding "bad"
        if "bad" in responses:
            raise ValueError("cannot score that")
        return [1.0 if r == "good" else 0.0 for r in responses]

    notes = Annotator(CallableOracle(picky), retries=1, backoff=0.0).annotate(
        ["p"] * 2, [("good", "meh"), ("bad", "meh")], [1, 2]
    )
    assert [n.status for n in notes] == ["ok", "oracle_failed"]  # one bad pair does not sink the other

    slow = Annotator(load_oracle("callable:toy_oracles:slow"), retries=0, timeout=0.2)
    assert slow.annotate(["p"], [("a", "b")], [0])[0].status == "oracle_failed"

    noisy = Annotator(CallableOracle(lambda p, r: [1.0 if x == "a" else 0.0 for x in r]), noise_temperature=1.0)
    labels = [noisy.annotate(["p"], [("a", "b")], [s])[0].label for s in range(2000)]
    assert labels == [noisy.annotate(["p"], [("a", "b")], [s])[0].label for s in range(2000)]  # seeded
    assert labels.count(0) / 2000 == pytest.approx(1 / (1 + math.exp(-1)), abs=0.03)  # σ(1/τ)


def test_load_oracle_errors_name_the_option():
    for spec, words in [
        ("nope", "unknown oracle"),
        ("callable:toy_oracles:missing", "cannot import"),
        ("world:persona=zzz", "unknown persona"),
    ]:
        with pytest.raises(TetherError, match=words):
            load_oracle(spec)


# ---------------------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("lora", [False, True])
def test_behavior_refreshed_exactly_at_phase_starts(model_dir, prompt_file, tmp_path, lora):
    kw = dict(lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-2) if lora else {}
    run = online_train(online_config(model_dir, prompt_file, tmp_path / "run", steps=6, phases=3, **kw))
    rows = metrics(run)
    assert [r["behavior_version"] for r in rows] == [0, 0, 1, 1, 2, 2]
    for r in rows:
        at_refresh = (r["step"] - 1) % 2 == 0
        # right after a refresh π_θ = π_β: every log-ratio is 0 and the DPO loss is log 2
        assert (abs(r["loss"] - math.log(2)) < 1e-4) == at_refresh, r
        assert math.isfinite(r["logits_chosen"]) and math.isfinite(r["logits_rejected"]), r
    ledger = jsonl_rows(run / "ledger.jsonl")
    assert len(ledger) == 6 * 4 and {row["behavior_version"] for row in ledger if row["step"] in (2, 3)} == {1}


def test_ema_with_rate_one_is_bpo_sampling_every_step(model_dir, prompt_file, tmp_path):
    bpo = online_train(online_config(model_dir, prompt_file, tmp_path / "bpo", phases=4))
    ema = online_train(online_config(model_dir, prompt_file, tmp_path / "ema", phases=4, reference="ema", ema_rate=1.0))
    # BPO takes log π_β from the sampling pass (cached keys/values), EMA from a full forward: ~1e-6 apart in
    # log-probs, ~1e-5 in weights after 4 steps at lr 1e-2
    assert_params_close(final_params(bpo), final_params(ema), atol=5e-5)


def test_fixed_reference_equal_to_the_initial_model_is_the_initial_reference(model_dir, prompt_file, tmp_path):
    initial = online_train(online_config(model_dir, prompt_file, tmp_path / "init", reference="initial", phases=4))
    fixed = online_train(
        online_config(model_dir, prompt_file, tmp_path / "fixed", reference="fixed", ref_model=str(model_dir), phases=4)
    )
    assert_params_close(final_params(initial), final_params(fixed), atol=1e-6)
    assert metrics(initial)[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # π_ref stays π_sft while π_θ moves


@pytest.mark.parametrize("merge", ["linear", "exact"])
def test_ensemble_merges_match_the_matrix_math(model_dir, prompt_file, tmp_path, merge):
    from peft.tuners.lora import LoraLayer

    cfg = online_config(
        model_dir, prompt_file, tmp_path / "m", lora=True, lora_r=4, lora_alpha=8, ensemble_size=3, ensemble_merge=merge
    )
    policy = OnlinePolicy(cfg, torch.device("cpu"))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    policy.refresh_behavior()
    n, s = 3, 8 / 4
    layers = [m for m in policy.model.modules() if isinstance(m, LoraLayer)]
    assert layers
    for m in layers:
        A = [m.lora_A[k].weight for k in policy.names]
        B = [m.lora_B[k].weight for k in policy.names]
        want = s / n * (sum(B) @ sum(A)) if merge == "linear" else s / n * sum(b @ a for a, b in zip(A, B))
        got = m.scaling["behavior"] * m.lora_B["behavior"].weight @ m.lora_A["behavior"].weight
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if merge == "linear":  # the same ΔW as PEFT's add_weighted_adapter "linear" (the paper's code)
        policy.model.add_weighted_adapter(policy.names, [1 / n] * n, "peft_linear", combination_type="linear")
        for m in layers:
            peft = m.scaling["peft_linear"] * m.lora_B["peft_linear"].weight @ m.lora_A["peft_linear"].weight
            ours = m.scaling["behavior"] * m.lora_B["behavior"].weight @ m.lora_A["behavior"].weight
            torch.testing.assert_close(ours, peft, rtol=1e-5, atol=1e-6)


def test_lora_ensemble_run_exports_the_merged_adapter(model_dir, prompt_file, tmp_path):
    from peft import PeftModel

    run = online_train(
        online_config(
            model_dir,
            prompt_file,
            tmp_path / "ens",
            lora=True,
            lora_r=4,
            lora_alpha=8,
            ensemble_size=2,
            ensemble_merge="exact",
            eval_file=str(prompt_file),
            eval_prompts=6,
        )
    )
    model = PeftModel.from_pretrained(load_model(model_dir), run / "final")
    assert model.peft_config["default"].r == 8  # exact merge: rank n·r
    res = json.loads((run / "results.json").read_text())
    assert 0 <= res["final_eval"]["eval_win_rate"] <= 1 and res["final_eval"]["eval_n"] == 6
    assert res["annotations"] + res["identical_pairs"] == 16


def test_failing_oracle_skips_pairs_and_the_run_finishes(model_dir, prompt_file, tmp_path):
    run = online_train(
        online_config(
            model_dir,
            prompt_file,
            tmp_path / "down",
            oracle="callable:toy_oracles:always_fails",
            oracle_retries=1,
            steps=2,
            phases=1,
            max_oracle_failure_rate=1.0,
        )
    )  # 1 = never stop for failures
    res = json.loads((run / "results.json").read_text())
    assert res["oracle_failures"] + res["identical_pairs"] == 8 and res["annotations"] == 0
    assert all(r.get("skipped") for r in metrics(run))


def test_killed_run_resumes_from_the_ledger_without_asking_the_oracle_again(model_dir, prompt_file, tmp_path):
    args = [
        "online",
        "--model",
        str(model_dir),
        "--prompt_file",
        str(prompt_file),
        "--oracle",
        "callable:toy_oracles:shorter",
        "--steps",
        "6",
        "--phases",
        "3",
        "--prompts_per_step",
        "4",
        "--max_new_tokens",
        "12",
        "--learning_rate",
        "1e-2",
        "--save_steps",
        "2",
        "--progress",
        "false",
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
    ]
    whole_log, part_log = tmp_path / "whole.log", tmp_path / "part.log"
    r = run_cli(*args, "--output_dir", str(tmp_path / "whole"), env={"TOY_ORACLE_LOG": str(whole_log)})
    assert r.returncode == 0, r.stderr
    r = run_cli(
        *args,
        "--output_dir",
        str(tmp_path / "part"),
        env={"TOY_ORACLE_LOG": str(part_log), "TETHER_CRASH_AFTER_STEP": "3"},
    )
    assert r.returncode == 17 and not (tmp_path / "part" / "final").exists()
    asked_before = sum(map(int, part_log.read_text().split()))
    r = run_cli(*args, "--output_dir", str(tmp_path / "part"), "--resume", env={"TOY_ORACLE_LOG": str(part_log)})
    assert r.returncode == 0, r.stderr
    asked = sum(map(int, part_log.read_text().split()))
    assert asked == sum(map(int, whole_log.read_text().split()))  # step 3 (after the step-2 checkpoint) replayed
    assert asked > asked_before
    assert_params_close(final_params(tmp_path / "whole"), final_params(tmp_path / "part"), atol=0)
    assert [m["step"] for m in metrics(tmp_path / "part")] == list(range(1, 7))
    assert metrics(tmp_path / "part")[2]["replayed"] is True


def test_two_processes_equal_one(model_dir, prompt_file, tmp_path):
    args = [
        "online",
        "--model",
        str(model_dir),
        "--prompt_file",
        str(prompt_file),
        "--oracle",
        "callable:toy_oracles:shorter",
        "--steps",
        "3",
        "--phases",
        "3",
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
    ]
    one = run_cli(*args, "--output_dir", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr
    launcher = [*LAUNCH, "-m", "tether.cli"]
    two = run_cli(*args, "--output_dir", str(tmp_path / "two"), launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    ledgers = [jsonl_rows(tmp_path / d / "ledger.jsonl") for d in ("one", "two")]
    assert [(r["response_ids"], r["label"]) for r in ledgers[0]] == [
        (r["response_ids"], r["label"]) for r in ledgers[1]
    ]
    assert_params_close(final_params(tmp_path / "one"), final_params(tmp_path / "two"), atol=PROCESS_ATOL)


def test_bad_online_input_gets_one_clear_line(model_dir, prompt_file, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    cases = [
        (dict(prompt_file=str(bad)), "bad.jsonl:line 2: missing field 'prompt'"),
        (dict(eval_file=str(bad)), "missing field 'reference'"),
        (dict(steps=5, phases=2), "option 'phases'"),
        (dict(reference="fixed"), "needs option 'ref_model'"),
        (dict(ensemble_size=2), "needs lora: true"),
        (dict(oracle="nope"), "unknown oracle"),
    ]
    for overrides, words in cases:
        with pytest.raises(TetherError, match=words):
            online_train(
                online_config(model_dir, overrides.pop("prompt_file", prompt_file), tmp_path / "never", **overrides)
            )
        assert not (tmp_path / "never").exists()


def test_online_help_lists_every_option():
    r = run_cli("online", "--help")
    assert r.returncode == 0
    for name in ("--phases", "--reference", "--ensemble_merge", "--oracle_noise", "--prompts_per_step", "--ema_rate"):
        assert name in r.stdout


def test_reward_model_oracle_from_a_local_directory(model_dir, tokenizer, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(model_dir)
    cfg.num_labels, cfg.pad_token_id = 1, tokenizer.pad_token_id
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(cfg).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    oracle = load_oracle(f"reward-model:{tmp_path / 'rm'}")
    prompts = [[{"role": "user", "content": "What colour is the sky?"}], "What colour is grass?\n"]
    scores = oracle.score(prompts, ["Blue.", "Green, I believe."])
    assert len(scores) == 2 and all(math.isfinite(s) for s in scores) and scores[0] != scores[1]
    assert oracle.score(prompts[:1], ["Blue."]) == pytest.approx(
        scores[:1], abs=1e-5
    )  # batching does not change a score
    with pytest.raises(TetherError, match="no such directory"):
        load_oracle(f"reward-model:{tmp_path / 'missing'}")


@pytest.mark.parametrize("reference,lora", [("behavior", True), ("initial", True), ("behavior", False)])
def test_online_bapo_anchor_on_the_initial_models_own_answers(model_dir, prompt_file, tmp_path, reference, lora):
    kw = dict(lora=True, lora_r=4, lora_alpha=8, learning_rate=5e-2) if lora else {}
    run = online_train(
        online_config(
            model_dir,
            prompt_file,
            tmp_path / "anchor",
            method="bapo",
            anchor_weight=1.0,
            reference=reference,
            phases=1,
            **kw,
        )
    )
    rows = metrics(run)
    assert rows[0]["anchor"] == pytest.approx(0.0, abs=1e-4) and rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all("logps_base" in r and "anchor_active" in r for r in rows)
    assert all(r["anchor"] >= 0 for r in rows) and rows[-1]["logps_base"] != rows[0]["logps_base"]
    if lora:  # at this learning rate the policy's log-prob of its initial answers drops: the hinge is active
        assert rows[-1]["anchor"] > 0
    ledger = jsonl_rows(run / "ledger.jsonl")
    assert all(r["base_ids"] and isinstance(r["base_logp"], float) for r in ledger)
