"""Callable oracles for the online tests (imported as callable:toy_oracles:NAME; tests/ is on PYTHONPATH)."""

import os
import time


def shorter(prompts, responses):
    """Prefers shorter responses."""
    _log(len(responses))
    return [-float(len(r)) for r in responses]


def _log(n):
    path = os.environ.get("TOY_ORACLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{n}\n")


def always_fails(prompts, responses):
    raise RuntimeError("the annotation service is down")


def slow(prompts, responses):
    time.sleep(5)
    return [0.0] * len(responses)


def never_returns(prompts, responses):
    """An annotation service that hangs: only --oracle_timeout can end the call."""
    time.sleep(10_000)
    return [0.0] * len(responses)


def down_when_told(prompts, responses):
    """Fails while TOY_ORACLE_DOWN=1 (an annotation service that is down, then back)."""
    if os.environ.get("TOY_ORACLE_DOWN") == "1":
        raise RuntimeError("the annotation service is down")
    return shorter(prompts, responses)


def shorter_ties_on_s(prompts, responses):
    """Prefers shorter responses, but has no preference (a tie) about things whose name starts with an s."""
    return [0.0 if "the s" in p else -float(len(r)) for p, r in zip(prompts, responses)]


def shorter_slowly(prompts, responses):
    """`shorter`, taking TOY_ORACLE_SLEEP seconds per call (a slow annotation service; the same answers)."""
    time.sleep(float(os.environ.get("TOY_ORACLE_SLEEP", "0")))
    return shorter(prompts, responses)


def editing(prompts, responses):
    """Scores like `shorter`, and edits what it was given (appends to every chat prompt, rewrites messages)."""
    for p in prompts:
        if isinstance(p, list):
            p.append({"role": "user", "content": "injected"})
            p[0]["content"] = "rewritten"
    return [-float(len(r)) for r in responses]


def shorter_where(prompts, responses):
    """`shorter`, writing to TOY_ORACLE_LOG which process (RANK) was asked and about how many responses."""
    path = os.environ.get("TOY_ORACLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{os.environ.get('RANK', '0')} {len(responses)}\n")
    return [-float(len(r)) for r in responses]
