"""The command line as a user runs it: --help, a YAML config with flag overrides, the run directory."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import jsonl_rows, run_cli
from tether.cli import main
from tether.loss_table import NAMES as LOSS_NAMES
from tether.train import TrainConfig

REQUIRED_METRICS = {"step", "loss", "reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"}


def test_help_lists_every_option_with_default(capsys):
    try:
        main(["train", "--help"])
    except SystemExit:
        pass
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text, f.name
    assert "(default: 1e-06)" in text and "--resume" in text and "--config" in text
    for name in LOSS_NAMES:  # every loss of the table, by name
        assert f" {name}" in text.split("preference loss (docs/losses.md):")[1].split("--loss_weights")[0], name


def test_config_file_and_flags_end_to_end(model_dir, data_dir, tmp_path):
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(model_dir),
                "train_file": str(data_dir / "train.jsonl"),
                "eval_file": str(data_dir / "eval.jsonl"),
                "learning_rate": 1e-3,
                "max_steps": 4,
                "batch_size": 4,
                "beta": 0.5,
                "progress": False,
                "save_steps": 2,
                "eval_steps": 2,
                "lora": True,
                "lora_r": 4,
                "lora_target_modules": ["q_proj", "v_proj"],
            }
        )
    )
    out = tmp_path / "run"
    res = run_cli("train", "--config", str(cfg), "--beta", "0.2", "--loss", "ipo", "--output_dir", str(out))
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["beta"] == 0.2 and resolved["loss"] == "ipo" and resolved["max_steps"] == 4  # flag beats file
    assert resolved["lr_scheduler"] == "linear"  # defaults are written out too
    rows = jsonl_rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(REQUIRED_METRICS <= r.keys() for r in rows)
    assert "eval_loss" in rows[1] and "eval_loss" not in rows[0]
    assert all({"logits_chosen", "logits_rejected"} <= r.keys() for r in rows) and "eval_logits_chosen" in rows[1]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    results = json.loads((out / "results.json").read_text())
    assert results["final_eval"]["eval_loss"] < results["initial_eval"]["eval_loss"]

    from peft import AutoPeftModelForCausalLM

    model = AutoPeftModelForCausalLM.from_pretrained(out / "final")
    assert sorted(model.peft_config["default"].target_modules) == ["q_proj", "v_proj"]
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapter learned something


def test_full_model_output_loads_with_transformers(model_dir, data_dir, tmp_path):
    out = tmp_path / "full"
    res = run_cli(
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "conv.jsonl"),
        "--max_steps",
        "2",
        "--batch_size",
        "4",
        "--output_dir",
        str(out),
        "--progress",
        "false",
        "--learning_rate",
        "1e-3",
    )
    assert res.returncode == 0, res.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tok = AutoTokenizer.from_pretrained(out / "final")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What colour is the sky?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        assert model(**ids).logits.shape[-1] == len(tok)


def test_errors_are_one_line_with_exit_code_2(model_dir, data_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    cases = [
        (["--model", str(model_dir), "--train_file", str(bad)], f"{bad}:line 2: missing field 'rejected'"),
        (["--model", "org/some-model", "--train_file", str(bad)], "never downloads"),
        (
            ["--model", str(model_dir), "--train_file", str(bad), "--max_prompt_length", "600"],
            "option 'max_prompt_length'",
        ),
        (["--config", str(tmp_path / "none.yaml")], "none.yaml: config file not found"),
    ]
    for args, message in cases:
        res = run_cli("train", *args, "--output_dir", str(tmp_path / "x"))
        assert res.returncode == 2, (args, res.stderr)
        err_lines = [line for line in res.stderr.splitlines() if line.startswith("tether: error:")]
        assert len(err_lines) == 1 and message in err_lines[0], res.stderr
        assert "Traceback" not in res.stderr
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_study_seeds_option_parses_or_names_the_bad_value(capsys):
    from tether.cli import build_parser

    args = build_parser().parse_args(["study", "bapo", "--model", "m", "--seeds", "0,1,2"])
    assert args.seeds == [0, 1, 2]
    with pytest.raises(SystemExit) as e:
        main(["study", "bapo", "--model", "m", "--seeds", "0,x"])
    assert e.value.code == 2 and "'0,x': expected distinct comma-separated integers" in capsys.readouterr().err


def test_study_world_seed_option_parses_or_names_the_bad_value(capsys):
    from tether.cli import build_parser

    assert build_parser().parse_args(["study", "bapo", "--world_seed", "3"]).world_seed == 3
    for bad in ("-1", "x", "1.5"):
        with pytest.raises(SystemExit) as e:
            main(["study", "bapo", "--world_seed", bad])
        err = capsys.readouterr().err
        assert (
            e.value.code == 2 and f"argument --world_seed: '{bad}': expected an integer from 0 to 2147483647" in err
        ), err
    assert main(["study", "bapo", "--model", "m", "--world_seed", "2"]) == 2  # the embedded world's option only
    assert "option --world_seed: applies to the embedded world" in capsys.readouterr().err


HEAVY = ("torch", "transformers", "accelerate", "peft", "datasets")
# what `tether ...` imported before exiting, printed by the child process
_IMPORTED = """
import sys
from tether.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["online", "--help"],
        ["world", "build", "--help"],
        ["world", "export", "--help"],
        ["eval", "--help"],
        ["study", "bapo", "--help"],
        ["study", "bpo", "--help"],
        ["train", "--no_such_flag", "1"],
        ["train", "--model", "m"],
        ["online", "--model", "m", "--steps", "0"],
    ],
)
def test_help_and_option_errors_do_not_import_torch(argv):
    """--help and option errors answer without the heavy libraries (see the rule in tether.cli's docstring)."""
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-c", _IMPORTED.format(heavy=HEAVY), *argv], capture_output=True, text=True, timeout=120
    )
    assert res.stdout.strip().splitlines()[-1] == "[]", (argv, res.stdout[-300:], res.stderr[-500:])
    if len(argv) > 1 and argv[-1] != "--help":
        assert "error" in res.stderr, res.stderr  # the error itself was reported


def test_every_subcommand_parser_is_torch_free():
    """New subcommands follow the rule too: building the whole parser imports none of the heavy libraries."""
    import subprocess
    import sys

    code = (
        "import sys; from tether.cli import build_parser; build_parser(); "
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "[]", res.stdout + res.stderr


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, ("PASSIVE", "1000")),  # tether's default: a bounded spin, then sleep
        ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE", None)),  # an explicit policy wins and gets no spin bound
        ({"GOMP_SPINCOUNT": "50"}, ("PASSIVE", "50")),  # an explicit spin bound wins
    ],
)
def test_openmp_waiting_default_and_overrides(env, expected):
    """The `tether` command sets the default in its own process (here: a real `python -m tether.cli` run, whose
    exit handlers print what it had)."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    show = "lambda: print(json.dumps([os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')]))"
    code = (
        f"import atexit, json, os, runpy, sys; atexit.register({show}); "
        "sys.argv = ['tether', 'report', '/nonexistent']; runpy.run_module('tether.cli', run_name='__main__')"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)
    assert out.returncode == 2 and tuple(json.loads(out.stdout.splitlines()[-1])) == expected, out.stderr


def test_importing_tether_changes_nothing_in_the_callers_environment():
    """The Python API leaves the caller's environment (and signal handlers) as they were: no OpenMP default, no
    HF_HUB_OFFLINE, whatever tether modules are imported (the libraries it builds on are imported first: peft
    sets a variable of its own)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_WAIT", "GOMP_", "HF_", "TRANSFORMERS_"))}
    code = (
        "import json, os, signal; import torch, transformers, accelerate, peft, datasets; "
        "before, handler = dict(os.environ), signal.getsignal(signal.SIGTERM); "
        "import tether, tether.models, tether.train.offline, tether.train.online, tether.cli; "
        "changed = sorted(set(os.environ.items()) ^ set(before.items())); "
        "print(json.dumps([changed, signal.getsignal(signal.SIGTERM) == handler]))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.splitlines()[-1]) == [[], True]
