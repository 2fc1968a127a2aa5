"""Padding-free batches: the sequences of a collated batch packed into rows of bounded length.

A *group* is one prompt and the completions that share it (`data.collate`'s key-major rows j, B + j, 2B + j, ...:
chosen, rejected and BAPO's y_b of example j), laid out as the prompt followed by each completion. Every completion
continues the prompt's positions (its position ids start at the prompt's length), and a token attends to the tokens
before it in its own prompt and its own completion only: the block-diagonal causal mask of a packed batch, whose
prompt block is shared by the group's completions (`block_causal_mask`). Without a mask of tether's own (attention
implementations that take none, such as flash attention's variable-length kernels) every group is one sequence,
prompt and completion, and `position_ids` restarting at 0 tell transformers where each sequence begins (for flash
attention all in one row: its variable-length kernels read packed sequences only from a batch of one).

Groups go into rows first-fit-decreasing (`pack_rows`). The row width is chosen from a few candidates between the
longest group and max(longest group, MAX_ROW) to minimise an estimate of the work, rows · W · (6·hidden + W): the
matrix products grow with the tokens a row holds, padding included, the attention with W² per row. One long row
with a dense mask would pay quadratic attention over the whole batch; rows of at most MAX_ROW tokens also keep
every group inside one key block of torch's CPU attention kernel, so a sequence's log-probs do not depend on where
in a row it lands (the cached reference log-probs then equal the policy's at step 0 bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_ROW = 512  # tokens per row unless one group is longer
WIDTH_STEPS = (1.0, 1.125, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)  # candidate widths, × the longest group


@dataclass
class Packed:
    """A packed batch: R rows of width W; T = the completion tokens of the original batch."""

    input_ids: torch.Tensor  # (R, W) int64
    position_ids: torch.Tensor  # (R, W) int64: positions within each sequence
    group: torch.Tensor  # (R, W) int64: the group of each token (each padding token has a group of its own)
    branch: torch.Tensor  # (R, W) int64: 0 = the group's prompt, k = its k-th completion
    predictors: torch.Tensor  # (T,) flat index into R·W of the hidden state that predicts each completion token
    labels: torch.Tensor  # (T,) int64: the completion tokens
    rows: torch.Tensor  # (T,) the original batch row each completion token belongs to


def pack_rows(lengths: list[int], width: int) -> list[list[int]]:
    """First-fit decreasing: the indices of `lengths` in rows whose lengths sum to at most `width` (each length ≤
    width); ties keep index order, so the same lengths always give the same rows."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(width - lengths[i])
    return rows


def choose_rows(lengths: list[int], hidden_size: int) -> tuple[int, list[list[int]]]:
    """(W, rows): the candidate packing with the least estimated work rows · W · (6·hidden_size + W), W being the
    fullest row's length (see the module docstring)."""
    longest = max(lengths)
    cap = max(longest, MAX_ROW)
    best = None
    for width in sorted({min(cap, int(longest * s)) for s in WIDTH_STEPS} | {cap}):
        rows = pack_rows(lengths, width)
        used = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * used * (6 * hidden_size + used)
        if best is None or cost < best[0]:
            best = (cost, used, rows)
    return best[1], best[2]


def _groups(starts: list[int], counts: list[int], n_keys: int, share: bool) -> list[tuple[int, int, list[int]]]:
    """(row holding the prompt, prompt length, rows of its completions) per group: the key-major rows of one example
    when `share` and their prompts line up, else one group per row that has completion tokens."""
    n = len(starts)
    b = n // n_keys if n_keys > 1 and n % n_keys == 0 else 0
    if share and b and all(counts) and all(starts[k * b + j] == starts[j] for k in range(n_keys) for j in range(b)):
        return [(j, starts[j], [k * b + j for k in range(n_keys)]) for j in range(b)]
    return [(i, starts[i], [i]) for i in range(n) if counts[i]]


def collated_layout(attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> tuple[list, list] | None:
    """(completion start, completion length) per row when the batch is laid out as `data.collate` builds it: right
    padding, each completion running from its start (≥ 1) to the row's last token; None otherwise."""
    cols = torch.arange(attention_mask.size(1), device=attention_mask.device)
    ends = attention_mask.sum(dim=1, keepdim=True)
    counts = completion_mask.sum(dim=1, keepdim=True)
    starts = ends - counts
    expected = (cols >= starts) & (cols < ends)
    if not (torch.equal(attention_mask.bool(), cols < ends) and torch.equal(completion_mask.bool(), expected)):
        return None
    if bool(((starts < 1) & (counts > 0)).any()):
        return None
    return starts.squeeze(1).tolist(), counts.squeeze(1).tolist()


def pack(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    n_keys: int,
    share_prompts: bool,
    hidden_size: int,
    single_row: bool = False,
) -> Packed | None:
    """The padded batch (N, L) of `data.collate` as a `Packed` batch; None when its layout is not collate's. With
    `share_prompts` each prompt appears once for its n_keys completions (needs `block_causal_mask`); `single_row`
    puts every group in one row (flash attention's variable-length kernels take packed sequences only so, and pay
    no attention across them)."""
    layout = collated_layout(attention_mask, completion_mask)
    if layout is None or not any(layout[1]):
        return None
    starts, counts = layout
    groups = _groups(starts, counts, n_keys, share_prompts)
    lengths = [p + sum(counts[r] for r in rows) for _, p, rows in groups]
    if single_row:
        width, placement = sum(lengths), [list(range(len(groups)))]
    else:
        width, placement = choose_rows(lengths, hidden_size)
    names = ("dst", "src", "pos", "group", "branch", "pred", "lab", "row")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in names}

    def put(dst0: int, src0: int, pos0: int, size: int, g: int, branch: int) -> None:
        parts["dst"].append(torch.arange(dst0, dst0 + size))
        parts["src"].append(torch.arange(src0, src0 + size))
        parts["pos"].append(torch.arange(pos0, pos0 + size))
        parts["group"].append(torch.full((size,), g))
        parts["branch"].append(torch.full((size,), branch))

    L = input_ids.size(1)
    for r, members in enumerate(placement):
        at = r * width
        for g in members:
            prompt_row, p, rows = groups[g]
            put(at, prompt_row * L, 0, p, g, 0)
            last_prompt, at = at + p - 1, at + p
            for k, row in enumerate(rows, 1):
                c = counts[row]
                put(at, row * L + p, p, c, g, k)
                parts["pred"] += [torch.tensor([last_prompt]), torch.arange(at, at + c - 1)]
                parts["lab"].append(torch.arange(row * L + p, row * L + p + c))
                parts["row"].append(torch.full((c,), row))
                at += c
    cat = {k: torch.cat(v) for k, v in parts.items()}
    return _assemble(input_ids, cat, len(placement), width, len(groups))


def _assemble(input_ids: torch.Tensor, parts: dict[str, torch.Tensor], n_rows: int, width: int, n_groups: int):
    """The `Packed` tensors from the flat index lists of `pack` (padding: its own group per token, positions
    counting from 0 after a row's last sequence, so that no padding token continues a sequence)."""
    device, size = input_ids.device, n_rows * width
    real = torch.zeros(size, dtype=torch.bool)
    real[parts["dst"]] = True
    pad = (~real).view(n_rows, width).long()
    pad_pos = (pad.cumsum(dim=1) - 1).clamp(min=0).view(-1)
    position_ids = torch.where(real, 0, pad_pos)
    position_ids[parts["dst"]] = parts["pos"]
    group = n_groups + torch.arange(size)  # padding tokens: a group of their own each
    group[parts["dst"]] = parts["group"]
    branch = torch.zeros(size, dtype=torch.long)
    branch[parts["dst"]] = parts["branch"]
    flat = input_ids.reshape(-1)
    ids = torch.zeros(size, dtype=input_ids.dtype, device=device)
    ids[parts["dst"].to(device)] = flat[parts["src"].to(device)]
    return Packed(
        input_ids=ids.view(n_rows, width),
        position_ids=position_ids.view(n_rows, width).to(device),
        group=group.view(n_rows, width).to(device),
        branch=branch.view(n_rows, width).to(device),
        predictors=parts["pred"].to(device),
        labels=flat[parts["lab"].to(device)],
        rows=parts["row"].to(device),
    )


def block_causal_mask(packed: Packed, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(R, 1, W, W) attention mask of a packed batch: query i sees key j ≤ i of its own group when j is in the
    group's prompt or in i's own completion. Boolean (True = attend; sdpa's form), or with `dtype` additive (0 or the
    dtype's minimum; eager attention's form)."""
    g, b = packed.group, packed.branch
    width = g.size(1)
    causal = torch.ones(width, width, dtype=torch.bool, device=g.device).tril()
    same = g.unsqueeze(2) == g.unsqueeze(1)
    visible = (b.unsqueeze(1) == 0) | (b.unsqueeze(2) == b.unsqueeze(1))
    allowed = (same & visible & causal).unsqueeze(1)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=g.device).masked_fill_(~allowed, torch.finfo(dtype).min)
