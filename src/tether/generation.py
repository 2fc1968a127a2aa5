"""Batched generation for any causal LM and tokenizer.

`generate` takes prompts and returns completion texts; a prompt is a string (tokenized with the
tokenizer's usual special tokens) or a list of chat messages (rendered with the chat template and the
generation prompt). `generate_ids` is the same on token ids, for callers that need the exact tokens
(BAPO's base responses). Prompts are sorted by length so each batch pads little, left-padded so every row
ends where generation starts, and the results come back in the caller's order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .models import eval_mode, forward_is_collective


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of one prompt. Chat messages get the chat template (which adds its own special tokens);
    a plain string gets the tokenizer's usual special tokens (e.g. a BOS)."""
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_token_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (rows, longest row) on `device`: each row right-aligned, so that every row
    ends where generation starts."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def cut_at_eos(ids: list[int], eos_ids) -> list[int]:
    """`ids` up to and including the first end-of-sequence token (all of them when none came)."""
    return ids[: next((k + 1 for k, t in enumerate(ids) if t in eos_ids), len(ids))]


def completion_text(tokenizer, ids: Sequence[int], eos_ids) -> str:
    """A completion's text: end-of-sequence and other special tokens dropped, surrounding whitespace stripped."""
    return tokenizer.decode([t for t in ids if t not in eos_ids], skip_special_tokens=True).strip()


@torch.no_grad()
def generate_ids(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    batch_size: int = 32,
    seed: int | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """Generated token ids for each prompt (given as token ids), up to and including the first
    end-of-sequence token, or `max_new_tokens` ids when none came.

    Greedy unless `do_sample`; when sampling, `top_k` = 0 and `top_p` = 1 mean no truncation. `seed`
    makes sampling reproducible without disturbing the caller's random state. With weights sharded over
    processes (FSDP2) every process must call this with the same number of prompts: the batches then decode in
    step (transformers' `synced_gpus`), each process's results the same as alone.
    """
    eos_ids = eos_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=eos_ids,
        pad_token_id=pad_id,
        **(dict(temperature=temperature, top_k=top_k, top_p=top_p) if do_sample else {}),
    )
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    synced = forward_is_collective(model)
    device = next(model.parameters()).device
    out: list[list[int]] = [[] for _ in prompts]
    with eval_mode(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
            idx = order[start : start + batch_size]
            ids, mask = left_pad([prompts[i] for i in idx], pad_id, device)
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=synced)
            for row, i in enumerate(idx):
                out[i] = cut_at_eos(gen[row, ids.size(1) :].tolist(), eos_ids)
    return out


def generate(model, tokenizer, prompts: Sequence, **decoding) -> list[str]:
    """Completions of `prompts` (strings or chat messages) as text: special tokens stripped, cut at the
    end of sequence. `decoding`: the keyword options of `generate_ids` (greedy by default)."""
    ids = generate_ids(model, tokenizer, [prompt_ids(tokenizer, p) for p in prompts], **decoding)
    eos_ids = eos_token_ids(model, tokenizer)
    return [completion_text(tokenizer, row, eos_ids) for row in ids]
