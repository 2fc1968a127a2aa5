"""Reading, validating and tokenizing preference records; every bad-input case gives one clear line."""

import json

import pytest

from tether.config import TetherError, load_config
from tether.data import collate, load_preference_records, tokenize_records
from tether.models import load_model, load_tokenizer, resolve_model_path
from tether.train import TrainConfig
from tether_lab.demo import toy_preferences, write_jsonl
from tether_lab.tiny import train_tokenizer


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


GOOD = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"})


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "a", "rejected": ', "line 2: malformed JSON"),
        ('{"prompt": "p", "rejected": "b"}', "line 2: missing field 'chosen'"),
        ('{"prompt": "p", "chosen": 3, "rejected": "b"}', "line 2: field 'chosen' must be a string, got int"),
        ('{"prompt": "p", "chosen": "  ", "rejected": "b"}', "line 2: field 'chosen' is empty"),
        ('{"prompt": "p", "chosen": "a", "rejected": ""}', "line 2: field 'rejected' is empty"),
        ('["p", "a", "b"]', "line 2: a record must be a JSON object"),
        ('{"prompt": 1, "chosen": "a", "rejected": "b"}', "line 2: field 'prompt' must be a string"),
        (
            '{"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}], '
            '"rejected": [{"role": "assistant", "content": "b"}]}',
            "field 'prompt' message 0 must be",
        ),
    ],
)
def test_bad_records_name_file_line_and_field(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, line])
    with pytest.raises(TetherError) as err:
        load_preference_records(path)
    text = str(err.value)
    assert str(path) in text and message in text and "\n" not in text


def test_other_file_problems(tmp_path):
    with pytest.raises(TetherError, match="no such file"):
        load_preference_records(tmp_path / "missing.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(TetherError, match="unknown data format '.csv'"):
        load_preference_records(tmp_path / "d.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(TetherError, match="holds no records"):
        load_preference_records(tmp_path / "e.jsonl")
    (tmp_path / "obj.json").write_text('{"prompt": "p"}')
    with pytest.raises(TetherError, match="must hold a list"):
        load_preference_records(tmp_path / "obj.json")


def test_all_file_formats_give_the_same_records(tmp_path):
    import datasets

    rows = toy_preferences(5)
    write_jsonl(rows, tmp_path / "a.jsonl")
    (tmp_path / "a.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "a.parquet"))
    ds.save_to_disk(str(tmp_path / "a_ds"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "a_dd"))
    want = [(r.prompt, r.completions, r.extra) for r in load_preference_records(tmp_path / "a.jsonl")]
    for name in ("a.json", "a.parquet", "a_ds", "a_dd"):
        got = [(r.prompt, r.completions, r.extra) for r in load_preference_records(tmp_path / name)]
        assert got == want, name
    assert want[0][2] == {"id": 0}  # extra fields pass through


def test_identical_pairs_are_skipped_and_counted(tmp_path, tokenizer):
    rows = [
        {"id": "x", "prompt": "p", "chosen": "same", "rejected": "same"},
        {"id": "y", "prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    examples, report = tokenize_records(load_preference_records(write_jsonl(rows, tmp_path / "s.jsonl")), tokenizer)
    assert len(examples) == 1 and report.skipped_identical == 1 and report.kept == 1
    assert report.skipped[0]["id"] == "x" and report.skipped[0]["reason"] == "chosen == rejected"
    assert examples[0].extra == {"id": "y"}


def test_pairs_equal_once_truncated_are_skipped_and_counted_like_equal_pairs(tmp_path, tokenizer):
    """Two answers that differ only after max_length are the same pair to the model: not trained on."""
    same_start = "The apple is red and round and sweet. " * 3
    rows = [
        {"id": "z", "prompt": "What is the apple like?", "chosen": same_start + "Yes.", "rejected": same_start + "No."}
    ]
    recs = load_preference_records(write_jsonl(rows, tmp_path / "t.jsonl"))
    (full,), _ = tokenize_records(recs, tokenizer)
    assert full.completion_ids["chosen"] != full.completion_ids["rejected"]
    examples, report = tokenize_records(recs, tokenizer, max_length=len(full.prompt_ids) + 8)
    assert examples == [] and report.skipped_identical == 1 and report.kept == 0
    assert report.skipped == [{"source": recs[0].source, "reason": "chosen == rejected after truncation", "id": "z"}]


def test_completion_tokens_and_eos(tokenizer, data_dir):
    rec = load_preference_records(data_dir / "train.jsonl")[0]
    (ex,), _ = tokenize_records([rec], tokenizer)
    assert ex.completion_ids["chosen"][-1] == tokenizer.eos_token_id
    assert (
        tokenizer.decode(ex.prompt_ids) + tokenizer.decode(ex.completion_ids["chosen"])
        == rec.prompt + rec.completions["chosen"] + tokenizer.eos_token
    )
    batch = collate([ex], tokenizer.pad_token_id)
    n_prompt = len(ex.prompt_ids)
    assert batch["completion_mask"][0, :n_prompt].sum() == 0
    assert batch["completion_mask"][0].sum() == len(ex.completion_ids["chosen"])


def test_truncation_policy(tokenizer, tmp_path):
    rows = [{"prompt": "What colour is the apple? " * 4, "chosen": "The apple is red. " * 6, "rejected": "red."}]
    recs = load_preference_records(write_jsonl(rows, tmp_path / "t.jsonl"))
    (full,), _ = tokenize_records(recs, tokenizer)
    (cut,), _ = tokenize_records(recs, tokenizer, max_length=20, max_prompt_length=8)
    assert cut.prompt_ids == full.prompt_ids[-8:]  # prompt cut from the left
    assert cut.completion_ids["chosen"] == full.completion_ids["chosen"][:12]  # completion cut from the right
    assert cut.completion_ids["rejected"] == full.completion_ids["rejected"]
    examples, report = tokenize_records(recs, tokenizer, max_length=8, max_prompt_length=8)
    assert examples == [] and report.skipped_truncated == 1


def test_conversational_explicit_and_implicit_prompt_agree(tokenizer, tmp_path, data_dir):
    explicit = load_preference_records(data_dir / "conv.jsonl")
    implicit_rows = []
    for r in toy_preferences(16, seed=3, conversational=True):
        implicit_rows.append({"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]})
    implicit = load_preference_records(write_jsonl(implicit_rows, tmp_path / "imp.jsonl"))
    a, _ = tokenize_records(explicit, tokenizer)
    b, _ = tokenize_records(implicit, tokenizer)
    assert [(x.prompt_ids, x.completion_ids) for x in a] == [(x.prompt_ids, x.completion_ids) for x in b]
    assert tokenizer.decode(a[0].completion_ids["chosen"]).endswith("<|end|><|eos|>")


def test_conversational_needs_a_chat_template(tmp_path, data_dir):
    tok = train_tokenizer(["some text to train on"] * 5, vocab_size=300, chat_template=False)
    with pytest.raises(
        TetherError, match=r"conv.jsonl:line 1: conversational record but the tokenizer has no chat template"
    ):
        tokenize_records(load_preference_records(data_dir / "conv.jsonl"), tok)


def test_model_resolution_errors(tmp_path):
    with pytest.raises(TetherError, match="never downloads"):
        resolve_model_path("meta-llama/Llama-3-8B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TetherError, match="no config.json"):
        resolve_model_path(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(TetherError, match="cannot load the model"):
        load_model(broken)
    with pytest.raises(TetherError, match="cannot load the tokenizer"):
        load_tokenizer(broken)
    with pytest.raises(TetherError, match="not a built-in model"):
        resolve_model_path("no-such-model")


def test_config_errors_name_the_option(tmp_path):
    with pytest.raises(TetherError, match="option 'loss': unknown loss 'kto'"):
        load_config(TrainConfig, None, {"model": "m", "train_file": "f", "loss": "kto"})
    with pytest.raises(TetherError, match="option 'model' is required"):
        load_config(TrainConfig, None, {"train_file": "f"})
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ntrain_file: f\nbeta: fast\n")
    with pytest.raises(TetherError, match=r"c.yaml: option 'beta' must be float"):
        load_config(TrainConfig, cfg)
    cfg.write_text("model: m\ntrain_file: f\nbetta: 0.1\n")
    with pytest.raises(TetherError, match="unknown option 'betta'"):
        load_config(TrainConfig, cfg)
    cfg.write_text("model: m\ntrain_file: f\nbeta: 1\nlora_target_modules: [q_proj]\n")
    loaded = load_config(TrainConfig, cfg)
    assert loaded.beta == 1.0 and loaded.lora_target_modules == ["q_proj"]
