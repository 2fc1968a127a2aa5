"""Per-sequence completion log-probabilities from one forward pass.

log π(y|x) = Σ_t log π(y_t | x, y_<t) over completion tokens only (prompt and padding never count).

The fast path runs the model's backbone over the whole batch and applies the LM head ONLY at the
positions that predict a completion token, so no (rows × length × vocab) logits tensor is ever built;
the log-softmax is `logit[label] − logsumexp(logits)`, which keeps no second full-vocabulary copy for
the backward pass (autograd saves only the logits it already has and one scalar per token).
"""

from __future__ import annotations

import torch
from torch import nn


def gather_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per row.

    logits: (T, V) any float dtype; labels: (T,) int64. Returns (T,) float32.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _backbone_and_head(model: nn.Module):
    """(backbone, lm_head) of a causal LM (also through a PEFT wrapper), or None when the model's
    forward does more than `lm_head(backbone(...))` (logit soft-capping or scaling) or has no such split."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft.PeftModel
        inner = inner.get_base_model()
    cfg = getattr(inner, "config", None)
    if cfg is None:
        return None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text_cfg, attr, None) not in (None, 1.0):
            return None
    backbone = getattr(inner, getattr(inner, "base_model_prefix", "model"), None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if backbone is None or head is None or backbone is inner:
        return None
    return backbone, head


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and completion lengths, one row per sequence.

    input_ids, attention_mask, completion_mask: (N, L); completion_mask[i, t] = 1 when token t of row i
    is a completion token (never the first token of a row). Returns (sum_logps (N,) float32,
    n_tokens (N,) float32). Mean log-prob = sum_logps / n_tokens.
    """
    target_mask = completion_mask[:, 1:].bool()  # position t predicts token t+1
    labels = input_ids[:, 1:][target_mask]
    rows = torch.arange(input_ids.size(0), device=input_ids.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    split = _backbone_and_head(model)
    if split is not None:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        logits = head(hidden[:, :-1][target_mask])  # (T, V), completion positions only
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][target_mask]
    token_logps = gather_logps(logits, labels)
    sums = torch.zeros(input_ids.size(0), dtype=torch.float32, device=input_ids.device).index_add(0, rows, token_logps)
    return sums, target_mask.sum(dim=1).float()


class SequenceScorer(nn.Module):
    """Wraps a causal LM so that `forward` returns per-sequence completion log-probs.

    Putting the log-prob computation inside one module's forward lets `accelerate` wrap it in
    DistributedDataParallel (gradients are synchronised through `forward`), while the wrapped
    Hugging Face model stays available as `.model` for saving and generation.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, completion_mask):
        return sequence_logps(self.model, input_ids, attention_mask, completion_mask)
