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
        from tether_lab.studies import bapo_smollm2

        proto = bapo_smollm2.protocol_for(args.model, quick=args.quick, seeds=args.seeds)
        out = args.out or f"out/study-bapo-{Path(args.model).name}{'-quick' if args.quick else ''}"
        bapo_smollm2.run_study(out=out, protocol=proto, threads=args.threads)
        print((Path(out) / "report.md").read_text())
        print(f"study written to {out} (results.json, report.md)")
        return 0

    from tether_lab.studies.bapo import BapoProtocol, run_study

    out = args.out or ("out/study-bapo-quick" if args.quick else "out/study-bapo")
    protocol = BapoProtocol.for_mode(args.quick, world_seed=args.world_seed)
    data = run_study(quick=args.quick, out=out, threads=args.threads, protocol=protocol)
    print((Path(out) / "report.md").read_text())
    print(summary_table(data))
    print(f"study written to {out} (results.json, report.md, figures)")
    return 0


def _run_bpo(args) -> int:
    from tether_lab.studies.bpo import run_from_args

    return run_from_args(args)


def _world_seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 0, e.g. 0")
    return value


def _seed_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1,2") from None


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
        help="seed 0 only (full: seeds 0-4 on the embedded world; with --model: seeds 0 and 1)",
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
        "DPO (by steps) vs BAPO (across λ) with LoRA on the instruction-defined persona `simple`, "
        "knowledge probe with churn; a local model directory or a built-in name",
    )
    b.add_argument(
        "--seeds",
        default=None,
        type=_seed_list,
        help="with --model: comma-separated training seeds, replacing 0,1 (each seed adds ~27 minutes for "
        "SmolLM2 on 2 cores: 4 trainings, 6 evaluations; verdicts need at least 2 seeds)",
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
    q.set_defaults(func=_run_bpo)
