"""The one table of preference losses, torch-free to import (docs/losses.md is generated from it).

Each entry names its pure function in `tether.losses`, its formula in tether's notation (docs/methods.md §1),
the paper and equation, its parameters (options of `tether train`, `tether online` and `tether eval`, with
defaults and ranges), whether it needs a reference π_ref, whether it length-normalizes, its name in TRL 1.16
(DPOTrainer's `loss_type`, or the TRL trainer that has it) with the metrics TRL logs for it, and — for a loss
that is not a mean over pairs — how its batch is formed. Every list of losses in tether comes from here:
the options' choices and `--help`, the TRL key mapping, the docs' tables, the studies' arms.

Adding a loss = one function in tether.losses + one entry here + its test (tests/test_losses.py checks the
entry against the function's signature; tests/test_trl_losses.py checks each TRL name against TRL itself).

A mixture `loss: a+b+c` with `loss_weights: [w_a, w_b, w_c]` (default: all 1) is Σ_k w_k · L_k, as TRL's list
of loss types with `loss_weights` (MPO: sigmoid, bco_pair, sft with 0.8, 0.2, 1.0 is `dpo+bco_pair+sft`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# the metrics TRL 1.16's DPOTrainer logs for every loss type (tether logs the first eight under these names in
# its trackers, logits/* averaged per pair, not per token: docs/losses.md; not the last three)
DPO_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
    "entropy",
    "mean_token_accuracy",
    "num_tokens",
)
# TRL's experimental CPOTrainer (cpo, simpo) and ORPOTrainer (orpo) log these
CPO_METRICS = DPO_METRICS[:8] + ("nll_loss",)
ORPO_METRICS = CPO_METRICS + ("log_odds_ratio", "log_odds_chosen")


@dataclass(frozen=True)
class Param:
    """A loss parameter: an option of the same name. `default` None = no default (it must be given)."""

    name: str
    default: float | None
    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = True

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def range_text(self) -> str:
        """'> 0', '>= 0' or 'in [0, 0.5)'."""
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


# what each parameter option means (its --help text); the defaults and ranges are per loss, in the table
PARAM_HELP = {
    "beta": "β: strength of the loss's tie to the reference (the scale of the implicit rewards r = β·log-ratio); "
    "null = the loss's default (docs/losses.md): 0.1, or 2.0 for simpo",
    "label_smoothing": "ε: conservative DPO (dpo), the label-flip rate (robust, aot, aot_unpaired), EXO's ε "
    "(exo_pair, required there); 0 = off",
    "discopop_tau": "τ of DiscoPOP's log-ratio modulation (discopop only)",
    "simpo_gamma": "γ: SimPO's target reward margin (simpo only)",
    "cpo_alpha": "weight of CPO's NLL term on the chosen response (cpo only)",
}
OPTION_DEFAULTS = {"beta": None, "label_smoothing": 0.0, "discopop_tau": 0.05, "simpo_gamma": 1.0, "cpo_alpha": 1.0}


def _beta(default: float = 0.1) -> Param:
    return Param("beta", default, 0.0, low_open=True)


SMOOTHING = Param("label_smoothing", 0.0, 0.0, 0.5)
TAU = Param("discopop_tau", 0.05, 0.0, low_open=True)


@dataclass(frozen=True)
class Loss:
    name: str
    function: str  # the pure function in tether.losses
    formula: str  # per-pair loss in tether's notation (docs/methods.md §1)
    source: str  # paper and equation
    params: tuple[Param, ...]
    reference: bool = True  # needs π_ref's log-probs of y_w and y_l
    normalized: bool = False  # built from per-token mean log-probs
    trl: str | None = None  # its loss_type in TRL 1.16's trl_trainer
    trl_trainer: str = "DPOTrainer"  # CPOTrainer and ORPOTrainer are in trl.experimental
    metrics: tuple[str, ...] = DPO_METRICS  # what TRL logs for it
    batch: str = ""  # how the batch loss is formed when it is not the mean over pairs

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)


_LOSSES = (
    Loss(
        "dpo",
        "dpo_loss",
        "−(1−ε)·log σ(β h) − ε·log σ(−β h)",
        "DPO, Rafailov et al. 2023 (arXiv 2305.18290), Eq. 7; ε: conservative DPO (Mitchell 2023)",
        (_beta(), SMOOTHING),
        trl="sigmoid",
    ),
    Loss(
        "ipo",
        "ipo_loss",
        "(h̄ − 1/(2β))², h̄ the margin of MEAN log-probs",
        "IPO, Azar et al. 2023 (arXiv 2310.12036), Eq. 17; length-averaged as in TRL and the BPO code",
        (_beta(),),
        normalized=True,
        trl="ipo",
    ),
    Loss(
        "slic",
        "slic_loss",
        "max(0, 1 − β h)",
        "the calibration (hinge) loss of SLiC-HF, Zhao et al. 2023 (arXiv 2305.10425), in TRL's form",
        (_beta(),),
        trl="hinge",
    ),
    Loss(
        "exo_pair",
        "exo_pair_loss",
        "σ(βh)·[log σ(βh) − log(1−ε)] + σ(−βh)·[log σ(−βh) − log ε]",
        "EXO, Ji et al. 2024 (arXiv 2402.00856), Eq. 16 (pairwise); ε > 0 required, the paper uses 1e-3",
        (_beta(), Param("label_smoothing", None, 0.0, 1.0, low_open=True)),
        trl="exo_pair",
    ),
    Loss(
        "nca_pair",
        "nca_pair_loss",
        "−log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)",
        "NCA, Chen et al. 2024 (arXiv 2402.05369), the pairwise (K = 2) NCA loss",
        (_beta(),),
        trl="nca_pair",
    ),
    Loss(
        "robust",
        "robust_loss",
        "[−(1−ε)·log σ(β h) + ε·log σ(−β h)] / (1 − 2ε)",
        "Robust DPO (rDPO), Chowdhury et al. 2024 (arXiv 2403.00409); ε the label-flip rate",
        (_beta(), SMOOTHING),
        trl="robust",
    ),
    Loss(
        "bco_pair",
        "bco_pair_loss",
        "−log σ(r_w) − log σ(−r_l)",
        "BCO, Jung et al. 2024 (arXiv 2404.04656), on pairs and without the reward shift δ (as in TRL)",
        (_beta(),),
        trl="bco_pair",
    ),
    Loss(
        "sppo_hard",
        "sppo_hard_loss",
        "(ℓ_w − 1/(2β))² + (ℓ_l + 1/(2β))², ℓ = log π_θ − log π_ref",
        "SPPO, Wu et al. 2024 (arXiv 2405.00675), Eq. 4.7 with hard probabilities P(y_w ≻ y_l) = 1",
        (_beta(),),
        trl="sppo_hard",
    ),
    Loss(
        "aot",
        "aot_loss",
        "−(1−ε)·log σ(β δ_(i)) − ε·log σ(−β δ_(i)), δ_(i) = sort(ρ_θ)_i − sort(ρ_ref)_i, ρ = log π(y_w) − log π(y_l)",
        "AOT, Melnyk et al. 2024 (arXiv 2406.05882), paired form",
        (_beta(), SMOOTHING),
        trl="aot",
        batch="sorts the pairs' log-ratios across the micro-batch: pair i of the loss is the i-th smallest",
    ),
    Loss(
        "aot_unpaired",
        "aot_unpaired_loss",
        "−(1−ε)·log σ(β δ_(i)) − ε·log σ(−β δ_(i)), δ_(i) = sort(ℓ_w)_i − sort(ℓ_l)_i",
        "AOT, Melnyk et al. 2024 (arXiv 2406.05882), unpaired form",
        (_beta(), SMOOTHING),
        trl="aot_unpaired",
        batch="sorts chosen and rejected log-ratios separately across the micro-batch",
    ),
    Loss(
        "apo_zero",
        "apo_zero_loss",
        "1 − σ(r_w) + σ(r_l)",
        "APO-zero, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 7",
        (_beta(),),
        trl="apo_zero",
    ),
    Loss(
        "apo_down",
        "apo_down_loss",
        "σ(r_w) + 1 − σ(β h)",
        "APO-down, D'Oosterlinck et al. 2024 (arXiv 2408.06266), Eq. 8",
        (_beta(),),
        trl="apo_down",
    ),
    Loss(
        "discopop",
        "discopop_loss",
        "(1 − m)·(−log σ(β h)) + m·exp(−β h), m = σ(β h / τ)",
        "DiscoPOP (log-ratio modulated loss), Lu et al. 2024 (arXiv 2406.08414), Eq. 5",
        (_beta(), TAU),
        trl="discopop",
    ),
    Loss(
        "sft",
        "sft_loss",
        "−Σ_pairs log π_θ(y_w|x) / Σ_pairs |y_w|",
        "NLL of the chosen responses, the SFT term of MPO (Wang et al. 2024, arXiv 2411.10442)",
        (_beta(),),
        reference=False,
        trl="sft",
        batch="a token mean over all chosen tokens of the micro-batch (every pair gets the batch's value)",
    ),
    Loss(
        "sigmoid_norm",
        "sigmoid_norm_loss",
        "−log σ(β h̄), h̄ the margin of MEAN log-probs",
        "length-normalized DPO (as in Tülu 3, Lambert et al. 2024, arXiv 2411.15124)",
        (_beta(),),
        normalized=True,
        trl="sigmoid_norm",
    ),
    Loss(
        "simpo",
        "simpo_loss",
        "−log σ(β·mean log π_θ(y_w|x) − β·mean log π_θ(y_l|x) − γ)",
        "SimPO, Meng et al. 2024 (arXiv 2405.14734), Eq. 6; β = 2, γ = 1 (γ/β = 0.5, a SimPO recipe's setting)",
        (_beta(2.0), Param("simpo_gamma", 1.0, 0.0)),
        reference=False,
        normalized=True,
        trl="simpo",
        trl_trainer="CPOTrainer",
        metrics=CPO_METRICS,
    ),
    Loss(
        "orpo",
        "orpo_loss",
        "−mean log π_θ(y_w|x) − β·log σ(log odds(y_w) − log odds(y_l)), odds(y) = p/(1−p), p = exp(mean log π_θ(y|x))",
        "ORPO, Hong et al. 2024 (arXiv 2403.07691), Eqs. 4, 6, 7; β is the paper's λ (as TRL's ORPOConfig)",
        (_beta(),),
        reference=False,
        normalized=True,
        trl_trainer="ORPOTrainer",
        metrics=ORPO_METRICS,
    ),
    Loss(
        "cpo",
        "cpo_loss",
        "−log σ(β log π_θ(y_w|x) − β log π_θ(y_l|x)) − α·mean log π_θ(y_w|x)",
        "CPO, Xu et al. 2024 (arXiv 2401.08417), Eq. 3 plus its NLL term (α = cpo_alpha)",
        (_beta(), Param("cpo_alpha", 1.0, 0.0)),
        reference=False,
        trl="sigmoid",
        trl_trainer="CPOTrainer",
        metrics=CPO_METRICS,
    ),
)
LOSSES: dict[str, Loss] = {entry.name: entry for entry in _LOSSES}
NAMES: tuple[str, ...] = tuple(LOSSES)
# DPOTrainer's loss_type -> tether's loss (the TRL YAML key `loss_type` maps through this)
TRL_LOSS_TYPES: dict[str, str] = {e.trl: e.name for e in _LOSSES if e.trl and e.trl_trainer == "DPOTrainer"}
PARAMS: tuple[str, ...] = tuple(OPTION_DEFAULTS)


def components(loss: str) -> tuple[str, ...]:
    """The loss names of `loss` ("dpo" or a mixture "dpo+bco_pair+sft"); ValueError naming an unknown one."""
    names = tuple(loss.split("+"))
    for name in names:
        if name not in LOSSES:
            trl = TRL_LOSS_TYPES.get(name)
            hint = f" (TRL's name for '{trl}')" if trl else ""
            raise ValueError(f"unknown loss '{name}'{hint}; choose from {', '.join(NAMES)}, or a mixture a+b")
    if len(set(names)) != len(names):
        raise ValueError(f"loss '{loss}' names a loss twice")
    return names


def needs_reference(loss: str) -> bool:
    """Whether any component of `loss` reads π_ref (a loss that does not is trained with no reference)."""
    return any(LOSSES[name].reference for name in components(loss))


def reference_free_names() -> tuple[str, ...]:
    return tuple(name for name, entry in LOSSES.items() if not entry.reference)


def resolve_options(loss: str, weights: list[float] | None, values: dict) -> dict:
    """Check a loss (or mixture), its weights and its parameter options; returns the options with `beta`
    resolved to the loss's default when null. Raises ValueError with a message naming the option."""
    try:
        entries = [LOSSES[name] for name in components(loss)]
    except ValueError as e:
        raise ValueError(f"option 'loss': {e}") from None
    if weights is not None:
        if len(weights) != len(entries):
            raise ValueError(
                f"option 'loss_weights' has {len(weights)} weights for the {len(entries)} losses of {loss}"
            )
        if any(not w >= 0 for w in weights) or not any(weights):
            raise ValueError(f"option 'loss_weights' must be >= 0 and not all 0, got {weights}")
    out = dict(values)
    used = {p.name: [] for p in (p for e in entries for p in e.params)}
    for e in entries:
        for p in e.params:
            used[p.name].append((e.name, p))
    if out.get("beta") is None:
        defaults = {p.default for _, p in used["beta"]}
        if len(defaults) > 1:
            raise ValueError(f"losses {loss} have different default β ({sorted(defaults)}): set option 'beta'")
        out["beta"] = defaults.pop()
    problems = []  # every parameter's problem at once
    for name, readers in used.items():
        value = out[name]
        for who, p in readers:
            if p.default is None and value == OPTION_DEFAULTS[name]:
                problems.append(f"loss {who} needs option '{name}' {p.range_text()} ({PARAM_HELP[name]})")
            elif not p.accepts(value):
                problems.append(f"option '{name}' must be {p.range_text()} for loss {who}, got {value}")
    for name in PARAMS:
        if name not in used and out[name] != OPTION_DEFAULTS[name]:
            readers = [e.name for e in _LOSSES if name in e.param_names]
            problems.append(f"option '{name}' is a parameter of {', '.join(readers)} only; loss is {loss}")
    if problems:
        raise ValueError("; ".join(problems))
    return out


def loss_help() -> str:
    """The `loss` option's --help text: every loss of the table, with its TRL name where that differs."""
    names = []
    for e in _LOSSES:
        label = e.name + (f" (TRL {e.trl})" if e.trl_trainer == "DPOTrainer" and e.trl != e.name else "")
        names.append(label + ("" if e.reference else " [no reference]"))
    return (
        f"preference loss (docs/losses.md): {', '.join(names)}; or a mixture a+b+c weighted by loss_weights "
        "([no reference]: trained without a reference model)"
    )
