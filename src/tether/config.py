"""Typed configuration: dataclasses whose fields carry their own help text, read from YAML and CLI flags.

Every command's options are a dataclass. `add_dataclass_arguments` turns its fields into `--field value`
flags whose `--help` shows the default and meaning; `load_config` merges defaults < YAML file < flags and
calls the dataclass's `validate()` — the one place where a config is checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
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


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {brief(text)}")


def _parse_optional(inner):
    def parse(text: str):
        if str(text).lower() in ("none", "null"):
            return None
        try:
            return inner(text)
        except (ValueError, TypeError):  # argparse would echo the whole value
            raise argparse.ArgumentTypeError(
                f"expected {getattr(inner, '__name__', 'a value')}, got {brief(text)}"
            ) from None

    parse.__name__ = getattr(inner, "__name__", "value")
    return parse


def field_default(f: dataclasses.Field) -> Any:
    """A dataclass field's default value (from its default or its default_factory)."""
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, skip: set[str] = frozenset()) -> None:
    """Add one `--name` flag per field of dataclass `cls` (but those in `skip`, already added by another class);
    defaults stay unset so YAML values can win."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("help") or f.name in skip:
            continue
        tp, is_list = _base_type(hints[f.name])
        default = field_default(f)
        conv = _parse_bool if tp is bool else tp
        kwargs: dict[str, Any] = dict(type=_parse_optional(conv), default=argparse.SUPPRESS, dest=f.name)
        if is_list:
            kwargs["nargs"] = "+"
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        shown = "null" if default is None else default
        kwargs["help"] = f"{f.metadata['help']} (default: {shown})"
        kwargs["metavar"] = tp.__name__.upper() if not f.metadata.get("choices") else None
        parser.add_argument(f"--{f.name}", **kwargs)


def _coerce(cls, name: str, value: Any, source: str):
    """Check a YAML value's type against the field and convert ints to floats where a float is expected."""
    hints = typing.get_type_hints(cls)
    tp, is_list = _base_type(hints[name])
    if value is None:
        return None
    items = value if is_list else [value]
    if is_list and not isinstance(value, list):
        items = [value]
    out = []
    for item in items:
        if tp is float and isinstance(item, int) and not isinstance(item, bool):
            item = float(item)
        if tp in (int, float, bool) and isinstance(item, str):  # YAML reads 5e-7 as a string; flags are strings
            try:
                item = _parse_bool(item) if tp is bool else tp(item)
            except (ValueError, argparse.ArgumentTypeError):
                pass
        if tp in (int, float) and isinstance(item, bool) or not isinstance(item, tp):
            raise TetherError(f"{source}: option '{name}' must be {tp.__name__}, got {brief(item)}")
        out.append(item)
    return out if is_list else out[0]


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


MAX_INT = 2**63 - 1


def check_finite(cfg) -> None:
    """Every number option must be a finite number (nan and inf are refused, naming the option) and an integer
    must fit in 64 bits."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise TetherError(f"option '{f.name}' must be a finite number, got {v}")
            if isinstance(v, int) and not isinstance(v, bool) and not -MAX_INT <= v <= MAX_INT:
                raise TetherError(f"option '{f.name}' is out of range (|value| < 2**63), got {brief(v)}")


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
    """Check a config object as the command line checks it (every number finite, then its `validate()`); returns
    it. A config built in Python (`TrainConfig(...)`) is checked so before a run or a trainer uses it."""
    check_finite(cfg)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def load_config(
    cls,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    extra_flags: list[str] | None = None,
    base: dict[str, Any] | None = None,
):
    """Build a validated `cls` from defaults, then `base` (a resumed run's own config.yaml), then the YAML file,
    then `extra_flags` (command-line tokens argparse did not know, e.g. TRL's names), then `overrides` (parsed
    CLI flags). Every number must be finite; then the dataclass's `validate()` runs.

    YAML keys and extra flags may use TRL's `DPOConfig` names (tether.trl_keys). Every unknown or unsupported
    key of a source is reported at once, each with its nearest known name."""
    from .trl_keys import translate

    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    sources = [("run config", base, "")] if base else []
    if config_file is not None:
        sources.append((str(config_file), read_yaml_mapping(config_file), ""))
    if extra_flags:
        flags, stray = parse_extra_flags(extra_flags)
        if stray:
            raise TetherError(f"unexpected argument(s) {' '.join(stray)}; options are written --name value")
        sources.append(("command line", flags, "--"))
    for source, data, dash in sources:
        got, problems, ignored = translate(data, names, lambda k, v, s=source: _coerce(cls, k, v, s), dash)
        if problems:
            raise TetherError(f"{source}: " + "; ".join(problems) + "; see --help for the list of options")
        if ignored:
            logging.getLogger("tether").info(
                "%s: TRL option(s) %s accepted; they do not change what tether computes", source, ", ".join(ignored)
            )
        values.update(got)
    bad = [k for k in (overrides or {}) if k not in names]
    if bad:
        raise TetherError(f"unknown option(s) {', '.join('--' + k for k in bad)}; see --help for the list of options")
    values.update(overrides or {})
    return check_config(cls(**values))


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
