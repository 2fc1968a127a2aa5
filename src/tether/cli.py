"""The `tether` command line. Each subcommand's options are a config dataclass (see tether.config).

Fast answers: `tether --help`, `tether SUBCOMMAND --help` and option errors must not wait for torch (several
seconds to import). The rule that keeps them fast: a module that builds a parser or holds a config dataclass
(this file, the modules in SUBCOMMAND_MODULES and those registered as commands, tether.config, train/train_config.py,
...) imports
no torch, transformers, accelerate, peft or datasets at its top level; the run function imports the heavy
module it needs, after the options have been validated. tests/test_cli.py checks this for every subcommand.
"""

from __future__ import annotations

import argparse
import atexit
import errno
import importlib
import logging
import os
import signal
import sys

from .config import TetherError, add_dataclass_arguments, load_config

# What the `tether` command sets in its own process before torch loads (a Python caller's environment is never
# changed). OpenMP waiting (BENCHMARKS.md, "OpenMP waiting"; benchmarks/omp_wait.py): threads that spin until work
# arrives make torch 10-30x slower as soon as another process shares the cores; threads that sleep at once cost
# up to ~50% on an idle machine when operations are small. Passive waiting after a bounded spin of 1,000
# iterations (GOMP_SPINCOUNT wins over the policy in libgomp) is within a few % of the better of the two either
# way. An explicit OMP_WAIT_POLICY or GOMP_SPINCOUNT wins; the policy stays PASSIVE in the environment, which
# tether.sampling's one-thread decoding rule reads. HF_HUB_OFFLINE backs up the per-call local_files_only of
# every load (tether.models.LOCAL_ONLY).
COMMAND_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
# errors of the machine rather than of tether, answered in one line (a full disk, a read-only directory)
ONE_LINE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)
MAX_ERROR_CHARS = 2000


def set_command_defaults() -> None:
    """The `tether` command's own environment (COMMAND_DEFAULTS), set before torch is imported."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = "1000"
    for name, value in COMMAND_DEFAULTS.items():
        os.environ.setdefault(name, value)


# the library's modules that add their own subcommands through `add_*_parser(subparsers)`; other packages add theirs
# through tether.registry (group "commands": tether_lab adds `tether world` and `tether study`)
SUBCOMMAND_MODULES = ("tether.eval_cli", "tether.export_cli", "tether.vllm_cli")


def _options(
    args: argparse.Namespace,
    skip=("func", "config", "resume", "verbose", "command", "extra_flags", "known_flags", "accepts_extra_flags"),
) -> dict:
    return {k: v for k, v in vars(args).items() if k not in skip}


def _run_config(cls, args: argparse.Namespace):
    """The run's options: defaults < (with --resume) the run's own config.yaml < --config file < flags. So
    `tether train --output_dir runs/x --resume` continues a run without repeating its options."""
    overrides, base = _options(args), None
    if args.resume:
        from pathlib import Path

        from .config import read_yaml_mapping

        file_values = read_yaml_mapping(args.config) if args.config else {}
        out = (
            overrides.get("output_dir")
            or file_values.get("output_dir")
            or cls.__dataclass_fields__["output_dir"].default
        )
        if (Path(out) / "config.yaml").is_file():
            base = read_yaml_mapping(Path(out) / "config.yaml")
    return load_config(cls, args.config, overrides, args.extra_flags, base=base)


def _run_train(args: argparse.Namespace) -> int:
    from .train.train_config import TrainConfig

    cfg = _run_config(TrainConfig, args)  # option errors answer before torch loads
    from .train.offline import train

    _print_summary(train(cfg, resume=args.resume))
    return 0


def _run_online(args: argparse.Namespace) -> int:
    from .train.online_config import OnlineConfig

    cfg = _run_config(OnlineConfig, args)
    from .train.online import online_train

    _print_summary(online_train(cfg, resume=args.resume))
    return 0


def _print_summary(run_dir) -> None:
    """The end of a run on the console (the main process): before/after metrics, where the run and its report are."""
    if int(os.environ.get("RANK", "0")) == 0:
        from .train.bookkeeping import run_summary

        print(run_summary(run_dir), flush=True)


def _run_report(args: argparse.Namespace) -> int:
    from .train.report import write_report

    print(write_report(args.run_dir))
    return 0


def add_report_parser(sub) -> None:
    text = (
        "write RUN_DIR/report.md and RUN_DIR/plots/*.png (loss, reward accuracy, margins, log-probs, lr, grad norm; "
        "online: win rate, annotations, ties, time) from a run's files"
    )
    p = sub.add_parser("report", help=text, description=text + ". Every run writes it at its end; this rewrites it.")
    p.add_argument("run_dir", help="a directory written by `tether train` or `tether online`")
    p.set_defaults(func=_run_report)


def _add_run_parser(sub, name: str, cls, func, help: str, description: str) -> None:
    p = sub.add_parser(
        name,
        help=help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description=description + " Options come from --config FILE.yaml, then from flags (a flag wins over the "
        "file). TRL's DPOConfig names are accepted in the file and as flags where the meaning agrees "
        "(model_name_or_path, per_device_train_batch_size, loss_type: sigmoid|ipo|hinge, use_peft, ...; "
        "docs/trl.md). Works under `accelerate launch` for several processes.",
    )
    p.set_defaults(accepts_extra_flags=True)
    p.add_argument("--config", default=None, help="YAML file of options (any option below)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in output_dir from its newest readable checkpoint, with the options it started "
        "with (read from its config.yaml; changing one that alters training is refused); a finished run is "
        "left as it is",
    )
    add_dataclass_arguments(p, cls)
    p.set_defaults(func=func)


def add_train_parser(sub) -> None:
    from .train.online_config import OnlineConfig
    from .train.train_config import TrainConfig

    _add_run_parser(
        sub,
        "train",
        TrainConfig,
        _run_train,
        "offline preference optimization (DPO, IPO, SLiC, BAPO) from a preference file",
        "Offline preference optimization.",
    )
    _add_run_parser(
        sub,
        "online",
        OnlineConfig,
        _run_online,
        "online preference optimization (BPO and its baselines) from prompts and an oracle",
        "Online preference optimization: sample pairs from the behavior policy, label them with an "
        "oracle (recorded in ledger.jsonl before training), one DAP step per batch; BPO uses the "
        "behavior policy as the reference (docs/methods.md §5).",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Preference optimization that keeps a model tethered: to the base model's own answers "
        "(BAPO) or to the behavior model that collected the data (BPO).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    add_report_parser(sub)
    from .registry import load, names

    modules = [importlib.import_module(name) for name in SUBCOMMAND_MODULES]
    modules += [load("commands", name) for name in sorted(names("commands"))]
    for module in modules:
        for attr in dir(module):
            if attr.startswith("add_") and attr.endswith("_parser"):
                getattr(module, attr)(sub)
    _remember_flags(parser)
    return parser


def _remember_flags(parser: argparse.ArgumentParser) -> None:
    """Each (sub)parser records its own flags, so an unknown one can be answered with the nearest known name."""
    flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
    parser.set_defaults(known_flags=flags)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _remember_flags(child)


def _check_extra_flags(args: argparse.Namespace, extras: list[str]) -> None:
    """Flags argparse did not know: `train`/`online` read them as options (TRL's names); elsewhere every one
    of them is reported at once, each with its nearest known flag."""
    from .trl_keys import did_you_mean

    if getattr(args, "accepts_extra_flags", False):
        args.extra_flags = extras
        return
    unknown = [t for t in extras if t.startswith("-")] or extras
    known = getattr(args, "known_flags", [])
    named = ", ".join(f"'{t.split('=')[0]}'" + did_you_mean(t.split("=")[0], known, "--") for t in unknown)
    raise TetherError(f"unknown argument(s) {named}; see --help")


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # this process is the `tether` command
        set_command_defaults()
        signal.signal(signal.SIGTERM, _terminated)  # like Ctrl-C: one line, no traceback (a run checkpoints first)
    try:
        rc = _main(argv)
    except KeyboardInterrupt as e:
        name = str(e) if str(e).startswith("SIG") else "SIGINT"
        print(f"tether: stopped by {name}; finished work is kept (a run continues with --resume)", file=sys.stderr)
        rc = 128 + signal.Signals[name].value
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a finished multi-process run leaves without destroying its gloo process group (see train.engine.end_run)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    if argv is None:  # the command leaves without the interpreter's teardown
        _leave(rc)
    return rc


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    args.extra_flags = None
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if extras:
            _check_extra_flags(args, extras)
        return args.func(args)
    except TetherError as e:
        print(f"tether: error: {_one_line(e)}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except OSError as e:
        if e.errno not in ONE_LINE_ERRNOS:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(
            f"tether: error: {_one_line(where + (e.strerror or str(e)))}; nothing half-written is left", file=sys.stderr
        )
        return 2


def _leave(rc: int) -> None:
    """End the process now: atexit handlers run and output is flushed, but the interpreter's own teardown is
    skipped (freeing torch's and transformers' objects one by one took 2.7 s after a SmolLM2 LoRA run)."""
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
