"""Typed configuration: dataclasses whose fields carry their own help text, read from YAML and CLI flags.

Every command's options are a dataclass. `add_dataclass_arguments` turns its fields into `--field value`
flags whose `--help` shows the default and meaning; `load_config` merges defaults < YAML file < flags, checks
every field's type, choices and range (`field_problems`) and calls the dataclass's `validate()` — the one place
where a config is checked — and reports every problem it finds at once, in one TetherError.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import reprlib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .files import write_text_atomic


class TetherError(Exception):
    """A user-facing error: one line that names the file, record or option and says what to do."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = 60, 40, 60


def brief(value: Any, limit: int = 80) -> str:
    """A bounded repr of a value for an error message: an expanded or enormous value is cut, never printed whole."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001 - e.g. an int too long to print, deep inside a list
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def value_problem(e: BaseException) -> str:
    """A parser's complaint about a value, in words (the text of Python's own is not for users)."""
    if isinstance(e, RecursionError):
        return "nested too deeply to read"
    if "integer string conversion" in str(e):
        return "an integer with more than 4300 digits"
    return brief(getattr(e, "problem", None) or str(e) or type(e).__name__, 200).strip("'")


MAX_YAML_NODES = 100_000  # values after expanding aliases; a config is a few hundred at most


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a document whose aliases expand to more than MAX_YAML_NODES values, or refer
    to themselves (an "alias bomb": a few hundred bytes that expand to gigabytes)."""

    def compose_document(self):
        node = super().compose_document()
        if node is not None:
            _check_expanded_size(node)
        return node


def _check_expanded_size(root) -> None:
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, closing = stack.pop()
        if id(node) in sizes:
            continue
        if isinstance(node, yaml.MappingNode):
            children = [c for pair in node.value for c in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        if closing:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES} values")
            continue
        if id(node) in open_nodes:
            raise yaml.YAMLError("an alias refers to a value that contains it")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((c, False) for c in children if id(c) not in sizes)


def load_yaml(text: str):
    """yaml.safe_load with aliases bounded (see _BoundedLoader). Raises yaml.YAMLError, or ValueError for a value
    YAML cannot convert (an integer of more than 4300 digits)."""
    return yaml.load(text, Loader=_BoundedLoader)


def option(default: Any, help: str, choices: tuple | None = None, **kw) -> Any:
    """A dataclass field with a help text (and optional allowed values)."""
    meta = {"help": help, "choices": choices}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def _base_type(tp):
    """(python type, is_list) for a field annotation such as `int`, `str | None`, `list[str] | None`."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})  # annotations are strings under `from __future__ import annotations`
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _is_optional(tp) -> bool:
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {})
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {brief(text)}")


class InvalidFlag:
    """A flag value its option's type cannot read. argparse keeps it (instead of stopping at the first one with
    its usage text) so that `load_config` reports it together with every other problem of the command line."""

    def __init__(self, text: str, expected: str):
        self.text, self.expected = text, expected

    def problem(self, name: str) -> str:
        return f"option '--{name}' must be {self.expected}, got {brief(self.text)}"


def _flag_parser(inner, optional: bool):
    """The argparse `type` of a flag: `inner` (int, float, str, _parse_bool); "none"/"null" is None when the
    option may be null (report_to's "none" is a value); an unreadable value becomes an InvalidFlag."""
    expected = "true or false" if inner is _parse_bool else getattr(inner, "__name__", "a value")

    def parse(text: str):
        if optional and str(text).lower() in ("none", "null"):
            return None
        try:
            return inner(text)
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            return InvalidFlag(text, expected)

    parse.__name__ = expected
    return parse


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (from its default or its default_factory)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset()) -> None:
    """Add one `--name` flag per field of dataclass `cls` (but those in `skip`, already added by another class);
    defaults stay unset so YAML values can win. A boolean flag alone means true (`--lora`, as in TRL's command
    line); values and choices are checked by `load_config`, which reports every problem at once."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help") or f.name in skip:
            continue
        tp, is_list = _base_type(hints[f.name])
        default = field_default(f)
        conv = _parse_bool if tp is bool else tp
        kwargs: dict[str, Any] = dict(type=_flag_parser(conv, _is_optional(hints[f.name])), default=argparse.SUPPRESS)
        if is_list:
            kwargs["nargs"] = "+"
        elif tp is bool:
            kwargs.update(nargs="?", const=True)
        choices = f.metadata.get("choices")
        shown = "null" if default is None else default
        kwargs["help"] = f"{f.metadata['help']} (default: {shown})"
        kwargs["metavar"] = "{" + ",".join(map(str, choices)) + "}" if choices else tp.__name__.upper()
        parser.add_argument(f"--{f.name}", dest=f.name, **kwargs)


class OptionProblem(TetherError):
    """One bad option value (its type or choice); `load_config` collects them."""


def _coerce(cls, name: str, value: Any, source: str = ""):
    """Check a value's type against the field and convert where the meaning is plain: an int where a float is
    expected, a number or boolean written as a string (YAML reads 5e-7 as one), a path as a string, one value
    where a list is expected. Raises OptionProblem naming the option."""
    hints = typing.get_type_hints(cls)
    tp, is_list = _base_type(hints[name])
    where = f"{source}: " if source else ""
    if value is None:
        if not _is_optional(hints[name]):
            raise OptionProblem(f"{where}option '{name}' must be {tp.__name__}, got null")
        return None
    items = value if is_list and isinstance(value, (list, tuple)) else [value]
    if is_list and items and all(item is None for item in items) and _is_optional(hints[name]):
        return None  # `--lora_target_modules null`
    out = []
    for item in items:
        if isinstance(item, InvalidFlag):
            raise OptionProblem(where + item.problem(name))
        if tp is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if tp is str and isinstance(item, os.PathLike):
            item = os.fspath(item)
        if tp in (int, float, bool) and isinstance(item, str):  # YAML reads 5e-7 as a string; flags are strings
            try:
                item = _parse_bool(item) if tp is bool else tp(item)
            except (ValueError, argparse.ArgumentTypeError):
                pass
        if tp in (int, float) and isinstance(item, bool) or not isinstance(item, tp):
            raise OptionProblem(f"{where}option '{name}' must be {tp.__name__}, got {brief(item)}")
        out.append(item)
    return out if is_list else out[0]


def field_problems(cfg) -> tuple[list[str], set[str]]:
    """Every field of a config dataclass checked for its type (values converted in place as `_coerce` does),
    its choices, finiteness and 64-bit range: (problems, names of the fields that have one). The checks that
    need a field's value can skip a field named here."""
    problems: list[str] = []
    bad: set[str] = set()
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        try:
            value = _coerce(type(cfg), f.name, value)
        except OptionProblem as e:
            problems.append(str(e))
            bad.add(f.name)
            continue
        setattr(cfg, f.name, value)
        problem = _value_problem(f, value)
        if problem:
            problems.append(problem)
            bad.add(f.name)
    return problems, bad


MAX_INT = 2**63 - 1


def _value_problem(f: dataclasses.Field, value: Any) -> str | None:
    """A value of the right type that is no choice of its option, not finite, or not a 64-bit integer."""
    choices = f.metadata.get("choices")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if choices and v is not None and v not in choices:
            return f"option '{f.name}' must be one of {', '.join(map(str, choices))}, got {brief(v)}"
        if isinstance(v, float) and not math.isfinite(v):
            return f"option '{f.name}' must be a finite number, got {v}"
        if isinstance(v, int) and not isinstance(v, bool) and not -MAX_INT <= v <= MAX_INT:
            return f"option '{f.name}' is out of range (|value| < 2**63), got {brief(v)}"
    return None


class Checks:
    """The problems a config's `validate()` finds, collected so that every one is reported at once. Starts with
    `field_problems`; a check whose options have a problem of their own is skipped (`usable`)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.found, self.bad = field_problems(cfg)

    def usable(self, *names: str) -> bool:
        return not self.bad.intersection(names)

    def add(self, message: str, *names: str) -> None:
        self.found.append(message)
        self.bad.update(names)

    def at_least(self, low: float, *names: str, strict: bool = False) -> None:
        """Each option of `names` must be >= low (> low with `strict`)."""
        for name in names:
            value = getattr(self.cfg, name)
            if self.usable(name) and (value <= low if strict else value < low):
                self.add(f"option '{name}' must be {'>' if strict else '>='} {low:g}, got {brief(value)}", name)

    def within(self, name: str, low: float, high: float, low_open: bool = False, high_open: bool = True) -> None:
        value = getattr(self.cfg, name)
        if not self.usable(name):
            return
        if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            self.add(f"option '{name}' must be in {interval}, got {brief(value)}", name)

    def raise_if_any(self) -> None:
        if self.found:
            raise TetherError("; ".join(dict.fromkeys(self.found)))


def read_text(path: str | Path) -> str:
    """A text file as UTF-8 (a byte-order mark is allowed and dropped); a decode error names the line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise TetherError(f"{path}:line {line}: not valid UTF-8 (byte {e.start}); save the file as UTF-8") from None


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file that must hold a mapping, with one-line errors naming the file and line."""
    path = Path(path)
    try:
        data = load_yaml(read_text(path)) or {}
    except FileNotFoundError:
        raise TetherError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise TetherError(f"{path}: is a directory, not a YAML config file") from None
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TetherError(f"{path}:{where} is not valid YAML ({value_problem(e)})") from None
    if not isinstance(data, dict):
        raise TetherError(f"{path}: a config file must be a mapping of option: value")
    return data


def _flag_value(key: str, text: str):
    try:
        return load_yaml(text)
    except (yaml.YAMLError, ValueError, RecursionError):
        return text  # kept as the string it is; the option's type check names it


def parse_extra_flags(tokens: list[str]) -> tuple[dict[str, Any], list[str]]:
    """`--key value`, `--key=value`, `--key v1 v2` (a list), `--flag` (true) and `--no_flag` (false), as the
    TRL/HF command line writes them; values are read as YAML scalars. Returns (options, stray tokens)."""
    values: dict[str, Any] = {}
    stray: list[str] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            stray.append(tok)
            i += 1
            continue
        key, eq, text = tok[2:].partition("=")
        args = [text] if eq else []
        i += 1
        while not eq and i < len(tokens) and not tokens[i].startswith("--"):
            args.append(tokens[i])
            i += 1
        parsed = [_flag_value(key, a) if a.strip() else a for a in args]
        if not parsed:
            key, value = (key[3:], False) if key.startswith("no_") else (key, True)
        else:
            value = parsed[0] if len(parsed) == 1 else parsed
        values[key.replace("-", "_")] = value
    return values, stray


def check_config(cfg):
    """Check a config object as the command line checks it (types, choices, finiteness, then what its
    `validate()` finds; every problem in one TetherError); returns it. A config built in Python
    (`TrainConfig(...)`) is checked so before a run or a trainer uses it."""
    problems = _validation_problems(cfg, skip=set())
    if problems:
        raise TetherError("; ".join(problems))
    return cfg


def load_config(
    cls,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    extra_flags: list[str] | None = None,
    base: dict[str, Any] | None = None,
    overrides_source: str = "options",
):
    """Build a validated `cls` from defaults, then `base` (a resumed run's own config.yaml), then the YAML file,
    then the command line: `extra_flags` (tokens argparse did not know, e.g. TRL's names) and `overrides` (parsed
    flags, or a Python caller's values; `overrides_source` names them in messages), which form one source.

    YAML keys and extra flags may use TRL's names (tether.trl_keys). Every problem is reported at once in one
    TetherError: unknown or unsupported keys (each unknown one with its nearest known name), wrong types and
    choices, two names of one option that disagree within a source, TRL keys whose meaning tether would change,
    and what the dataclass's `validate()` finds."""
    from .trl_keys import TRL_KEYS, translate, trl_meaning_problems

    names = {f.name for f in dataclasses.fields(cls)}
    table = getattr(cls, "trl_keys", TRL_KEYS)
    problems: list[tuple[str, str]] = []  # (source, problem)
    sources = [("run config", base, "")] if base else []
    if config_file is not None:
        sources.append((str(config_file), read_yaml_mapping(config_file), ""))
    command_line, label = _command_line(overrides, extra_flags, problems, overrides_source)
    if command_line:
        sources.append((label, command_line, "--"))
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}  # option -> the key (tether's or TRL's) that set its final value
    given_badly: set[str] = set()
    for source, data, dash in sources:
        got, origin, found, accepted = translate(data, names, lambda k, v: _coerce(cls, k, v), dash, table)
        problems += [(source, p) for p in found.problems]
        given_badly |= found.options
        _log_accepted(source, accepted)
        values.update(got)
        origins.update(origin)
    problems += [("", p) for p in trl_meaning_problems(values, origins)]
    cfg = cls(**values)
    problems += [("", p) for p in _validation_problems(cfg, skip=given_badly)]
    if problems:
        raise TetherError(_grouped(problems) + "; see --help for the list of options")
    return cfg


def _grouped(problems: list[tuple[str, str]]) -> str:
    """(source, problem) pairs joined with "; ", each source named once before its run of problems."""
    out, previous = [], None
    for source, problem in dict.fromkeys(problems):
        out.append(problem if not source or source == previous else f"{source}: {problem}")
        previous = source
    return "; ".join(out)


def _log_accepted(source: str, accepted: list[tuple[str, str]]) -> None:
    """Name the TRL keys taken without effect: ignored ones at info level, speed or memory settings tether does
    not apply as a warning."""
    log = logging.getLogger("tether")
    for kind, level in (("ignored", logging.INFO), ("not applied", logging.WARNING)):
        keys = [text for k, text in accepted if k == kind]
        if keys:
            log.log(level, "%s: TRL option(s) %s: %s", source, kind, "; ".join(keys))


def _command_line(overrides, extra_flags, problems: list[tuple[str, str]], label: str) -> tuple[dict[str, Any], str]:
    """The flags argparse did not know and the parsed ones as one source (a TRL name and tether's name of the
    same option given together must agree). A flag given both ways (`--lora --no_lora`) is a problem."""
    flags: dict[str, Any] = {}
    if extra_flags:
        flags, stray = parse_extra_flags(extra_flags)
        if stray:
            problems.append(
                ("command line", f"unexpected argument(s) {' '.join(stray)}; options are written --name value")
            )
        label = "command line"
    for key, value in (overrides or {}).items():
        if key in flags and flags[key] != value:
            problems.append((label, f"'--{key}' is given twice with different values; keep one"))
        flags[key] = value
    return flags, label


def _validation_problems(cfg, skip: set[str]) -> list[str]:
    """What `cfg.validate()` (and the field checks every config gets) finds, but what names an option that
    already has a problem of its source (a wrong type left the option at its default)."""
    problems = getattr(cfg, "problems", None)
    if problems is not None:
        found = problems()
    else:
        found, _ = field_problems(cfg)
        if hasattr(cfg, "validate") and not found:
            try:
                cfg.validate()
            except TetherError as e:
                found.append(str(e))
    names = "|".join(re.escape(name) for name in skip)
    return [p for p in found if not (names and re.search(rf"'(--)?({names})'|--({names})\b", p))]


def config_to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def check_output_file(path: str | os.PathLike, option: str) -> None:
    """Before any work: `path` can be written as a file (not a directory, in a writable directory); else a
    one-line error naming the option."""
    path = Path(path)
    if path.is_dir():
        raise TetherError(f"option '{option}': {path} is a directory; give a file path such as {path / 'result.json'}")
    parent = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise TetherError(f"option '{option}': cannot write {path} ({parent} is not a writable directory)")
