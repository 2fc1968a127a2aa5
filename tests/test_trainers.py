"""The trainer objects (tether.DPOTrainer, tether.OnlineDPOTrainer): objects in, the same run as the command line's."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import TrainerCallback

import tether
from conftest import final_params, jsonl_rows, online_config, same_weights, train_config
from tether import DPOTrainer, OnlineDPOTrainer, TetherError, TrainConfig
from tether.models import load_model, load_tokenizer
from tether.train import online_train, train
from toy_oracles import shorter

OPTIONS = dict(
    learning_rate=1e-3, max_steps=3, batch_size=8, save_steps=0, progress=False, max_length=64, max_prompt_length=32
)


class Recorder(TrainerCallback):
    def __init__(self, stop_at: int | None = None):
        self.events, self.stop_at = [], stop_at

    def on_train_begin(self, args, state, control, **kw):
        self.events.append(("begin", state.global_step))

    def on_step_end(self, args, state, control, **kw):
        self.events.append(("step", state.global_step))
        if self.stop_at is not None and state.global_step == self.stop_at:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kw):
        self.events.append(("log", logs["step"], round(logs["loss"], 6)))

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        self.events.append(("evaluate", sorted(metrics)[0]))

    def on_save(self, args, state, control, checkpoint=None, **kw):
        self.events.append(("save", checkpoint.name))

    def on_train_end(self, args, state, control, run_dir=None, **kw):
        self.events.append(("end", run_dir.name))


def test_objects_train_as_the_command_line_does(model_dir, data_dir, tmp_path):
    """A model object, a datasets.Dataset and a tokenizer give the same final weights as the same run by paths;
    config.yaml names the directory the model came from and a file holding exactly the dataset's records."""
    by_path = train(train_config(model_dir, data_dir, tmp_path / "paths"))
    rows = jsonl_rows(data_dir / "train.jsonl")
    trainer = DPOTrainer(
        load_model(model_dir),
        args=TrainConfig(output_dir=str(tmp_path / "objects"), **OPTIONS),
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=load_tokenizer(model_dir),
    )
    out = trainer.train()
    assert out.finished and out.global_step == 3 and out.run_dir == tmp_path / "objects"
    assert same_weights(by_path, out.run_dir)
    import yaml

    saved = yaml.safe_load((out.run_dir / "config.yaml").read_text())
    assert saved["model"] == str(model_dir)
    assert jsonl_rows(saved["train_file"]) == rows


def test_config_from_python_is_checked(model_dir, data_dir, tmp_path):
    """A config built in Python is refused as the command line refuses it: by train() and by the trainer."""
    bad = TrainConfig(
        model=str(model_dir), train_file=str(data_dir / "train.jsonl"), beta=-1.0, output_dir=str(tmp_path / "r")
    )
    with pytest.raises(TetherError, match="beta"):
        train(bad)
    with pytest.raises(TetherError, match="beta"):
        DPOTrainer(str(model_dir), args={"beta": -1.0}, train_dataset=str(data_dir / "train.jsonl"))
    with pytest.raises(TetherError, match="args: .*betaa"):  # a dict of options is read as a YAML config is
        DPOTrainer(str(model_dir), args={"betaa": 0.1}, train_dataset=str(data_dir / "train.jsonl"))
    assert not (tmp_path / "r").exists()


def test_bad_records_and_objects_are_named(model_dir, tmp_path):
    """An in-memory dataset's bad record is named by its index; a PEFT model, an unknown type and a tokenizer
    that cannot be found are one-line errors before anything is written."""
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    with pytest.raises(TetherError, match=r"train_dataset: record 1: missing field 'rejected'"):
        DPOTrainer(str(model_dir), train_dataset=[good, {"prompt": "a", "chosen": "b"}])
    with pytest.raises(TetherError, match=r"train_dataset: has no split 'train' \(it has test\)"):
        DPOTrainer(str(model_dir), train_dataset=datasets.DatasetDict({"test": datasets.Dataset.from_list([good])}))
    with pytest.raises(TetherError, match="train_dataset: expected a datasets.Dataset"):
        DPOTrainer(str(model_dir), train_dataset={"prompt": ["a"]})
    from tether.models import add_lora

    with pytest.raises(TetherError, match="a PEFT model; pass model.merge_and_unload"):
        DPOTrainer(add_lora(load_model(model_dir), 4, 8, 0.0, None), train_dataset=[good])
    with pytest.raises(TetherError, match="model: expected a path"):
        DPOTrainer(42, train_dataset=[good])
    import transformers

    config = load_model(model_dir).config
    config._name_or_path = ""  # built in memory: no directory to read a tokenizer from
    anonymous = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(TetherError, match="processing_class"):
        DPOTrainer(anonymous, train_dataset=[good], args={"output_dir": str(tmp_path / "x")})
    assert not (tmp_path / "x").exists()


def test_callbacks_resume_evaluate_and_save(model_dir, data_dir, tmp_path):
    """HF-style callbacks see every event; one that stops the run leaves a checkpoint that train(resume) continues
    to the same weights as an uninterrupted run; evaluate() gives tether eval's metrics; save_model writes a model
    transformers loads."""
    rows, held_out = jsonl_rows(data_dir / "train.jsonl"), jsonl_rows(data_dir / "eval.jsonl")
    args = dict(OPTIONS, max_steps=4, save_steps=2, output_dir=str(tmp_path / "run"), eval_steps=2)
    stopper = Recorder(stop_at=3)
    trainer = DPOTrainer(str(model_dir), args=args, train_dataset=rows, eval_dataset=held_out, callbacks=[stopper])
    out = trainer.train()
    assert not out.finished and out.global_step == 3
    assert ("save", "step-000002") in stopper.events and ("save", "step-000003") in stopper.events
    assert stopper.events[0] == ("begin", 0) and ("evaluate", "eval_logps_base") not in stopper.events
    assert [e[1] for e in stopper.events if e[0] == "step"] == [1, 2, 3]
    assert sum(e[0] == "evaluate" for e in stopper.events) == 2  # before training, at step 2

    again = Recorder()
    trainer = DPOTrainer(str(model_dir), args=args, train_dataset=rows, eval_dataset=held_out, callbacks=[again])
    out = trainer.train(resume_from_checkpoint=True)
    assert out.finished and out.global_step == 4 and again.events[0] == ("begin", 3)
    assert again.events[-1] == ("end", "run") and [e[1] for e in again.events if e[0] == "log"] == [4]
    whole = DPOTrainer(
        str(model_dir), args={**args, "output_dir": str(tmp_path / "whole")}, train_dataset=rows, eval_dataset=held_out
    ).train()
    assert same_weights(out.run_dir, whole.run_dir)

    metrics = trainer.evaluate()
    final_eval = json.loads((out.run_dir / "results.json").read_text())["final_eval"]
    assert metrics["eval_loss"] == pytest.approx(final_eval["eval_loss"], abs=1e-5)
    assert metrics["eval_reward_accuracy"] == pytest.approx(final_eval["eval_reward_accuracy"])
    saved = trainer.save_model(tmp_path / "exported")
    again_loaded = load_model(saved)
    torch.testing.assert_close(again_loaded.state_dict(), load_model(out.run_dir / "final").state_dict())
    with pytest.raises(TetherError, match="not an empty directory"):
        trainer.save_model(tmp_path / "exported")


def test_resume_refuses_other_weights(model_dir, data_dir, tmp_path):
    """A run started from an in-memory model refuses to resume from different weights."""
    rows = jsonl_rows(data_dir / "train.jsonl")
    args = dict(OPTIONS, max_steps=4, save_steps=2, output_dir=str(tmp_path / "run"))
    tok = load_tokenizer(model_dir)
    DPOTrainer(
        load_model(model_dir), args=args, train_dataset=rows, processing_class=tok, callbacks=[Recorder(stop_at=2)]
    ).train()
    other = load_model(model_dir)
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    with pytest.raises(TetherError, match="the model of option 'model'.*changed"):
        DPOTrainer(other, args=args, train_dataset=rows, processing_class=tok).train(resume_from_checkpoint=True)


def test_lora_trainer_from_a_model_object(model_dir, data_dir, tmp_path):
    """LoRA on a model object: the reference is the base under the adapter; the result equals the path run's."""
    by_path = train(train_config(model_dir, data_dir, tmp_path / "paths", lora=True, lora_r=4))
    trainer = DPOTrainer(
        load_model(model_dir),
        args={**OPTIONS, "lora": True, "lora_r": 4, "output_dir": str(tmp_path / "obj")},
        train_dataset=str(data_dir / "train.jsonl"),
        processing_class=load_tokenizer(model_dir),
    )
    out = trainer.train()
    for k, v in final_params(by_path).items():
        torch.testing.assert_close(final_params(out.run_dir)[k], v, rtol=0, atol=0)
    assert trainer.evaluate(str(data_dir / "eval.jsonl"))["eval_loss"] > 0


def test_online_trainer_with_a_python_oracle(model_dir, prompt_file, tmp_path):
    """A Python function as the oracle and prompts as a list: the same run as `oracle: callable:toy_oracles:shorter`
    by path; evaluate() scores the trained policy against the references."""
    by_path = online_train(online_config(model_dir, prompt_file, tmp_path / "paths"))
    rows = jsonl_rows(prompt_file)
    opts = online_config(model_dir, prompt_file, tmp_path / "obj")
    args = {
        k: getattr(opts, k)
        for k in (
            "steps",
            "phases",
            "prompts_per_step",
            "max_new_tokens",
            "learning_rate",
            "save_steps",
            "progress",
            "max_length",
            "max_prompt_length",
        )
    }
    trainer = OnlineDPOTrainer(
        str(model_dir), args={**args, "output_dir": str(tmp_path / "obj")}, train_dataset=rows, oracle=shorter
    )
    out = trainer.train()
    assert out.finished and same_weights(by_path, out.run_dir)
    ledger_a, ledger_b = jsonl_rows(by_path / "ledger.jsonl"), jsonl_rows(out.run_dir / "ledger.jsonl")
    assert [r["label"] for r in ledger_a] == [r["label"] for r in ledger_b]
    metrics = trainer.evaluate(rows[:8])
    assert metrics["eval_n"] == 8 and 0.0 <= metrics["eval_win_rate"] <= 1.0
    assert trainer.evaluate(rows[:8]) == metrics  # greedy answers, an oracle without noise: the same numbers
    assert trainer.evaluate(rows[:3])["eval_n"] == 3
    assert trainer.run.eval_set == [] and trainer.run.eval_ids == []  # a given set never replaces the run's own
    with pytest.raises(TetherError, match="evaluate: give an eval_dataset"):
        trainer.evaluate()
    with pytest.raises(TetherError, match="record 0: missing field 'reference'"):
        trainer.evaluate([{"prompt": "x"}])
    with pytest.raises(TetherError, match="oracle: expected a function"):
        OnlineDPOTrainer(str(model_dir), train_dataset=rows, oracle=3)


def test_top_level_names():
    assert {"DPOTrainer", "OnlineDPOTrainer", "TrainConfig", "OnlineConfig"} <= set(tether.__all__)


def test_the_notebook_example_runs(tmp_path, monkeypatch):
    """examples/notebook.ipynb, its code cells run in order in one namespace (as a kernel would), in a fresh
    directory."""
    from conftest import ROOT

    cells = json.loads((ROOT / "examples" / "notebook.ipynb").read_text())["cells"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), "notebook.ipynb", "exec"), namespace)
    assert namespace["out"].finished and namespace["out"].global_step == 6
    assert (tmp_path / "nb-adapter" / "adapter_config.json").is_file()
    assert namespace["result"].finished and namespace["result"].metrics["annotations"] > 0
