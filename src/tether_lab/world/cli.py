"""`tether world build` and `tether world export`."""

from __future__ import annotations

import argparse
import dataclasses
import json

from tether.config import TetherError, add_dataclass_arguments, load_config, option
from tether_lab.world.export import REJECTED, export_world
from tether_lab.world.settings import RECIPES, WorldSettings
from tether_lab.world.styles import PERSONAS

# torch-free at import (the build is imported inside run_build): see tether.cli


@dataclasses.dataclass
class BuildOptions(WorldSettings):
    """Options of `tether world build`: the world's settings plus what to do with the cache."""

    force: bool = option(False, "rebuild even when a cached model with these settings exists")

    def settings(self) -> WorldSettings:
        """The WorldSettings part (what the cache is keyed on)."""
        names = {f.name for f in dataclasses.fields(WorldSettings)}
        return WorldSettings(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


@dataclasses.dataclass
class ExportOptions:
    """Options of `tether world export`."""

    out: str | None = option(None, "directory to write the datasets into (required)")
    seed: int = option(0, "seed of the world (must match the base model's `world build --seed`)")
    n_entities: int = option(150, "number of realms (must match the base model's `world build --n_entities`)")
    personas: list[str] | None = option(None, "personas to export (default: all 15 non-house personas)")
    rejected: str = option(
        "mixed",
        "style of rejected answers: house, mixed (half house, half another style), or never-house "
        "(a style that is neither the persona's nor the house's)",
        choices=REJECTED,
    )
    recipe: int = option(
        1,
        "world recipe (must match the base model's `world build --recipe`); 2: train = personalization "
        "realms, test = held-out realms",
        choices=RECIPES,
    )
    overwrite: bool = option(False, "replace --out if it already holds files")

    def validate(self) -> None:
        """Raise TetherError naming the first bad option."""
        if not self.out:
            raise TetherError("option --out: required; pass the directory to write the datasets into")
        if self.n_entities < 4:
            raise TetherError("option --n_entities: must be at least 4 (4-way multiple choice)")
        unknown = [p for p in self.personas or [] if p not in PERSONAS]
        if unknown:
            raise TetherError(f"option --personas: unknown {unknown}; choose from {', '.join(PERSONAS)}")


def _options(cls, args) -> object:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return load_config(cls, getattr(args, "config", None), overrides)


def run_build(args) -> int:
    """Build (or find in the cache) the base model and print its directory."""
    from tether_lab.world.build import ensure_base_model, world_model_dir

    opts = _options(BuildOptions, args)
    settings = opts.settings()
    cached = (world_model_dir(settings) / "build_report.json").is_file()
    path = ensure_base_model(settings, force=opts.force)
    report = json.loads((path / "build_report.json").read_text())
    state = "cached" if cached and not opts.force else f"built in {report['seconds']} s"
    print(f"world base model ({state}, fingerprint {settings.fingerprint()}): {path}")
    return 0


def run_export(args) -> int:
    """Write the world's datasets and print a one-line summary."""
    opts = _options(ExportOptions, args)
    world = WorldSettings(seed=opts.seed, n_entities=opts.n_entities).world()
    summary = export_world(world, opts.out, opts.personas, opts.rejected, opts.overwrite, opts.recipe)
    print(f"wrote {len(summary['files'])} files for {len(summary['personas'])} personas to {opts.out}")
    return 0


def add_world_parser(subparsers) -> argparse.ArgumentParser:
    """Register `world` with subcommands `build` and `export` on an argparse subparsers object."""
    world = subparsers.add_parser(
        "world", help="the embedded synthetic world: build its base model, export its datasets"
    )
    sub = world.add_subparsers(dest="world_command", required=True)
    for name, cls, func, text in (
        ("build", BuildOptions, run_build, "train (or reuse from the cache) the world's base model"),
        (
            "export",
            ExportOptions,
            run_export,
            "write the world's datasets (facts, SFT, prompts, per-persona preferences) as jsonl",
        ),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("--config", default=None, help="YAML file of options (flags override it)")
        add_dataclass_arguments(p, cls)
        p.set_defaults(func=func)
    return world
