"""TRL option names read as tether options where the meaning agrees (the table: tether.trl_key_table).

A TRL YAML (or `--flag` on the command line) may use TRL's names: `translate` turns a mapping of tether and TRL
names into tether options, collecting every problem; `trl_meaning_problems` refuses a combination whose meaning
tether would change (TRL 1.16's sigmoid ignores label_smoothing, tether's dpo applies it); `keys_markdown` writes
docs/trl.md's table of every key.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from .loss_table import LOSSES, components
from .trl_key_table import KINDS, ONLINE_TRL_KEYS, TRL_KEYS, TRL_SMOOTHED_LOSS_TYPES, Key, Unsupported

__all__ = ["TRL_KEYS", "ONLINE_TRL_KEYS", "Unsupported", "translate", "trl_meaning_problems", "keys_markdown"]


@dataclass
class Found:
    """The problems of one source, and the tether options they leave unset (their checks are then skipped)."""

    problems: list[str] = field(default_factory=list)
    options: set[str] = field(default_factory=set)

    def add(self, problem: str, *options: str) -> None:
        self.problems.append(problem)
        self.options.update(options)


def _own(key: str, names: set[str], table: dict[str, Key]) -> bool:
    """A key read as tether's own option: tether has it, and TRL's entry (if any) does not translate its value."""
    return key in names and (key not in table or table[key].kind != "same")


def translate(data: dict[str, Any], names: set[str], coerce, dash: str = "", table: dict[str, Key] | None = None):
    """Turn a mapping of option names (tether's or TRL's) into tether options.

    Returns (values, origins, found, accepted): `origins` maps each option set to the key that set it, `found`
    holds one phrase per problem (unknown keys with their nearest known name, unsupported TRL values, wrong types,
    two keys of one option that disagree), `accepted` (kind, text) for each TRL key taken without effect (ignored
    or not applied), with its reason.
    `coerce(name, value)` checks a tether value's type (it raises TetherError on a wrong one); `dash` ("--" for
    flags) prefixes the names in messages; `table` is TRL_KEYS (tether train) or ONLINE_TRL_KEYS (tether online)."""
    from .config import TetherError

    table = TRL_KEYS if table is None else table
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    found, unknown, accepted = Found(), [], []
    for key, value in data.items():
        entry = None if _own(key, names, table) else table.get(key)
        if entry is None and key not in names:
            unknown.append(key)
            continue
        try:
            out = entry.handler(key, value) if entry else {key: value}
        except Unsupported as e:
            found.add(dash + str(e))
            continue
        if entry and entry.kind in ("ignored", "not applied"):
            accepted.append((entry.kind, f"{key} ({entry.note})"))
        for name, v in out.items():
            if name not in names:
                found.add(f"'{dash}{key}' sets '{name}', an option this command does not have")
                continue
            try:
                v = coerce(name, v)
            except TetherError as e:
                found.add(str(e), name)
                continue
            if name in values and values[name] != v:
                found.add(f"'{dash}{key}' and '{dash}{origins[name]}' both set '{name}' to different values; keep one")
                continue
            values[name], origins[name] = v, key
    _eval_split_of_dataset(data, names, values, coerce)
    for key in unknown:
        found.add(f"unknown option '{dash}{key}'" + did_you_mean(key, names | set(table), dash))
    return values, origins, found, accepted


def _eval_split_of_dataset(data: dict, names: set[str], values: dict, coerce) -> None:
    """TRL evaluates on dataset_test_split of dataset_name when eval_strategy is not "no"."""
    strategy = data.get("eval_strategy", data.get("evaluation_strategy", "no"))
    if "dataset_name" in data and str(strategy).lower() != "no" and "eval_file" in names and "eval_file" not in values:
        values["eval_file"] = coerce("eval_file", data["dataset_name"])
        values.setdefault("eval_split", coerce("eval_split", data.get("dataset_test_split", "test")))


def trl_meaning_problems(values: dict[str, Any], origins: dict[str, str]) -> list[str]:
    """Options whose final values would mean something else than in TRL: a loss that came from TRL's loss_type
    with a nonzero label_smoothing that TRL 1.16 ignores for one of its loss types (sigmoid) but tether's loss
    reads (dpo: conservative DPO). A TRL YAML never silently trains another objective."""
    if origins.get("loss") != "loss_type" or not values.get("label_smoothing"):
        return []
    try:
        names = components(values["loss"])
    except ValueError:
        return []
    trl_of = {entry.name: entry.trl for entry in LOSSES.values()}
    changed = [
        trl_of[n]
        for n in names
        if "label_smoothing" in LOSSES[n].param_names and trl_of[n] not in TRL_SMOOTHED_LOSS_TYPES
    ]
    if not changed:
        return []
    return [
        f"label_smoothing with loss_type {changed[0]}: TRL 1.16 ignores it there, tether's "
        f"{LOSSES[[n for n in names if trl_of[n] == changed[0]][0]].name} would apply it (conservative DPO); drop "
        "label_smoothing, or write loss: dpo to mean conservative DPO"
    ]


def accepted_names(table: dict[str, Key], kinds: tuple[str, ...]) -> list[str]:
    return sorted(k for k, entry in table.items() if entry.kind in kinds)


def did_you_mean(key: str, known, dash: str = "") -> str:
    """ " (did you mean 'x'?)" for the nearest known name (written with `dash` in front), or "" when none is close."""
    close = difflib.get_close_matches(key.lstrip("-"), sorted(k.lstrip("-") for k in known), n=1, cutoff=0.6)
    return f" (did you mean '{dash}{close[0]}'?)" if close else ""


def _row(key: str, entry: Key) -> str:
    target = entry.shown or (key if entry.kind == "same" else "—")
    note = entry.note.replace("|", "\\|")
    older = " (older TRL)" if entry.removed else ""
    return f"| `{key}`{older} | {entry.kind} | {'`' + target + '`' if target != '—' else target} | {note} |"


def keys_markdown() -> str:
    """docs/trl.md's table: every key of `trl dpo` (TRL 1.16 and older) and of OnlineDPOConfig, by kind."""
    lines = ["| TRL key | kind | tether option | note |", "|---|---|---|---|"]
    for kind in KINDS:
        lines += [_row(k, e) for k, e in sorted(TRL_KEYS.items()) if e.kind == kind]
    lines += ["", "`tether online` reads the same keys and these of `OnlineDPOConfig` (`trl.experimental`):", ""]
    lines += ["| TRL key | kind | tether option | note |", "|---|---|---|---|"]
    online = {k: e for k, e in ONLINE_TRL_KEYS.items() if TRL_KEYS.get(k) is not e}
    for kind in KINDS:
        lines += [_row(k, e) for k, e in sorted(online.items()) if e.kind == kind]
    return "\n".join(lines) + "\n"
