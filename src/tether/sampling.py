"""Sampling several responses per prompt for online training, reproducibly per (prompt, sample).

Each prompt goes through the model once; its key/value cache is repeated for its n samples. Every row draws
its random numbers from its own generator (seeded by the caller per prompt), so a response depends only on
the model, the prompt and its seed — not on which other prompts share the batch or the process. That is what
lets 2 processes reproduce 1 process, and a resumed run reproduce an uninterrupted one.

The log-probability of each sampled response under the model itself (temperature 1, no top-k/top-p) is
summed on the way, from the same logits: online training needs log π_β(y) of every sampled pair, and this
gives it without a second forward pass.

Under OMP_WAIT_POLICY=PASSIVE (tether's default, with a bounded spin) the token-by-token loop runs on ONE torch
thread when a decoding step is small (under DECODE_PARALLEL_FLOPS, e.g. models of a few million parameters): each
step is then many operations of a few microseconds, and waking a sleeping OpenMP thread for each costs more than it
saves (2 threads → 1: tiny 0.127 → 0.062 s, 5m 0.289 → 0.230 s per 16 × 32 tokens; with ACTIVE waiting 2 threads
stay 8-12% faster, so they are kept). The prompt's forward pass keeps every thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .generation import cut_at_eos, left_pad
from .logprobs import gather_logps
from .models import any_process, eval_mode, forward_is_collective

DECODE_PARALLEL_FLOPS = 1e9  # per decoding step (2 · parameters · rows); below it, PASSIVE waiting decodes on 1 thread


@contextlib.contextmanager
def at_most_threads(n: int):
    """Run the block with at most `n` torch threads (restored afterwards)."""
    old = torch.get_num_threads()
    if old <= n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@dataclass
class Samples:
    ids: list[list[list[int]]]  # [prompt][sample] -> completion token ids (through the first EOS, if any)
    logps: list[list[float]]  # [prompt][sample] -> Σ log π(y_t | x, y_<t) under the sampling model at temperature 1


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Logits of the sampling distribution: divided by the temperature, then top-k, then top-p (nucleus;
    the smallest set of most likely tokens whose probability reaches top_p), the rest set to −inf.
    top_k = 0 and top_p = 1 switch those filters off."""
    scores = logits / temperature
    if 0 < top_k < scores.size(-1):
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = (cum - sorted_scores.softmax(dim=-1)) >= top_p  # mass before this token already reaches top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


@torch.no_grad()
def sample_responses(
    model,
    prompts: Sequence[Sequence[int]],
    seeds: Sequence[int],
    *,
    n: int = 2,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int = 50,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> Samples:
    """n sampled completions of every prompt (token ids) and their log-probs under `model`.

    prompts: token ids per prompt; seeds: one integer per prompt (sample j of prompt i uses seed
    seeds[i] · 1000 + j). Generation stops at an EOS token or after max_new_tokens tokens. With weights sharded
    over processes (FSDP2) every process calls this with the same number of prompts, and they decode step by step
    together until every row of every process is done (a finished process feeds padding; its results are the
    same as alone).
    """
    device = next(model.parameters()).device
    b = len(prompts)
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    with eval_mode(model):
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        rows = torch.arange(b, device=device).repeat_interleave(n)  # row r = sample r % n of prompt r // n
        cache = out.past_key_values
        cache.reorder_cache(rows)
        logits = out.logits[:, -1].float()[rows]
        mask, position = mask[rows], positions[rows, -1:]
        gens = [torch.Generator().manual_seed(int(seeds[r // n]) * 1000 + r % n) for r in range(b * n)]
        eos = torch.tensor(list(eos_ids) or [-1], device=device)

        tokens, done = [], torch.zeros(b * n, dtype=torch.bool, device=device)
        total = torch.zeros(b * n, dtype=torch.float32, device=device)
        synced = forward_is_collective(model)
        small = 2 * sum(p.numel() for p in model.parameters()) * b * n < DECODE_PARALLEL_FLOPS
        passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
        with at_most_threads(1 if small and passive else torch.get_num_threads()):
            for _ in range(max_new_tokens):
                cdf = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1).cumsum(dim=-1)
                u = torch.cat([torch.rand(1, generator=g) for g in gens]).to(device) * cdf[:, -1]
                token = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1).clamp(max=cdf.size(1) - 1)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                total += torch.where(done, 0.0, gather_logps(logits, token))
                tokens.append(token)
                done |= torch.isin(token, eos)
                unfinished = not bool(done.all())
                if not (any_process(unfinished, device) if synced else unfinished):
                    break
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                position = position + 1
                out = model(
                    input_ids=token.unsqueeze(1),
                    attention_mask=mask,
                    position_ids=position,
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
                logits = out.logits[:, -1].float()

    eos_set = set(eos_ids)
    completions = [cut_at_eos(row, eos_set) for row in torch.stack(tokens, dim=1).tolist()]
    logps = total.tolist()
    return Samples(
        ids=[completions[i * n : (i + 1) * n] for i in range(b)],
        logps=[logps[i * n : (i + 1) * n] for i in range(b)],
    )
