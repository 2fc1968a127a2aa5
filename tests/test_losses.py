"""Loss values against hand-computed numbers, gradient directions, and the table of losses."""

import inspect
import math
from pathlib import Path

import pytest
import torch

import tether.losses
from tether.loss_docs import losses_page, methods_table
from tether.loss_table import LOSSES, OPTION_DEFAULTS, PARAMS, resolve_options
from tether.losses import base_anchor, dpo_loss, ipo_loss, logratio_margin, objective, preference_loss, slic_loss


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


# ------------------------------------------------------------------ reference-free losses, by hand (papers' formulas)


def test_simpo_by_hand():
    # mean log-probs: chosen -4/2 = -2, rejected -9/3 = -3; β = 2, γ = 1: z = 2·(−2) − 2·(−3) − 1 = 1
    loss, s = preference_loss(t(-4.0), t(-9.0), None, None, t(2.0), t(3.0), loss="simpo", beta=2.0, simpo_gamma=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), abs=1e-7)
    # no reference: rewards are β·mean log π_θ, as TRL's CPOTrainer reports them for SimPO
    assert (s["rewards_chosen"].item(), s["rewards_rejected"].item()) == pytest.approx((-4.0, -6.0))


def test_cpo_by_hand():
    # −log σ(0.1·(−4 − (−9))) + α·(4/2), α = 1
    loss, s = preference_loss(t(-4.0), t(-9.0), None, None, t(2.0), t(3.0), loss="cpo", beta=0.1, cpo_alpha=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5)) + 2.0, abs=1e-6)
    assert s["nll"].item() == pytest.approx(2.0) and s["rewards_chosen"].item() == pytest.approx(-0.4)


def test_orpo_by_hand():
    # p_w = exp(mean log π(y_w)) = 0.5 (odds 1), p_l = 0.2 (odds 0.25): log odds ratio = log 4,
    # L_OR = −log σ(log 4) = log 1.25; NLL = −log 0.5; λ = β = 0.1
    pc, pr = t(2 * math.log(0.5)), t(4 * math.log(0.2))
    loss, s = preference_loss(pc, pr, None, None, t(2.0), t(4.0), loss="orpo", beta=0.1)
    assert loss.item() == pytest.approx(math.log(2.0) + 0.1 * math.log(1.25), abs=1e-6)
    assert s["log_odds_chosen"].item() == pytest.approx(math.log(4.0), abs=1e-6)
    assert s["log_odds_ratio"].item() == pytest.approx(math.log(0.8), abs=1e-6)


def test_reference_free_losses_do_not_read_the_reference():
    with pytest.raises(ValueError, match="needs the reference"):
        preference_loss(t(-4.0), t(-9.0), None, None, t(2.0), t(3.0), loss="dpo")
    a, _ = preference_loss(t(-4.0), t(-9.0), None, None, t(2.0), t(3.0), loss="simpo", beta=2.0)
    b, _ = preference_loss(t(-4.0), t(-9.0), t(0.0), t(-50.0), t(2.0), t(3.0), loss="simpo", beta=2.0)
    assert a.item() == b.item()


def test_mixture_is_the_weighted_sum_and_the_anchor_adds_to_any_loss():
    args = (t(-3.0, -2.0), t(-4.0, -1.0), t(-3.5, -2.0), t(-3.0, -1.5), t(2.0, 3.0), t(4.0, 1.0))
    parts = [preference_loss(*args, loss=name)[0].item() for name in ("dpo", "bco_pair", "sft")]
    mixed, _ = preference_loss(*args, loss="dpo+bco_pair+sft", loss_weights=[0.8, 0.2, 1.0])
    assert mixed.item() == pytest.approx(0.8 * parts[0] + 0.2 * parts[1] + parts[2], abs=1e-6)
    rows = torch.tensor([-3.0, -2.0, -4.0, -1.0, -6.0, -5.0])  # chosen, rejected, base (key-major)
    lens, ref = torch.tensor([2.0, 3.0, 4.0, 1.0, 2.0, 2.0]), torch.tensor([-3.5, -2.0, -3.0, -1.5, -5.0, -5.0])
    opts = dict(beta=0.1, label_smoothing=0.0, nll_weight=0.0, anchor_form="hinge", anchor_normalize="sum")
    for name in ("dpo", "apo_zero", "simpo", "orpo"):
        ref_rows = ref if name in ("dpo", "apo_zero") else ref[4:]  # no reference: the base rows' alone
        plain, _ = objective(rows, lens, ref_rows, 3, loss=name, anchor_weight=0.0, **opts)
        anchored, s = objective(rows, lens, ref_rows, 3, loss=name, anchor_weight=0.5, **opts)
        assert anchored.item() == pytest.approx(plain.item() + 0.5 * (1.0 + 0.0) / 2, abs=1e-6)  # hinges 1 and 0
        assert s["anchor"].tolist() == [1.0, 0.0]


# ------------------------------------------------------------------ the table


def test_every_table_entry_names_a_function_with_its_parameters():
    one = torch.tensor([1.0])
    pairs = tether.losses.PairLogps(-one, -one, -one, -one, one, one)
    reads_reference = {"h", "h_mean", "chosen_logratio", "rejected_logratio", "ref_chosen", "ref_rejected"}
    for entry in LOSSES.values():
        args = set(inspect.signature(getattr(tether.losses, entry.function)).parameters)
        params, quantities = args & set(PARAMS), args - set(PARAMS)
        assert set(entry.param_names) - {"beta"} <= params <= set(entry.param_names), entry.name  # β: rewards too
        assert all(hasattr(pairs, q) for q in quantities), entry.name
        assert entry.reference == bool(quantities & reads_reference), entry.name


def test_docs_pages_are_generated_from_the_table():
    root = Path(__file__).resolve().parents[1]
    assert (root / "docs" / "losses.md").read_text() == losses_page(), "run python -m tether.loss_docs > docs/losses.md"
    assert methods_table() in (root / "docs" / "methods.md").read_text()


def test_loss_options_are_checked_against_the_table():
    assert resolve_options("simpo", None, dict(OPTION_DEFAULTS))["beta"] == 2.0
    assert resolve_options("dpo", None, dict(OPTION_DEFAULTS))["beta"] == 0.1
    bad = [
        ("dpo", None, {"discopop_tau": 0.1}, "'discopop_tau' is a parameter of discopop only"),
        ("exo_pair", None, {}, "loss exo_pair needs option 'label_smoothing'"),
        ("dpo+simpo", None, {}, "different default β"),
        ("dpo+sft", [1.0], {}, "1 weights for the 2 losses"),
        ("dpo+dpo", None, {}, "names a loss twice"),
        ("hinge", None, {}, "unknown loss 'hinge' \\(TRL's name for 'slic'\\)"),
        ("robust", None, {"label_smoothing": 0.5}, "'label_smoothing' must be in \\[0, 0.5\\) for loss robust"),
    ]
    for loss, weights, values, message in bad:
        with pytest.raises(ValueError, match=message):
            resolve_options(loss, weights, {**OPTION_DEFAULTS, **values})


def test_online_settings_whose_point_is_the_reference_refuse_a_reference_free_loss():
    from tether.config import TetherError, load_config
    from tether.train import OnlineConfig, TrainConfig

    base = dict(model="m", prompt_file="p.jsonl", oracle="world")
    with pytest.raises(TetherError, match="loss simpo uses no reference, so reference: behavior") as err:
        load_config(OnlineConfig, None, {**base, "loss": "simpo"})
    assert "\n" not in str(err.value)
    assert load_config(OnlineConfig, None, {**base, "loss": "orpo", "reference": "none"}).beta == 0.1
    with pytest.raises(TetherError, match="reference: none, but loss dpo needs a reference"):
        load_config(OnlineConfig, None, {**base, "reference": "none"})
    with pytest.raises(TetherError, match="loss cpo uses no reference.*drop ref_model"):
        load_config(TrainConfig, None, dict(model="m", train_file="d", loss="cpo", ref_model="r"))
