"""Every TRL 1.16 `loss_type` (and mixtures with `loss_weights`) against TRL's own DPOTrainer on the same
token log-probs: loss, gradient and logged metrics; SimPO, CPO and ORPO against TRL's experimental CPO and
ORPO trainers. `python tests/test_trl_losses.py` prints the largest deviation per loss."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tether.loss_table import DPO_METRICS, LOSSES, TRL_LOSS_TYPES
from tether.losses import cpo_loss, objective, orpo_loss, simpo_loss

trl = pytest.importorskip("trl")
from trl import DPOTrainer  # noqa: E402

TOL = 1e-6
SMOOTHING = {"robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1, "exo_pair": 1e-3}


def token_logps(seed: int, pairs: int = 6):
    """Per-token log-probs as TRL's fused head returns them ((2B, L−1), zero off the completion), the
    completion mask (2B, L) and reference log-probs of chosen and rejected (B,) each."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 4, (2 * pairs,), generator=g)
    completion = torch.randint(1, 8, (2 * pairs,), generator=g)
    length = int((prompt + completion).max())
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt.tolist(), completion.tolist())):
        mask[i, p : p + c] = 1
    per_token = -3 * torch.rand(2 * pairs, length - 1, generator=g) * mask[:, 1:]
    ref = per_token.sum(1) + 2 * torch.randn(2 * pairs, generator=g)
    return per_token, mask, ref[:pairs], ref[pairs:]


class FusedHeadOutput:
    """Stands in for the model under TRL's fused LM head: returns the given token log-probs."""

    training = True

    def __init__(self, per_token):
        self.per_token = per_token

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token)
        return SimpleNamespace(log_probs=self.per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())


def trl_dpo(loss_types, weights, per_token, mask, ref_c, ref_r, beta, label_smoothing, tau=0.05):
    """TRL's DPOTrainer loss (its own `_compute_loss`, precomputed reference log-probs) and logged metrics."""
    from accelerate import Accelerator

    model = FusedHeadOutput(per_token)
    trainer = DPOTrainer.__new__(DPOTrainer)
    trainer.__dict__.update(
        model=model,
        accelerator=Accelerator(cpu=True),
        precompute_ref_logps=True,
        loss_types=list(loss_types),
        loss_weights=list(weights) if weights else [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        f_divergence_type="reverse_kl",
        use_weighting=False,
        ld_alpha=None,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
        args=SimpleNamespace(discopop_tau=tau, gradient_checkpointing_kwargs=None),
    )
    inputs = {
        "input_ids": torch.ones_like(mask),
        "attention_mask": torch.ones_like(mask),
        "completion_mask": mask,
        "ref_chosen_logps": ref_c,
        "ref_rejected_logps": ref_r,
    }
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def tether_dpo(loss, weights, per_token, mask, ref_c, ref_r, beta, label_smoothing, tau=0.05):
    n = ref_c.numel()
    options = dict(loss=loss, beta=beta, label_smoothing=label_smoothing, nll_weight=0.0, anchor_weight=0.0)
    total, stats = objective(
        per_token.sum(1),
        mask.sum(1),
        torch.cat([ref_c, ref_r]),
        2,
        anchor_form="hinge",
        anchor_normalize="sum",
        loss_weights=weights,
        discopop_tau=tau,
        **options,
    )
    assert all(v.shape == (n,) for v in stats.values())
    return total, stats


# tether's stat -> TRL's metric name (what both log)
SHARED_METRICS = {
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "reward_accuracy": "rewards/accuracies",
    "reward_margin": "rewards/margins",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


def deviation(trl_types, weights, seed, beta, label_smoothing) -> dict[str, float]:
    """Largest |tether − TRL| of the loss, its gradient (per token log-prob) and the shared metrics."""
    per_token, mask, ref_c, ref_r = token_logps(seed)
    ours_in, theirs_in = per_token.clone().requires_grad_(), per_token.clone().requires_grad_()
    name = "+".join(TRL_LOSS_TYPES[t] for t in trl_types)
    ours, stats = tether_dpo(name, weights, ours_in, mask, ref_c, ref_r, beta, label_smoothing)
    theirs, metrics = trl_dpo(trl_types, weights, theirs_in, mask, ref_c, ref_r, beta, label_smoothing)
    ours.backward()
    theirs.backward()
    real = mask[:, 1:].bool()  # the completion tokens' log-probs (the rest are not log-probs of anything)
    assert set(metrics) == set(DPO_METRICS)  # the metrics the table says TRL logs for this loss
    # the per-pair losses average to the loss
    assert abs(stats["loss"].mean().item() - ours.item()) <= TOL * max(1.0, abs(ours.item()))
    return {
        "loss": abs(ours.item() - theirs.item()) / max(1.0, abs(theirs.item())),  # relative above 1
        "grad": (ours_in.grad - theirs_in.grad)[real].abs().max().item(),
        "metrics": max(abs(stats[k].mean().item() - metrics[v]) for k, v in SHARED_METRICS.items()),
        "value": theirs.item(),
    }


CASES = [((t,), None, SMOOTHING.get(t, 0.0)) for t in TRL_LOSS_TYPES] + [
    (("sigmoid", "bco_pair", "sft"), [0.8, 0.2, 1.0], 0.0),  # MPO
    (tuple(t for t in TRL_LOSS_TYPES if t != "sigmoid"), [0.5 + i / 10 for i in range(14)], 1e-3),
]


@pytest.mark.parametrize("types, weights, smoothing", CASES, ids=["+".join(c[0])[:40] for c in CASES])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_equal_to_trl(types, weights, smoothing, beta):
    for seed in range(3):
        dev = deviation(types, weights, seed, beta, smoothing)
        assert dev["loss"] <= TOL and dev["grad"] <= TOL and dev["metrics"] <= TOL, (seed, dev)
        assert math.isfinite(dev["value"]) and dev["value"] != 0


def test_every_trl_loss_type_is_in_the_table():
    from trl.trainer.dpo_config import DPOConfig

    help_text = DPOConfig.__dataclass_fields__["loss_type"].metadata["help"]
    listed = {word.strip("`',.") for word in help_text.split() if word.startswith("`'")}
    assert listed == set(TRL_LOSS_TYPES) and len(listed) == 15


def _trl_experimental(trainer: str, **attrs):
    from accelerate import Accelerator

    module = pytest.importorskip(f"trl.experimental.{trainer.lower()}.{trainer.lower()}_trainer")
    cls = getattr(module, f"{trainer}Trainer")
    stub = cls.__new__(cls)
    stub.__dict__.update(accelerator=Accelerator(cpu=True), alpha=0.0, label_smoothing=0.0, **attrs)
    return stub


def _policy_pairs(seed: int):
    per_token, mask, _, _ = token_logps(seed)
    sums, lens = per_token.sum(1), mask.sum(1)
    n = sums.numel() // 2
    return sums[:n], sums[n:], lens[:n], lens[n:]


@pytest.mark.parametrize("seed", range(3))
def test_reference_free_losses_equal_trl_experimental(seed):
    pc, pr, cl, rl = _policy_pairs(seed)
    cm, rm = pc / cl, pr / rl
    simpo = _trl_experimental("CPO", beta=2.0, loss_type="simpo", simpo_gamma=1.0)
    assert (simpo_loss(cm, rm, 2.0, 1.0) - simpo.cpo_loss(cm, rm)[0]).abs().max() <= TOL
    cpo = _trl_experimental("CPO", beta=0.1, loss_type="sigmoid")
    assert (cpo_loss(pc, pr, cm, 0.1, 0.0)[0] - cpo.cpo_loss(pc, pr)[0]).abs().max() <= TOL
    orpo = _trl_experimental("ORPO", beta=0.1)
    trl_ratio_term, _, _, trl_ratio, trl_log_odds = orpo.odds_ratio_loss(cm, rm)
    ours, extra = orpo_loss(cm, rm, 0.1)
    # TRL's ORPO loss is nll − mean(β·log σ(log odds)); its own NLL is a token mean over the batch
    assert (ours - extra["nll"] + trl_ratio_term).abs().max() <= TOL
    assert (
        abs(extra["log_odds_ratio"].mean() - trl_ratio) <= TOL
        and abs(extra["log_odds_chosen"].mean() - trl_log_odds) <= TOL
    )


def test_table_says_which_losses_need_a_reference():
    assert {n for n, e in LOSSES.items() if not e.reference} == {"sft", "simpo", "orpo", "cpo"}
    assert {n for n, e in LOSSES.items() if e.batch} == {"sft", "aot", "aot_unpaired"}


if __name__ == "__main__":  # the closing note's numbers: the largest deviation per loss over seeds and β
    for types, weights, smoothing in CASES:
        worst = defaultdict(float)
        for beta in (0.1, 0.5):
            for seed in range(3):
                for k, v in deviation(types, weights, seed, beta, smoothing).items():
                    if k != "value":
                        worst[k] = max(worst[k], v)
        label = "+".join(types) if len(types) < 4 else f"all {len(types)} but sigmoid"
        print(f"{label:32s} loss {worst['loss']:.1e}  grad {worst['grad']:.1e}  metrics {worst['metrics']:.1e}")


def test_which_trl_losses_read_label_smoothing():
    """TRL 1.16 reads label_smoothing in exactly the loss types tether.trl_key_table names (sigmoid ignores it,
    so tether refuses sigmoid + label_smoothing rather than train conservative DPO: tests/test_trl_keys.py)."""
    from tether.trl_key_table import TRL_SMOOTHED_LOSS_TYPES

    per_token, mask, ref_c, ref_r = token_logps(seed=5)
    reads = []
    for t in TRL_LOSS_TYPES:
        smoothed = 1e-3 if t == "exo_pair" else 0.0  # exo_pair refuses 0
        plain, _ = trl_dpo([t], None, per_token, mask, ref_c, ref_r, 0.1, smoothed)
        other, _ = trl_dpo([t], None, per_token, mask, ref_c, ref_r, 0.1, 0.2)
        if abs(plain.item() - other.item()) > 1e-9:
            reads.append(t)
    assert sorted(reads) == sorted(TRL_SMOOTHED_LOSS_TYPES)
    assert "sigmoid" not in reads
