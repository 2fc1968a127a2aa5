"""Resolve a model name or local path to (model, tokenizer); LoRA through PEFT; built-in models.

tether never downloads: a model is a local Hugging Face directory or a built-in name registered here
(for example the embedded world's base model). Anything that looks like a hub id is refused with a
message that says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: no hub traffic from anything tether loads
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel  # noqa: E402

from .config import TetherError  # noqa: E402

# name -> function returning a local directory (building or unpacking it on first use)
BUILTIN_MODELS: dict[str, Callable[[], Path]] = {}


def register_builtin(name: str, resolver: Callable[[], Path]) -> None:
    BUILTIN_MODELS[name] = resolver


def cache_dir() -> Path:
    """tether's cache directory: $TETHER_CACHE, else ~/.cache/tether."""
    root = os.environ.get("TETHER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tether")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local model directory for `name`, or a one-line TetherError explaining what to pass instead."""
    text = str(name)
    if text in BUILTIN_MODELS:
        return Path(BUILTIN_MODELS[text]())
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise TetherError(f"{path}: not a Hugging Face model directory (no config.json); pass a directory written by save_pretrained")
        return path
    if path.exists():
        raise TetherError(f"{path}: is a file; pass the model's directory (the one holding config.json)")
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise TetherError(
            f"model '{text}' is not a local directory; tether never downloads models — download it yourself "
            f"(e.g. with huggingface-cli) and pass the local directory"
        )
    known = ", ".join(sorted(BUILTIN_MODELS)) or "none registered"
    raise TetherError(f"model '{text}': no such directory and not a built-in model (built-ins: {known})")


def load_tokenizer(name: str | os.PathLike):
    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        raise TetherError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str | os.PathLike, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise TetherError(f"{path}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model


def add_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float, target_modules: list[str] | None, seed: int = 0):
    """Wrap `model` in a fresh PEFT LoRA adapter (B = 0 at init, so the policy starts equal to the base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or "all-linear",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, cfg)
    except ValueError as e:
        raise TetherError(f"lora_target_modules {target_modules}: {str(e).splitlines()[0]}") from None


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 so the policy at step 0 equals the reference exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, attr, None), float):
            setattr(cfg, attr, 0.0)


def _smollm2() -> Path:
    from .smollm2 import model_dir  # imported on first use only (it needs the optional smollm2 extra)

    return model_dir()


def _world() -> Path:
    from .world.build import ensure_base_model  # the embedded world's base model, built on first use

    return ensure_base_model()


def _world_sft() -> Path:
    from .world.online import ensure_sft_model  # the world's starting policy for online training

    return ensure_sft_model()


register_builtin("smollm2-135m-instruct", _smollm2)
register_builtin("world", _world)
register_builtin("world-sft", _world_sft)
