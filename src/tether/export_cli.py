"""`tether export --merge ADAPTER_DIR --out DIR`: write base + PEFT adapter as one plain Hugging Face model.

Like a run, it writes only what it creates: `--out` must be new or an empty directory (not a symbolic link);
the model is written into a new temp directory beside it that this command created, and renamed to `--out`
when complete. A failure removes that temp directory and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
from pathlib import Path

from .config import TetherError, add_dataclass_arguments, load_config, option
from .files import new_private_dir, share_like_umask


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
        check_new_output_dir(Path(self.out))


def check_new_output_dir(out: Path) -> None:
    """`out` may become a directory tether writes: it does not exist, or is an empty directory, not a link."""
    if out.is_symlink():
        raise TetherError(f"--out {out}: is a symbolic link; give the path of a new directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TetherError(f"--out {out}: already exists and is not an empty directory; choose another")


def export_merged(adapter_dir: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    """Merge the adapter into its base and save model + tokenizer (+ the adapter's model card) to `out`."""
    from .models import adapter_base, load_merged_adapter, load_tokenizer

    adapter_dir, out = Path(adapter_dir), Path(out)
    model = load_merged_adapter(adapter_dir, dtype)
    tokenizer = load_tokenizer(adapter_dir)
    check_new_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_private_dir(out.parent, f".{out.name}.tmp-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        note = (
            f"Merged plain model: base `{adapter_base(adapter_dir)}` + LoRA adapter `{adapter_dir}` "
            "(written by `tether export --merge`).\n\n"
        )
        card = adapter_dir / "README.md"
        (tmp / "README.md").write_text(note + (card.read_text(encoding="utf-8") if card.is_file() else ""))
        share_like_umask(tmp)  # safetensors writes its weight files 0600
        check_new_output_dir(out)  # still new or empty (checked again: the merge took a while)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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
