"""Resolve a model name or local path to (model, tokenizer); LoRA through PEFT; built-in models.

tether never downloads: a model is a local Hugging Face directory or a built-in name that another package
registered (tether.registry; tether_lab registers the embedded world's models and SmolLM2). Anything that
looks like a hub id is refused with a message that says so.

Nothing a model directory holds runs as code: every `from_pretrained` of tether's passes `LOCAL_ONLY`
(trust_remote_code=False — a config with `auto_map` is refused, never imported — and local_files_only=True — no
hub traffic, set per call, so the caller's environment is left as it was).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .config import TetherError

LOCAL_ONLY = {"trust_remote_code": False, "local_files_only": True}


def builtin_models() -> dict[str, str]:
    """The built-in model names other packages registered (tether.registry, group "models"): NAME -> the
    "module:function" that builds (once, into the cache) or finds that model's directory."""
    from .registry import names

    return names("models")


def builtin_model_dir(name: str) -> Path:
    """Build or find the directory of the built-in model `name` (a key of builtin_models())."""
    from .registry import load

    return Path(load("models", name)())


DTYPES = ("auto", "float32", "bfloat16", "float16")


def is_adapter_dir(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter directory (adapter_config.json, no config.json), e.g. a LoRA run's final/."""
    path = Path(path)
    return (path / "adapter_config.json").is_file() and not (path / "config.json").is_file()


def adapter_base(adapter_dir: Path) -> Path:
    """The base model directory an adapter was trained on (adapter_config.json's base_model_name_or_path)."""
    import json

    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        raise TetherError(f"{adapter_dir}: adapter_config.json is unreadable (not a JSON object)") from None
    base = (config.get("base_model_name_or_path") if isinstance(config, dict) else None) or ""
    if not isinstance(base, str):
        raise TetherError(f"{adapter_dir}: adapter_config.json's base_model_name_or_path is not a path")
    if not base:
        raise TetherError(f"{adapter_dir}: adapter_config.json names no base model (base_model_name_or_path)")
    try:
        return resolve_model_path(base)
    except TetherError as e:
        raise TetherError(f"{adapter_dir}: its base model cannot be found ({e})") from None


def resolve_model_path(name: str | os.PathLike) -> Path:
    """A local model (or PEFT adapter) directory for `name`, or a one-line TetherError explaining what to pass."""
    text = str(name)
    if text in builtin_models():
        return builtin_model_dir(text)
    path = Path(text).expanduser()
    if path.is_dir():
        if is_adapter_dir(path):
            return path
        if not (path / "config.json").is_file():
            raise TetherError(
                f"{path}: not a Hugging Face model directory (no config.json) nor a PEFT adapter (no "
                "adapter_config.json); pass a directory written by save_pretrained"
            )
        return path
    if path.exists():
        raise TetherError(f"{path}: is a file; pass the model's directory (the one holding config.json)")
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if looks_like_hub_id:
        raise TetherError(
            f"model '{text}' is not a local directory; tether never downloads models — download it yourself "
            f"(e.g. with huggingface-cli) and pass the local directory"
        )
    known = ", ".join(sorted(builtin_models())) or "none registered"
    raise TetherError(f"model '{text}': no such directory and not a built-in model (built-ins: {known})")


def load_tokenizer(name: str | os.PathLike):
    path = resolve_model_path(name)
    if is_adapter_dir(path) and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        path = adapter_base(path)  # an adapter saved without its tokenizer uses the base model's
    try:
        tok = AutoTokenizer.from_pretrained(path, **LOCAL_ONLY)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear line
        raise TetherError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return pad_token_set(tok)


def pad_token_set(tokenizer):
    """`tokenizer` with a padding token (its end-of-sequence token when it has none, as TRL does)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise TetherError(f"{type(tokenizer).__name__}: the tokenizer has neither a pad nor an eos token; set one")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str | torch.dtype) -> torch.dtype | str:
    """A `torch_dtype` option value ("auto", "float32", "bfloat16", "float16") as from_pretrained takes it."""
    if isinstance(name, torch.dtype) or name == "auto":
        return name
    if name not in DTYPES:
        raise TetherError(f"torch_dtype '{name}': choose one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_model(
    name: str | os.PathLike, dtype: str | torch.dtype = torch.float32, empty: bool = False
) -> PreTrainedModel:
    """The model `name` with weights in `dtype` ("auto" = the dtype stored in its config.json).

    A PEFT adapter directory is loaded onto its base model (adapter_config.json's base_model_name_or_path)
    and merged into it: the result is a plain model equal to base + adapter. `empty`: the same model with its
    weights left empty (`empty_model`), nothing read."""
    path = resolve_model_path(name)
    if empty:
        return empty_model(path, dtype)
    if is_adapter_dir(path):
        return load_merged_adapter(path, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(  # absolute path: an adapter records it
            path.resolve(), dtype=torch_dtype(dtype), **LOCAL_ONLY
        )
    except Exception as e:  # noqa: BLE001
        raise TetherError(f"{path}: cannot load the model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model


def empty_model(path: Path, dtype: str | torch.dtype = torch.float32) -> PreTrainedModel:
    """The model of directory `path` (a model or an adapter, as `load_model` takes it) built from its config with
    empty weights (on the meta device: no memory, nothing read) and real buffers (rotary tables), with its
    generation config: what every process but the first holds under FSDP2 memory-efficient loading until the
    first process's weights are broadcast into its shards (`engine.shard_model`)."""
    from accelerate import init_empty_weights
    from transformers import GenerationConfig

    source = adapter_base(path) if is_adapter_dir(path) else path
    try:
        config = AutoConfig.from_pretrained(source, **LOCAL_ONLY)
        target = torch_dtype(dtype)
        if target == "auto":
            target = getattr(config, "dtype", None) or torch.float32
            target = getattr(torch, target) if isinstance(target, str) else target
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=target)
        if (source / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(source, **LOCAL_ONLY)
    except Exception as e:  # noqa: BLE001
        raise TetherError(f"{path}: cannot build the model ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    model.config.name_or_path = model.name_or_path = str(path.resolve())  # as from_pretrained records it
    return model.eval()  # from_pretrained's mode


def load_adapter(adapter_dir: Path, dtype: str | torch.dtype = torch.float32):
    """The PEFT model of an adapter directory on its base model (loaded in `dtype`), not merged: with the
    adapter disabled it is the base."""
    from peft import PeftModel

    base_dir = adapter_base(adapter_dir)
    base = load_model(base_dir, dtype)
    try:
        return PeftModel.from_pretrained(base, adapter_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise TetherError(
            f"{adapter_dir}: cannot apply the adapter to {base_dir} ({type(e).__name__}: {str(e).splitlines()[0]})"
        ) from None


def load_merged_adapter(adapter_dir: Path, dtype: str | torch.dtype = torch.float32) -> PreTrainedModel:
    """base + adapter merged into one plain model. The merge runs in float32 (base weights upcast when stored
    lower), then the merged weights are cast to `dtype` ("auto" = the base model's stored dtype)."""
    base_dir = adapter_base(adapter_dir)
    merged = load_adapter(adapter_dir, torch.float32).merge_and_unload()
    target = torch_dtype(dtype)
    if target == "auto":
        target = getattr(AutoConfig.from_pretrained(base_dir, **LOCAL_ONLY), "dtype", None) or torch.float32
        target = getattr(torch, target) if isinstance(target, str) else target
    merged.config.name_or_path = merged.name_or_path = str(
        adapter_dir.resolve()
    )  # a new adapter records this as its base
    return merged.requires_grad_(True).to(target)  # PEFT froze the base; a loaded model is trainable like any other


def load_4bit(name: str | os.PathLike, dtype: str | torch.dtype = torch.float32, quant_type: str = "nf4", device="cpu"):
    """QLoRA's base: the model `name` on `device` with the weights of its linear layers (all but the output head)
    quantized to 4 bits by bitsandbytes (`quant_type` nf4 or fp4), computing in `dtype` ("auto" = as stored), and
    PEFT's k-bit preparation applied (the other weights in float32, frozen), ready for a LoRA adapter. Needs
    bitsandbytes (on a CPU: its CPU backend, for layers whose input width is a multiple of 64)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise TetherError("option 'load_in_4bit': bitsandbytes is not installed (pip install bitsandbytes)")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    path = resolve_model_path(name)
    if is_adapter_dir(path):
        raise TetherError(f"{path}: load_in_4bit needs a model directory; merge the adapter first (tether export)")
    compute = torch_dtype(dtype)
    if compute == "auto":
        compute = getattr(AutoConfig.from_pretrained(path, **LOCAL_ONLY), "dtype", None) or torch.float32
        compute = getattr(torch, compute) if isinstance(compute, str) else compute
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.resolve(), quantization_config=quant, device_map={"": str(device)}, dtype=compute, **LOCAL_ONLY
        )
    except Exception as e:  # noqa: BLE001
        raise TetherError(f"{path}: cannot load in 4 bits ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def add_lora(
    model: PreTrainedModel,
    r: int,
    alpha: int,
    dropout: float,
    target_modules: list[str] | None,
    seed: int = 0,
    use_dora: bool = False,
):
    """Wrap `model` in a fresh PEFT LoRA adapter (B = 0 at init, so the policy starts equal to the base); with
    `use_dora` a DoRA adapter (its magnitudes start at the base weights' column norms: again equal to the base)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules or "all-linear",
        task_type="CAUSAL_LM",
        use_dora=use_dora,
    )
    try:
        # autocast_adapter_dtype: on a bfloat16/float16 base the adapter weights are kept in float32
        return get_peft_model(model, cfg, autocast_adapter_dtype=True)
    except ValueError as e:
        raise TetherError(f"lora_target_modules {target_modules}: {str(e).splitlines()[0]}") from None


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them (non-reentrant
    checkpointing, so a frozen base under a LoRA adapter needs no input-grad hook)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(inner, "supports_gradient_checkpointing", False):
        raise TetherError(f"gradient_checkpointing: {type(inner).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(inner, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every dropout probability to 0 so the policy at step 0 equals the reference exactly."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    cfg = getattr(model, "config", None)
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, attr, None), float):
            setattr(cfg, attr, 0.0)


@contextlib.contextmanager
def eval_mode(model, adapter_off: bool = False):
    """`model` in eval mode (no dropout) without gradients, with its PEFT adapters disabled when `adapter_off`
    (no-op for a plain model); its training mode is restored afterwards, and a sharded model is back to its shards
    (`reshard`)."""
    off = model.disable_adapter() if adapter_off and hasattr(model, "disable_adapter") else contextlib.nullcontext()
    was_training = model.training
    model.eval()
    try:
        with off, torch.no_grad():
            yield model
    finally:
        model.train(was_training)
        reshard(model)


def is_sharded(params) -> bool:
    """Whether any of these parameters is a shard of a tensor spread over processes (an FSDP2 DTensor)."""
    return any(hasattr(p, "full_tensor") for p in params)


def forward_is_collective(model) -> bool:
    """Whether a forward call of `model` is a collective (its weights are sharded over several processes, FSDP2):
    then every process must make the same forward calls — the same number of batches and decoding steps."""
    dist = torch.distributed
    return (
        is_sharded(model.parameters()) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    )


def on_meta(model) -> bool:
    """Whether `model`'s weights are still empty (on the meta device): under FSDP2 memory-efficient loading every
    process but the first builds the model so, and receives its shards when the model is sharded."""
    return any(p.is_meta for p in model.parameters())


def to_device(model, device):
    """`model` on `device`; a model with empty (meta) weights stays as it is (sharding places its shards)."""
    return model if on_meta(model) else model.to(device)


def share_of(items: list, rank: int, processes: int, even: bool) -> tuple[list, int]:
    """Process `rank`'s round-robin share of `items` (the same list on every process) and how many of its entries
    are real. `even` (every forward is a collective: `forward_is_collective`): shares are padded to equal length
    with items[0], whose results the caller drops, so every process makes the same number of calls."""
    mine = items[rank::processes]
    real = len(mine)
    if even and items:
        mine += [items[0]] * (-(-len(items) // processes) - real)
    return mine, real


def any_process(flag: bool, device) -> bool:
    """True on every process when `flag` is true on at least one (a collective)."""
    t = torch.tensor([int(flag)], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def reshard(model) -> None:
    """Put `model`'s FSDP2 units back to their shards (no communication). A unit that does not reshard after its
    forward (accelerate's embedding/output tail) leaves whole tensors as its parameters after a forward without
    backward (generation, scoring): a parameter-wise copy, EMA step or checkpoint must see the shards. No-op
    for a model that is not sharded."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
