"""Coming from TRL: DPOConfig key names and values, every unknown key reported at once with a suggestion,
data splits (`PATH:SPLIT`, DatasetDict, split files), implicit prompts in plain strings, max_steps 0."""

import json
import math
from pathlib import Path

import pytest
import yaml

from conftest import run_cli
from tether.config import TetherError, load_config
from tether.data import load_preference_records, split_source
from tether.loss_table import TRL_LOSS_TYPES
from tether.train import OnlineConfig, TrainConfig, train
from tether.train.card import file_fingerprint
from tether_lab.demo import toy_preferences, write_jsonl

# A DPO YAML as TRL's docs write one (trl/scripts/dpo.py's LoRA example as a config file, plus the keys a TRL
# user carries over); only model_name_or_path and dataset_name point at local things.
TRL_DOCS_YAML = """
model_name_or_path: {model}
dataset_name: {data}
learning_rate: 5.0e-6
num_train_epochs: 1
per_device_train_batch_size: 2
max_steps: 3
gradient_accumulation_steps: 2
gradient_checkpointing: true
eval_strategy: steps
eval_steps: 2
output_dir: {out}
remove_unused_columns: false
use_peft: true
lora_r: 4
lora_alpha: 8
lora_target_modules: all-linear
loss_type: sigmoid
beta: 0.1
precompute_ref_log_probs: true
lr_scheduler_type: cosine
warmup_ratio: 0.1
rpo_alpha: 0.5
report_to: [none]
logging_steps: 1
save_strategy: "no"
bf16: false
"""


def test_trl_names_map_to_tether_options(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": "m",
                "dataset_name": "d.jsonl",
                "per_device_train_batch_size": 4,
                "num_train_epochs": 2,
                "loss_type": ["hinge"],
                "use_peft": True,
                "precompute_ref_log_probs": False,
                "lr_scheduler_type": "constant_with_warmup",
                "warmup_ratio": 0.1,
                "rpo_alpha": 1.0,
                "report_to": ["tensorboard"],
                "lora_target_modules": "all-linear",
                "learning_rate": "5e-7",  # YAML reads 5e-7 as a string; HF reads it as a float, so does tether
            }
        )
    )
    cfg = load_config(TrainConfig, path)
    assert (cfg.model, cfg.train_file, cfg.batch_size, cfg.num_epochs, cfg.loss, cfg.lora) == (
        "m",
        "d.jsonl",
        4,
        2.0,
        "slic",
        True,
    )
    assert not cfg.precompute_ref_logps and cfg.lr_scheduler == "constant" and cfg.warmup_ratio == 0.1
    assert cfg.nll_weight == 1.0 and cfg.report_to == ["tensorboard"] and cfg.lora_target_modules is None
    assert cfg.learning_rate == 5e-7
    for value, loss in (("sigmoid", "dpo"), ("ipo", "ipo"), ("hinge", "slic")):
        path.write_text(f"model: m\ntrain_file: d.jsonl\nloss_type: {value}\n")
        assert load_config(TrainConfig, path).loss == loss
    path.write_text("model: m\ntrain_file: d.jsonl\nmax_length: 128\n")  # TRL has no prompt limit: half goes to it
    assert load_config(TrainConfig, path).max_prompt_length == 64
    assert load_config(TrainConfig, overrides=dict(model="m", train_file="d")).max_prompt_length == 256
    path.write_text("model: m\ntrain_file: d.jsonl\nreport_to: none\n")
    assert load_config(TrainConfig, path).report_to == ["none"]


def test_every_unknown_key_is_reported_at_once_with_a_suggestion(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "model: m\ntrain_file: d.jsonl\nlerning_rate: 1.0e-3\nbta: 0.2\nloss_type: kto_pair\n"
        "per_device_train_bach_size: 3\nzzz: 1\n"
    )
    with pytest.raises(TetherError) as err:
        load_config(TrainConfig, path)
    text = str(err.value)
    assert "\n" not in text and text.startswith(str(path))
    for part in (
        "'lerning_rate' (did you mean 'learning_rate'?)",
        "'bta' (did you mean 'beta'?)",
        "'per_device_train_bach_size' (did you mean 'per_device_train_batch_size'?)",
        "'zzz'",
        "loss_type: 'kto_pair' is not supported",
    ):
        assert part in text, part
    path.write_text("model: m\ntrain_file: d.jsonl\nloss_type: [sigmoid, sft]\nloss_weights: [1.0, 0.5, 2.0]\n")
    with pytest.raises(TetherError, match="'loss_weights' has 3 weights for the 2 losses of dpo\\+sft"):
        load_config(TrainConfig, path)
    path.write_text("model: m\ntrain_file: d.jsonl\nloss_type: [simpo]\nlabel_smoothing: 0.1\n")
    with pytest.raises(TetherError, match="simpo: not a DPOTrainer loss_type, write loss: simpo"):
        load_config(TrainConfig, path)
    path.write_text("model: m\ntrain_file: d.jsonl\nloss_type: sigmoid\nlabel_smoothing: 0.1\n")
    with pytest.raises(TetherError, match="label_smoothing with loss_type sigmoid: TRL 1.16 ignores it"):
        load_config(TrainConfig, path)
    path.write_text("model: m\ntrain_file: d.jsonl\nmodel_name_or_path: other\n")
    with pytest.raises(TetherError, match="'model_name_or_path' and 'model' both set 'model'"):
        load_config(TrainConfig, path)


def test_launcher_keys_of_the_trl_cli(tmp_path):
    path = tmp_path / "l.yaml"
    path.write_text("model: m\ntrain_file: d.jsonl\nnum_processes: 1\n")
    assert load_config(TrainConfig, path).model == "m"  # what this (single-process) run has
    path.write_text("model: m\ntrain_file: d.jsonl\nnum_processes: 4\naccelerate_config: zero2\n")
    with pytest.raises(TetherError, match="accelerate launch --num_processes 4.*accelerate_config: a launcher setting"):
        load_config(TrainConfig, path)


def test_trl_keys_for_online_and_those_that_do_not_apply(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text(
        "model_name_or_path: m\ndataset_name: p.jsonl\noracle: world\nreward_model_path: rm\nmax_steps: 4\n"
        "loss_type: ipo\nbeta: [0.2]\ntemperature: 0.9\n"
    )
    with pytest.raises(TetherError, match="'reward_model_path' and 'oracle' both set 'oracle' to different values"):
        load_config(OnlineConfig, path)
    path.write_text(path.read_text().replace("oracle: world\n", ""))
    cfg = load_config(OnlineConfig, path)
    assert (cfg.model, cfg.prompt_file, cfg.oracle, cfg.steps, cfg.loss, cfg.beta, cfg.temperature) == (
        "m",
        "p.jsonl",
        "reward-model:rm",
        4,
        "ipo",
        0.2,
        0.9,
    )
    path.write_text(
        "model: m\nprompt_file: p.jsonl\noracle: world\ndataset_train_split: x\nloss_type: hinge\n"
        "beta: [0.1, 0.2]\nper_device_train_batch_size: 2\nuse_vllm: true\n"
    )
    with pytest.raises(TetherError) as err:
        load_config(OnlineConfig, path)
    for part in (
        "dataset_train_split: 'x' is not supported (prompt_file takes PATH:SPLIT for another split)",
        "loss_type: 'hinge' is not an OnlineDPOTrainer loss type",
        "a β per epoch) is not supported",
        "write prompts_per_step",
        "use_vllm: True is not supported",
    ):
        assert part in str(err.value), part


def test_cli_flags_trl_names_and_all_unknown_flags(model_dir, data_dir, tmp_path):
    res = run_cli(
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(data_dir / "train.jsonl"),
        "--lerning_rate",
        "1",
        "--num_train_epoch",
        "2",
        "--output_dir",
        str(tmp_path / "x"),
    )
    assert res.returncode == 2
    line = [ln for ln in res.stderr.splitlines() if ln.startswith("tether: error:")][0]
    assert "'--lerning_rate' (did you mean '--learning_rate'?)" in line
    assert "'--num_train_epoch' (did you mean '--num_train_epochs'?)" in line
    res = run_cli("eval", "--modle", "x", "--eval_flie", "y")
    assert res.returncode == 2 and "'--modle' (did you mean '--model'?)" in res.stderr
    assert "'--eval_flie' (did you mean '--eval_file'?)" in res.stderr
    from tether.cli import build_parser
    from tether.config import parse_extra_flags

    assert parse_extra_flags(
        [
            "--use_peft",
            "--per_device_train_batch_size",
            "4",
            "--no_remove_unused_columns",
            "--report_to",
            "tensorboard",
            "wandb",
            "--learning_rate=1e-3",
        ]
    )[0] == {
        "use_peft": True,
        "per_device_train_batch_size": 4,
        "remove_unused_columns": False,
        "report_to": ["tensorboard", "wandb"],
        "learning_rate": "1e-3",
    }
    assert build_parser() is not None


def test_trl_docs_yaml_runs_unchanged(model_dir, data_dir, tmp_path):
    """A TRL DPO config (LoRA, eval on the dataset's test split, cosine schedule, RPO) runs as it is."""
    import datasets

    data = tmp_path / "prefs"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(toy_preferences(24, seed=1)),
            "test": datasets.Dataset.from_list(toy_preferences(6, seed=2)),
        }
    ).save_to_disk(str(data))
    out = tmp_path / "run"
    cfg = tmp_path / "dpo_config.yaml"
    cfg.write_text(TRL_DOCS_YAML.format(model=model_dir, data=data, out=out))
    res = run_cli("train", "--config", str(cfg), "--progress", "false")
    assert res.returncode == 0, res.stderr
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["lora"] and resolved["eval_file"] == str(data) and resolved["eval_split"] == "test"
    assert resolved["nll_weight"] == 0.5 and resolved["lr_scheduler"] == "cosine" and resolved["save_steps"] == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 3 and results["eval_pairs"] == 6 and results["train_pairs"] == 24
    assert "initial_eval" in results and "final_eval" in results
    assert resolved["gradient_checkpointing"]  # tether's own option: it checkpoints
    assert "TRL option(s) ignored: remove_unused_columns (tether reads only the columns it needs)" in res.stderr


def test_splits_of_datasetdict_split_files_and_json(tmp_path):
    import datasets

    train, test = toy_preferences(4, seed=1), toy_preferences(3, seed=2)
    dd = tmp_path / "dd"
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(train), "test": datasets.Dataset.from_list(test)}
    ).save_to_disk(str(dd))
    assert len(load_preference_records(dd)) == 4
    assert len(load_preference_records(dd, split="test")) == 3
    assert len(load_preference_records(f"{dd}:test")) == 3
    with pytest.raises(TetherError, match="without a 'validation' split \\(splits: train, test\\)"):
        load_preference_records(dd, split="validation")
    hub = tmp_path / "hub"
    datasets.Dataset.from_list(train).to_parquet(str(hub / "data" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(test).to_parquet(str(hub / "data" / "test-00000-of-00001.parquet"))
    assert len(load_preference_records(f"{hub}:test")) == 3 and len(load_preference_records(hub)) == 4
    with pytest.raises(TetherError, match="no split 'dev' \\(splits: test, train\\)"):
        load_preference_records(f"{hub}:dev")
    datasets.Dataset.from_list(test).to_parquet(str(hub / "data" / "test_prefs-00000-of-00001.parquet"))
    assert len(load_preference_records(f"{hub}:test_prefs")) == 3  # split names with underscores (UltraFeedback's)
    js = tmp_path / "splits.json"
    js.write_text(json.dumps({"train": train, "test": test}))
    assert len(load_preference_records(js, split="test")) == 3
    flat = write_jsonl(train, tmp_path / "flat.jsonl")
    assert len(load_preference_records(flat, split="test")) == 4  # no splits: the file is the data
    with pytest.raises(TetherError, match="holds no splits"):
        load_preference_records(f"{flat}:test")
    # one parser of PATH:SPLIT serves the reader and the run's data fingerprint
    assert split_source(f"{hub}:test") == (hub, "test") and split_source(hub) == (hub, None)
    assert split_source(f"{hub}:a/b") == (Path(f"{hub}:a/b"), None)  # a path, not a split name
    assert split_source(tmp_path / "missing:test") == (tmp_path / "missing:test", None)
    assert file_fingerprint(f"{hub}:test") == file_fingerprint(hub) != file_fingerprint(dd)


def test_eval_file_datasetdict_without_test_split_is_refused(model_dir, tmp_path):
    import datasets

    dd = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(toy_preferences(4))}).save_to_disk(str(dd))
    res = run_cli(
        "train",
        "--model",
        str(model_dir),
        "--train_file",
        str(dd),
        "--eval_file",
        str(dd),
        "--output_dir",
        str(tmp_path / "x"),
    )
    assert res.returncode == 2 and "without a 'test' split (splits: train)" in res.stderr
    assert not (tmp_path / "x").exists()


def test_implicit_prompt_in_plain_strings(tmp_path):
    path = write_jsonl([{"chosen": "The sky is blue.", "rejected": "The sky is green."}], tmp_path / "i.jsonl")
    rec = load_preference_records(path)[0]
    assert (rec.prompt, rec.completions) == ("The sky is", {"chosen": " blue.", "rejected": " green."})


def test_max_steps_zero_trains_nothing(model_dir, data_dir, tmp_path, capsys):
    from tether.cli import main
    from tether.train import train

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "0 = no training step, as in HF/TRL" in " ".join(capsys.readouterr().out.split())

    out = train(
        load_config(
            TrainConfig,
            overrides=dict(
                model=str(model_dir),
                train_file=str(data_dir / "train.jsonl"),
                eval_file=str(data_dir / "eval.jsonl"),
                max_steps=0,
                output_dir=str(tmp_path / "r"),
                progress=False,
            ),
        )
    )
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 0 and results["initial_eval"] == results["final_eval"]
    with pytest.raises(TetherError, match="'max_steps' must be >= 0, or -1"):
        load_config(TrainConfig, overrides=dict(model="m", train_file="d", max_steps=-2))


MPO = "[sigmoid, bco_pair, sft]\nloss_weights: [0.8, 0.2, 1.0]"


@pytest.mark.parametrize("loss_type", sorted(TRL_LOSS_TYPES) + [MPO], ids=lambda v: "mpo" if v == MPO else v)
def test_a_trl_yaml_runs_with_each_trl_loss_type(loss_type, model_dir, data_dir, tmp_path):
    smoothing = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type)
    path = tmp_path / "trl.yaml"
    lines = [
        f"model_name_or_path: {model_dir}",
        f"dataset_name: {data_dir / 'train.jsonl'}",
        f"output_dir: {tmp_path / 'run'}",
        f"loss_type: {loss_type}",
        "per_device_train_batch_size: 4",
        "max_steps: 2",
        "max_length: 64",
        "learning_rate: 1.0e-3",
        'save_strategy: "no"',
        "report_to: none",
        "disable_tqdm: true",
        "write_report: false",
        "progress: false",
    ] + ([f"label_smoothing: {smoothing}"] if smoothing else [])
    path.write_text("\n".join(lines) + "\n")
    cfg = load_config(TrainConfig, path)
    assert cfg.loss == ("dpo+bco_pair+sft" if loss_type == MPO else TRL_LOSS_TYPES[loss_type])
    assert cfg.loss_weights == ([0.8, 0.2, 1.0] if loss_type == MPO else None)
    run = train(cfg)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["loss"]) for r in rows)
    assert rows[0]["loss"] != rows[1]["loss"]  # the first step changed the policy


def test_a_config_built_in_python_is_checked_whole_and_validate_is_idempotent():
    """TrainConfig(...) from Python gets the CLI's checks through validate(): every problem at once, types too;
    a valid config validated twice is the same config."""
    bad = TrainConfig(model="m", train_file="d", beta=-1.0, learning_rate=0.0, lr_scheduler="foo", batch_size="x")
    with pytest.raises(TetherError) as err:
        bad.validate()
    for part in (
        "option 'beta' must be > 0 for loss dpo, got -1.0",
        "option 'learning_rate' must be > 0, got 0.0",
        "option 'lr_scheduler' must be one of linear, cosine, constant, got 'foo'",
        "option 'batch_size' must be int, got 'x'",
    ):
        assert part in str(err.value), part
    cfg = TrainConfig(model="m", train_file="d", method="bapo", lora_target_modules=["all-linear"], report_to="none")
    cfg.validate()
    once = dict(vars(cfg))
    cfg.validate()
    assert vars(cfg) == once and cfg.beta == 0.1 and cfg.anchor_weight == 0.1 and cfg.max_prompt_length == 256
    assert cfg.report_to == ["none"] and cfg.lora_target_modules is None
    online = OnlineConfig(model="m", prompt_file="p", oracle="world", steps=5, phases=2, top_p=0.0)
    with pytest.raises(
        TetherError, match="'phases' \\(2\\) must divide 'steps' \\(5\\).*'top_p' must be in \\(0, 1\\]"
    ):
        online.validate()


def test_padding_free_is_tether_trains_own_option_and_online_pads(tmp_path):
    path = tmp_path / "p.yaml"
    for value in (True, False):
        path.write_text(f"model: m\ntrain_file: d.jsonl\npadding_free: {str(value).lower()}\n")
        assert load_config(TrainConfig, path).padding_free is value
    assert load_config(TrainConfig, overrides=dict(model="m", train_file="d")).padding_free  # TRL's default: false
    path.write_text("model: m\nprompt_file: p.jsonl\noracle: world\npadding_free: false\n")
    assert load_config(OnlineConfig, path).model == "m"
    path.write_text("model: m\nprompt_file: p.jsonl\noracle: world\npadding_free: true\n")
    with pytest.raises(TetherError, match="padding_free: True is not supported \\(tether online pads"):
        load_config(OnlineConfig, path)
