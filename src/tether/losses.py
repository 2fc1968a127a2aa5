"""Preference losses as pure functions of log-prob tensors (docs/methods.md §1–4). No model, no I/O.

Shapes: every input is (B,) — one entry per preference pair — and every per-pair output is (B,).
`*_logps` are SUMMED completion log-probs, `*_len` the number of completion tokens.

The table of losses (name -> function, paper, parameters, reference or not) is `tether.loss_table`. A loss
function names what it reads: its arguments are the per-pair quantities of `PairLogps` (h, h_mean,
chosen_logratio, policy_chosen_mean, ...) and its parameters (beta, label_smoothing, ...), and
`preference_loss` passes exactly those. It returns the per-pair loss, or (per-pair loss, extra stats).
"""

from __future__ import annotations

import functools
import inspect
import math

import torch
import torch.nn.functional as F

from .loss_table import LOSSES, OPTION_DEFAULTS, PARAMS, components


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


def exo_pair_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """EXO-pref for a pair (EXO paper Eq. 16): KL(q ‖ p) of q = (σ(βh), σ(−βh)) from p = (1−ε, ε).
    h: (B,) → (B,)"""
    q_w, q_l = torch.sigmoid(beta * h), torch.sigmoid(-beta * h)
    return q_w * (F.logsigmoid(beta * h) - math.log1p(-label_smoothing)) + q_l * (
        F.logsigmoid(-beta * h) - math.log(label_smoothing)
    )


def nca_pair_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """NCA for a pair (NCA paper, K = 2): −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l), r = β·log-ratio.
    (B,) → (B,)"""
    r_w, r_l = beta * chosen_logratio, beta * rejected_logratio
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO (rDPO) with label-flip rate ε: [−(1−ε)·log σ(βh) + ε·log σ(−βh)] / (1 − 2ε).   (B,) → (B,)"""
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)


def bco_pair_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """BCO on pairs, without the reward shift: −log σ(r_w) − log σ(−r_l), r = β·log-ratio.   (B,) → (B,)"""
    return -F.logsigmoid(beta * chosen_logratio) - F.logsigmoid(-beta * rejected_logratio)


def sppo_hard_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """SPPO (SPPO paper Eq. 4.7) with hard win probabilities 1 and 0: (ℓ_w − 1/(2β))² + (ℓ_l + 1/(2β))²,
    ℓ the log-ratio log π_θ − log π_ref.   (B,) → (B,)"""
    return (chosen_logratio - 0.5 / beta) ** 2 + (rejected_logratio + 0.5 / beta) ** 2


def _smoothed_sigmoid(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * delta) * (1.0 - label_smoothing) - F.logsigmoid(-beta * delta) * label_smoothing


def aot_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float):
    """AOT, paired: the DPO loss on δ_(i) = sort(ρ_θ)_i − sort(ρ_ref)_i, ρ = log π(y_w) − log π(y_l) — the
    i-th smallest policy log-ratio against the i-th smallest reference one, over the batch. (B,) → (B,) in
    sorted order, not the pairs' order."""
    delta = torch.sort(policy_chosen - policy_rejected).values - torch.sort(ref_chosen - ref_rejected).values
    return _smoothed_sigmoid(delta, beta, label_smoothing)


def aot_unpaired_loss(chosen_logratio, rejected_logratio, beta: float, label_smoothing: float) -> torch.Tensor:
    """AOT, unpaired: the DPO loss on δ_(i) = sort(ℓ_w)_i − sort(ℓ_l)_i over the batch.   (B,) → (B,) sorted"""
    delta = torch.sort(chosen_logratio).values - torch.sort(rejected_logratio).values
    return _smoothed_sigmoid(delta, beta, label_smoothing)


def apo_zero_loss(chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-zero (APO paper Eq. 7): 1 − σ(r_w) + σ(r_l) — raise y_w, lower y_l.   (B,) → (B,)"""
    return 1.0 - torch.sigmoid(beta * chosen_logratio) + torch.sigmoid(beta * rejected_logratio)


def apo_down_loss(chosen_logratio: torch.Tensor, h: torch.Tensor, beta: float) -> torch.Tensor:
    """APO-down (APO paper Eq. 8): σ(r_w) + 1 − σ(β h) — lower both, y_l more.   (B,) → (B,)"""
    return torch.sigmoid(beta * chosen_logratio) + 1.0 - torch.sigmoid(beta * h)


def discopop_loss(h: torch.Tensor, beta: float, discopop_tau: float) -> torch.Tensor:
    """DiscoPOP (DiscoPOP paper Eq. 5): (1 − m)·(−log σ(βh)) + m·exp(−βh), m = σ(βh/τ).   (B,) → (B,)"""
    logits = beta * h
    m = torch.sigmoid(logits / discopop_tau)
    return -F.logsigmoid(logits) * (1.0 - m) + torch.exp(-logits) * m


def sft_loss(policy_chosen: torch.Tensor, chosen_len: torch.Tensor) -> torch.Tensor:
    """NLL of y_w as a token mean over the batch: −Σ log π_θ(y_w|x) / Σ |y_w| (not a mean over pairs: every
    pair gets the batch's value).   (B,) → (B,)"""
    return (-policy_chosen.sum() / chosen_len.sum().clamp(min=1)).expand(policy_chosen.shape)


def sigmoid_norm_loss(h_mean: torch.Tensor, beta: float) -> torch.Tensor:
    """Length-normalized DPO: −log σ(β h̄), h̄ the margin of MEAN log-probs.   (B,) → (B,)"""
    return -F.logsigmoid(beta * h_mean)


def simpo_loss(policy_chosen_mean, policy_rejected_mean, beta: float, simpo_gamma: float) -> torch.Tensor:
    """SimPO (SimPO paper Eq. 6), no reference: −log σ(β·mean log π_θ(y_w) − β·mean log π_θ(y_l) − γ).
    (B,) → (B,)"""
    return -F.logsigmoid(beta * (policy_chosen_mean - policy_rejected_mean) - simpo_gamma)


def cpo_loss(policy_chosen, policy_rejected, policy_chosen_mean, beta: float, cpo_alpha: float):
    """CPO (CPO paper Eq. 3 + its NLL term), no reference: −log σ(β log π_θ(y_w) − β log π_θ(y_l)) + α·NLL(y_w),
    NLL = −mean log π_θ(y_w|x).   (B,) → ((B,), {"nll": (B,)})"""
    nll = -policy_chosen_mean
    return -F.logsigmoid(beta * (policy_chosen - policy_rejected)) + cpo_alpha * nll, {"nll": nll.detach()}


def _log1m_exp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0, accurate on both sides of −log 2 (Mächler 2012)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(policy_chosen_mean: torch.Tensor, policy_rejected_mean: torch.Tensor, beta: float):
    """ORPO (ORPO paper Eqs. 4, 6, 7), no reference: NLL(y_w) − λ·log σ(log odds(y_w) − log odds(y_l)), with
    odds(y) = p / (1 − p), p = exp(mean log π_θ(y|x)), λ = β.   (B,) → ((B,), {nll, log_odds_ratio,
    log_odds_chosen}), the last two as TRL's ORPOTrainer logs them: log σ(log-odds ratio) and the ratio."""
    log_odds = (policy_chosen_mean - _log1m_exp(policy_chosen_mean)) - (
        policy_rejected_mean - _log1m_exp(policy_rejected_mean)
    )
    ratio = F.logsigmoid(log_odds)
    nll = -policy_chosen_mean
    extra = {"nll": nll.detach(), "log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return nll - beta * ratio, extra


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


class PairLogps:
    """The per-pair quantities a loss function may ask for by argument name, each (B,), computed on first use:
    policy_chosen, policy_rejected, ref_chosen, ref_rejected (summed log-probs; the ref_* are None without a
    reference), chosen_len, rejected_len, and
        h                    the log-ratio margin (`logratio_margin`)
        h_mean               the same margin of per-token MEAN log-probs
        chosen_logratio      log π_θ(y_w|x) − log π_ref(y_w|x); rejected_logratio likewise
        policy_chosen_mean   mean log π_θ(y_w|x); policy_rejected_mean likewise"""

    def __init__(self, policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len):
        self.policy_chosen, self.policy_rejected = policy_chosen, policy_rejected
        self._ref = (ref_chosen, ref_rejected)
        self.chosen_len, self.rejected_len = chosen_len, rejected_len

    def _reference(self, i: int) -> torch.Tensor:
        if self._ref[i] is None:
            raise ValueError("this loss needs the reference's log-probs, and none were given")
        return self._ref[i]

    ref_chosen = property(lambda self: self._reference(0))
    ref_rejected = property(lambda self: self._reference(1))

    @functools.cached_property
    def h(self):
        return logratio_margin(self.policy_chosen, self.policy_rejected, self.ref_chosen, self.ref_rejected)

    @functools.cached_property
    def h_mean(self):
        cl, rl = self.chosen_len.clamp(min=1), self.rejected_len.clamp(min=1)
        return logratio_margin(
            self.policy_chosen / cl, self.policy_rejected / rl, self.ref_chosen / cl, self.ref_rejected / rl
        )

    chosen_logratio = functools.cached_property(lambda self: self.policy_chosen - self.ref_chosen)
    rejected_logratio = functools.cached_property(lambda self: self.policy_rejected - self.ref_rejected)
    policy_chosen_mean = functools.cached_property(lambda self: self.policy_chosen / self.chosen_len.clamp(min=1))
    policy_rejected_mean = functools.cached_property(lambda self: self.policy_rejected / self.rejected_len.clamp(min=1))


@functools.cache
def _arguments(function_name: str) -> tuple:
    fn = globals()[function_name]
    return fn, tuple(inspect.signature(fn).parameters)


def loss_term(name: str, pairs: PairLogps, params: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-pair loss (B,), extra stats) of the table's loss `name`, given the quantities it asks for."""
    fn, names = _arguments(LOSSES[name].function)
    out = fn(**{a: params[a] if a in PARAMS else getattr(pairs, a) for a in names})
    return out if isinstance(out, tuple) else (out, {})


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor | None,
    ref_rejected: torch.Tensor | None,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    loss: str = "dpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    nll_weight: float = 0.0,
    loss_weights: list[float] | None = None,
    **params: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Batch loss = mean over pairs of Σ_k w_k·L_k (+ nll_weight · NLL on y_w), and per-pair statistics.

    `loss` is a loss of tether.loss_table or a mixture "a+b" (weights `loss_weights`, default 1 each);
    `params` its other parameters (discopop_tau, simpo_gamma, cpo_alpha; the table's defaults when missing).
    ref_* may be None when no component reads the reference.

    Returns (loss scalar, stats) where stats holds detached (B,) tensors: `loss` (per pair),
    `rewards_chosen` r_w, `rewards_rejected` r_l, `reward_accuracy` [r_w > r_l], `reward_margin` r_w − r_l,
    `logps_chosen`, `logps_rejected` (and `nll` when used, and a loss's own terms, e.g. ORPO's log odds).
    Rewards use summed log-probs, as TRL's DPOTrainer reports them, whatever the loss: r = β(log π_θ − log π_ref);
    without a reference r = β·log π_θ (of MEAN log-probs for a length-normalizing loss), as TRL's CPO and ORPO
    trainers report them. For a loss that is not a mean over pairs (sft, aot, aot_unpaired) the per-pair
    `loss` is its batch's terms (see the table), whose mean is the batch loss.
    """
    names = components(loss)
    values = {**OPTION_DEFAULTS, **params, "beta": beta, "label_smoothing": label_smoothing}
    pairs = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_len, rejected_len)
    stats, terms = {}, []
    for k, name in enumerate(names):
        term, extra = loss_term(name, pairs, values)
        terms.append((term, 1.0 if loss_weights is None else loss_weights[k]))
        stats.update(extra)
    per_pair = terms[0][0] if loss_weights is None and len(terms) == 1 else sum(w * t for t, w in terms)
    nll = nll_loss(policy_chosen, chosen_len) if nll_weight else None
    if nll is not None:
        per_pair = per_pair + nll_weight * nll
        stats["nll"] = nll.detach()
    if len(terms) == 1:
        total = per_pair.mean()
    else:  # TRL's order of sums: Σ_k mean(L_k)·w_k
        total = sum(t.mean() * w for t, w in terms) + ((nll_weight * nll).mean() if nll is not None else 0.0)
    if ref_chosen is not None:
        r_w, r_l = beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()
    elif LOSSES[names[0]].normalized:
        r_w, r_l = beta * pairs.policy_chosen_mean.detach(), beta * pairs.policy_rejected_mean.detach()
    else:
        r_w, r_l = beta * policy_chosen.detach(), beta * policy_rejected.detach()
    stats.update(
        loss=per_pair.detach(),
        rewards_chosen=r_w,
        rewards_rejected=r_l,
        reward_accuracy=(r_w > r_l).float(),
        reward_margin=r_w - r_l,
        logps_chosen=policy_chosen.detach(),
        logps_rejected=policy_rejected.detach(),
    )
    return total, stats


def objective(
    policy_logps: torch.Tensor,
    lengths: torch.Tensor,
    ref_logps: torch.Tensor | None,
    n_keys: int,
    *,
    loss: str,
    beta: float,
    label_smoothing: float,
    nll_weight: float,
    anchor_weight: float,
    anchor_form: str,
    anchor_normalize: str,
    **loss_params,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """What both training loops minimise (docs/methods.md, "The objective"):

        L = mean over pairs of [ Σ_k w_k·L_k + α·NLL(y_w) + λ · mean_j A(x, y_b^j) ]

    Inputs are KEY-MAJOR rows (n_keys·B,): B chosen rows, B rejected rows, then (BAPO) B rows for each of the
    n_keys − 2 base responses y_b^j. `policy_logps` / `ref_logps` are summed completion log-probs under π_θ and
    π_ref, `lengths` completion token counts. With a loss that reads no reference (docs/losses.md), `ref_logps`
    may hold the base rows alone ((n_keys − 2)·B,), or be None without base rows: the no-reference mode.
    Without base rows there is no anchor (λ is not used). `loss_params`: loss_weights and the loss's other
    parameters (`preference_loss`).
    Returns (scalar loss, per-pair (B,) stats of `preference_loss`, plus `anchor`, `logps_base`,
    `anchor_active` with base rows; the per-pair `loss` includes the anchor)."""
    pol, lens = policy_logps.view(n_keys, -1), lengths.view(n_keys, -1)
    ref = ref_logps.view(-1, pol.size(1)) if ref_logps is not None else None
    paired_ref = ref is not None and ref.size(0) == n_keys  # else: the base rows' reference alone
    total, stats = preference_loss(
        pol[0],
        pol[1],
        ref[0] if paired_ref else None,
        ref[1] if paired_ref else None,
        lens[0],
        lens[1],
        loss=loss,
        beta=beta,
        label_smoothing=label_smoothing,
        nll_weight=nll_weight,
        **loss_params,
    )
    if n_keys > 2:
        ref_base = ref[2:] if paired_ref else ref
        anchor = base_anchor(pol[2:], ref_base, lens[2:], anchor_form, anchor_normalize).mean(dim=0)
        total = total + anchor_weight * anchor.mean()
        stats["loss"] = stats["loss"] + anchor_weight * anchor.detach()
        stats["anchor"] = anchor.detach()
        stats["logps_base"] = pol[2:].detach().mean(dim=0)
        stats["anchor_active"] = (ref_base > pol[2:]).float().mean(dim=0)
    return total, stats
