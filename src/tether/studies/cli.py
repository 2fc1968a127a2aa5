"""`tether study bapo|bpo [--quick] [--out DIR]`."""

from __future__ import annotations

import argparse


def _run_bapo(args) -> int:
    from .bapo import run_pilot, run_study

    if args.pilot:
        out = args.out or "out/study-bapo-pilot"
        run_pilot(out)
        print((__import__("pathlib").Path(out) / "pilot.md").read_text())
        return 0

    out = args.out or ("out/study-bapo-quick" if args.quick else "out/study-bapo")
    data = run_study(quick=args.quick, out=out)
    print((__import__("pathlib").Path(out) / "report.md").read_text())
    print(f"study written to {out} (results.json, report.md, figures); claims: "
          + ", ".join(f"{'holds' if c['holds'] else 'does not hold'}" for c in data["claims"]))
    return 0


def add_study_parser(subparsers) -> None:
    p = subparsers.add_parser("study", help="reproduce a paper's experiment on the embedded world",
                              description="Run a paper study; an interrupted study resumes where it stopped.")
    sub = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    b = sub.add_parser(
        "bapo", help="personalization vs forgetting: DPO, IPO, SLiC, DPO+NLL and BAPO across heterogeneity levels",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    b.add_argument("--quick", action="store_true", help="1 seed, heterogeneity 1-3, 60 steps (its duration is not measured yet)")
    b.add_argument("--pilot", action="store_true", help="rerun the pilot that chose the learning rate and default λ")
    b.add_argument("--out", default=None, help="study directory (default: out/study-bapo or out/study-bapo-quick)")
    b.set_defaults(func=_run_bapo)
