"""TRL `DPOConfig` / `trl dpo` option names, read as tether options where the meaning agrees.

A TRL YAML (or `--flag` on the command line) may use TRL's names: each entry of `TRL_KEYS` turns one TRL key
and its value into tether options (`{}` = accepted, no effect on the result). A key whose value has no
tether meaning raises `Unsupported` with the reason. Keys that tether spells like TRL (beta, learning_rate,
max_steps, ...) need no entry: they are tether options already. docs/trl.md is the table.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from typing import Any

from .loss_table import NAMES, TRL_LOSS_TYPES


class Unsupported(ValueError):
    """A TRL key or value tether cannot honour; the message says why and what to use instead."""


def _to(name: str) -> Callable[[Any], dict]:
    return lambda value: {name: value}


def _one_of(key: str, value: Any, allowed: dict[Any, dict], reason: str) -> dict:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        value = value.lower()
    if not isinstance(value, (list, dict)) and value in allowed:
        return allowed[value]
    raise Unsupported(f"{key}: {value!r} is not supported ({reason})")


def _loss_type(value: Any) -> dict:
    """TRL's loss_type (one name or a list, combined with loss_weights) as tether's loss (a mixture a+b+c)."""
    names = value if isinstance(value, list) else [value]
    unknown = [n for n in names if not isinstance(n, str) or n.lower() not in TRL_LOSS_TYPES]
    if unknown or not names:
        others = [n for n in unknown if isinstance(n, str) and n.lower() in NAMES]
        hint = f"; {', '.join(others)}: not a DPOTrainer loss_type, write loss: {others[0]}" if others else ""
        raise Unsupported(
            f"loss_type: {value!r} is not supported (TRL 1.16's DPOTrainer loss types are "
            f"{', '.join(TRL_LOSS_TYPES)}{hint})"
        )
    return {"loss": "+".join(TRL_LOSS_TYPES[n.lower()] for n in names)}


def _loss_weights(value: Any) -> dict:
    if value is None:
        return {}
    if isinstance(value, list):
        return {"loss_weights": value}
    raise Unsupported(f"loss_weights: {value!r} is not supported (a list of weights, one per loss_type)")


def cross_key_problems(data: dict[str, Any]) -> list[str]:
    """TRL keys whose meaning depends on another key: TRL 1.16's sigmoid ignores label_smoothing (its robust,
    exo_pair and aot losses read it), while tether's dpo applies it as conservative DPO."""
    types = data.get("loss_type", [])
    types = types if isinstance(types, list) else [types]
    if "sigmoid" in [t.lower() for t in types if isinstance(t, str)] and data.get("label_smoothing"):
        return [
            "label_smoothing with loss_type sigmoid: TRL 1.16 ignores it there, tether's dpo would apply it "
            "(conservative DPO); drop label_smoothing, or write loss: dpo to mean conservative DPO"
        ]
    return []


def _scheduler(value: Any) -> dict:
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
    return _one_of(
        "lr_scheduler_type",
        value,
        {k: {"lr_scheduler": v} for k, v in names.items()},
        "use linear, cosine, constant or constant_with_warmup",
    )


def _eval_strategy(value: Any) -> dict:
    return _one_of(
        "eval_strategy",
        value,
        {"no": {"eval_steps": 0}, "steps": {}},
        "use steps with eval_steps, or no; tether also evaluates before and after training",
    )


def _save_strategy(value: Any) -> dict:
    return _one_of("save_strategy", value, {"no": {"save_steps": 0}, "steps": {}}, "use steps with save_steps, or no")


def _bf16(value: Any) -> dict:
    return {"mixed_precision": "bf16" if value else "no"}


def _fp16(value: Any) -> dict:
    if value:
        raise Unsupported("fp16: true is not supported (use bf16: true on a GPU)")
    return {}


def _rpo_alpha(value: Any) -> dict:
    return {"nll_weight": 0.0 if value is None else value}


def _must_be(key: str, ok: Any, reason: str) -> Callable[[Any], dict]:
    """A TRL key tether accepts only at one value (the one matching tether's behaviour)."""

    def check(value: Any) -> dict:
        if value in (ok if isinstance(ok, tuple) else (ok,)):
            return {}
        raise Unsupported(f"{key}: {value!r} is not supported ({reason})")

    return check


def _num_processes(value: Any) -> dict:
    """`trl dpo` starts the processes itself; tether runs inside `accelerate launch`, so the number must match."""
    running = int(os.environ.get("WORLD_SIZE", "1"))
    if value == running:
        return {}
    raise Unsupported(
        f"num_processes: {value!r} is a launcher setting; start tether with `accelerate launch "
        f"--num_processes {value} -m tether.cli train ...` (this run has {running})"
    )


def _launcher(key: str) -> Callable[[Any], dict]:
    def refuse(value: Any) -> dict:
        raise Unsupported(f"{key}: a launcher setting; pass it to `accelerate launch` (e.g. --config_file) instead")

    return refuse


def _ignored(value: Any) -> dict:
    return {}


TRL_KEYS: dict[str, Callable[[Any], dict]] = {
    # renamed: the same meaning under another name
    "model_name_or_path": _to("model"),
    "dataset_name": _to("train_file"),
    "dataset_train_split": _to("train_split"),
    "dataset_test_split": _to("eval_split"),
    "per_device_train_batch_size": _to("batch_size"),
    "per_device_eval_batch_size": _to("eval_batch_size"),
    "precompute_ref_batch_size": _to("eval_batch_size"),
    "num_train_epochs": _to("num_epochs"),
    "use_peft": _to("lora"),
    "use_dora": _to("use_dora"),
    "load_in_4bit": _to("load_in_4bit"),
    "bnb_4bit_quant_type": _to("bnb_4bit_quant_type"),
    "precompute_ref_log_probs": _to("precompute_ref_logps"),
    "lr_scheduler_type": _scheduler,
    "loss_type": _loss_type,
    "loss_weights": _loss_weights,
    "rpo_alpha": _rpo_alpha,
    "eval_strategy": _eval_strategy,
    "evaluation_strategy": _eval_strategy,
    "save_strategy": _save_strategy,
    "bf16": _bf16,
    "fp16": _fp16,
    "num_processes": _num_processes,
    "accelerate_config": _launcher("accelerate_config"),
    # accepted at the value that matches what tether does
    "truncation_mode": _must_be(
        "truncation_mode",
        "keep_start",
        "tether keeps the start: prompts are cut from the left to max_prompt_length, then completions from the right",
    ),
    "reference_free": _must_be(
        "reference_free",
        False,
        "write the loss instead: cpo with cpo_alpha: 0 is sigmoid without a reference; simpo and orpo need none",
    ),
    "sync_ref_model": _must_be(
        "sync_ref_model",
        False,
        "TR-DPO's reference sync is not implemented; for a moving reference see `tether online --reference ema`",
    ),
    "f_divergence_type": _must_be("f_divergence_type", "reverse_kl", "only the reverse KL of standard DPO"),
    "use_weighting": _must_be("use_weighting", False, "WPO weighting is not implemented"),
    "ld_alpha": _must_be("ld_alpha", None, "LD-DPO is not implemented"),
    "padding_free": _must_be("padding_free", False, "tether pads; it needs no flash attention"),
    "use_rslora": _must_be("use_rslora", False, "rank-stabilized LoRA is not implemented"),
    "load_in_8bit": _must_be("load_in_8bit", False, "quantized training is not implemented"),
    "push_to_hub": _must_be("push_to_hub", False, "tether never uploads; the final model is in output_dir/final"),
    "trust_remote_code": _must_be("trust_remote_code", False, "tether loads only models transformers knows"),
    "optim": _must_be("optim", ("adamw_torch", "adamw_torch_fused"), "tether's optimizer is torch's AdamW"),
    "lora_task_type": _must_be("lora_task_type", "CAUSAL_LM", "tether trains causal language models"),
    "logging_strategy": _must_be("logging_strategy", "steps", "tether logs every logging_steps steps"),
    "max_completion_length": _must_be(
        "max_completion_length", None, "use max_length (prompt + completion) and max_prompt_length"
    ),
    "model_revision": _must_be("model_revision", "main", "tether loads local directories, which have no revisions"),
    # accepted, no effect on the result: tether has no such setting or always does what it asks
    **dict.fromkeys(
        (
            "remove_unused_columns",
            "dataset_num_proc",
            "dataloader_num_workers",
            "dataloader_pin_memory",
            "logging_dir",
            "logging_first_step",
            "run_name",
            "overwrite_output_dir",
            "do_train",
            "do_eval",
            "gradient_checkpointing",
            "gradient_checkpointing_kwargs",
            "ddp_find_unused_parameters",
            "attn_implementation",
            "label_pad_token_id",
            "padding_value",
            "max_target_length",
            "pad_to_multiple_of",
            "use_logits_to_keep",
            "generate_during_eval",
            "dataset_streaming",
            "tf32",
            "use_liger_kernel",
            "hub_model_id",
            "dtype",
            "torch_dtype",
            "ignore_bias_buffers",
            "activation_offloading",
            "disable_tqdm",
            "log_level",
            "logging_nan_inf_filter",
            "model_init_kwargs",
            "ref_model_init_kwargs",
        ),
        _ignored,
    ),
}
# gradient_checkpointing and dtype change memory and precision, not the objective (tether computes in float32)
IGNORED = sorted(k for k, f in TRL_KEYS.items() if f is _ignored)


def translate(
    data: dict[str, Any], names: set[str], coerce: Callable[[str, Any], Any], dash: str = ""
) -> tuple[dict, list[str], list[str]]:
    """Turn a mapping of option names (tether's or TRL's) into tether options.

    Returns (values, problems, ignored): `problems` holds one phrase per unknown or unsupported key (all of
    them, each unknown one with its nearest known name), `ignored` the TRL keys accepted without effect.
    `coerce(name, value)` checks a tether value's type (it raises on a wrong one); `dash` ("--" for flags)
    prefixes the names in messages."""
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    problems, unknown, ignored = [], [], []
    for key, value in data.items():
        if key in names:
            out = {key: value}
        elif key in TRL_KEYS:
            try:
                out = TRL_KEYS[key](value)
            except Unsupported as e:
                problems.append(dash + str(e))
                continue
            if not out:
                ignored.append(key)
        else:
            unknown.append(key)
            continue
        for name, v in out.items():
            if name not in names:  # a TRL key this command has no use for (e.g. dataset_name in `tether online`)
                unknown.append(key)
                break
            if name in values and values[name] != v and origin[name] != key:
                problems.append(
                    f"'{dash}{key}' and '{dash}{origin[name]}' both set '{name}' to different values; keep one"
                )
                continue
            values[name], origin[name] = coerce(name, v), key
    # TRL evaluates on dataset_test_split of dataset_name when eval_strategy is not "no"
    strategy = data.get("eval_strategy", data.get("evaluation_strategy", "no"))
    if "dataset_name" in data and str(strategy).lower() != "no" and "eval_file" in names and "eval_file" not in values:
        values["eval_file"] = coerce("eval_file", data["dataset_name"])
        values.setdefault("eval_split", coerce("eval_split", data.get("dataset_test_split", "test")))
    problems += [dash + p for p in cross_key_problems(data)]
    for key in unknown:
        problems.append(f"unknown option '{dash}{key}'" + did_you_mean(key, names | set(TRL_KEYS), dash))
    return values, problems, ignored


def did_you_mean(key: str, known, dash: str = "") -> str:
    """ " (did you mean 'x'?)" for the nearest known name (written with `dash` in front), or "" when none is close."""
    close = difflib.get_close_matches(key.lstrip("-"), sorted(k.lstrip("-") for k in known), n=1, cutoff=0.6)
    return f" (did you mean '{dash}{close[0]}'?)" if close else ""
