"""`tether eval --model M --eval_file PAIRS`: held-out preference metrics of a model or adapter, no training.

Per pair: the loss, the implicit rewards r = β(log π_θ − log π_ref) of chosen and rejected, whether r_w > r_l,
the margin r_w − r_l, and the summed log-probs under the policy and the reference. In aggregate: the mean of
each with a 95% percentile-bootstrap CI over pairs. The numbers are those `tether train` logs as eval_* for
the same model, reference, loss and β. `--losses` adds each named loss's value on the whole file.

The whole file is one batch: a loss that is not a mean over pairs (sft, aot, aot_unpaired) sorts or averages
over every pair of the file (training evaluates it per eval batch). With only losses that use no reference,
no reference is loaded and the rewards are β·log π_θ (docs/losses.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import TetherError, read_yaml_mapping
from .data import COMPLETION_KEYS, collate, load_preference_records, tokenize_records
from .logprobs import sequence_logps
from .loss_table import LOSSES, OPTION_DEFAULTS, PARAMS, needs_reference, resolve_options
from .losses import preference_loss
from .models import adapter_base, is_adapter_dir, load_adapter, load_model, load_tokenizer
from .stats import summarize
from .train.reference import model_reference

log = logging.getLogger("tether")
PER_PAIR = (
    "loss",
    "reward_accuracy",
    "reward_margin",
    "rewards_chosen",
    "rewards_rejected",
    "logps_chosen",
    "logps_rejected",
    "ref_logps_chosen",
    "ref_logps_rejected",
)


def load_policy_and_reference(model: str, ref_model: str | None, need_reference: bool = True, dtype: str = "float32"):
    """(policy, reference, tokenizer, description), weights in `dtype`. An adapter directory (adapter_config.json)
    is loaded on its base, which is also the reference (the adapter disabled) unless `ref_model` is given; a full
    model needs `ref_model`, except a tether run's final/ model, whose reference is the run's (config.yaml beside
    it: its ref_model, or its initial model). Without `need_reference` no reference is loaded (it is None)."""
    path = Path(model)
    if not need_reference:
        policy = load_adapter(path, dtype) if is_adapter_dir(path) else load_model(model, dtype)
        return policy.eval(), None, load_tokenizer(path), {"model": str(path), "ref_model": None}
    if is_adapter_dir(path):
        policy = load_adapter(path, dtype).eval()
        base = adapter_base(path)
        if ref_model:
            reference = model_reference(str(ref_model), load_model(ref_model, dtype).eval())
        else:
            reference = model_reference(f"{base} (adapter disabled)", policy, adapter_off=True)
        return (
            policy,
            reference,
            load_tokenizer(path),
            {"model": str(path), "base_model": str(base), "ref_model": reference.label},
        )
    run_cfg = path.parent / "config.yaml"
    if ref_model is None and path.name == "final" and run_cfg.is_file():
        cfg = read_yaml_mapping(run_cfg)  # aliases bounded, a non-mapping refused in one line
        ref_model = cfg.get("ref_model") or cfg.get("model")
    if ref_model is None:
        raise TetherError(
            f"--model {model}: a full model needs --ref_model (the reference its rewards are measured against)"
        )
    reference = model_reference(str(ref_model), load_model(ref_model, dtype).eval())
    return (
        load_model(model, dtype).eval(),
        reference,
        load_tokenizer(model),
        {"model": str(model), "ref_model": str(ref_model)},
    )


@torch.no_grad()
def evaluate_pairs(opts) -> dict:
    """Per-pair and aggregate preference metrics of opts.model on opts.eval_file (see the module docstring)."""
    records = load_preference_records(opts.eval_file, split=opts.eval_split)  # bad data fails before models load
    asked = [opts.loss, *(opts.losses or [])]
    policy, ref, tokenizer, who = load_policy_and_reference(
        opts.model, opts.ref_model, any(needs_reference(name) for name in asked), opts.torch_dtype
    )
    examples, report = tokenize_records(records, tokenizer, opts.max_length, opts.max_prompt_length)
    if not examples:
        raise TetherError(f"{opts.eval_file}: no usable preference pairs ({report.summary()})")
    options = dict(loss=opts.loss, loss_weights=opts.loss_weights, nll_weight=opts.nll_weight, **_params(opts))
    pairs, (pol, lens, ref_sums) = pair_metrics(policy, ref, examples, tokenizer.pad_token_id, opts.batch_size, options)
    per_pair = PER_PAIR if ref is not None else PER_PAIR[:-2]
    n = len(examples)
    result = {
        **who,
        "eval_file": str(opts.eval_file),
        "loss_type": opts.loss,
        "beta": opts.beta,
        "pairs_used": len(pairs),
        "data": {k: v for k, v in vars(report).items() if k != "skipped"},
        "aggregate": {k: summarize([p[k] for p in pairs]) for k in per_pair},
    }
    if opts.losses:
        result["losses"] = {name: _one_loss(opts, name, pol, lens, ref_sums, n) for name in opts.losses}
    return {**result, "pairs": pairs}


def pair_metrics(policy, ref, examples, pad_id: int, batch_size: int, options: dict):
    """Per pair (a dict per example: source, extra fields, PER_PAIR values; no ref_* without a reference) under
    `policy` and `ref` (a Reference or None) with the loss `options` (preference_loss's keywords), and the
    summed log-probs behind them (policy, lengths, reference)."""
    pol, lens, ref_sums = _file_logps(policy, ref, examples, pad_id, batch_size)
    n = len(examples)
    _, stats = preference_loss(*_pairs(pol, lens, ref_sums, n), **options)
    per_pair = PER_PAIR if ref is not None else PER_PAIR[:-2]
    if ref is not None:
        stats.update(ref_logps_chosen=ref_sums[:n], ref_logps_rejected=ref_sums[n:])
    pairs = [
        {"source": ex.source, **ex.extra, **{k: float(stats[k][i]) for k in per_pair}} for i, ex in enumerate(examples)
    ]
    return pairs, (pol, lens, ref_sums)


def _file_logps(policy, ref, examples, pad_id, batch_size):
    """Summed log-probs of chosen then rejected of every example (2N,) under the policy and the reference
    (None without one), and the completion lengths."""
    pol, lens, refs = [], [], []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], pad_id, COMPLETION_KEYS)
        sums, counts = sequence_logps(policy, batch["input_ids"], batch["attention_mask"], batch["completion_mask"], 2)
        pol.append(sums.view(2, -1))
        lens.append(counts.view(2, -1))
        if ref is not None:
            refs.append(ref.logps(batch, 2).view(2, -1))
    return (
        torch.cat(pol, 1).reshape(-1),
        torch.cat(lens, 1).reshape(-1),
        torch.cat(refs, 1).reshape(-1) if refs else None,
    )


def _pairs(pol, lens, ref_sums, n):
    ref_c, ref_r = (ref_sums[:n], ref_sums[n:]) if ref_sums is not None else (None, None)
    return pol[:n], pol[n:], ref_c, ref_r, lens[:n], lens[n:]


def _params(opts, loss: str | None = None) -> dict:
    """opts' loss parameters; for another `loss` of --losses: those it reads (at its own default β unless
    --beta was given), the rest at their defaults."""
    if loss is None:
        return {p: getattr(opts, p) for p in PARAMS}
    reads = LOSSES[loss].param_names
    values = {p: getattr(opts, p) if p in reads else OPTION_DEFAULTS[p] for p in PARAMS}
    if not getattr(opts, "_beta_given", True):
        values["beta"] = None
    return resolve_options(loss, None, values)


def _one_loss(opts, name, pol, lens, ref_sums, n) -> dict:
    """The value of loss `name` on the whole file (mean over pairs, with its 95% CI when it is one), or why not."""
    try:
        params = _params(opts, name)
    except ValueError as e:
        return {"skipped": str(e)}
    _, stats = preference_loss(*_pairs(pol, lens, ref_sums, n), loss=name, nll_weight=0.0, **params)
    return {"beta": params["beta"], **summarize(stats["loss"].tolist())}
