"""`tether study bapo|bpo [--quick] [--out DIR]`."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tether.config import TetherError


def _run_bapo(args) -> int:
    from tether_lab.studies.report_bapo import summary_table

    if args.model and args.world_seed:
        raise TetherError("option --world_seed: applies to the embedded world, not to --model")
    if args.model:
        return _run_bapo_llm(args)
    if args.seeds or args.data_seed:
        raise TetherError(
            "options --seeds and --data_seed: apply to a chat model's study (--model), not to the world's"
        )
    from tether_lab.studies.bapo import BapoProtocol, run_study

    out = args.out or ("out/study-bapo-quick" if args.quick else "out/study-bapo")
    protocol = BapoProtocol.for_mode(args.quick, world_seed=args.world_seed)
    data = run_study(quick=args.quick, out=out, threads=args.threads, protocol=protocol, resume=args.resume)
    print((Path(out) / "report.md").read_text())
    print(summary_table(data))
    print(f"study written to {out} (results.json, report.md, figures)")
    return 0


def _run_bapo_llm(args) -> int:
    from tether_lab.studies import bapo_llm, bapo_llm_rules

    if args.quick:
        if args.seeds:
            raise TetherError("option --seeds: --quick runs the calibration stage only (no study seed)")
        proto = bapo_llm_rules.quick_protocol(args.model, args.data_seed)
    else:
        proto = bapo_llm_rules.LlmBapoProtocol(model=args.model, data_seed=args.data_seed)
        if args.seeds:
            proto.seeds = list(args.seeds)
    if any(s >= bapo_llm_rules.TUNING_OFFSET for s in proto.seeds):
        raise TetherError(
            f"option --seeds: study seeds must be below {bapo_llm_rules.TUNING_OFFSET} (the calibration's)"
        )
    out = args.out or f"out/study-bapo-{Path(args.model).name}{'-quick' if args.quick else ''}"
    bapo_llm.run_study(out=out, protocol=proto, resume=args.resume, threads=args.threads)
    print((Path(out) / "report.md").read_text())
    print(f"study written to {out} (results.json, report.md, figures)")
    return 0


def _run_bpo(args) -> int:
    if args.model:
        return _run_bpo_llm(args)
    if args.data_seed:
        raise TetherError("option --data_seed: applies to a chat model's study (--model), not to the world's")
    from tether_lab.studies.bpo import run_from_args

    return run_from_args(args)  # the world study resumes when rerun: --resume changes nothing there


def _run_bpo_llm(args) -> int:
    from tether_lab.studies import bpo_llm, bpo_llm_rules

    for name, given in (("--world_seed", args.world_seed), ("--pilot", args.pilot), ("--workers", args.workers != 1)):
        if given:
            raise TetherError(f"option {name}: applies to the embedded world's study, not to --model")
    if args.threads is not None and args.threads < 1:
        raise TetherError(f"option '--threads' must be >= 1, got {args.threads}")
    if args.quick:
        proto = bpo_llm_rules.quick_protocol(args.model, args.data_seed)
    else:
        proto = bpo_llm_rules.LlmBpoProtocol(model=args.model, data_seed=args.data_seed)
    out = args.out or f"out/study-bpo-{Path(args.model).name}{'-quick' if args.quick else ''}"
    bpo_llm.run_study(out=out, protocol=proto, resume=args.resume, threads=args.threads)
    print((Path(out) / "report.md").read_text())
    print(f"study written to {out} (results.json, report.md, figures)")
    return 0


def _world_seed(text: str) -> int:
    """A seed option: an integer in 0 .. 2**31 − 1."""
    try:
        value = int(text) if len(text) < 20 else -1
    except ValueError:
        value = -1
    if not 0 <= value < 2**31:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: expected an integer from 0 to 2147483647, e.g. 0")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",")]
    except ValueError:
        seeds = []
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: expected distinct comma-separated integers >= 0, e.g. 0,1,2")
    return seeds


def add_study_parser(subparsers) -> None:
    from tether_lab.studies.bpo import add_bpo_arguments

    p = subparsers.add_parser(
        "study",
        help="reproduce a paper's experiment on the embedded world (or a chat model)",
        description="Run a paper study; an interrupted study resumes where it stopped.",
    )
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    b = sub.add_parser(
        "bapo",
        help="personalization vs forgetting: DPO, IPO, SLiC, DPO+NLL and BAPO across heterogeneity levels",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help="seed 0 only on the embedded world (full: seeds 0-4); with --model: the gates and calibration curves of "
        "a reduced grid (one persona, 10 steps; about 20 minutes for SmolLM2 on 2 cores), never a verdict",
    )
    b.add_argument(
        "--world_seed",
        type=_world_seed,
        default=0,
        help="seed of the embedded world (realms, facts, splits) and of its base model (not with --model)",
    )
    b.add_argument(
        "--model",
        default=None,
        help="run the study on this chat model instead of the embedded world (e.g. smollm2-135m-instruct): "
        "a calibration (DPO over lr × β, IPO, SLiC, DPO+NLL, BAPO over λ, a null SFT run; gates), then BAPO vs "
        "DPO and the selected baseline on the personas `simple` and `enthusiastic` (protocol version 3, "
        "docs/studies.md); a local model directory or a built-in name",
    )
    b.add_argument(
        "--seeds",
        default=None,
        type=_seed_list,
        help="with --model: comma-separated study seeds, replacing 0,1,2,3,4 (each seed has its own preference "
        "data, data seed = --data_seed + seed; the claims need 5)",
    )
    b.add_argument(
        "--data_seed",
        type=_world_seed,
        default=0,
        help="with --model: offset of the data seeds (study seed s uses data_seed + s, the calibration "
        "data_seed + 1000)",
    )
    b.add_argument(
        "--resume",
        action="store_true",
        help="continue the study in --out, keeping every finished run (a changed protocol is refused, naming what "
        "changed); without it a directory that holds finished runs is refused",
    )
    b.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the study process")
    b.add_argument("--out", default=None, help="study directory (default: out/study-bapo or out/study-bapo-quick)")
    b.set_defaults(func=_run_bapo)
    q = sub.add_parser(
        "bpo",
        help="online DAP at one annotation budget: offline, on-policy, BPO F=2 / F=T and the π_ref ablation",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_bpo_arguments(q)
    _add_bpo_llm_arguments(q)
    q.set_defaults(func=_run_bpo)


def _add_bpo_llm_arguments(parser) -> None:
    """The options of `tether study bpo --model M` (the chat-model study; the world study's are in bpo.py)."""
    parser.add_argument(
        "--model",
        default=None,
        help="run the study on this chat model instead of the embedded world (e.g. smollm2-135m-instruct), with an "
        "instructed persona's score as the oracle: gates on tuning seeds (π_gold's win rate, a calibration of offline "
        "DPO, identical pairs and β|h| of on-policy DAP, the seed count), then offline / BPO F=2 / F=T / on-policy / "
        "π_ref=π_gold with DPO and IPO at F=1, 2 (protocol version 5, docs/studies.md); a local directory or a "
        "built-in name",
    )
    parser.add_argument(
        "--data_seed",
        type=_world_seed,
        default=0,
        help="with --model: the prompt pool's split into training, dev and test topics (a replication names another)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="with --model: continue the study in --out, keeping every finished run (a changed protocol is refused); "
        "without it a directory that holds finished runs is refused. The world study always resumes when rerun",
    )
