"""Odd inputs a user may give (config, data, CLI, oracles), each with the one-line answer it gets, and the
promise that nothing was written for it."""

import json
import os
from pathlib import Path

import pytest

from tether.cli import main

TESTS = str(Path(__file__).parent)

# (what, subcommand extra args; {placeholders} are filled in, the answer expected in the one error line)
TRAIN_CASES = [
    ("nan beta", ["--beta", "nan"], "option 'beta' must be a finite number, got nan"),
    ("infinite learning rate", ["--learning_rate", "inf"], "option 'learning_rate' must be a finite number"),
    ("infinite epochs", ["--num_epochs", "inf"], "option 'num_epochs' must be a finite number"),
    ("negative beta", ["--beta", "-0.1"], "option 'beta' must be > 0"),
    ("label smoothing 0.5", ["--label_smoothing", "0.5"], "option 'label_smoothing' must be in [0, 0.5)"),
    ("adam beta1 of 1", ["--adam_beta1", "1"], "option 'adam_beta1' must be in [0, 1)"),
    ("lora dropout of 1", ["--lora_dropout", "1"], "option 'lora_dropout' must be in [0, 1)"),
    ("zero adam epsilon", ["--adam_epsilon", "0"], "option 'adam_epsilon' must be > 0"),
    (
        "prompt as long as everything",
        ["--max_prompt_length", "64", "--max_length", "64"],
        "option 'max_prompt_length' (64)",
    ),
    ("zero batch", ["--batch_size", "0"], "option 'batch_size' must be > 0"),
    ("warm-up ratio of 1", ["--warmup_ratio", "1"], "option 'warmup_ratio' must be in [0, 1)"),
    ("nan warm-up ratio", ["--warmup_ratio", "nan"], "option 'warmup_ratio' must be a finite number"),
    ("eval fraction of 1", ["--eval_fraction", "1"], "option 'eval_fraction' must be in [0, 1)"),
    ("max_steps below -1", ["--max_steps", "-5"], "option 'max_steps' must be >= 0, or -1"),
    ("base top-p of 0", ["--base_top_p", "0"], "option 'base_top_p' must be in (0, 1]"),
    ("missing data file", ["--train_file", "{tmp}/nope.jsonl"], "nope.jsonl: no such file or directory"),
    ("csv data", ["--train_file", "{tmp}/data.csv"], "unknown data format '.csv'"),
    ("empty data file", ["--train_file", "{tmp}/empty.jsonl"], "empty.jsonl: holds no records"),
    (
        "a record that is a string",
        ["--train_file", "{tmp}/strings.jsonl"],
        "strings.jsonl:line 1: a record must be a JSON object",
    ),
    (
        "a number as the chosen answer",
        ["--train_file", "{tmp}/number.jsonl"],
        "number.jsonl:line 1: field 'chosen' must be a string, got int",
    ),
    (".json holding an object", ["--train_file", "{tmp}/object.json"], "a .json data file must hold a list"),
    ("invalid UTF-8 on line 3", ["--train_file", "{tmp}/latin1.jsonl"], "latin1.jsonl:line 3: not valid UTF-8"),
    (
        "a user message as the chosen completion",
        ["--train_file", "{tmp}/user_chosen.jsonl"],
        "user_chosen.jsonl:line 1: field 'chosen' holds a 'user' message",
    ),
    ("every pair identical", ["--train_file", "{tmp}/identical.jsonl"], "no usable preference pairs left"),
    ("JSON nested 100,000 deep", ["--train_file", "{tmp}/nested.jsonl"], "nested.jsonl:line 1: JSON nested too deeply"),
    (
        "a 5000-digit integer",
        ["--train_file", "{tmp}/digits.jsonl"],
        "digits.jsonl:line 1: unreadable JSON (an integer with more than 4300 digits)",
    ),
    (
        "a lone surrogate in a prompt",
        ["--train_file", "{tmp}/surrogate.jsonl"],
        "surrogate.jsonl:line 1: field 'prompt' holds a lone surrogate (\\ud800",
    ),
    (
        "a lone surrogate in a chat message",
        ["--train_file", "{tmp}/surrogate_chat.jsonl"],
        "field 'chosen[0].content' holds a lone surrogate",
    ),
    ("seed -1", ["--seed", "-1"], "option 'seed' must be in [0, 4294967295]"),
    ("seed 2**32", ["--seed", str(2**32)], "option 'seed' must be in [0, 4294967295]"),
    ("seed of 5000 digits in the config", ["--config", "{tmp}/digits.yaml"], "an integer with more than 4300 digits"),
    ("a 342-byte YAML alias bomb", ["--config", "{tmp}/bomb.yaml"], "aliases expand to more than 100000 values"),
    ("a YAML alias that contains itself", ["--config", "{tmp}/loop.yaml"], "an alias refers to a value that contains"),
    ("config that is a list", ["--config", "{tmp}/list.yaml"], "list.yaml: a config file must be a mapping"),
    ("config that is a directory", ["--config", "{tmp}"], "is a directory, not a YAML config file"),
    ("config with a wrong type", ["--config", "{tmp}/wrongtype.yaml"], "option 'beta' must be float, got 'high'"),
    ("BAPO's anchor weight without method bapo", ["--anchor_weight", "0.5"], "is BAPO's anchor, but method is dap"),
    ("negative anchor weight", ["--method", "bapo", "--anchor_weight", "-1"], "option 'anchor_weight' must be >= 0"),
    ("output_dir that is a file", ["--output_dir", "{tmp}/data.csv"], "is a file, not a directory"),
    (
        "output_dir that cannot be created",
        ["--output_dir", "/proc/tether-test/run"],
        "cannot write into /proc/tether-test/run",
    ),
]

ONLINE_CASES = [
    ("nan temperature", ["--temperature", "nan"], "option 'temperature' must be a finite number"),
    ("nan oracle timeout", ["--oracle_timeout", "nan"], "option 'oracle_timeout' must be a finite number"),
    (
        "failure rate above 1",
        ["--max_oracle_failure_rate", "1.5"],
        "option 'max_oracle_failure_rate' must be in [0, 1]",
    ),
    ("zero patience", ["--oracle_failure_patience", "0"], "option 'oracle_failure_patience' must be >= 1"),
    ("top-p of 0", ["--top_p", "0"], "option 'top_p' must be in (0, 1]"),
    ("BAPO's anchor weight online without method bapo", ["--anchor_weight", "1"], "set method: bapo"),
    (
        "phases that do not divide steps",
        ["--steps", "4", "--phases", "3"],
        "option 'phases' (3) must divide 'steps' (4)",
    ),
    ("EMA rate of 0", ["--reference", "ema", "--ema_rate", "0"], "option 'ema_rate' must be in (0, 1]"),
    ("unknown persona", ["--oracle", "world:persona=nobody"], "option 'oracle'"),
    ("oracle module that does not exist", ["--oracle", "callable:no_such_module:f"], "cannot import no_such_module:f"),
    ("oracle spec with no kind", ["--oracle", "gpt4"], "unknown oracle 'gpt4'"),
    (
        "empty prompt",
        ["--prompt_file", "{tmp}/empty_prompt.jsonl"],
        "empty_prompt.jsonl:line 1: field 'prompt' is empty",
    ),
]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected\n")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "strings.jsonl").write_text('"hello"\n')
    (tmp_path / "number.jsonl").write_text('{"prompt": "p", "chosen": 3, "rejected": "b"}\n')
    (tmp_path / "object.json").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}')
    ok = '{"prompt": "p", "chosen": "a", "rejected": "b"}\n'
    (tmp_path / "latin1.jsonl").write_bytes(
        (ok * 2).encode() + '{"prompt": "café", "chosen": "a", "rejected": "b"}\n'.encode("latin-1")
    )
    (tmp_path / "user_chosen.jsonl").write_text(
        '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "more"}], '
        '"rejected": [{"role": "assistant", "content": "no"}]}\n'
    )
    (tmp_path / "identical.jsonl").write_text('{"prompt": "p", "chosen": "same", "rejected": "same"}\n' * 3)
    (tmp_path / "list.yaml").write_text("- beta\n- 0.1\n")
    (tmp_path / "wrongtype.yaml").write_text("beta: high\n")
    (tmp_path / "empty_prompt.jsonl").write_text('{"prompt": "  "}\n')
    (tmp_path / "nested.jsonl").write_text('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    (tmp_path / "digits.jsonl").write_text(
        '{"prompt": "p", "chosen": "a", "rejected": "b", "id": ' + "7" * 5000 + "}\n"
    )
    (tmp_path / "surrogate.jsonl").write_text('{"prompt": "p\\ud800", "chosen": "a", "rejected": "b"}\n')
    (tmp_path / "surrogate_chat.jsonl").write_text(
        '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "\\udfff"}], '
        '"rejected": [{"role": "assistant", "content": "no"}]}\n'
    )
    (tmp_path / "digits.yaml").write_text("seed: " + "9" * 5000 + "\n")
    bomb = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefgh", "bcdefghi"):
        bomb += f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]\n"
    assert len(bomb) == 342  # the size of the issue's bomb: it expands to 9**9 strings
    (tmp_path / "bomb.yaml").write_text(bomb)
    (tmp_path / "loop.yaml").write_text("beta: &x [*x]\n")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "What colour is the sky?"}\n')
    return tmp_path


def _run(capsys, argv):
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("tether: error:")]
    return rc, lines


@pytest.mark.parametrize("what, extra, answer", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_odd_train_input(what, extra, answer, files, model_dir, data_dir, capsys):
    out = files / "run"
    extra = [a.replace("{tmp}", str(files)) for a in extra]
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--output_dir",
        str(out),
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
        "--progress",
        "false",
        *extra,
    ]
    rc, lines = _run(capsys, argv)
    assert rc == 2 and len(lines) == 1 and answer in lines[0], (what, lines)
    assert len(lines[0]) < 600  # bounded: no expanded value, no 5000-digit number
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("what, extra, answer", ONLINE_CASES, ids=[c[0] for c in ONLINE_CASES])
def test_odd_online_input(what, extra, answer, files, model_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(TESTS)
    out = files / "run"
    extra = [a.replace("{tmp}", str(files)) for a in extra]
    argv = [
        "online",
        "--model",
        str(model_dir),
        "--prompt_file",
        str(files / "prompts.jsonl"),
        "--output_dir",
        str(out),
        "--oracle",
        "callable:toy_oracles:shorter",
        "--steps",
        "2",
        "--phases",
        "1",
        "--prompts_per_step",
        "1",
        "--max_length",
        "64",
        "--max_prompt_length",
        "32",
        "--progress",
        "false",
        *extra,
    ]
    rc, lines = _run(capsys, argv)
    assert rc == 2 and len(lines) == 1 and answer in lines[0], (what, lines)
    assert not out.exists()


def test_a_byte_order_mark_is_accepted_in_data_and_config(files, model_dir, data_dir, capsys):
    data = files / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + (data_dir / "train.jsonl").read_bytes())
    rows = [json.loads(line) for line in (data_dir / "train.jsonl").read_text().splitlines()]
    split = files / "bom_split.json"  # {split: [records]} with a byte-order mark
    split.write_bytes(b"\xef\xbb\xbf" + json.dumps({"train": rows[:40], "test": rows[40:]}).encode())
    cfg = files / "bom.yaml"
    cfg.write_bytes(b"\xef\xbb\xbfbeta: 0.2\n")
    out = files / "run"
    rc = main(
        [
            "train",
            "--config",
            str(cfg),
            "--model",
            str(model_dir),
            "--train_file",
            str(split),
            "--eval_file",
            str(data),
            "--output_dir",
            str(out),
            "--max_steps",
            "1",
            "--batch_size",
            "4",
            "--max_length",
            "64",
            "--max_prompt_length",
            "32",
            "--progress",
            "false",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert (out / "final").is_dir() and "beta: 0.2" in (out / "config.yaml").read_text()


@pytest.mark.parametrize(
    "extra, answer",
    [
        (["--beta", "0"], "option 'beta' must be > 0 for loss dpo, got 0.0"),
        (["--label_smoothing", "0.5"], "option 'label_smoothing' must be in [0, 0.5) for loss dpo, got 0.5"),
        (["--beta", "inf"], "option 'beta' must be a finite number"),
        (["--max_prompt_length", "600"], "option --max_prompt_length (600) must be > 0 and < --max_length (512)"),
    ],
)
def test_odd_eval_pair_options(extra, answer, files, capsys):
    rc, lines = _run(
        capsys, ["eval", "--model", str(files / "no-model"), "--eval_file", str(files / "empty.jsonl"), *extra]
    )
    assert rc == 2 and len(lines) == 1 and answer in lines[0], lines


def test_eval_out_naming_a_directory_is_refused_before_any_work(files, capsys):
    rc, lines = _run(capsys, ["eval", "--model", str(files / "no-model"), "--suite", "knowledge", "--out", str(files)])
    assert rc == 2 and len(lines) == 1 and "option '--out'" in lines[0] and "is a directory" in lines[0]


def test_file_permissions_of_atomic_writes_follow_the_umask(tmp_path):
    from tether.files import write_text_atomic

    path = write_text_atomic(tmp_path / "x.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_bapo_is_switched_on_by_method_alone_with_one_default():
    from tether.config import load_config
    from tether.train.online_config import OnlineConfig
    from tether.train.train_config import BAPO_ANCHOR_WEIGHT, TrainConfig

    common = {"model": "m", "output_dir": "x"}
    offline = {**common, "train_file": "t.jsonl"}
    online = {**common, "prompt_file": "p.jsonl", "oracle": "world"}
    for cls, need in ((TrainConfig, offline), (OnlineConfig, online)):
        assert load_config(cls, None, {**need, "method": "bapo"}).anchor_weight == BAPO_ANCHOR_WEIGHT
        assert load_config(cls, None, need).anchor_weight == 0.0
        assert (
            load_config(cls, None, {**need, "method": "bapo", "anchor_weight": 0.0}).anchor_weight == 0.0
        )  # λ = 0 is allowed
