"""TRL 1.16's option names: every field of `trl dpo`'s configs (ScriptArguments, DatasetMixtureConfig, DPOConfig,
ModelConfig) and of OnlineDPOConfig has an entry in tether's key table, with its kind and reason, and docs/trl.md
shows the table as generated. The field lists come from tests/data/trl_1_16_fields.json, committed so that these
checks run without TRL; where TRL 1.16 is installed (the test extra installs it), the snapshot is checked against it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tether.config import TetherError, load_config
from tether.train import OnlineConfig, TrainConfig
from tether.trl_key_table import KINDS, ONLINE_TRL_KEYS, TRL_KEYS
from tether.trl_keys import keys_markdown

ROOT = Path(__file__).resolve().parents[1]
SNAPSHOT = json.loads((Path(__file__).parent / "data" / "trl_1_16_fields.json").read_text())
TRL_DPO_CLASSES = ("ScriptArguments", "DatasetMixtureConfig", "DPOConfig", "ModelConfig")


def option_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_the_snapshot_is_trl_1_16():
    trl = pytest.importorskip("trl")
    if trl.__version__ != SNAPSHOT["trl"]:
        pytest.skip(f"TRL {trl.__version__} is installed; the snapshot is of TRL {SNAPSHOT['trl']}")
    from trl.experimental.online_dpo import OnlineDPOConfig

    for cls in (trl.ScriptArguments, trl.DatasetMixtureConfig, trl.DPOConfig, trl.ModelConfig, OnlineDPOConfig):
        assert sorted(f.name for f in dataclasses.fields(cls)) == SNAPSHOT[cls.__name__], cls.__name__


@pytest.mark.parametrize(
    "classes, table, cls",
    [
        (TRL_DPO_CLASSES, TRL_KEYS, TrainConfig),
        (("ScriptArguments", "ModelConfig", "OnlineDPOConfig"), ONLINE_TRL_KEYS, OnlineConfig),
    ],
    ids=["trl dpo", "online"],
)
def test_every_trl_field_is_mapped_or_refused_with_its_reason(classes, table, cls):
    fields = {name for c in classes for name in SNAPSHOT[c]}
    missing = sorted(fields - set(table))
    assert not missing, f"TRL 1.16 fields without an entry in tether.trl_key_table: {missing}"
    names = option_names(cls)
    every_field = {name for c in SNAPSHOT if c != "trl" for name in SNAPSHOT[c]}
    for key, entry in table.items():
        assert entry.kind in KINDS and entry.note or entry.kind in ("same", "renamed"), key
        launcher = key in ("num_processes", "accelerate_config")  # `trl dpo`'s own, not a config field
        assert entry.removed == (key not in every_field) or launcher, f"{key}: 'removed' says the wrong thing"
        if entry.kind == "same":
            assert key in names, f"{key}: listed as a tether option of the same name, but {cls.__name__} has none"
        for target in filter(None, entry.shown.split(",")):
            assert target in names, f"{key}: sets {target}, which {cls.__name__} does not have"


def test_docs_show_the_generated_table():
    text = (ROOT / "docs" / "trl.md").read_text()
    start, end = "<!-- trl-keys:start -->\n", "<!-- trl-keys:end -->"
    assert start in text and end in text, "docs/trl.md lost its generated table's markers"
    shown = text.split(start)[1].split(end)[0]
    assert shown.strip() == keys_markdown().strip(), "docs/trl.md is stale: write tether.trl_keys.keys_markdown() there"


def test_each_kind_does_what_it_says(tmp_path):
    need = "model_name_or_path: m\ndataset_name: d.jsonl\n"
    path = tmp_path / "trl.yaml"
    cases = {
        "dtype: bfloat16\n": {"torch_dtype": "bfloat16"},
        "model_init_kwargs: {dtype: float16, attn_implementation: sdpa}\n": {"torch_dtype": "float16"},
        "activation_checkpointing: true\n": {"gradient_checkpointing": True},
        "warmup_steps: 0.25\n": {"warmup_ratio": 0.25, "warmup_steps": 0},
        "warmup_steps: 7.0\n": {"warmup_steps": 7},
        "save_total_limit: null\n": {"save_total_limit": 0},
        "disable_tqdm: true\n": {"progress": False},
        "test_split_size: 0.2\n": {"eval_fraction": 0.2},
        "bf16: false\nfp16: false\n": {"mixed_precision": "no"},
        "loss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.5]\n": {"loss": "dpo+sft", "loss_weights": [1.0, 0.5]},
        "rpo_alpha: 0.3\n": {"nll_weight": 0.3},
        "padding_free: true\ntf32: true\nrun_name: x\n": {},  # accepted without effect (TRL 1.16 falls back too)
    }
    for extra, expected in cases.items():
        path.write_text(need + extra)
        cfg = load_config(TrainConfig, path)
        assert {k: getattr(cfg, k) for k in expected} == expected, extra
    path.write_text(
        need + "max_length: null\nneftune_noise_alpha: 5\nlogging_steps: 0.1\ntrackio_space_id: me/space\n"
        "model_init_kwargs: {device_map: auto}\nfsdp: full_shard\nlearning_rate: -1\n"
    )
    with pytest.raises(TetherError) as err:
        load_config(TrainConfig, path)
    text = str(err.value)
    for part in (
        "max_length: null (no truncation) is not supported",
        "neftune_noise_alpha: 5 is not supported (NEFTune is not implemented)",
        "logging_steps: 0.1 (a ratio of the total steps) is not supported",
        "trackio_space_id: 'me/space' is not supported (tether never uploads",
        "model_init_kwargs: device_map not supported",
        "fsdp: a launcher setting",
        "option 'learning_rate' must be > 0, got -1.0",
    ):
        assert part in text, part
    assert text.count(str(path)) == 1  # named once, before all of its problems


def test_a_trl_yaml_never_trains_another_objective(tmp_path):
    """TRL 1.16's sigmoid ignores label_smoothing; tether's dpo would apply it (conservative DPO). Refused wherever
    either comes from; tether's own `loss: dpo` with label_smoothing is conservative DPO, as documented."""
    path = tmp_path / "t.yaml"
    path.write_text("model: m\ntrain_file: d\nloss_type: sigmoid\n")
    with pytest.raises(TetherError, match="label_smoothing with loss_type sigmoid: TRL 1.16 ignores it"):
        load_config(TrainConfig, path, {"label_smoothing": 0.1})
    with pytest.raises(TetherError, match="label_smoothing with loss_type sigmoid"):
        load_config(TrainConfig, None, extra_flags=["--loss_type", "sigmoid", "robust", "--label_smoothing", "0.1"])
    assert load_config(TrainConfig, path, {"label_smoothing": 0.1, "loss": "dpo"}).label_smoothing == 0.1
    path.write_text("model: m\ntrain_file: d\nloss_type: robust\nlabel_smoothing: 0.1\n")  # TRL reads it there
    assert load_config(TrainConfig, path).loss == "robust"


def test_the_trl_script_command_line_parses(capsys):
    """trl/scripts/dpo.py's LoRA command line (TRL 1.16's docstring), with bare boolean flags and a --no_ flag."""
    from tether.cli import _run_config, build_parser

    line = (
        "train --dataset_name d.jsonl --model_name_or_path m --learning_rate 5.0e-6 --num_train_epochs 1 "
        "--per_device_train_batch_size 2 --max_steps 1000 --gradient_accumulation_steps 8 --eval_strategy steps "
        "--eval_steps 50 --output_dir out --no_remove_unused_columns --use_peft --lora_r 32 --lora_alpha 16 "
        "--gradient_checkpointing --report_to none"
    )
    args, extras = build_parser().parse_known_args(line.split())
    args.extra_flags = extras
    cfg = _run_config(TrainConfig, args)
    assert (cfg.lora, cfg.lora_r, cfg.batch_size, cfg.gradient_checkpointing, cfg.report_to) == (
        True,
        32,
        2,
        True,
        ["none"],
    )
    assert cfg.eval_file == "d.jsonl" and cfg.eval_steps == 50 and cfg.learning_rate == 5e-6
