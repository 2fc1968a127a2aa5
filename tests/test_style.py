"""The code style is checked, not hoped for: `ruff format --check` and `ruff check` (configured in pyproject.toml)
over src, tests and benchmarks. A failure shows ruff's own report; `ruff format` and `ruff check --fix` mend most."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PATHS = ["src", "tests", "benchmarks"]


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")  # the test extra installs it into the same environment
    found = str(beside) if beside.is_file() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed: `pip install -c constraints.txt -e '.[test]'` (or `make install`)")
    return [found]


@pytest.mark.parametrize("command", [["format", "--check"], ["check", "--no-fix"]], ids=["format", "lint"])
def test_ruff_is_clean(command):
    res = subprocess.run(_ruff() + command + PATHS, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"ruff {' '.join(command)} found problems:\n{res.stdout}{res.stderr}"
