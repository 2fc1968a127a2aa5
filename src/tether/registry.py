"""What other packages add to tether: built-in models, oracles, evaluation suites and subcommands.

The library knows none of these by name. A package (tether_lab, or yours) declares them as entry points in its
`pyproject.toml`, and tether finds them when it needs them:

    [project.entry-points."tether.models"]        # NAME = "module:function" -> a local model directory
    my-model = "my_pkg.models:model_dir"
    [project.entry-points."tether.oracles"]       # KIND = "module:factory"; factory(rest_of_spec) -> Oracle
    my-judge = "my_pkg.judge:make_oracle"         #   `oracle: my-judge:anything` calls make_oracle("anything")
    [project.entry-points."tether.eval_suites"]   # NAME = "module:SuiteOptions" (see tether.eval_cli)
    [project.entry-points."tether.commands"]      # NAME = "module"; its add_*_parser(subparsers) add subcommands

Code that cannot install a package can call `register(group, name, "module:attr")` instead (a test, a notebook).
Torch-free: nothing here imports the registered modules until one is used.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import entry_points

GROUPS = ("models", "oracles", "eval_suites", "commands")
_added: dict[str, dict[str, str]] = {group: {} for group in GROUPS}


@cache
def _declared(group: str) -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=f"tether.{group}")}


def names(group: str) -> dict[str, str]:
    """Every registered NAME -> "module[:attr]" of `group` (declared entry points, then `register` calls)."""
    if group not in GROUPS:
        raise KeyError(f"unknown registry group {group!r}; one of {', '.join(GROUPS)}")
    return {**_declared(group), **_added[group]}


def register(group: str, name: str, target: str) -> None:
    """Add NAME -> "module:attr" to `group` for this process."""
    names(group)  # checks the group
    _added[group][name] = target


def load(group: str, name: str):
    """The object registered as NAME in `group` (its module imported now)."""
    module, _, attr = names(group)[name].partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded
