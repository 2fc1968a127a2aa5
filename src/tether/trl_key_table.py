"""The table of TRL's option names (`trl dpo`: ScriptArguments, DPOConfig, ModelConfig; `OnlineDPOConfig` for
`tether online`): what tether does with each. `tether.trl_keys` reads configs through it.

Every field of TRL 1.16's configs has one entry here (tests/test_trl_keys.py fails on a field without one, from
the committed field list tests/data/trl_1_16_fields.json, itself checked against an installed TRL 1.16), and so
do the keys that older TRL versions had. An entry says what tether does with the key, as one of the `KINDS`:

- **same**: a tether option of the same name and meaning;
- **renamed**: the same meaning under tether's name (its value may be translated);
- **only**: accepted at the values that match what tether does, refused at any other with the reason;
- **ignored**: accepted; it changes nothing tether computes or writes (or only what TRL itself would not use);
- **not applied**: accepted with a warning: a speed or memory setting tether does not apply (the result is the
  same, the cost may differ);
- **refused**: tether cannot honour it at any value but its off value (the reason says what to use);
- **launcher**: a setting of `trl dpo`'s launcher: pass it to `accelerate launch`.

docs/trl.md's key table is generated from here (`tether.trl_keys.keys_markdown`; tests/test_trl_keys.py keeps it
current).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .loss_table import NAMES, TRL_LOSS_TYPES

KINDS = ("same", "renamed", "only", "ignored", "not applied", "refused", "launcher")
# TRL 1.16's DPOTrainer reads label_smoothing in these loss types only (trl/trainer/dpo_trainer.py, _compute_loss:
# sigmoid ignores it); tests/test_trl_losses.py checks this against TRL itself
TRL_SMOOTHED_LOSS_TYPES = ("exo_pair", "robust", "aot", "aot_unpaired")


class Unsupported(ValueError):
    """A TRL key or value tether cannot honour; the message says why and what to use instead."""


@dataclass(frozen=True)
class Key:
    """What tether does with one TRL key: `handler(key, value)` returns tether options ({} = none) or raises
    Unsupported; `note` is the reason or the difference; `removed`: a key of older TRL versions that TRL 1.16 no
    longer has."""

    kind: str
    handler: Callable[[str, Any], dict]
    note: str = ""
    removed: bool = False
    shown: str = ""  # the tether option(s) it sets, for the docs table

    def __post_init__(self):
        assert self.kind in KINDS, self.kind


def same(note: str = "", removed: bool = False) -> Key:
    return Key("same", lambda key, value: {key: value}, note, removed)


def to(name: str, note: str = "", removed: bool = False, convert: Callable[[Any], Any] | None = None) -> Key:
    return Key("renamed", lambda key, value: {name: convert(value) if convert else value}, note, removed, name)


def only(allowed: tuple, note: str, removed: bool = False, sets: dict | None = None) -> Key:
    """Accepted at the `allowed` values (strings compared case-blind, a one-item list as its item)."""

    def check(key: str, value: Any) -> dict:
        if _plain(value) in allowed:
            return dict(sets or {})
        raise Unsupported(f"{key}: {value!r} is not supported ({note})")

    return Key("only", check, f"only {', '.join(_show(v) for v in allowed)}: {note}", removed)


def refused(off: tuple, note: str, removed: bool = False) -> Key:
    key = only(off, note, removed)
    return Key("refused", key.handler, note, removed)


def ignored(note: str, removed: bool = False) -> Key:
    return Key("ignored", lambda key, value: {}, note, removed)


def not_applied(note: str) -> Key:
    return Key("not applied", lambda key, value: {}, note)


def _plain(value: Any) -> Any:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str):
        value = value.lower()
    return value if not isinstance(value, (list, dict)) else repr(value)


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def custom(kind: str, handler: Callable[[str, Any], dict], note: str, shown: str = "", removed: bool = False) -> Key:
    return Key(kind, handler, note, removed, shown)


# ----------------------------------------------------------------------------------- values that need translating


def _loss_type(key: str, value: Any) -> dict:
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


def _online_loss_type(key: str, value: Any) -> dict:
    if _plain(value) not in ("sigmoid", "ipo"):
        raise Unsupported(f"loss_type: {value!r} is not an OnlineDPOTrainer loss type (sigmoid or ipo); write loss:")
    return _loss_type(key, value)


def _loss_weights(key: str, value: Any) -> dict:
    if value is None or isinstance(value, list):
        return {"loss_weights": value}
    raise Unsupported(f"loss_weights: {value!r} is not supported (a list of weights, one per loss_type)")


def _scheduler(key: str, value: Any) -> dict:
    names = {"linear": "linear", "cosine": "cosine", "constant": "constant", "constant_with_warmup": "constant"}
    if _plain(value) in names:
        return {"lr_scheduler": names[_plain(value)]}
    raise Unsupported(f"{key}: {value!r} is not supported (use linear, cosine, constant or constant_with_warmup)")


def _strategy(option: str, reason: str) -> Callable[[str, Any], dict]:
    def translate(key: str, value: Any) -> dict:
        if _plain(value) == "no":
            return {option: 0}
        if _plain(value) == "steps":
            return {}
        raise Unsupported(f"{key}: {value!r} is not supported ({reason})")

    return translate


def _steps(option: str, ratio: str | None = None) -> Callable[[str, Any], dict]:
    """A TRL step count, which may also be a float: < 1 is a ratio of all steps (`ratio` names tether's option for
    it, else it is refused), a whole float is a count."""

    def translate(key: str, value: Any) -> dict:
        if isinstance(value, float) and 0 < value < 1:
            if ratio:
                return {ratio: value}
            raise Unsupported(f"{key}: {value} (a ratio of the total steps) is not supported; give a number of steps")
        if isinstance(value, float) and value.is_integer():
            return {option: int(value)}
        return {option: value}

    return translate


def _save_total_limit(key: str, value: Any) -> dict:
    return {"save_total_limit": 0 if value is None else value}  # TRL's null keeps all, as tether's 0


def _precision(key: str, value: Any) -> dict:
    if key == "fp16" and value:
        raise Unsupported("fp16: true is not supported (use bf16: true on a GPU)")
    if key == "bf16" and value is not None:
        return {"mixed_precision": "bf16" if value else "no"}
    return {}


def _max_length(key: str, value: Any) -> dict:
    if value is None:
        raise Unsupported(f"{key}: null (no truncation) is not supported; give the longest prompt + completion length")
    return {key: value}


def _model_init_kwargs(key: str, value: Any) -> dict:
    """from_pretrained's keyword arguments: the dtype is honoured, attention implementations change no result."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise Unsupported(f"{key}: {value!r} is not supported (a mapping of from_pretrained arguments)")
    dtypes = {value[k] for k in ("dtype", "torch_dtype") if k in value}
    others = sorted(set(value) - {"dtype", "torch_dtype", "attn_implementation"})
    if others or len(dtypes) > 1:
        raise Unsupported(
            f"{key}: {', '.join(others) or 'two dtypes'} not supported (tether honours dtype alone; "
            "attn_implementation is accepted without effect)"
        )
    return {"torch_dtype": dtypes.pop()} if dtypes else {}


def _online_beta(key: str, value: Any) -> dict:
    if isinstance(value, list):
        if len(value) != 1:
            raise Unsupported(f"beta: {value!r} (a β per epoch) is not supported; give one β")
        value = value[0]
    return {"beta": value}


def _reward_model(key: str, value: Any) -> dict:
    return {} if value is None else {"oracle": f"reward-model:{value}"}


def _num_processes(key: str, value: Any) -> dict:
    """`trl dpo` starts the processes itself; tether runs inside `accelerate launch`, so the number must match."""
    running = int(os.environ.get("WORLD_SIZE", "1"))
    if value == running:
        return {}
    raise Unsupported(
        f"num_processes: {value!r} is a launcher setting; start tether with `accelerate launch "
        f"--num_processes {value} -m tether.cli train ...` (this run has {running})"
    )


def _launcher(key: str, value: Any) -> dict:
    if value in (None, "", [], {}):
        return {}
    raise Unsupported(f"{key}: a launcher setting; pass it to `accelerate launch` (e.g. --config_file) instead")


def _checkpointing_kwargs(key: str, value: Any) -> dict:
    if value and set(value) - {"use_reentrant"}:
        raise Unsupported(f"{key}: {value!r} is not supported (tether checkpoints non-reentrant; no other argument)")
    return {}


NOT_APPLIED = "a speed or memory setting tether does not apply; the result is the same"
DATA_LOADING = "tether tokenizes and batches in the training process"
USED_WITH = "used only with {}, which tether refuses at any value but its default"
NO_UPLOAD = "tether never uploads; the final model is in output_dir/final"


def launcher(note: str) -> Key:
    return Key("launcher", _launcher, note)


# ----------------------------------------------------------------------------------- the table

_SCRIPT = {  # trl.ScriptArguments (and DatasetMixtureConfig) of `trl dpo`
    "dataset_name": to("train_file", "a local file or directory; with eval_strategy: steps also eval_file"),
    "dataset_config": refused((None,), "a local directory has no dataset configurations"),
    "dataset_train_split": to("train_split"),
    "dataset_test_split": to("eval_split"),
    "dataset_streaming": ignored("tether reads the data once; streaming or not, the same pairs are trained on"),
    "ignore_bias_buffers": ignored("tether's DDP broadcasts no buffers"),
    "datasets": refused((None, "[]"), "a mixture of datasets is not implemented; write one dataset_name"),
    "streaming": ignored("tether reads the data once; streaming or not, the same pairs are trained on"),
    "test_split_size": custom(
        "renamed",
        lambda key, value: {} if value is None else {"eval_fraction": value},
        "a fraction of the training data held out (an integer count is refused by eval_fraction's range)",
        "eval_fraction",
    ),
}
_MODEL = {  # trl.ModelConfig
    "model_name_or_path": to("model", "a local directory or a built-in name; tether never downloads"),
    "model_revision": only(("main",), "tether loads local directories, which have no revisions"),
    "dtype": to("torch_dtype", "the dtype the policy and reference are loaded in (auto, float32, bfloat16, float16)"),
    "attn_implementation": ignored("tether loads the model's default attention; the numbers agree to rounding"),
    "use_peft": to("lora"),
    "lora_r": same(),
    "lora_alpha": same(),
    "lora_dropout": same("TRL's default 0.05, tether's 0"),
    "lora_target_modules": same("all-linear included"),
    "lora_target_parameters": refused((None,), "adapting parameters (not modules) is not implemented"),
    "lora_modules_to_save": refused((None,), "training extra modules beside the adapter is not implemented"),
    "lora_task_type": only(("causal_lm",), "tether trains causal language models"),
    "use_rslora": refused((False,), "rank-stabilized LoRA is not implemented"),
    "use_dora": same("DoRA adapters (docs/large-models.md)"),
    "load_in_8bit": refused((False,), "quantized training is not implemented"),
    "load_in_4bit": same("QLoRA: a 4-bit base through bitsandbytes (docs/large-models.md)"),
    "bnb_4bit_quant_type": same(),
    "use_bnb_nested_quant": refused((False,), "nested (double) 4-bit quantization is not implemented"),
    "bnb_4bit_quant_storage": ignored("the storage dtype of packed 4-bit weights changes no number"),
}
_DPO = {  # the fields trl.DPOConfig adds to TrainingArguments
    "model_init_kwargs": custom("only", _model_init_kwargs, "dtype / torch_dtype become torch_dtype", "torch_dtype"),
    "trust_remote_code": refused((False,), "tether loads only models transformers knows"),
    "router_aux_loss_coef": refused(
        (None,), "tether adds no Mixture-of-Experts router loss (TRL adds the model's own by default on an MoE model)"
    ),
    "disable_dropout": same(),
    "dataset_num_proc": ignored(DATA_LOADING),
    "max_length": custom("same", _max_length, "prompt + completion; tether cuts prompts to max_prompt_length first"),
    "truncation_mode": only(("keep_start",), "prompts are cut from the left to max_prompt_length, then completions"),
    "padding_free": only(
        (False,), "tether online pads its batches; tether train has its own padding_free (same meaning, default true)"
    ),
    "pad_to_multiple_of": ignored("padding changes no log-prob"),
    "precompute_ref_log_probs": to("precompute_ref_logps", "TRL's default is false, tether's true; same numbers"),
    "precompute_ref_batch_size": custom(
        "renamed", lambda key, value: {} if value is None else {"eval_batch_size": value}, "", "eval_batch_size"
    ),
    "loss_type": custom("renamed", _loss_type, "a TRL name or a list (a mixture a+b+c); docs/losses.md", "loss"),
    "loss_weights": custom("same", _loss_weights, "the weights of a mixture, in order"),
    "ld_alpha": refused((None,), "LD-DPO is not implemented"),
    "f_divergence_type": only(("reverse_kl",), "only the reverse KL of standard DPO"),
    "f_alpha_divergence_coef": ignored(USED_WITH.format("f_divergence_type: alpha_divergence")),
    "label_smoothing": same(
        "ε of dpo (conservative DPO), robust, aot, aot_unpaired and exo_pair; with loss_type sigmoid it is "
        "refused (TRL 1.16's sigmoid ignores it)"
    ),
    "beta": same(),
    "use_weighting": refused((False,), "WPO weighting is not implemented"),
    "discopop_tau": same(),
    "activation_offloading": not_applied(NOT_APPLIED),
    "sync_ref_model": refused(
        (False,),
        "TR-DPO's reference sync is not implemented; for a moving reference see `tether online --reference ema`",
    ),
    "ref_model_mixup_alpha": ignored(USED_WITH.format("sync_ref_model")),
    "ref_model_sync_steps": ignored(USED_WITH.format("sync_ref_model")),
    "pad_token": refused((None,), "deprecated in TRL; tether uses the tokenizer's pad token (or its EOS)"),
}
_TRAINING = {  # transformers.TrainingArguments (transformers 5), as DPOConfig inherits them
    "output_dir": same(),
    "per_device_train_batch_size": to("batch_size", "per process, as in TRL"),
    "num_train_epochs": to("num_epochs"),
    "max_steps": same(),
    "learning_rate": same(),
    "lr_scheduler_type": custom("renamed", _scheduler, "constant_with_warmup = tether's constant", "lr_scheduler"),
    "lr_scheduler_kwargs": refused((None, "{}"), "tether's schedules take no arguments"),
    "warmup_steps": custom(
        "same", _steps("warmup_steps", ratio="warmup_ratio"), "a float < 1 is a ratio, as in transformers 5"
    ),
    "optim": only(("adamw_torch", "adamw_torch_fused"), "tether's optimizer is torch's AdamW"),
    "optim_args": refused((None,), "tether's optimizer is torch's AdamW"),
    "optim_target_modules": refused((None,), "tether's optimizer is torch's AdamW"),
    "weight_decay": same(),
    "adam_beta1": same(),
    "adam_beta2": same(),
    "adam_epsilon": same(),
    "gradient_accumulation_steps": same(),
    "average_tokens_across_devices": ignored("DPO losses are means over pairs, on every process alike"),
    "max_grad_norm": same(),
    "label_smoothing_factor": ignored("the Trainer's cross-entropy smoothing; DPOTrainer computes its own loss"),
    "fp16": custom("refused", _precision, "refused when true (use bf16 on a GPU)"),
    "bf16": custom(
        "renamed", _precision, "on a GPU; TRL's default (null) is bf16, tether's float32", "mixed_precision"
    ),
    "bf16_full_eval": refused((False,), "evaluation runs in the training precision"),
    "fp16_full_eval": refused((False,), "evaluation runs in the training precision"),
    "tf32": not_applied(NOT_APPLIED),
    "gradient_checkpointing": same("TRL's default is true, tether's false"),
    "gradient_checkpointing_kwargs": custom("only", _checkpointing_kwargs, "only use_reentrant (tether: false)"),
    "activation_checkpointing": custom(
        "renamed",
        lambda key, value: {} if value is None else {"gradient_checkpointing": value},
        "transformers 5's name",
        "gradient_checkpointing",
    ),
    "activation_checkpointing_kwargs": custom("only", _checkpointing_kwargs, "only use_reentrant (tether: false)"),
    "torch_compile": not_applied(NOT_APPLIED),
    "torch_compile_backend": not_applied(NOT_APPLIED),
    "torch_compile_mode": not_applied(NOT_APPLIED),
    "use_liger_kernel": not_applied(NOT_APPLIED),
    "liger_kernel_config": not_applied(NOT_APPLIED),
    "use_cache": ignored("tether never uses a key/value cache while training"),
    "neftune_noise_alpha": refused((None,), "NEFTune is not implemented"),
    "torch_empty_cache_steps": not_applied(NOT_APPLIED),
    "auto_find_batch_size": refused((False,), "give batch_size"),
    "logging_strategy": only(("steps",), "tether logs every logging_steps steps"),
    "logging_steps": custom("same", _steps("logging_steps"), "TRL's default 10, tether's 1; a ratio is refused"),
    "logging_first_step": ignored("tether logs the held-out metrics before the first step"),
    "log_on_each_node": ignored("tether logs on the main process"),
    "logging_nan_inf_filter": ignored("tether stops a run at a non-finite update instead"),
    "include_num_input_tokens_seen": ignored("a logging extra"),
    "log_level": ignored("use tether -v for debug messages"),
    "log_level_replica": ignored("use tether -v for debug messages"),
    "disable_tqdm": to("progress", "negated: disable_tqdm: true is progress: false", convert=lambda v: not v),
    "report_to": same("tensorboard, wandb, trackio, mlflow or none (a list)"),
    "run_name": ignored("the trackers' run is named after the run directory"),
    "project": ignored("the trackers' project is tether"),
    "trackio_space_id": refused((None,), NO_UPLOAD),
    "trackio_bucket_id": refused((None,), NO_UPLOAD),
    "trackio_static_space_id": refused((None,), NO_UPLOAD),
    "eval_strategy": custom(
        "renamed", _strategy("eval_steps", "use steps with eval_steps, or no"), "tether also evaluates before and after"
    ),
    "eval_steps": custom("same", _steps("eval_steps"), "null = before and after training only"),
    "eval_delay": only((0, 0.0), "tether evaluates every eval_steps from the start"),
    "per_device_eval_batch_size": to("eval_batch_size"),
    "prediction_loss_only": ignored("tether evaluates the loss and its reward metrics"),
    "eval_on_start": ignored("tether always evaluates before the first step"),
    "eval_do_concat_batches": ignored("evaluation internals"),
    "eval_use_gather_object": ignored("evaluation internals"),
    "eval_accumulation_steps": ignored("evaluation internals"),
    "include_for_metrics": ignored("tether has no compute_metrics"),
    "batch_eval_metrics": ignored("tether has no compute_metrics"),
    "save_only_model": ignored("tether's checkpoints always hold what a resume needs"),
    "save_strategy": custom("renamed", _strategy("save_steps", "use steps with save_steps, or no"), "", "save_steps"),
    "save_steps": custom("same", _steps("save_steps"), "TRL's default 500, tether's 100; a ratio is refused"),
    "save_on_each_node": ignored("the main process writes the run directory"),
    "save_total_limit": custom("same", _save_total_limit, "null (keep all) = tether's 0"),
    "enable_jit_checkpoint": ignored("tether checkpoints on SIGTERM and Ctrl-C anyway"),
    "push_to_hub": refused((False,), NO_UPLOAD),
    "hub_token": ignored(USED_WITH.format("push_to_hub")),
    "hub_private_repo": ignored(USED_WITH.format("push_to_hub")),
    "hub_model_id": ignored(USED_WITH.format("push_to_hub")),
    "hub_strategy": ignored(USED_WITH.format("push_to_hub")),
    "hub_always_push": ignored(USED_WITH.format("push_to_hub")),
    "hub_revision": ignored(USED_WITH.format("push_to_hub")),
    "load_best_model_at_end": refused((False,), "final/ is the model after the last step"),
    "metric_for_best_model": ignored(USED_WITH.format("load_best_model_at_end")),
    "greater_is_better": ignored(USED_WITH.format("load_best_model_at_end")),
    "ignore_data_skip": refused((False,), "a resumed run continues the data order exactly"),
    "restore_callback_states_from_checkpoint": ignored("tether's run state is in its checkpoints"),
    "full_determinism": ignored("tether's CPU runs are bit-identical, resumed or not"),
    "seed": same(),
    "data_seed": refused((None,), "tether's data order follows seed"),
    "use_cpu": refused((False,), "hide the GPUs (CUDA_VISIBLE_DEVICES=) to train on the CPU"),
    "accelerator_config": launcher("accelerate's own settings"),
    "parallelism_config": launcher("accelerate's own settings"),
    "dataloader_drop_last": ignored("tether draws every batch full from a reshuffled stream"),
    "dataloader_num_workers": ignored(DATA_LOADING),
    "dataloader_pin_memory": ignored(DATA_LOADING),
    "dataloader_persistent_workers": ignored(DATA_LOADING),
    "dataloader_prefetch_factor": ignored(DATA_LOADING),
    "dataloader_multiprocessing_context": ignored(DATA_LOADING),
    "dataloader_in_order": ignored(DATA_LOADING),
    "remove_unused_columns": ignored("tether reads only the columns it needs"),
    "label_names": ignored("tether reads only the columns it needs"),
    "train_sampling_strategy": only(("random",), "tether shuffles the pairs"),
    "length_column_name": ignored("tether reads only the columns it needs"),
    "ddp_find_unused_parameters": not_applied(NOT_APPLIED),
    "ddp_bucket_cap_mb": not_applied(NOT_APPLIED),
    "ddp_broadcast_buffers": not_applied(NOT_APPLIED),
    "ddp_static_graph": not_applied(NOT_APPLIED),
    "ddp_backend": launcher("accelerate's own settings"),
    "ddp_timeout": launcher("accelerate's own settings"),
    "fsdp": launcher("an accelerate config file (examples/accelerate/fsdp.yaml)"),
    "fsdp_config": launcher("an accelerate config file (examples/accelerate/fsdp.yaml)"),
    "deepspeed": launcher("an accelerate config file"),
    "debug": only(("",), "no debug modes"),
    "skip_memory_metrics": ignored("a logging extra"),
    "do_train": ignored("scripts' switches; the Trainer ignores them too"),
    "do_eval": ignored("scripts' switches; the Trainer ignores them too"),
    "do_predict": ignored("scripts' switches; the Trainer ignores them too"),
    "resume_from_checkpoint": refused((None,), "resume with --resume and the run's output_dir"),
    "local_rank": ignored("set by the launcher"),
}
_OLDER = {  # keys of earlier TRL or transformers versions that TRL 1.16 no longer has
    "rpo_alpha": to("nll_weight", "NLL of the chosen answer (TRL 1.x: loss_type [sigmoid, sft])", removed=True),
    "max_prompt_length": same("tether's own (default max_length // 2); TRL 1.16 cuts only the whole", removed=True),
    "max_completion_length": refused((None,), "use max_length and max_prompt_length", removed=True),
    "max_target_length": refused((None,), "encoder-decoder models are not supported", removed=True),
    "is_encoder_decoder": refused((None, False), "encoder-decoder models are not supported", removed=True),
    "reference_free": refused(
        (False,),
        "write the loss instead: cpo with cpo_alpha: 0 is sigmoid without a reference; simpo and orpo need none",
        removed=True,
    ),
    "force_use_ref_model": ignored("tether loads a reference model when the loss needs one", removed=True),
    "model_adapter_name": refused((None,), "named adapters are not implemented", removed=True),
    "ref_adapter_name": refused((None,), "named adapters are not implemented", removed=True),
    "ref_model_init_kwargs": refused((None, "{}"), "the reference loads like the policy (torch_dtype)", removed=True),
    "generate_during_eval": ignored("a logging extra", removed=True),
    "use_logits_to_keep": ignored("tether applies the LM head at completion positions only", removed=True),
    "padding_value": ignored("padding changes no log-prob", removed=True),
    "label_pad_token_id": ignored("padding changes no log-prob", removed=True),
    "tools": refused((None,), "tool schemas are not implemented", removed=True),
    "evaluation_strategy": custom(
        "renamed", _strategy("eval_steps", "use steps with eval_steps, or no"), "", "eval_steps", removed=True
    ),
    "warmup_ratio": same("transformers 5 writes it as warmup_steps < 1", removed=True),
    "torch_dtype": same("transformers 5 and TRL 1.16 call it dtype", removed=True),
    "logging_dir": same("transformers 5 reads TENSORBOARD_LOGGING_DIR instead; tether reads both", removed=True),
    "overwrite_output_dir": ignored("tether continues its own runs with --resume and never overwrites", removed=True),
    "num_processes": custom("launcher", _num_processes, "equal to the running count is accepted", removed=True),
    "accelerate_config": launcher("`trl dpo`'s launcher key"),
}
# trl.experimental.online_dpo.OnlineDPOConfig's own fields, for `tether online` (its TrainingArguments as above)
_ONLINE = {
    "dataset_name": to("prompt_file", "prompts: a local file or directory with a 'prompt' field"),
    "reward_model_path": custom("renamed", _reward_model, "oracle: reward-model:PATH", "oracle"),
    "max_new_tokens": same("TRL's default 64, tether's 128"),
    "temperature": same("TRL's default 0.9, tether's 1.0"),
    "top_p": same(),
    "top_k": same("0 = off in both; TRL's default 0, tether's 50"),
    "min_p": refused((None,), "min-p sampling is not implemented"),
    "repetition_penalty": only((1, 1.0), "sampling has no repetition penalty"),
    "generation_kwargs": refused((None, "{}"), "use temperature, top_k, top_p and max_new_tokens"),
    "cache_implementation": not_applied(NOT_APPLIED),
    "missing_eos_penalty": refused((None,), "the oracle's scores are used as they are"),
    "beta": custom("same", _online_beta, "one β (a list of one is accepted; a β per epoch is refused)"),
    "loss_type": custom("renamed", _online_loss_type, "sigmoid or ipo, as OnlineDPOTrainer", "loss"),
    "use_vllm": refused(
        (False,), "tether samples with vLLM through sampler: vllm and vllm_url (tether vllm-serve), not trl vllm-serve"
    ),
    "vllm_model_impl": ignored(USED_WITH.format("use_vllm")),
    "vllm_structured_outputs_regex": ignored(USED_WITH.format("use_vllm")),
    "vllm_gpu_memory_utilization": ignored(USED_WITH.format("use_vllm")),
    "vllm_mode": ignored(USED_WITH.format("use_vllm")),
    "vllm_server_base_url": ignored(USED_WITH.format("use_vllm")),
    "vllm_server_host": ignored(USED_WITH.format("use_vllm")),
    "vllm_server_port": ignored(USED_WITH.format("use_vllm")),
    "vllm_server_timeout": ignored(USED_WITH.format("use_vllm")),
    "vllm_group_port": ignored(USED_WITH.format("use_vllm")),
    "vllm_tensor_parallel_size": ignored(USED_WITH.format("use_vllm")),
    "vllm_enable_sleep_mode": ignored(USED_WITH.format("use_vllm")),
    "ds3_gather_for_generation": ignored("DeepSpeed generation internals"),
    "reward_weights": refused((None,), "one oracle"),
    "max_steps": to("steps", "T, the optimizer steps"),
    "dataset_train_split": refused(("train",), "prompt_file takes PATH:SPLIT for another split"),
    "dataset_test_split": ignored("tether online evaluates on eval_file (prompts with a reference answer)"),
    "test_split_size": refused((None,), "give eval_file (prompts with a reference answer)"),
    "precompute_ref_log_probs": refused((False,), "online pairs are new at every step: nothing to precompute"),
    "num_train_epochs": ignored("each prompt is used once; steps × prompts_per_step decide the run's length"),
    "gradient_accumulation_steps": only((1,), "one optimizer step per batch of prompts_per_step prompts"),
    "per_device_train_batch_size": refused((), "write prompts_per_step (B, over all processes; TRL's is per device)"),
}
TRL_KEYS: dict[str, Key] = {**_SCRIPT, **_MODEL, **_DPO, **_TRAINING, **_OLDER}
ONLINE_TRL_KEYS: dict[str, Key] = {**TRL_KEYS, **_ONLINE}
