"""Trainer objects for Python and notebooks, as TRL users know them: `DPOTrainer` (offline: DPO and every loss of
docs/losses.md, BAPO included) and `OnlineDPOTrainer` (online: BPO and its baselines).

    trainer = DPOTrainer(model, args=TrainConfig(beta=0.1, lora=True), train_dataset=ds, processing_class=tok)
    trainer.train()
    trainer.evaluate(held_out)
    trainer.save_model("my-model")

Each takes objects or paths: a model (a `transformers` model, a local directory or a built-in name), an optional
reference, a tokenizer, datasets (a `datasets.Dataset`, a `DatasetDict`, a list of dicts or a file path), a config
(a `TrainConfig` / `OnlineConfig`, or a dict that may use TRL's `DPOConfig` names) checked on construction
exactly as the command line checks it, and callbacks (any `transformers.TrainerCallback`; train/callbacks.py).
The run they make is the run `tether train` / `tether online` makes: the same directory, files and resume.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TetherError, check_config, load_config
from .files import new_private_dir, read_json, share_like_umask
from .train.bookkeeping import StoppedByCallback
from .train.callbacks import Callbacks
from .train.inputs import RunObjects, dataset_file, model_file_or_object
from .train.online_config import OnlineConfig
from .train.reference import weights_fingerprint
from .train.train_config import TrainConfig

log = logging.getLogger("tether")


@dataclass
class TrainOutput:
    """What `train()` returns: the run directory, the step it reached, whether it finished (a callback may stop
    it earlier; `train(resume_from_checkpoint=True)` continues it) and its results.json (initial and final
    evaluation, totals)."""

    run_dir: Path
    global_step: int
    finished: bool
    metrics: dict


class _Trainer:
    """What both trainers share: the config, the objects that replace its paths, and the run."""

    config_class: Any = None

    def __init__(self, model, ref_model, args, processing_class, callbacks, data: dict[str, tuple]):
        objects, given = RunObjects(tokenizer=processing_class), {}
        for option, value in (("model", model), ("ref_model", ref_model)):
            if value is not None:
                given[option], obj = model_file_or_object(value, option)
                setattr(objects, option, obj)
                if obj is not None:  # before training changes it: a resumed run must start from the same weights
                    objects.fingerprints[option] = weights_fingerprint(obj)
        splits = self._config(args, {})  # the splits a DatasetDict is read at
        for option, (value, name, kind, split) in data.items():
            if value is not None:
                given[option] = dataset_file(value, name, kind, getattr(splits, split) if split else "train")
        self.args = self._config(args, given)
        if processing_class is None and objects.model is not None and self.args.model.startswith("<in-memory"):
            raise TetherError("processing_class: give the tokenizer of an in-memory model that has no local directory")
        objects.callbacks = Callbacks(callbacks, self.args)
        self.objects, self.model, self.run_dir = objects, objects.model, Path(self.args.output_dir)
        self.processing_class = processing_class

    def _config(self, args, given: dict):
        """`args` (a config object, copied, or a dict of options read as a YAML config is, TRL names included)
        with `given` set, checked as the command line checks a config (unless `given` is empty)."""
        cls = self.config_class
        if args is None or isinstance(args, dict):
            values = {**(args or {}), **given}
            if not given:
                return cls(**{k: v for k, v in values.items() if k.endswith("_split")})
            try:
                return load_config(cls, None, base=values)
            except TetherError as e:
                raise TetherError(str(e).replace("run config: ", "args: ", 1)) from None
        if not isinstance(args, cls):
            raise TetherError(f"args: expected a {cls.__name__} or a dict, got {type(args).__name__}")
        cfg = dataclasses.replace(args, **given)
        return check_config(cfg) if given else cfg

    def _make_run(self, resume: bool):
        raise NotImplementedError

    def train(self, resume_from_checkpoint: bool = False) -> TrainOutput:
        """Run the training (or, with `resume_from_checkpoint=True`, continue the run in args.output_dir from
        its newest checkpoint; a finished run is left as it is). Raises TetherError on bad input, as the command
        line does."""
        if not isinstance(resume_from_checkpoint, bool):
            raise TetherError(
                "resume_from_checkpoint: tether continues from the newest checkpoint of args.output_dir; pass True"
            )
        run = self._make_run(resume_from_checkpoint)
        stopped_at = None
        try:
            self.run_dir = Path(run.run())
        except StoppedByCallback as stop:
            log.info("%s; continue with train(resume_from_checkpoint=True)", stop)
            self.run_dir, stopped_at = run.run_dir, stop.step
        self._trained(run)
        path = self.run_dir / "results.json"
        results = read_json(path) if path.is_file() else {}
        step = stopped_at if stopped_at is not None else results.get("steps", 0)
        return TrainOutput(self.run_dir, step, stopped_at is None, results)

    def _trained(self, run) -> None:
        """Keep the trained policy of `run` as self.model."""

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the trained model (a PEFT adapter with LoRA) and the tokenizer in Hugging Face format into
        `output_dir` (a new or empty directory); without it, return the run's final/ directory."""
        if output_dir is None:
            final = self.run_dir / "final"
            if not final.is_dir():
                raise TetherError(f"{final}: no final model yet; call train() first, or give save_model a directory")
            return final
        out = Path(output_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TetherError(f"save_model: {out} exists and is not an empty directory; choose a new directory")
        if self.model is None:
            raise TetherError("save_model: no model in memory yet; call train() first")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = new_private_dir(out.parent, f".{out.name}.tmp-")  # written whole, then renamed into place
        try:
            self._model_to_save().save_pretrained(tmp)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(tmp)
            share_like_umask(tmp)
            os.replace(tmp, out)  # onto a missing or empty directory
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    def _model_to_save(self):
        return self.model


class DPOTrainer(_Trainer):
    """Offline preference optimization (any loss of docs/losses.md; `method: bapo` adds BAPO's anchor).

    What it takes:

    - `model`: the policy: a `transformers` causal LM (trained in place), a local directory or a built-in name.
    - `ref_model`: a fixed reference (object or path); None = the initial policy (with LoRA: the base with the
      adapter disabled; a model object to fully fine-tune is then copied once, as TRL does).
    - `args`: a `TrainConfig`, or a dict of its options (TRL's `DPOConfig` names accepted); checked here.
    - `train_dataset`, `eval_dataset`: preference data (`prompt`/`chosen`/`rejected`, standard or conversational),
      as a `datasets.Dataset`, a `DatasetDict` (its `train_split` / `eval_split`), a list of dicts or a path.
    - `processing_class`: the tokenizer; None = loaded from the model's directory.
    - `callbacks`: `transformers.TrainerCallback`s (train/callbacks.py says when each event fires).
    """

    config_class = TrainConfig

    def __init__(
        self,
        model=None,
        ref_model=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        callbacks=None,
    ):
        data = {
            "train_file": (train_dataset, "train_dataset", "preference", "train_split"),
            "eval_file": (eval_dataset, "eval_dataset", "preference", "eval_split"),
        }
        super().__init__(model, ref_model, args, processing_class, callbacks, data)
        cfg, objects = self.args, self.objects
        if objects.model is not None and not cfg.lora and not cfg.ref_model:  # π_ref = π_sft, copied once as TRL does
            objects.initial = copy.deepcopy(objects.model).eval().requires_grad_(False)

    def _make_run(self, resume: bool):
        from .train.offline import OfflineRun

        return OfflineRun(self.args, resume, self.objects)

    def _trained(self, run) -> None:
        self.model = run.model
        self.processing_class = run.tokenizer

    @torch.no_grad()
    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Mean loss, reward accuracy, margins and log-probs of the current policy on preference pairs (default:
        the eval_dataset given at construction), against its reference, with args' loss and β — the numbers
        `tether eval` prints, under eval_* names."""
        from .data import load_preference_records, tokenize_records
        from .pair_eval import pair_metrics
        from .train.optimization import load_policy
        from .train.train_config import loss_options

        cfg = self.args
        source = eval_dataset if eval_dataset is not None else (cfg.eval_file or None)
        if source is None:
            raise TetherError("evaluate: give an eval_dataset (here or at construction)")
        path = dataset_file(source, "eval_dataset", "preference", cfg.eval_split)
        if self.model is None:
            self.model = load_policy(dataclasses.replace(cfg, lora=False, gradient_checkpointing=False))
        tokenizer = self.processing_class or self._tokenizer()
        records = load_preference_records(path, split=cfg.eval_split)
        examples, report = tokenize_records(records, tokenizer, cfg.max_length, cfg.max_prompt_length)
        if not examples:
            raise TetherError(f"eval_dataset: no usable preference pairs ({report.summary()})")
        pairs, _ = pair_metrics(
            self.model.eval(),
            self._reference(),
            examples,
            tokenizer.pad_token_id,
            cfg.eval_batch_size,
            loss_options(cfg),
        )
        return {f"eval_{k}": sum(p[k] for p in pairs) / len(pairs) for k in pairs[0] if isinstance(pairs[0][k], float)}

    def _tokenizer(self):
        from .models import load_tokenizer

        self.processing_class = load_tokenizer(self.args.model)
        return self.processing_class

    def _reference(self):
        """π_ref of an evaluation: the given reference, the base under the adapter, or the initial policy."""
        from .train.reference import frozen, load_reference_model, model_reference

        cfg, objects = self.args, self.objects
        device = next(self.model.parameters()).device
        if objects.ref_model is not None:
            return model_reference("ref_model", frozen(objects.ref_model, device))
        if cfg.ref_model:
            return model_reference(cfg.ref_model, load_reference_model(cfg.ref_model, cfg.torch_dtype, device))
        if hasattr(self.model, "peft_config"):
            return model_reference("the base (adapter disabled)", self.model, adapter_off=True)
        if objects.initial is None:
            objects.initial = load_reference_model(cfg.model, cfg.torch_dtype, device)
        return model_reference("initial", frozen(objects.initial, device))


class OnlineDPOTrainer(_Trainer):
    """Online preference optimization: BPO (π_ref = the behavior policy, refreshed at each of `phases`
    data-collection phases) and its baselines (`reference`: initial, fixed, ema, none).

    What it takes:

    - `model`, `ref_model`, `processing_class`, `callbacks`: as in `DPOTrainer` (ref_model with `reference: fixed`).
    - `args`: an `OnlineConfig`, or a dict of its options.
    - `train_dataset`: prompts (`prompt`: text or chat messages); eval_dataset: prompts with a `reference` answer.
    - `oracle`: who prefers what: a function (prompts, responses) -> scores, a `tether.oracles.Oracle`, or None
      to use args.oracle (a spec such as `callable:MODULE:FUNC` or `reward-model:PATH`).
    """

    config_class = OnlineConfig

    def __init__(
        self,
        model=None,
        ref_model=None,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        oracle=None,
        callbacks=None,
    ):
        from .oracles import CallableOracle, Oracle

        if oracle is not None:
            if not isinstance(oracle, Oracle):
                if not callable(oracle):
                    raise TetherError(f"oracle: expected a function or a tether.oracles.Oracle, got {type(oracle)}")
                oracle = CallableOracle(oracle, id=f"python:{getattr(oracle, '__qualname__', type(oracle).__name__)}")
            args = self._with(args, oracle=oracle.id)
        data = {
            "prompt_file": (train_dataset, "train_dataset", "prompt", None),
            "eval_file": (eval_dataset, "eval_dataset", "reference", None),
        }
        super().__init__(model, ref_model, args, processing_class, callbacks, data)
        self.objects.oracle = oracle

    def _with(self, args, **values):
        if isinstance(args, dict) or args is None:
            return {**(args or {}), **values}
        return dataclasses.replace(args, **values)

    def _make_run(self, resume: bool):
        from .train.online import OnlineRun

        return OnlineRun(self.args, resume, self.objects)

    def _trained(self, run) -> None:
        self.run = run
        self.model = run.policy.model
        self.processing_class = run.tokenizer

    def _model_to_save(self):
        return _Merged(self.run.policy)

    def evaluate(self, eval_dataset=None) -> dict[str, float]:
        """Win rate of the trained policy's greedy answers against the prompts' `reference` answers, by the
        oracle without label noise (ties count one half), with a 95% bootstrap CI (after `train()`)."""
        from .data import load_prompt_records

        run = getattr(self, "run", None)
        if run is None:
            raise TetherError("evaluate: call train() first (the online policy exists once its run has started)")
        eval_set = run.eval_set
        if eval_dataset is not None:
            eval_set = load_prompt_records(dataset_file(eval_dataset, "eval_dataset", "reference"), need_reference=True)
        if not eval_set:
            raise TetherError("evaluate: give an eval_dataset of prompts with a 'reference' answer")
        return run.evaluate(eval_set)


class _Merged:
    """save_model of an online policy: the merged ensemble as final/ holds it."""

    def __init__(self, policy):
        self.policy = policy

    def save_pretrained(self, directory) -> None:
        self.policy.write_final(Path(directory), state=self.policy.final_state(keep=True))
