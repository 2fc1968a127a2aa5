"""Packaging: the distribution's requirements are ranges (an exact pin would make tether uninstallable beside any
other version, e.g. a GPU user's torch); the exact versions `make` installs are in constraints.txt, which pins every
requirement, and torch there is the 2.13.0 that pip takes as the CPU wheel on a CPU machine."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> list[tuple[str, Requirement]]:
    """(where, requirement) for every dependency and optional dependency of pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    out = [("dependencies", Requirement(r)) for r in project["dependencies"]]
    for extra, reqs in project.get("optional-dependencies", {}).items():
        out += [(f"extra '{extra}'", Requirement(r)) for r in reqs]
    return out


def constraints() -> dict[str, str]:
    """constraints.txt: canonical name -> its exact version."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"constraints.txt: {line} is not an exact pin"
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def exact_pins(reqs) -> list[str]:
    return [f"{where}: {req}" for where, req in reqs for spec in req.specifier if spec.operator in ("==", "===")]


def test_no_exact_pin_in_the_package_metadata():
    assert not exact_pins(requirements()), "exact pins belong in constraints.txt, not in pyproject.toml"
    # the check itself catches one
    assert exact_pins([("dependencies", Requirement("torch==2.13.0"))]) == ["dependencies: torch==2.13.0"]


def test_constraints_pin_every_requirement_within_its_range():
    pins = constraints()
    for where, req in requirements():
        name = canonicalize_name(req.name)
        assert name in pins, f"{where}: {req.name} has no exact version in constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt: {name}=={pins[name]} not {req}"
    assert pins["torch"] == "2.13.0"  # the CPU wheel on a CPU machine (the Makefile installs with -c constraints.txt)
    assert "-c constraints.txt" in (ROOT / "Makefile").read_text()
