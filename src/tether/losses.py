"""Preference losses as pure functions of log-prob tensors (docs/methods.md §1–3). No model, no I/O.

Shapes: every input is (B,) — one entry per preference pair — and every per-pair output is (B,).
`*_logps` are SUMMED completion log-probs, `*_len` the number of completion tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected) -> torch.Tensor:
    """h = [log π_θ(y_w|x) − log π_ref(y_w|x)] − [log π_θ(y_l|x) − log π_ref(y_l|x)]   (B,)"""
    return (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)


def dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (DPO paper Eq. 7) with conservative label smoothing ε:
    −(1−ε)·log σ(β h) − ε·log σ(−β h).   h: (B,) → (B,)"""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h_mean: torch.Tensor, beta: float) -> torch.Tensor:
    """IPO (IPO paper Eq. 17): (h − 1/(2β))², with h built from MEAN (length-averaged) log-probs.
    h_mean: (B,) → (B,)"""
    return (h_mean - 1.0 / (2.0 * beta)) ** 2


def slic_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """SLiC hinge: max(0, 1 − β h).   h: (B,) → (B,)"""
    return torch.relu(1.0 - beta * h)


def nll_loss(policy_chosen: torch.Tensor, chosen_len: torch.Tensor) -> torch.Tensor:
    """RPO-style SFT term: −mean per-token log-prob of y_w under π_θ.   (B,) → (B,)"""
    return -policy_chosen / chosen_len.clamp(min=1)


def base_anchor(
    policy_base: torch.Tensor,
    ref_base: torch.Tensor,
    base_len: torch.Tensor,
    form: str = "hinge",
    normalize: str = "sum",
) -> torch.Tensor:
    """BAPO anchor A(x, y_b) (docs/methods.md §3) on the base model's own response y_b.

    hinge:   max(0, log π_ref(y_b|x) − log π_θ(y_b|x))
    squared: (log π_θ(y_b|x) − log π_ref(y_b|x))²
    normalize='mean' divides both log-probs by the number of tokens of y_b first.
    policy_base, ref_base, base_len: (B,) → (B,)
    """
    if normalize == "mean":
        policy_base, ref_base = policy_base / base_len.clamp(min=1), ref_base / base_len.clamp(min=1)
    elif normalize != "sum":
        raise ValueError(f"unknown anchor normalization {normalize!r}; use 'sum' or 'mean'")
    if form == "hinge":
        return torch.relu(ref_base - policy_base)
    if form == "squared":
        return (policy_base - ref_base) ** 2
    raise ValueError(f"unknown anchor form {form!r}; use 'hinge' or 'squared'")


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    loss: str = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch loss = mean over pairs of L_DAP (+ nll_weight · NLL on y_w), and per-pair statistics.

    Returns (loss scalar, stats) where stats holds detached (B,) tensors: `loss` (per pair),
    `rewards_chosen` r_w = β(log π_θ(y_w) − log π_ref(y_w)), `rewards_rejected` r_l, `reward_accuracy`
    [r_w > r_l], `reward_margin` r_w − r_l, `logps_chosen`, `logps_rejected` (and `nll` when used).
    Rewards always use summed log-probs, as TRL's DPOTrainer reports them, whatever the loss.
    """
    if loss == "dpo":
        per_pair = dpo_loss(
            logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta, label_smoothing
        )
    elif loss == "ipo":
        cl, rl = chosen_len.clamp(min=1), rejected_len.clamp(min=1)
        per_pair = ipo_loss(
            logratio_margin(policy_chosen / cl, policy_rejected / rl, ref_chosen / cl, ref_rejected / rl), beta
        )
    elif loss == "slic":
        per_pair = slic_loss(logratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected), beta)
    else:
        raise ValueError(f"unknown loss {loss!r}; choose one of dpo, ipo, slic")
    stats = {}
    if nll_weight:
        nll = nll_loss(policy_chosen, chosen_len)
        per_pair = per_pair + nll_weight * nll
        stats["nll"] = nll.detach()
    r_w = beta * (policy_chosen - ref_chosen).detach()
    r_l = beta * (policy_rejected - ref_rejected).detach()
    stats.update(
        loss=per_pair.detach(),
        rewards_chosen=r_w,
        rewards_rejected=r_l,
        reward_accuracy=(r_w > r_l).float(),
        reward_margin=r_w - r_l,
        logps_chosen=policy_chosen.detach(),
        logps_rejected=policy_rejected.detach(),
    )
    return per_pair.mean(), stats


def objective(
    policy_logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor,
    n_keys: int,
    *,
    loss: str,
    beta: float,
    label_smoothing: float,
    nll_weight: float,
    anchor_weight: float,
    anchor_form: str,
    anchor_normalize: str,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What both training loops minimise (docs/methods.md, "The objective"):

        L = mean over pairs of [ L_DAP(h) + α·NLL(y_w) + λ · mean_j A(x, y_b^j) ]

    Inputs are KEY-MAJOR rows (n_keys·B,): B chosen rows, B rejected rows, then (BAPO) B rows for each of the
    n_keys − 2 base responses y_b^j. `policy_logps` / `ref_logps` are summed completion log-probs under π_θ and
    π_ref, `lengths` completion token counts. Without base rows there is no anchor (λ is not used).
    Returns (scalar loss, per-pair (B,) stats of `preference_loss`, plus `anchor`, `logps_base`,
    `anchor_active` with base rows; the per-pair `loss` includes the anchor)."""
    pol, lens, ref = policy_logps.view(n_keys, -1), lengths.view(n_keys, -1), ref_logps.view(n_keys, -1)
    total, stats = preference_loss(
        pol[0],
        pol[1],
        ref[0],
        ref[1],
        lens[0],
        lens[1],
        loss=loss,
        beta=beta,
        label_smoothing=label_smoothing,
        nll_weight=nll_weight,
    )
    if n_keys > 2:
        anchor = base_anchor(pol[2:], ref[2:], lens[2:], anchor_form, anchor_normalize).mean(dim=0)
        total = total + anchor_weight * anchor.mean()
        stats["loss"] = stats["loss"] + anchor_weight * anchor.detach()
        stats["anchor"] = anchor.detach()
        stats["logps_base"] = pol[2:].detach().mean(dim=0)
        stats["anchor_active"] = (ref[2:] > pol[2:]).float().mean(dim=0)
    return total, stats
