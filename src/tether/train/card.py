"""What a run directory says about itself: the software versions it ran with, content fingerprints of its
data files, and the model card written to final/README.md."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path

from ..config import TetherError
from ..data import split_source
from ..files import read_json_lines

PACKAGES = ("tether", "torch", "transformers", "peft", "accelerate", "datasets")


def versions() -> dict[str, str]:
    """Installed versions of tether and the libraries a result depends on (and Python's)."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a data file's bytes (of every file, in sorted order, for a `datasets` directory); a `PATH:SPLIT`
    source is fingerprinted by its PATH."""
    path, _ = split_source(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".npz")
WHOLE_FILE_LIMIT = 16 << 20  # other files up to this size are hashed whole (configs, tokenizers, templates)
SAMPLES, SAMPLE_BYTES = 16, 4096


def model_fingerprint(path: str | Path) -> str:
    """A cheap fingerprint of a model (or adapter) directory, in O(files) reads however large the weights: every
    file's relative name and size; for a weight file its safetensors header (names, dtypes, shapes, offsets) and
    16 blocks of 4 KiB spread evenly over it; any other file of at most 16 MiB whole. Hidden entries (.git,
    .cache) are left out. Retrained or swapped weights change it; a change confined to bytes between the sampled
    blocks of one weight file can go unseen."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(root).as_posix()}\0{size}\0".encode())
        with f.open("rb") as fh:
            if not f.name.endswith(WEIGHT_SUFFIXES) and size <= WHOLE_FILE_LIMIT:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
                continue
            if f.suffix == ".safetensors" and size >= 8:
                header = int.from_bytes(fh.read(8), "little")
                h.update(fh.read(min(header, 100 << 20)))
            for i in range(SAMPLES):
                fh.seek(max(0, (size - SAMPLE_BYTES) * i // (SAMPLES - 1)))
                h.update(fh.read(SAMPLE_BYTES))
    return "cheap-sha256:" + h.hexdigest()


def data_files(**files: str | None) -> dict[str, dict]:
    """role -> {path, fingerprint} for each data file given (None skipped)."""
    return {role: {"path": str(p), "fingerprint": file_fingerprint(p)} for role, p in files.items() if p}


def _last_metrics(run_dir: Path) -> dict:
    rows = read_json_lines(run_dir / "metrics.jsonl")
    return rows[-1] if rows else {}


HYPER = (
    "loss",
    "beta",
    "label_smoothing",
    "nll_weight",
    "method",
    "anchor_weight",
    "anchor_form",
    "anchor_normalize",
    "reference",
    "steps",
    "phases",
    "prompts_per_step",
    "ensemble_size",
    "ensemble_merge",
    "learning_rate",
    "lr_scheduler",
    "warmup_steps",
    "max_steps",
    "num_epochs",
    "batch_size",
    "gradient_accumulation_steps",
    "max_length",
    "max_prompt_length",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_target_modules",
    "torch_dtype",
    "gradient_checkpointing",
    "seed",
)


def model_card(cfg, kind: str, run_dir: Path, results: dict) -> str:
    """final/README.md: what the model is, how it was trained, on what, with which result and software."""
    from ..models import is_adapter_dir, resolve_model_path

    lora = getattr(cfg, "lora", False)
    try:
        base_dir = resolve_model_path(cfg.model)
    except TetherError:
        base_dir = cfg.model
    base_note = " (itself a PEFT adapter, merged into its base before training)" if is_adapter_dir(base_dir) else ""
    meta = {
        "library_name": "peft" if lora else "transformers",
        "base_model": str(base_dir),
        "tags": ["tether", kind, cfg.loss],
    }
    lines = [
        "---",
        *(f"{k}: {json.dumps(v)}" for k, v in meta.items()),
        "---",
        "",
        f"# {Path(run_dir).name}: {kind} preference optimization with tether",
        "",
    ]
    if lora:
        usage = (
            "A PEFT LoRA adapter. Load it with `peft.AutoPeftModelForCausalLM.from_pretrained(this_dir)`, give this "
            "directory to tether as `--model`, or write a merged plain model with "
            "`tether export --merge this_dir --out DIR`."
        )
    else:
        usage = "A full Hugging Face model: `transformers.AutoModelForCausalLM.from_pretrained(this_dir)`."
    shown = f"`{cfg.model}`" if str(cfg.model) == str(base_dir) else f"`{cfg.model}` → `{base_dir}`"
    lines += [usage, "", f"- base model: {shown}{base_note}"]
    method = cfg.method
    if kind == "online":
        method = f"online DAP, reference = {results.get('reference')}"
        if cfg.method == "bapo":
            method += " + BAPO anchor"
    lines += [f"- method: {method}; loss: {cfg.loss}"]
    if kind != "online" and results.get("reference"):
        lines += [f"- reference: {results['reference']}"]
    lines += ["", "## Hyper-parameters", "", "| option | value |", "|---|---|"]
    anchored = cfg.method == "bapo"
    lines += [
        f"| {k} | {getattr(cfg, k)} |" for k in HYPER if hasattr(cfg, k) and (anchored or not k.startswith("anchor_"))
    ]
    lines += ["", "## Data", "", "| role | file | content fingerprint |", "|---|---|---|"]
    for role, info in results.get("data_files", {}).items():
        lines.append(f"| {role} | `{info['path']}` | `{info['fingerprint']}` |")
    counts = {
        k: results[k]
        for k in ("train_pairs", "eval_pairs", "annotations", "identical_pairs", "ties", "oracle_failures")
        if k in results
    }
    lines += ["", "Counts: " + ", ".join(f"{k} = {v}" for k, v in counts.items()) if counts else ""]
    last = _last_metrics(Path(run_dir))
    final_eval = results.get("final_eval") or {}
    lines += [
        "",
        "## Final metrics",
        "",
        "Training metrics of the last logged step (`metrics.jsonl`), then held-out metrics after training.",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    for k, v in {**{k: v for k, v in last.items() if isinstance(v, (int, float))}, **final_eval}.items():
        lines.append(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |")
    setup = results.get("distributed", {})
    lines += ["", "## Software and set-up", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in {**results.get("versions", {}), **setup}.items()]
    lines += [
        "",
        "Everything else: `config.yaml` (every option), `metrics.jsonl` and `results.json` in the run directory.",
        "",
    ]
    return "\n".join(lines)
