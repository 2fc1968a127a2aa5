"""`tether eval --model PATH --suite world [--persona NAME]`: evaluate a model, print (and save) JSON.
`tether eval --model M --eval_file PAIRS [--ref_model R]`: preference metrics on held-out pairs (pair_eval.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json

from .config import TetherError, add_dataclass_arguments, check_output_file, load_config, option
from .files import write_text_atomic
from .train.train_config import LOSSES
from .world.styles import PERSONAS

# torch-free at import (models and the suites load inside run_eval): see tether.cli


@dataclasses.dataclass
class EvalOptions:
    """Options of `tether eval`."""

    model: str = option("world", "model directory (save_pretrained output), PEFT adapter directory or built-in name to evaluate")
    suite: str = option(
        "world", "world = the embedded world's suite; knowledge = the general-knowledge probe (399 questions)",
        choices=("world", "knowledge"),
    )
    persona: str | None = option(None, "persona to score (adds persona score and win rate vs --base_model); see `tether world export` for names")
    base_model: str = option("world", "model the persona win rate is measured against")
    world_seed: int = option(0, "seed of the world the model was built/trained on")
    world_entities: int = option(150, "number of realms of that world")
    split: str = option("test", "which prompts to answer for alignment and persona scores", choices=("test", "train"))
    torch_dtype: str = option(
        "float32", "dtype the model weights are loaded in (auto = as stored in its config.json)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    batch_size: int = option(32, "sequences per forward pass / generation batch")
    max_new_tokens: int = option(96, "generation budget per answer (the longest styled answer of the world needs 82)")
    out: str | None = option(None, "also write the JSON result to this file (with --eval_file: the per-pair values go "
                             "here and stdout gets the aggregate)")
    # held-out preference pairs instead of a suite
    eval_file: str | None = option(None, "preference pairs (same formats as `tether train`): report loss, reward accuracy, "
                                   "margins and log-probs per pair and in aggregate with 95%% CIs, instead of --suite")
    eval_split: str = option("test", "split of eval_file when it holds splits (PATH:SPLIT works too)")
    ref_model: str | None = option(None, "reference for the rewards; null = the adapter's base (adapter disabled), or the "
                                   "run's reference for RUN/final; a full model elsewhere needs it")
    loss: str = option("dpo", "loss to report: dpo (sigmoid), ipo or slic (hinge)", choices=LOSSES)
    beta: float = option(0.1, "β of the rewards and the loss")
    label_smoothing: float = option(0.0, "ε of conservative DPO (dpo only)")
    nll_weight: float = option(0.0, "α of the NLL term added to the reported loss")
    max_length: int = option(512, "max tokens of prompt + completion (as in training)")
    max_prompt_length: int = option(256, "max prompt tokens (as in training)")
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        """Raise TetherError naming the first bad option."""
        if self.persona is not None and self.persona not in PERSONAS:
            raise TetherError(f"option --persona: unknown persona {self.persona!r}; choose from {', '.join(PERSONAS)}")
        if self.world_entities < 4:
            raise TetherError("option --world_entities: must be at least 4")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise TetherError("options --batch_size and --max_new_tokens: must be at least 1")
        if self.loss not in LOSSES:
            raise TetherError(f"option --loss: unknown loss '{self.loss}'; choose one of {', '.join(LOSSES)}")
        if not self.beta > 0 or not 0.0 <= self.label_smoothing < 0.5 or self.nll_weight < 0:
            raise TetherError("options --beta (> 0), --label_smoothing (in [0, 0.5)) and --nll_weight (>= 0) are out of range")
        if not 0 < self.max_prompt_length < self.max_length:
            raise TetherError(f"option --max_prompt_length ({self.max_prompt_length}) must be > 0 and < --max_length ({self.max_length})")
        if self.out is not None:
            check_output_file(self.out, "--out")


def run_eval(args) -> int:
    """Evaluate --model on the suite; print the JSON result."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalOptions) if hasattr(args, f.name)}
    opts = load_config(EvalOptions, getattr(args, "config", None), overrides)
    if opts.eval_file:
        return _emit_pairs(opts)
    from .models import load_model, load_tokenizer
    from .world import build_world, world_suite

    model, tokenizer = load_model(opts.model, opts.torch_dtype), load_tokenizer(opts.model)
    if tokenizer.chat_template is None:
        raise TetherError(f"--model {opts.model}: its tokenizer has no chat template; the suites ask questions as chat messages")
    if opts.suite == "knowledge":
        from .probes import knowledge_accuracy

        return _emit({"suite": "knowledge", "model": str(opts.model), **knowledge_accuracy(model, tokenizer, opts.batch_size)}, opts)
    base = None
    if opts.persona is not None:
        base = (model, tokenizer) if opts.base_model == opts.model else (load_model(opts.base_model, opts.torch_dtype), load_tokenizer(opts.base_model))
    world = build_world(opts.world_seed, opts.world_entities)
    result = world_suite(
        model, tokenizer, world, persona=opts.persona, base=base, split=opts.split,
        batch_size=opts.batch_size, max_new_tokens=opts.max_new_tokens, progress=opts.progress,
    )
    result["model"] = str(opts.model)
    if opts.persona is not None:
        result["persona"]["base_model"] = str(opts.base_model)
    return _emit(result, opts)


def _emit_pairs(opts) -> int:
    from .pair_eval import evaluate_pairs

    result = evaluate_pairs(opts)
    if opts.out:
        write_text_atomic(opts.out, json.dumps(result, indent=1) + "\n")
        result = {k: v for k, v in result.items() if k != "pairs"} | {"pairs_written_to": str(opts.out)}
    print(json.dumps(result, indent=2))
    return 0


def _emit(result: dict, opts) -> int:
    if opts.out:
        write_text_atomic(opts.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    """Register `eval` on an argparse subparsers object."""
    text = ("evaluate a model: knowledge accuracy, general alignment, persona score and win rate (--suite), or loss, "
            "reward accuracy, margins and log-probs on preference pairs (--eval_file), with 95 percent bootstrap CIs")
    p = subparsers.add_parser("eval", help=text, description=text)
    p.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    add_dataclass_arguments(p, EvalOptions)
    p.set_defaults(func=run_eval)
    return p
