"""`tether eval --model M --eval_file PAIRS`: held-out preference metrics of a model or adapter, no training.

Per pair: the loss, the implicit rewards r = β(log π_θ − log π_ref) of chosen and rejected, whether r_w > r_l,
the margin r_w − r_l, and the summed log-probs under the policy and the reference. In aggregate: the mean of
each with a 95% percentile-bootstrap CI over pairs. The numbers are those `tether train` logs as eval_* for
the same model, reference, loss and β.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import yaml

from .config import TetherError
from .data import COMPLETION_KEYS, collate, load_preference_records, tokenize_records
from .stats import summarize
from .logprobs import sequence_logps
from .losses import preference_loss
from .models import load_model, load_tokenizer

log = logging.getLogger("tether")
PER_PAIR = ("loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
            "logps_rejected", "ref_logps_chosen", "ref_logps_rejected")


def load_policy_and_reference(model: str, ref_model: str | None):
    """(policy, reference, tokenizer, description). An adapter directory (adapter_config.json) is loaded on its
    base, which is also the reference unless `ref_model` is given; a full model needs `ref_model`, except
    a tether run's final/ model, whose reference is the run's (config.yaml beside it)."""
    path = Path(model)
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        from peft import PeftModel

        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if not base:
            raise TetherError(f"{adapter}: no base_model_name_or_path; cannot tell which model the adapter belongs to")
        policy = PeftModel.from_pretrained(load_model(base), str(path)).eval()
        tokenizer = load_tokenizer(base)
        if (path / "tokenizer_config.json").is_file():  # the run saved its tokenizer beside the adapter
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        ref = load_model(ref_model).eval() if ref_model else None
        return policy, ref, tokenizer, {"model": str(path), "base_model": str(base), "ref_model": ref_model or f"{base} (adapter disabled)"}
    run_cfg = path.parent / "config.yaml"
    if ref_model is None and path.name == "final" and run_cfg.is_file():
        cfg = yaml.safe_load(run_cfg.read_text()) or {}
        ref_model = cfg.get("ref_model") or cfg.get("model")
    if ref_model is None:
        raise TetherError(f"--model {model}: a full model needs --ref_model (the reference its rewards are measured against)")
    return load_model(model).eval(), load_model(ref_model).eval(), load_tokenizer(model), {"model": str(model), "ref_model": str(ref_model)}


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
        if ref is None:
            with policy.disable_adapter():
                ref_sums, _ = sequence_logps(policy, *args)
        else:
            ref_sums, _ = sequence_logps(ref, *args)
        n = len(chunk)
        _, stats = preference_loss(pol[:n], pol[n:], ref_sums[:n], ref_sums[n:], lens[:n], lens[n:], loss=opts.loss,
                                   beta=opts.beta, label_smoothing=opts.label_smoothing, nll_weight=opts.nll_weight)
        stats.update(ref_logps_chosen=ref_sums[:n], ref_logps_rejected=ref_sums[n:])
        for i, ex in enumerate(chunk):
            pairs.append({"source": ex.source, **ex.extra, **{k: float(stats[k][i]) for k in PER_PAIR}})
    aggregate = {k: summarize([p[k] for p in pairs]) for k in PER_PAIR}
    return {
        **who, "eval_file": str(opts.eval_file), "loss_type": opts.loss, "beta": opts.beta,
        "pairs_used": len(pairs), "data": {k: v for k, v in vars(report).items() if k != "skipped"},
        "aggregate": aggregate, "pairs": pairs,
    }
