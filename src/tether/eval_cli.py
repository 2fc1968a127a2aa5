"""`tether eval --model M --eval_file PAIRS [--ref_model R]`: preference metrics on held-out pairs (pair_eval.py).
`tether eval --model M --suite NAME [suite options]`: an evaluation suite another package registered
(tether.registry, group "eval_suites"; tether_lab registers `world` and `knowledge`).

A suite is a dataclass of its own options (tether.config.option fields, a `validate()`), whose
`run(common: EvalOptions) -> dict` loads the model and evaluates it. Its options appear in `tether eval --help`
under the suite's name; giving one without `--suite NAME` is an error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import TetherError, add_dataclass_arguments, check_output_file, load_config, option, read_yaml_mapping
from .files import write_text_atomic
from .loss_table import NAMES, PARAMS
from .train.train_config import check_loss_options, loss_param

# torch-free at import (models and the suites load inside run_eval): see tether.cli


@dataclasses.dataclass
class EvalOptions:
    """Options of `tether eval` that every mode shares."""

    model: str | None = option(
        None, "model directory (save_pretrained output), PEFT adapter directory or built-in name to evaluate"
    )
    suite: str | None = option(
        None, "evaluation suite (registered by an installed package; see the suite options below)"
    )
    torch_dtype: str = option(
        "float32",
        "dtype the model weights are loaded in (auto = as stored in its config.json)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    batch_size: int = option(32, "sequences per forward pass / generation batch")
    out: str | None = option(
        None,
        "also write the JSON result to this file (with --eval_file: the per-pair values go "
        "here and stdout gets the aggregate)",
    )
    # held-out preference pairs instead of a suite
    eval_file: str | None = option(
        None,
        "preference pairs (same formats as `tether train`): report loss, reward accuracy, "
        "margins and log-probs per pair and in aggregate with 95%% CIs, instead of --suite",
    )
    eval_split: str = option("test", "split of eval_file when it holds splits (PATH:SPLIT works too)")
    ref_model: str | None = option(
        None,
        "reference for the rewards; null = the adapter's base (adapter disabled), or the "
        "run's reference for RUN/final; a full model elsewhere needs it",
    )
    loss: str = loss_param("loss")
    loss_weights: list[float] | None = loss_param("loss_weights")
    beta: float | None = loss_param("beta")
    label_smoothing: float = loss_param("label_smoothing")
    discopop_tau: float = loss_param("discopop_tau")
    simpo_gamma: float = loss_param("simpo_gamma")
    cpo_alpha: float = loss_param("cpo_alpha")
    nll_weight: float = loss_param("nll_weight")
    losses: list[str] | None = option(
        None,
        "also report the value of each of these losses on the file (names from docs/losses.md, or all), each at "
        "its own default β unless --beta is given",
    )
    max_length: int = option(512, "max tokens of prompt + completion (as in training)")
    max_prompt_length: int = option(256, "max prompt tokens (as in training)")
    # --model RUN/final: the loss options, lengths, dtype and reference default to the run's (RUN/config.yaml)
    progress: bool = option(True, "show progress bars")

    def validate(self) -> None:
        """Raise TetherError naming the first bad option."""
        if not self.model:
            raise TetherError("option --model: give the model (or adapter) directory to evaluate")
        if self.suite is not None and self.suite not in suites():
            known = ", ".join(sorted(suites())) or "none installed"
            raise TetherError(f"option --suite: unknown suite {self.suite!r}; choose from {known}")
        if self.suite is None and self.eval_file is None:
            raise TetherError("tether eval: say what to evaluate on: --eval_file PAIRS or --suite NAME")
        if self.suite is not None and self.eval_file is not None:
            raise TetherError("options --suite and --eval_file: give one of them")
        if self.batch_size < 1:
            raise TetherError("option --batch_size: must be at least 1")
        if self.nll_weight < 0:
            raise TetherError(f"option --nll_weight must be >= 0, got {self.nll_weight}")
        self.losses = list(NAMES) if self.losses == ["all"] else self.losses
        unknown = [name for name in self.losses or [] if name not in NAMES]
        if unknown:
            raise TetherError(f"option --losses: unknown loss {unknown[0]!r}; choose from {', '.join(NAMES)} or all")
        self._beta_given = self.beta is not None  # the other --losses then use it too
        check_loss_options(self)
        if not 0 < self.max_prompt_length < self.max_length:
            raise TetherError(
                f"option --max_prompt_length ({self.max_prompt_length}) must be > 0 and < --max_length "
                f"({self.max_length})"
            )
        if self.out is not None:
            check_output_file(self.out, "--out")


def suites() -> dict[str, type]:
    """Every registered suite: NAME -> its options dataclass (torch-free to import)."""
    from .registry import load, names

    return {name: load("eval_suites", name) for name in names("eval_suites")}


def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


# the options of a run's config.yaml that `tether eval --model RUN/final` takes unless given: how the run measured
# its loss and rewards (the reference is the run's ref_model, or else its initial model). The loss's options are
# taken together, and only when --loss is not given or is the run's loss.
LOSS_OPTIONS = ("loss", "loss_weights", *PARAMS, "nll_weight")
FROM_RUN = (*LOSS_OPTIONS, "max_length", "max_prompt_length", "torch_dtype", "ref_model")


def run_of(model: str | None) -> Path | None:
    """The config.yaml of the run a model directory came from (RUN/final), or None."""
    if not model or Path(model).name != "final":
        return None
    path = Path(model).parent / "config.yaml"
    return path if path.is_file() else None


def options_from_run(model: str | None, given: dict) -> tuple[dict, dict]:
    """(values, provenance): the FROM_RUN options of the run `model` came from that `given` does not set, and
    what to say about them (the run's config file, the options taken, the ones `given` overrides)."""
    path = run_of(model)
    if path is None:
        return {}, {}
    run = read_yaml_mapping(path)
    names = FROM_RUN
    if given.get("loss", run.get("loss")) != run.get("loss"):
        names = tuple(k for k in FROM_RUN if k not in LOSS_OPTIONS)  # another loss: none of the run's loss options
    taken = {k: run[k] for k in names if k in run and k not in given and run[k] is not None}
    overridden = {k: {"run": run[k], "given": given[k]} for k in FROM_RUN if k in run and k in given}
    overridden = {k: v for k, v in overridden.items() if v["run"] != v["given"]}
    return taken, {"config": str(path), "taken": taken, "overridden": overridden}


def run_eval(args) -> int:
    """Evaluate --model on pairs or a suite; print the JSON result."""
    common, registered = _field_names(EvalOptions), suites()
    known = common.union(*(_field_names(cls) for cls in registered.values()))
    given = {k: v for k, v in vars(args).items() if k in known}
    from_file = read_yaml_mapping(args.config) if getattr(args, "config", None) else {}
    values = {k: v for k, v in {**from_file, **given}.items() if k in common}
    run_values, provenance = options_from_run(values.get("model"), values)
    opts = load_config(EvalOptions, None, {**run_values, **values})
    opts._beta_given = "beta" in values  # --losses take the run's β only when --beta says so
    suite_values = {k: v for k, v in {**from_file, **given}.items() if k not in common}
    if provenance:
        _say_from_run(provenance)
    if opts.eval_file:
        _no_stray_suite_options(suite_values, None)
        return _emit_pairs(opts, provenance)
    suite_cls = registered[opts.suite]
    _no_stray_suite_options(suite_values, suite_cls)
    suite = load_config(suite_cls, None, {k: v for k, v in suite_values.items() if k in _field_names(suite_cls)})
    result = suite.run(opts)
    return _emit(result, opts)


def _no_stray_suite_options(values: dict, suite_cls) -> None:
    stray = sorted(set(values) - (_field_names(suite_cls) if suite_cls else set()))
    if stray:
        which = f"suite {suite_cls.__name__}" if suite_cls else "--eval_file"
        raise TetherError(
            f"option(s) {', '.join('--' + k for k in stray)}: not options of {which}; see tether eval --help"
        )


def _say_from_run(provenance: dict) -> None:
    """One line on stderr: which options came from the run's config.yaml, and which flags overrode it."""
    taken = ", ".join(f"{k} {v}" for k, v in provenance["taken"].items()) or "nothing"
    over = ", ".join(f"--{k} {v['given']} (run: {v['run']})" for k, v in provenance["overridden"].items())
    print(
        f"tether eval: from {provenance['config']}: {taken}" + (f"; overridden: {over}" if over else ""),
        file=sys.stderr,
    )


def _emit_pairs(opts, provenance: dict | None = None) -> int:
    from .pair_eval import evaluate_pairs

    result = evaluate_pairs(opts)
    if provenance:
        result["options_from_run"] = provenance
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
    text = (
        "evaluate a model: loss, reward accuracy, margins and log-probs on preference pairs (--eval_file), or an "
        "installed suite (--suite), with 95 percent bootstrap CIs"
    )
    p = subparsers.add_parser("eval", help=text, description=text)
    p.add_argument("--config", default=None, help="YAML file of options (flags override it)")
    add_dataclass_arguments(p, EvalOptions)
    known = set(_field_names(EvalOptions))
    for name, cls in sorted(suites().items()):
        group = p.add_argument_group(
            f"--suite {name}", (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None
        )
        add_dataclass_arguments(group, cls, skip=known)
        known |= _field_names(cls)
    p.set_defaults(func=run_eval)
    return p
