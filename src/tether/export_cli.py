"""`tether export --merge ADAPTER_DIR --out DIR`: write base + PEFT adapter as one plain Hugging Face model."""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from .config import TetherError, add_dataclass_arguments, load_config, option


@dataclasses.dataclass
class ExportOptions:
    """Options of `tether export`."""

    merge: str = option("", "PEFT adapter directory to merge into its base model, e.g. runs/x/final (required)")
    out: str = option(
        "", "directory to write the merged model and its tokenizer to; must not exist or be empty (required)"
    )
    torch_dtype: str = option(
        "auto",
        "dtype of the written weights (auto = the base model's stored dtype); the merge itself runs in float32",
        choices=("auto", "float32", "bfloat16", "float16"),
    )

    def validate(self) -> None:
        """Raise TetherError naming the first bad option."""
        if not self.merge or not self.out:
            raise TetherError("options --merge ADAPTER_DIR and --out DIR are both required")
        from .models import is_adapter_dir

        if not is_adapter_dir(self.merge):
            raise TetherError(
                f"--merge {self.merge}: not a PEFT adapter directory (no adapter_config.json, or it holds a full model)"
            )
        out = Path(self.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise TetherError(f"--out {out}: already exists and is not an empty directory; choose another")


def export_merged(adapter_dir: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Merge the adapter into its base and save model + tokenizer (+ the adapter's model card) to `out`."""
    from .models import adapter_base, load_merged_adapter, load_tokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    model = load_merged_adapter(adapter_dir, dtype)
    tokenizer = load_tokenizer(adapter_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    note = (
        f"Merged plain model: base `{adapter_base(adapter_dir)}` + LoRA adapter `{adapter_dir}` "
        "(written by `tether export --merge`).\n\n"
    )
    card = adapter_dir / "README.md"
    (tmp / "README.md").write_text(note + (card.read_text() if card.is_file() else ""))
    if out.exists():
        out.rmdir()  # empty, checked by validate
    os.replace(tmp, out)
    return out


def run_export(args) -> int:
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExportOptions) if hasattr(args, f.name)}
    opts = load_config(ExportOptions, None, overrides)
    print(f"merged model written to {export_merged(opts.merge, opts.out, opts.torch_dtype)}")
    return 0


def add_export_parser(subparsers) -> argparse.ArgumentParser:
    """Register `export` on an argparse subparsers object."""
    text = "merge a PEFT adapter (e.g. a LoRA run's final/) into its base model and write a plain Hugging Face model"
    p = subparsers.add_parser("export", help=text, description=text)
    add_dataclass_arguments(p, ExportOptions)
    p.set_defaults(func=run_export)
    return p
