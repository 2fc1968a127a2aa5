"""Token log-probs from hidden states: the LM head, log-softmax and gather, a chunk of positions at a time.

log π(y_t | ·) = logit[y_t] − logsumexp(logits), logits = W·h_t. Over all T completion positions at once the
(T × V) float32 logits, and in the backward pass a softmax and a gradient of the same size, are the largest tensors
of a step on a large vocabulary (SmolLM2: V = 49,152). `head_logps` computes them `chunk_size` positions at a time
and drops each chunk's logits before the next. For the backward pass it keeps per position only the expected output
embedding E_p[W] = softmax(logits)·W (H numbers, the size of the hidden state), because

    ∂ log p(y) / ∂h = W[y] − E_p[W]

so the hidden states' gradient needs no logits at all; a trainable head's gradient Σ_t g_t (onehot(y_t) − p_t) h_tᵀ
recomputes each chunk's logits in the backward pass (one more head product per chunk, full fine-tuning only).
A head that is not a plain bias-free `nn.Linear` (a PEFT-wrapped head), or a step under autocast, takes the same
chunks through `torch.utils.checkpoint` instead (its logits are recomputed in the backward). A sharded head (an FSDP2
unit, DeepSpeed ZeRO-3 partitions) runs unchunked, in one call of its own forward, in which its engine gathers the
weight (several calls per step of an FSDP2 unit, or one again inside the backward pass, give wrong numbers).
`mean_logits` gives the mean logit over the vocabulary per position (a metric) without any logits of a linear head.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint


def gather_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per row.

    logits: (T, V) any float dtype; labels: (T,) int64. Returns (T,) float32.
    """
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class ChunkedLinearLogps(torch.autograd.Function):
    """`gather_logps(hidden @ weightᵀ, labels)`, `chunk_size` rows at a time (see the module docstring).

    hidden: (T, H); weight: (V, H); labels: (T,) int64. Returns (T,) float32."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_size):
        want_hidden = ctx.needs_input_grad[0]
        out = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        expected = torch.empty_like(hidden) if want_hidden else None  # E_p[W] per position
        for s in range(0, hidden.size(0), chunk_size):
            logits = F.linear(hidden[s : s + chunk_size], weight).float()
            lse[s : s + chunk_size] = torch.logsumexp(logits, dim=-1)
            out[s : s + chunk_size] = (
                logits.gather(-1, labels[s : s + chunk_size].unsqueeze(-1)).squeeze(-1) - lse[s : s + chunk_size]
            )
            if want_hidden:
                probs = logits.sub_(lse[s : s + chunk_size].unsqueeze(-1)).exp_()
                expected[s : s + chunk_size] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(hidden, weight, labels, lse, expected)
        ctx.chunk_size = chunk_size
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse, expected = ctx.saved_tensors
        g = grad_out.float()
        grad_hidden = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_hidden = (g.unsqueeze(-1) * (weight[labels].float() - expected.float())).to(hidden.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for s in range(0, hidden.size(0), ctx.chunk_size):
                h, y, gc = (t[s : s + ctx.chunk_size] for t in (hidden, labels, g))
                # ∂/∂logits = g·(onehot(y) − p), from the chunk's logits recomputed
                dlogits = F.linear(h, weight).float().sub_(lse[s : s + ctx.chunk_size].unsqueeze(-1)).exp_()
                dlogits.mul_(-gc.unsqueeze(-1)).scatter_add_(-1, y.unsqueeze(-1), gc.unsqueeze(-1))
                grad_weight.addmm_(dlogits.t(), h.float())  # in place: no second (V × H) temporary
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def _held_in_shards(p: torch.Tensor) -> bool:
    """Whether a parameter is a DTensor shard or a DeepSpeed ZeRO-3 partition (gathered only when its module's own
    forward runs), not an ordinary whole tensor."""
    return type(p.data) is not torch.Tensor or hasattr(p, "ds_id")


def _whole_weight(head: nn.Module) -> torch.Tensor | None:
    """The head's weight when the head is exactly an `nn.Linear` holding its whole weight as an ordinary tensor;
    else None."""
    if type(head) is not nn.Linear:
        return None
    return None if _held_in_shards(head.weight) else head.weight


def _sharded(head: nn.Module) -> bool:
    """Whether an engine holds the head's parameters in shards (an FSDP2 unit, a DTensor, a ZeRO-3 partition)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(head, FSDPModule) or any(_held_in_shards(p) for p in head.parameters())


def _plain_weight(head: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
    """`_whole_weight` of a bias-free head when no autocast is on (what `ChunkedLinearLogps` computes exactly)."""
    if getattr(head, "bias", None) is not None or torch.is_autocast_enabled(hidden.device.type):
        return None
    return _whole_weight(head)


@torch.no_grad()
def mean_logits(head: nn.Module, hidden: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """The mean over the vocabulary of head(hidden) per row (TRL's `logits/chosen` metric averages it), no gradient.

    For a linear head W·h + b the logits are never built: mean_v(W·h + b)_v = h·mean_v(W) + mean(b), one float32
    dot product per row. Another head (PEFT-wrapped, FSDP-sharded) computes its logits, `chunk_size` rows at a time
    (0: all at once). hidden: (T, H). Returns (T,) float32."""
    weight = _whole_weight(head)
    if weight is None:
        step = chunk_size if chunk_size > 0 and not _sharded(head) else max(1, hidden.size(0))
        return torch.cat([head(h).mean(-1, dtype=torch.float32) for h in hidden.split(step)])
    with torch.autocast(hidden.device.type, enabled=False):
        out = hidden.float() @ weight.mean(0, dtype=torch.float32)
    return out if head.bias is None else out + head.bias.mean(dtype=torch.float32)


def head_logps(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 0) -> torch.Tensor:
    """log softmax(head(hidden))[label] per row, `chunk_size` rows at a time (0, or no more rows than that: all at
    once, exactly `gather_logps(head(hidden), labels)`).

    hidden: (T, H); labels: (T,) int64. Returns (T,) float32."""
    if chunk_size <= 0 or hidden.size(0) <= chunk_size or _sharded(head):
        return gather_logps(head(hidden), labels)
    weight = _plain_weight(head, hidden)
    if weight is not None:
        return ChunkedLinearLogps.apply(hidden, weight, labels, chunk_size)
    chunks = zip(hidden.split(chunk_size), labels.split(chunk_size))
    if not torch.is_grad_enabled():
        return torch.cat([gather_logps(head(h), y) for h, y in chunks])
    return torch.cat([checkpoint(lambda h, y: gather_logps(head(h), y), h, y, use_reentrant=False) for h, y in chunks])
