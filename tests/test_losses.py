"""Loss values against hand-computed numbers, and gradient directions."""

import math

import pytest
import torch

from tether.losses import base_anchor, dpo_loss, ipo_loss, logratio_margin, preference_loss, slic_loss


def t(*xs):
    return torch.tensor(xs, dtype=torch.float32, requires_grad=True)


def test_margin_is_difference_of_logratios():
    h = logratio_margin(t(-1.0), t(-2.0), t(-1.5), t(-1.5))
    assert h.item() == pytest.approx(1.0)


def test_dpo_by_hand():
    # h = 1, beta = 0.1:  -log sigmoid(0.1) = log(1 + e^-0.1)
    assert dpo_loss(torch.tensor([1.0]), 0.1).item() == pytest.approx(math.log1p(math.exp(-0.1)), abs=1e-7)
    # label smoothing 0.2: 0.8 * log(1 + e^-0.1) + 0.2 * log(1 + e^0.1)
    want = 0.8 * math.log1p(math.exp(-0.1)) + 0.2 * math.log1p(math.exp(0.1))
    assert dpo_loss(torch.tensor([1.0]), 0.1, 0.2).item() == pytest.approx(want, abs=1e-7)
    assert dpo_loss(torch.tensor([0.0]), 0.5).item() == pytest.approx(math.log(2), abs=1e-7)


def test_ipo_uses_mean_logps():
    # chosen: policy -4 over 2 tokens (-2/token), ref -5 (-2.5/token); rejected: -6 vs -6 over 3 tokens
    loss, _ = preference_loss(t(-4.0), t(-6.0), t(-5.0), t(-6.0), t(2.0), t(3.0), loss="ipo", beta=0.1)
    assert loss.item() == pytest.approx((0.5 - 5.0) ** 2, abs=1e-5)
    assert ipo_loss(torch.tensor([5.0]), 0.1).item() == pytest.approx(0.0)


def test_slic_hinge_by_hand():
    assert slic_loss(torch.tensor([1.0]), 0.1).item() == pytest.approx(0.9)
    assert slic_loss(torch.tensor([20.0]), 0.1).item() == 0.0


def test_nll_term_adds_mean_token_nll_of_chosen():
    base, _ = preference_loss(t(-6.0), t(-2.0), t(-6.0), t(-2.0), t(3.0), t(1.0), loss="dpo", beta=0.1)
    with_nll, stats = preference_loss(t(-6.0), t(-2.0), t(-6.0), t(-2.0), t(3.0), t(1.0), nll_weight=0.5)
    assert with_nll.item() == pytest.approx(base.item() + 0.5 * 2.0, abs=1e-6)
    assert stats["nll"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "slic"])
def test_gradient_raises_chosen_and_lowers_rejected(loss):
    pc, pr = t(-3.0), t(-3.0)
    out, _ = preference_loss(pc, pr, t(-3.0), t(-3.0), t(4.0), t(4.0), loss=loss, beta=0.1)
    out.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_dpo_gradient_magnitude_by_hand():
    # d/dpc of -log sigmoid(beta h) = -beta * sigmoid(-beta h); at h = 0: -beta / 2
    pc = t(-3.0)
    loss, _ = preference_loss(pc, t(-3.0), t(-3.0), t(-3.0), t(4.0), t(4.0), beta=0.1)
    loss.backward()
    assert pc.grad.item() == pytest.approx(-0.05, abs=1e-7)


def test_metrics_by_hand():
    # two pairs: rewards chosen = 0.1*(−1−(−2)) = 0.1 and 0.1*(−3−(−3)) = 0;
    # rejected: 0.1*(−2−(−1)) = −0.1 and 0.1*(−1−(−2)) = 0.1
    _, s = preference_loss(t(-1.0, -3.0), t(-2.0, -1.0), t(-2.0, -3.0), t(-1.0, -2.0), t(2.0, 2.0), t(2.0, 2.0))
    assert s["rewards_chosen"].tolist() == pytest.approx([0.1, 0.0])
    assert s["rewards_rejected"].tolist() == pytest.approx([-0.1, 0.1])
    assert s["reward_accuracy"].tolist() == [1.0, 0.0]
    assert s["reward_margin"].tolist() == pytest.approx([0.2, -0.1])
    assert s["logps_chosen"].tolist() == [-1.0, -3.0]


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="unknown loss"):
        preference_loss(t(0.0), t(0.0), t(0.0), t(0.0), t(1.0), t(1.0), loss="kto")


def test_anchor_hinge_is_zero_when_policy_at_or_above_reference():
    pb = t(-3.0, -5.0)
    a = base_anchor(pb, torch.tensor([-4.0, -4.0]), torch.tensor([2.0, 2.0]))
    assert a.tolist() == [0.0, 1.0]
    a.sum().backward()
    assert pb.grad.tolist() == [0.0, -1.0]  # only the example below the reference is pushed up


def test_anchor_squared_and_mean():
    a = base_anchor(torch.tensor([-6.0]), torch.tensor([-4.0]), torch.tensor([2.0]), form="squared", normalize="mean")
    assert a.item() == pytest.approx(1.0)  # (-3 - -2)^2
    with pytest.raises(ValueError):
        base_anchor(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]), form="cube")
