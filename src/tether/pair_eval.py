"""`tether eval --model M --eval_file PAIRS`: held-out preference metrics of a model or adapter, no training.

Per pair: the loss, the implicit rewards r = β(log π_θ − log π_ref) of chosen and rejected, whether r_w > r_l,
the margin r_w − r_l, and the summed log-probs under the policy and the reference. In aggregate: the mean of
each with a 95% percentile-bootstrap CI over pairs. The numbers are those `tether train` logs as eval_* for
the same model, reference, loss and β.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .config import TetherError, read_yaml_mapping
from .data import COMPLETION_KEYS, collate, load_preference_records, tokenize_records
from .logprobs import sequence_logps
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


def load_policy_and_reference(model: str, ref_model: str | None):
    """(policy, reference, tokenizer, description). An adapter directory (adapter_config.json) is loaded on its
    base, which is also the reference (the adapter disabled) unless `ref_model` is given; a full model needs
    `ref_model`, except a tether run's final/ model, whose reference is the run's (config.yaml beside it)."""
    path = Path(model)
    if is_adapter_dir(path):
        policy = load_adapter(path).eval()
        base = adapter_base(path)
        if ref_model:
            reference = model_reference(str(ref_model), load_model(ref_model).eval())
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
    reference = model_reference(str(ref_model), load_model(ref_model).eval())
    return (
        load_model(model).eval(),
        reference,
        load_tokenizer(model),
        {"model": str(model), "ref_model": str(ref_model)},
    )


@torch.no_grad()
def evaluate_pairs(opts) -> dict:
    """Per-pair and aggregate preference metrics of opts.model on opts.eval_file (see the module docstring)."""
    records = load_preference_records(opts.eval_file, split=opts.eval_split)  # bad data fails before models load
    policy, ref, tokenizer, who = load_policy_and_reference(opts.model, opts.ref_model)
    examples, report = tokenize_records(records, tokenizer, opts.max_length, opts.max_prompt_length)
    if not examples:
        raise TetherError(f"{opts.eval_file}: no usable preference pairs ({report.summary()})")
    pairs: list[dict] = []
    for start in range(0, len(examples), opts.batch_size):
        chunk = examples[start : start + opts.batch_size]
        batch = collate(chunk, tokenizer.pad_token_id, COMPLETION_KEYS)
        args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"], 2)
        pol, lens = sequence_logps(policy, *args)
        ref_sums = ref.logps(batch, 2)
        n = len(chunk)
        _, stats = preference_loss(
            pol[:n],
            pol[n:],
            ref_sums[:n],
            ref_sums[n:],
            lens[:n],
            lens[n:],
            loss=opts.loss,
            beta=opts.beta,
            label_smoothing=opts.label_smoothing,
            nll_weight=opts.nll_weight,
        )
        stats.update(ref_logps_chosen=ref_sums[:n], ref_logps_rejected=ref_sums[n:])
        for i, ex in enumerate(chunk):
            pairs.append({"source": ex.source, **ex.extra, **{k: float(stats[k][i]) for k in PER_PAIR}})
    aggregate = {k: summarize([p[k] for p in pairs]) for k in PER_PAIR}
    return {
        **who,
        "eval_file": str(opts.eval_file),
        "loss_type": opts.loss,
        "beta": opts.beta,
        "pairs_used": len(pairs),
        "data": {k: v for k, v in vars(report).items() if k != "skipped"},
        "aggregate": aggregate,
        "pairs": pairs,
    }
