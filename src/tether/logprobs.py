"""Per-sequence completion log-probabilities from one forward pass.

log π(y|x) = Σ_t log π(y_t | x, y_<t) over completion tokens only (prompt and padding never count).

The fast path runs the model's backbone over the whole batch and applies the LM head ONLY at the
positions that predict a completion token, so no (rows × length × vocab) logits tensor is ever built;
the log-softmax is `logit[label] − logsumexp(logits)`, which keeps no second full-vocabulary copy for
the backward pass (autograd saves only the logits it already has and one scalar per token), and with a
chunk size it holds the logits of only that many positions at a time (`tether.logprob_head`). Batches run
right-padded with each prompt once for its completions (a key/value cache), or padding-free (`tether.packing`:
the sequences packed into rows, a block-diagonal causal mask, the prompt still once). Asked for it, each path also
sums every completion position's mean logit over the vocabulary (TRL's `logits/*` metrics) from the same hidden
states, without the logits of a linear head (`logprob_head.mean_logits`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from . import packing
from .data import Example, collate
from .logprob_head import gather_logps, head_logps, mean_logits
from .models import eval_mode

log = logging.getLogger("tether")
MASKED_ATTENTION = ("sdpa", "eager")  # take a 4D mask of tether's own: each prompt once for its completions
POSITION_PACKED = (*MASKED_ATTENTION, "flash_attention_2", "flash_attention_3", "flash_attention_4", "flex_attention")
_SAID: set[str] = set()


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


def is_checkpointing(model: nn.Module) -> bool:
    """Whether gradient (activation) checkpointing is on for `model`'s layers (also under a PEFT wrapper)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _prompt_lengths(completion_mask: torch.Tensor, n_keys: int) -> torch.Tensor | None:
    """Per-example prompt length when rows come as n_keys key-major groups sharing prompts, else None."""
    n = completion_mask.size(0)
    if n_keys < 2 or n % n_keys or not bool(completion_mask.any(dim=1).all()):
        return None
    start = completion_mask.int().argmax(dim=1).view(n_keys, -1)
    return start[0] if bool((start == start[0]).all()) and int(start.min()) >= 1 else None


def _row_sums(head, hidden, labels, rows, n, chunk_size, logit_means):
    """(Σ token log-probs, Σ mean logits over the vocabulary or None) per row of n: `hidden` (T, H) holds the positions
    that predict `labels` (T,), of rows `rows` (T,); the second only with `logit_means` (no gradient)."""
    token_logps = head_logps(head, hidden, labels, chunk_size)
    sums = torch.zeros(n, dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    if not logit_means:
        return sums, None
    return sums, torch.zeros_like(sums).index_add(0, rows, mean_logits(head, hidden, chunk_size))


def _result(sums, counts, logit_sums):
    return (sums, counts) if logit_sums is None else (sums, counts, logit_sums)


def shared_prompt_logps(
    backbone, head, input_ids, attention_mask, completion_mask, prompt_len, n_keys, chunk_size=0, logit_means=False
):
    """Like `sequence_logps`, but each prompt goes through the model ONCE for its n_keys completions.

    Rows are key-major groups (all chosen, all rejected, ...) whose row j of every group shares the same
    prompt of prompt_len[j] tokens. The prompts run left-padded as one batch with a key/value cache; the
    cache is repeated for every group and the completions run right-padded on top of it, with the same
    positions as in the unshared forward. Gradients flow through the cache into the prompt forward.
    """
    device, pad = input_ids.device, 0
    b, n = prompt_len.numel(), input_ids.size(0)
    width = int(prompt_len.max())
    cols = torch.arange(width, device=device)
    left = width - prompt_len.unsqueeze(1)  # left padding per example
    p_mask = (cols >= left).long()
    p_ids = torch.where(p_mask.bool(), input_ids[:b].gather(1, (cols - left).clamp(min=0)), pad)
    out = backbone(input_ids=p_ids, attention_mask=p_mask, position_ids=(cols - left).clamp(min=0), use_cache=True)
    cache = out.past_key_values
    cache.reorder_cache(torch.arange(b, device=device).repeat(n_keys))

    starts = prompt_len.repeat(n_keys).unsqueeze(1)  # (n, 1)
    c_len = completion_mask.sum(dim=1)
    c_width = int(c_len.max())
    c_cols = torch.arange(c_width, device=device)
    c_mask = (c_cols < c_len.unsqueeze(1)).long()
    c_ids = torch.where(c_mask.bool(), input_ids.gather(1, (starts + c_cols).clamp(max=input_ids.size(1) - 1)), pad)
    full_mask = torch.cat([p_mask.repeat(n_keys, 1), c_mask], dim=1)
    hidden = backbone(
        input_ids=c_ids, attention_mask=full_mask, position_ids=starts + c_cols, past_key_values=cache, use_cache=True
    ).last_hidden_state
    # token t of a completion is predicted by the hidden state before it: the prompt's last one for t = 0
    before = torch.cat([out.last_hidden_state[:, -1:].repeat(n_keys, 1, 1), hidden[:, :-1]], dim=1)
    target = c_mask.bool()
    rows = torch.arange(n, device=device).unsqueeze(1).expand_as(target)[target]
    sums, logit_sums = _row_sums(head, before[target], c_ids[target], rows, n, chunk_size, logit_means)
    return _result(sums, c_len.float(), logit_sums)


def _full_attention_only(cfg) -> bool:
    """Whether every layer attends to the whole sequence (no sliding window or chunked layers, which tether's own
    block mask would not honour)."""
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return getattr(cfg, "sliding_window", None) is None or getattr(cfg, "use_sliding_window", True) is False


def _say_once(reason: str) -> None:
    if reason not in _SAID:
        _SAID.add(reason)
        log.info("padding_free: %s; these batches run padded", reason)


def packed_logps(
    backbone,
    head,
    input_ids,
    attention_mask,
    completion_mask,
    n_keys,
    chunk_size=0,
    own_mask=None,
    single_row=None,
    logit_means=False,
):
    """`sequence_logps` over a padding-free batch (`tether.packing`), or None when the model or the batch cannot be
    packed (then the caller pads). With `own_mask` (default: for sdpa and eager attention) tether's block mask lets
    each prompt run once for its completions; without it, whole sequences are packed and transformers reads the
    sequence boundaries from `position_ids` (flash attention's variable-length kernels, flex attention), in one row
    when `single_row` (default: for flash attention, which reads packed sequences only from a batch of one)."""
    cfg = backbone.config
    impl = getattr(cfg, "_attn_implementation", None)
    own_mask = impl in MASKED_ATTENTION if own_mask is None else own_mask
    single_row = str(impl).startswith("flash_attention") if single_row is None else single_row
    if impl not in (MASKED_ATTENTION if own_mask else POSITION_PACKED):
        _say_once(f"not available for {impl} attention")
        return None
    if own_mask and not _full_attention_only(cfg):
        _say_once("not available for a model with sliding-window or chunked attention layers")
        return None
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden_size = getattr(text_cfg, "hidden_size", 1024)
    batch = packing.pack(input_ids, attention_mask, completion_mask, n_keys, own_mask, hidden_size, single_row)
    if batch is None:
        _say_once("the batch is not laid out as tether.data.collate lays it out, or holds no completion token")
        return None
    mask = None
    if own_mask:  # sdpa takes a boolean mask, eager an additive one
        dtype = None if impl == "sdpa" else backbone.get_input_embeddings().weight.dtype
        mask = packing.block_causal_mask(batch, dtype)
    hidden = backbone(
        input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask, use_cache=False
    ).last_hidden_state
    predictors = hidden.reshape(-1, hidden.size(-1))[batch.predictors]
    n = input_ids.size(0)
    sums, logit_sums = _row_sums(head, predictors, batch.labels, batch.rows, n, chunk_size, logit_means)
    return _result(sums, completion_mask.sum(dim=1).float(), logit_sums)


def sequence_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    n_keys: int = 1,
    padding_free: bool = False,
    chunk_size: int = 0,
    logit_means: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Summed completion log-probs and completion lengths, one row per sequence.

    input_ids, attention_mask, completion_mask: (N, L); completion_mask[i, t] = 1 when token t of row i
    is a completion token (never the first token of a row). Returns (sum_logps (N,) float32,
    n_tokens (N,) float32). Mean log-prob = sum_logps / n_tokens. With n_keys > 1 the rows are that
    many key-major groups, one per completion key, sharing prompts (as `data.collate` builds them; the same
    `n_keys` as `losses.objective` takes) and each prompt is computed once. `padding_free`: the sequences are
    packed without padding (`packed_logps`) where the model allows it; `chunk_size` > 0: the LM head's logits
    of at most that many positions at a time (`logprob_head.head_logps`). Both give the padded results within
    float rounding; with neither, the padded computation exactly as before they existed. `logit_means`: a third
    tensor (N,) float32, each row's completion positions' mean logits over the vocabulary, summed (no gradient;
    divided by n_tokens, TRL's `logits/chosen` of one sequence); it changes nothing of the first two.
    """
    split = _backbone_and_head(model)
    if padding_free and split is not None:
        packed = packed_logps(
            *split, input_ids, attention_mask, completion_mask, n_keys, chunk_size, logit_means=logit_means
        )
        if packed is not None:
            return packed
    target_mask = completion_mask[:, 1:].bool()  # position t predicts token t+1
    labels = input_ids[:, 1:][target_mask]
    rows = torch.arange(input_ids.size(0), device=input_ids.device).unsqueeze(1).expand_as(target_mask)[target_mask]
    # gradient checkpointing drops the key/value cache a shared prompt needs: whole sequences then
    share = split is not None and not (model.training and is_checkpointing(model))
    prompt_len = _prompt_lengths(completion_mask, n_keys) if share else None
    if prompt_len is not None:
        return shared_prompt_logps(
            *split, input_ids, attention_mask, completion_mask, prompt_len, n_keys, chunk_size, logit_means
        )
    n, counts = input_ids.size(0), target_mask.sum(dim=1).float()
    if split is not None:
        backbone, head = split
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        sums, logit_sums = _row_sums(head, hidden[:, :-1][target_mask], labels, rows, n, chunk_size, logit_means)
        return _result(sums, counts, logit_sums)  # the head at completion positions only
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][target_mask]
    sums = torch.zeros(n, dtype=torch.float32, device=input_ids.device).index_add(0, rows, gather_logps(logits, labels))
    mean = logits.detach().mean(-1, dtype=torch.float32) if logit_means else None
    return _result(sums, counts, None if mean is None else torch.zeros_like(sums).index_add(0, rows, mean))


def pair_logit_means(logit_sums: torch.Tensor, n_tokens: torch.Tensor, n_keys: int) -> dict[str, torch.Tensor]:
    """Per pair, `logits_chosen` and `logits_rejected` (B,): the mean logit over every completion token and every
    vocabulary entry of y_w and of y_l, from `sequence_logps(..., logit_means=True)`'s key-major rows (chosen rows
    first, then rejected)."""
    means = (logit_sums / n_tokens.clamp(min=1)).view(n_keys, -1)
    return {"logits_chosen": means[0], "logits_rejected": means[1]}


class SequenceScorer(nn.Module):
    """Wraps a causal LM so that `forward` returns per-sequence completion log-probs.

    Putting the log-prob computation inside one module's forward lets `accelerate` wrap it in
    DistributedDataParallel (gradients are synchronised through `forward`), while the wrapped
    Hugging Face model stays available as `.model` for saving and generation. `padding_free`, `chunk_size` and
    `logit_means` are `sequence_logps`'s.
    """

    def __init__(
        self,
        model: nn.Module,
        n_keys: int = 1,
        padding_free: bool = False,
        chunk_size: int = 0,
        logit_means: bool = False,
    ):
        super().__init__()
        self.model = model
        self.n_keys = n_keys  # rows come as this many key-major groups (one per completion key) sharing prompts
        self.padding_free, self.chunk_size, self.logit_means = padding_free, chunk_size, logit_means
        # the layer classes FSDP wraps one by one (accelerate's transformer-based auto-wrap reads this)
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._no_split_modules = getattr(inner, "_no_split_modules", None)

    def forward(self, input_ids, attention_mask, completion_mask):
        return sequence_logps(
            self.model,
            input_ids,
            attention_mask,
            completion_mask,
            self.n_keys,
            self.padding_free,
            self.chunk_size,
            self.logit_means,
        )


@torch.no_grad()
def completion_logps_ids(
    model, prompts: Sequence[list[int]], completions: Sequence[list[int]], pad_id: int, batch_size: int = 32
) -> list[float]:
    """Summed log π(completion | prompt) for each (prompt ids, completion ids) pair, in batches (no gradient)."""
    return [g[0] for g in grouped_completion_logps(model, prompts, [[c] for c in completions], pad_id, batch_size)]


@torch.no_grad()
def grouped_completion_logps(
    model, prompts: Sequence[list[int]], groups: Sequence[Sequence[list[int]]], pad_id: int, batch_size: int = 32
) -> list[list[float]]:
    """Summed log π(c | prompt) of every completion c of each prompt's group (no gradient): groups[i] holds the
    k completions of prompts[i], the same k for every prompt. With k > 1 each prompt runs through the model once
    for its k completions (`sequence_logps` with n_keys = k), as in training. Prompts are taken in order of
    length (prompt + longest completion), `batch_size` prompts at a time, right-padded."""
    k = len(groups[0]) if groups else 0
    if any(len(g) != k for g in groups):
        raise ValueError("every prompt needs the same number of completions")
    keys = tuple(f"c{j}" for j in range(k))
    rows = [
        Example(list(p), {key: list(c) for key, c in zip(keys, g)}, "") for p, g in zip(prompts, groups, strict=True)
    ]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].prompt_ids) + max(map(len, groups[i]), default=0))
    device = next(model.parameters()).device
    out: list[list[float]] = [[] for _ in rows]
    with eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([rows[i] for i in idx], pad_id, keys=keys)
            sums, _ = sequence_logps(
                model,
                *(batch[name].to(device) for name in ("input_ids", "attention_mask", "completion_mask")),
                n_keys=k,
            )
            by_key = sums.view(k, len(idx))
            for r, i in enumerate(idx):
                out[i] = [float(v) for v in by_key[:, r]]
    return out
