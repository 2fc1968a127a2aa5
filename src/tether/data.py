"""Preference records: read (jsonl, json, parquet, `datasets` directory), validate, tokenize, collate.

Formats are TRL's. Standard: {"prompt": str, "chosen": str, "rejected": str}. Conversational: "prompt" is a
list of {"role", "content"} messages and "chosen"/"rejected" are lists holding the assistant turn; or, with no
"prompt", "chosen"/"rejected" are whole conversations and the prompt is every message before the last
assistant turn. Implicit prompt in the standard format too: with no "prompt", the prompt is the common
beginning of the chosen and rejected strings (TRL's extract_prompt). Any other field (an "id", say) is kept in
`Record.extra`. Sources with splits (a saved DatasetDict, split files, `PATH:SPLIT`): see `read_split_rows`.

Tokenization follows TRL: the completion is what tokenizing prompt+completion adds after the longest common
prefix with the tokenized prompt; standard completions get the EOS token appended. Truncation policy:
the prompt is cut from the LEFT to `max_prompt_length` tokens, then each completion from the RIGHT so that
prompt + completion ≤ `max_length`; a pair whose completion would be cut to nothing is skipped and counted.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import TetherError, read_text, value_problem

log = logging.getLogger("tether")
COMPLETION_KEYS = ("chosen", "rejected")


@dataclass
class Record:
    prompt: str | list[dict]
    completions: dict[str, str | list[dict]]  # "chosen", "rejected" (and later "base")
    source: str  # "file:line N" or "file: record N", for error messages
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


@dataclass
class Example:
    """A tokenized record: one shared prompt and one token list per completion."""

    prompt_ids: list[int]
    completion_ids: dict[str, list[int]]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizeReport:
    records: int = 0
    kept: int = 0
    skipped_identical: int = 0
    skipped_truncated: int = 0
    skipped: list[dict] = field(default_factory=list)  # one entry per skipped record: source, reason, extra

    def summary(self) -> str:
        return (
            f"{self.kept} of {self.records} pairs kept ({self.skipped_identical} with chosen == rejected, "
            f"{self.skipped_truncated} whose completion max_length would cut to nothing)"
        )


# ---------------------------------------------------------------------------------------------- reading files


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    """(source, raw row) pairs from a .jsonl, .json, .parquet file or a `datasets.save_to_disk` directory."""
    path = Path(path)
    if not path.exists():
        raise TetherError(f"{path}: no such file or directory")
    if path.is_dir():
        return _read_datasets_dir(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for n, line in enumerate(read_text(path).split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise TetherError(f"{path}:line {n}: {json_problem(e)}") from None
            rows.append((f"{path}:line {n}", row))
        return rows
    if suffix == ".json":
        data = _load_json_file(path)
        if not isinstance(data, list):
            raise TetherError(f"{path}: a .json data file must hold a list of records (use .jsonl for one per line)")
        return [(f"{path}: record {i}", row) for i, row in enumerate(data)]
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise TetherError(f"{path}: cannot read parquet ({e})") from None
        return [(f"{path}: record {i}", row) for i, row in enumerate(table.to_pylist())]
    raise TetherError(f"{path}: unknown data format '{suffix}'; use .jsonl, .json, .parquet or a datasets directory")


SPLIT_SUFFIXES = (".jsonl", ".json", ".parquet")


def json_problem(e: Exception) -> str:
    """What is wrong with a JSON text, in words (for a one-line error that names the file and line)."""
    if isinstance(e, json.JSONDecodeError):
        return f"malformed JSON ({e.msg} at column {e.colno})"
    if isinstance(e, RecursionError):
        return "JSON nested too deeply to read"
    return f"unreadable JSON ({value_problem(e)})"


def _load_json_file(path: Path):
    """A whole .json file (a byte-order mark allowed), or a one-line error naming its line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        line = f"line {e.lineno}: " if isinstance(e, json.JSONDecodeError) else ""
        raise TetherError(f"{path}:{line}{json_problem(e)}") from None


def split_source(path: str | Path) -> tuple[Path, str | None]:
    """(PATH, SPLIT) of a `PATH:SPLIT` source (PATH exists, SPLIT is a plain name); (path, None) otherwise."""
    text = str(path)
    if not Path(text).exists() and ":" in text:
        head, tail = text.rsplit(":", 1)
        if Path(head).exists() and tail and "/" not in tail:
            return Path(head), tail
    return Path(text), None


def read_split_rows(path: str | Path, split: str = "train") -> list[tuple[str, dict]]:
    """`read_rows` for sources that may hold splits: `PATH:SPLIT` names one explicitly (the split must exist),
    otherwise `split` applies where there are splits — a saved DatasetDict, a .json holding {split: [records]},
    or a directory of split files (train.jsonl, test.parquet, data/train-00000-of-00001.parquet). A source
    without splits is read whole unless a split was named in the path."""
    p, named = split_source(path)
    explicit = named is not None
    split = named or split
    if p.is_dir() and not _is_saved_dataset(p):
        files = _split_files(p)
        if not files:
            raise TetherError(
                f"{p}: neither a datasets.save_to_disk directory nor a directory of split files "
                f"(e.g. train.jsonl, data/test-00000-of-00001.parquet)"
            )
        if split not in files:
            raise TetherError(f"{p}: no split '{split}' (splits: {', '.join(sorted(files))}); name one as {p}:SPLIT")
        return [row for f in files[split] for row in read_rows(f)]
    if p.is_dir():
        return _read_datasets_dir(p, split)
    if p.suffix.lower() == ".json" and p.is_file():
        data = _load_json_file(p)
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            if split not in data:
                raise TetherError(f"{p}: no split '{split}' (splits: {', '.join(data)}); name one as {p}:SPLIT")
            return [(f"{p}: {split} record {i}", row) for i, row in enumerate(data[split])]
    if explicit:
        raise TetherError(f"{p}: holds no splits, so ':{split}' cannot be read; pass the path alone")
    return read_rows(p)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _split_files(path: Path) -> dict[str, list[Path]]:
    """{split: files} of a directory laid out like a downloaded Hub dataset: files named SPLIT.ext or
    SPLIT-*.ext, at the top or in data/ (ext = .jsonl, .json, .parquet)."""
    out: dict[str, list[Path]] = {}
    for folder in (path, path / "data"):
        if not folder.is_dir():
            continue
        for f in sorted(folder.iterdir()):
            if f.is_file() and f.suffix.lower() in SPLIT_SUFFIXES:
                name = f.name[: -len(f.suffix)]
                split = name.split("-")[0]  # train-00000-of-00001 -> train; test_prefs-0000 -> test_prefs
                out.setdefault(split, []).append(f)
    return out


def _read_datasets_dir(path: Path, split: str = "train") -> list[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001
        raise TetherError(f"{path}: not a datasets.save_to_disk directory ({str(e).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise TetherError(
                f"{path}: DatasetDict without a '{split}' split (splits: {', '.join(ds)}); name one as {path}:SPLIT"
            )
        ds = ds[split]
    return [(f"{path}: record {i}", row) for i, row in enumerate(ds)]


# ---------------------------------------------------------------------------------------------- validation


def _check_encodable(text: str, source: str, name: str) -> str:
    """Text that UTF-8 can hold: JSON's \\ud800-style escapes can make lone surrogates, which no tokenizer or file
    can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TetherError(
            f"{source}: field '{name}' holds a lone surrogate (\\u{ord(text[e.start]):04x} at character {e.start}), "
            "which is not text; fix the escape in the file"
        ) from None
    return text


def _check_messages(value: Any, source: str, name: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise TetherError(f"{source}: field '{name}' must be a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise TetherError(f'{source}: field \'{name}\' message {i} must be {{"role": str, "content": str}}')
        _check_encodable(m["role"], source, f"{name}[{i}].role")
        _check_encodable(m["content"], source, f"{name}[{i}].content")
    return value


def _check_text(value: Any, source: str, name: str, allow_empty: bool = False) -> str:
    if value is None:
        raise TetherError(f"{source}: missing field '{name}'")
    if not isinstance(value, str):
        raise TetherError(f"{source}: field '{name}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise TetherError(f"{source}: field '{name}' is empty")
    return _check_encodable(value, source, name)


def _completion_text(messages: list[dict]) -> str:
    return "".join(m["content"] for m in messages)


def parse_record(row: Any, source: str, keys: tuple[str, ...] = COMPLETION_KEYS) -> Record:
    """Validate one raw row and return a Record; raise a one-line TetherError naming the record and field."""
    if not isinstance(row, dict):
        raise TetherError(f"{source}: a record must be a JSON object, got {type(row).__name__}")
    for key in keys:
        if key not in row or row[key] is None:
            raise TetherError(f"{source}: missing field '{key}'")
    extra = {k: v for k, v in row.items() if k not in ("prompt", *keys)}
    conversational = isinstance(row[keys[0]], list)
    if not conversational:
        if row.get("prompt") is None:  # implicit prompt: the completions' common beginning, as TRL's extract_prompt
            texts = [_check_text(row[k], source, k) for k in keys]
            n = min(len(os.path.commonprefix(texts)), min(map(len, texts)) - 1)  # TRL keeps >= 1 character
            if n > 0 and texts[0][n - 1] == " ":
                n -= 1  # the space before the first differing word belongs to the completions
            row = {**row, "prompt": texts[0][:n], **{k: t[n:] for k, t in zip(keys, texts)}}
        prompt = _check_text(row.get("prompt"), source, "prompt", allow_empty=True)
        comps = {k: _check_text(row[k], source, k) for k in keys}
        return Record(prompt, comps, source, extra)
    comps = {k: _check_messages(row[k], source, k) for k in keys}
    if row.get("prompt") is not None:
        prompt = _check_messages(row["prompt"], source, "prompt")
        for k, msgs in comps.items():
            roles = sorted({m["role"] for m in msgs} - {"assistant"})
            if roles:
                raise TetherError(
                    f"{source}: field '{k}' holds a '{roles[0]}' message; a completion is the assistant's "
                    "answer (put the other turns in 'prompt')"
                )
    else:  # implicit prompt: everything before the last assistant turn, identical across completions
        prefixes = []
        for k, msgs in comps.items():
            if msgs[-1]["role"] != "assistant":
                raise TetherError(f"{source}: field '{k}' must end with an assistant message")
            prefixes.append(msgs[:-1])
        if any(p != prefixes[0] for p in prefixes):
            raise TetherError(
                f"{source}: without a 'prompt' field, {' and '.join(keys)} must share every message before the last"
            )
        if not prefixes[0]:
            raise TetherError(
                f"{source}: missing field 'prompt' (and the conversations have no messages before the answer)"
            )
        prompt = prefixes[0]
        comps = {k: msgs[-1:] for k, msgs in comps.items()}
    for k, msgs in comps.items():
        if not _completion_text(msgs).strip():
            raise TetherError(f"{source}: field '{k}' is empty")
    return Record(prompt, comps, source, extra)


def load_preference_records(
    path: str | Path, keys: tuple[str, ...] = COMPLETION_KEYS, split: str = "train"
) -> list[Record]:
    """Read and validate every record of a preference file (see the module docstring for the formats);
    `split` picks the split of a source that has several (see `read_split_rows`)."""
    records = [parse_record(row, source, keys) for source, row in read_split_rows(path, split)]
    if not records:
        raise TetherError(f"{path}: holds no records")
    return records


def load_prompt_records(path: str | Path, need_reference: bool = False) -> list[Record]:
    """Prompt records for online training or evaluation: a 'prompt' (string or chat messages) and, when
    present (required with need_reference), a 'reference' answer (string or assistant messages) kept as
    text in `completions["reference"]`."""
    records = prompt_records(read_rows(path), need_reference)
    if not records:
        raise TetherError(f"{path}: holds no records")
    return records


def prompt_records(rows: list[tuple[str, dict]], need_reference: bool = False) -> list[Record]:
    """Validated prompt records of (source, raw row) pairs (see `load_prompt_records`)."""
    records = []
    for source, row in rows:
        if not isinstance(row, dict):
            raise TetherError(f"{source}: a record must be a JSON object, got {type(row).__name__}")
        if row.get("prompt") is None:
            raise TetherError(f"{source}: missing field 'prompt'")
        prompt = row["prompt"]
        prompt = (
            _check_messages(prompt, source, "prompt")
            if isinstance(prompt, list)
            else _check_text(prompt, source, "prompt")
        )
        comps = {}
        if row.get("reference") is not None:
            ref = row["reference"]
            comps["reference"] = (
                _completion_text(_check_messages(ref, source, "reference"))
                if isinstance(ref, list)
                else _check_text(ref, source, "reference")
            )
        elif need_reference:
            raise TetherError(
                f"{source}: missing field 'reference' (evaluation prompts need a reference answer to compare with)"
            )
        records.append(
            Record(prompt, comps, source, {k: v for k, v in row.items() if k not in ("prompt", "reference")})
        )
    return records


# ---------------------------------------------------------------------------------------------- tokenization


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _tokenize_record(rec: Record, tokenizer) -> tuple[list[int], dict[str, list[int]]]:
    """(prompt_ids, completion ids per key) before truncation."""
    if rec.conversational:
        if not getattr(tokenizer, "chat_template", None):
            raise TetherError(
                f"{rec.source}: conversational record but the tokenizer has no chat template; "
                "use a model whose tokenizer defines one, or convert the data to the standard string format"
            )
        prompt_ids = list(
            tokenizer.apply_chat_template(rec.prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
        )
        fulls = {
            k: list(tokenizer.apply_chat_template(rec.prompt + msgs, tokenize=True, return_dict=False))
            for k, msgs in rec.completions.items()
        }
    else:
        eos = tokenizer.eos_token or ""
        prompt_ids = tokenizer(rec.prompt)["input_ids"]
        fulls = {
            k: tokenizer(rec.prompt + (text if text.endswith(eos) else text + eos))["input_ids"]
            for k, text in rec.completions.items()
        }
    cut = min(_common_prefix(prompt_ids, ids) for ids in fulls.values())
    comps = {k: ids[cut:] for k, ids in fulls.items()}
    if rec.conversational and tokenizer.eos_token_id is not None:
        comps = {
            k: ids if tokenizer.eos_token_id in ids else ids + [tokenizer.eos_token_id] for k, ids in comps.items()
        }
    return prompt_ids[:cut], comps


def tokenize_records(
    records: list[Record],
    tokenizer,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
) -> tuple[list[Example], TokenizeReport]:
    """Tokenize records under the truncation policy of the module docstring; count what is skipped."""
    report = TokenizeReport(records=len(records))
    examples = []
    for rec in records:
        texts = list(rec.completions.values())
        if len(texts) > 1 and all(t == texts[0] for t in texts[1:]):
            report.skipped_identical += 1
            report.skipped.append({"source": rec.source, "reason": "chosen == rejected", **rec.extra})
            continue
        prompt_ids, comps = _tokenize_record(rec, tokenizer)
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :]
        if max_length is not None:
            room = max_length - len(prompt_ids)
            comps = {k: ids[: max(room, 0)] for k, ids in comps.items()}
        if any(len(ids) == 0 for ids in comps.values()):
            report.skipped_truncated += 1
            report.skipped.append({"source": rec.source, "reason": "completion truncated to nothing", **rec.extra})
            continue
        token_lists = list(comps.values())
        if len(token_lists) > 1 and all(ids == token_lists[0] for ids in token_lists[1:]):  # equal once truncated
            report.skipped_identical += 1
            report.skipped.append({"source": rec.source, "reason": "chosen == rejected after truncation", **rec.extra})
            continue
        examples.append(Example(prompt_ids, comps, rec.source, rec.extra))
    report.kept = len(examples)
    if report.skipped_identical:
        log.warning("skipped %d pairs whose chosen and rejected are identical", report.skipped_identical)
    return examples, report


def collate(examples: list[Example], pad_id: int, keys: tuple[str, ...] = COMPLETION_KEYS) -> dict[str, torch.Tensor]:
    """Right-padded batch with one row per (key, example), key-major: all chosen rows, then all rejected, ...

    Returns input_ids, attention_mask, completion_mask: (len(keys)·B, L) int64.
    """
    seqs = [(ex.prompt_ids, ex.completion_ids[k]) for k in keys for ex in examples]
    width = max(len(p) + len(c) for p, c in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    completion_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, :n] = 1
        completion_mask[i, len(p) : n] = 1
    completion_mask[:, 0] = 0  # the first token is never predicted
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
