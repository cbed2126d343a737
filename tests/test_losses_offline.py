"""Offline preference losses (IPO, SimPO, ORPO, KTO) and the KL coefficient controllers.

Expected values are worked out by hand in each test with ``math``; they do not call the code
under test a second time.
"""

import json
import math

import pytest
import torch

from rlhf_spec.algorithms.kl import AdaptiveKLController, FixedKLController
from rlhf_spec.algorithms.kto import KTOLoss, kto_reference_point
from rlhf_spec.algorithms.pairwise import IPOLoss
from rlhf_spec.algorithms.reference_free import ORPOLoss, SimPOLoss, log1mexp


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def _t(*values, dtype=torch.float64, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


# ---------------------------------------------------------------------------
# IPO
# ---------------------------------------------------------------------------


def test_ipo_hand_computed_value_and_rewards():
    pc, pr = _t(-3.0, -5.0), _t(-4.0, -3.0)
    rc, rr = _t(-3.5, -5.0), _t(-3.0, -4.0)
    beta = 0.5  # target margin 1 / (2 * 0.5) = 1
    # row 0: h = (-3 + 3.5) - (-4 + 3) = 0.5 + 1 = 1.5 -> (1.5 - 1)^2 = 0.25
    # row 1: h = (-5 + 5) - (-3 + 4) = 0 - 1 = -1   -> (-1 - 1)^2 = 4
    loss, chosen_r, rejected_r = IPOLoss(beta)(pc, pr, rc, rr)
    assert loss.shape == ()
    assert loss.item() == pytest.approx((0.25 + 4.0) / 2, rel=1e-12)
    torch.testing.assert_close(chosen_r, _t(0.25, 0.0))
    torch.testing.assert_close(rejected_r, _t(-0.5, 0.5))
    assert not chosen_r.requires_grad and not rejected_r.requires_grad


def test_ipo_minimum_at_half_inverse_beta():
    beta = 0.2  # target margin 1 / 0.4 = 2.5 nats
    rc, rr, pr = _t(-10.0), _t(-12.0), _t(-11.0)
    # policy chosen logp giving h = (pc + 10) - (-11 + 12) = pc + 9 = 2.5  ->  pc = -6.5
    pc = _t(-6.5, grad=True)
    loss, _, _ = IPOLoss(beta)(pc, pr, rc, rr)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert pc.grad.item() == pytest.approx(0.0, abs=1e-12)
    # moving the margin by +-0.3 nats costs 0.3^2 either way (a parabola around the minimum)
    for shift in (-0.3, 0.3):
        moved = IPOLoss(beta)(_t(-6.5 + shift), pr, rc, rr)[0]
        assert moved.item() == pytest.approx(0.09, rel=1e-9)
    # and the gradient points back to the minimum: d loss / d pc = 2 * (h - 2.5)
    pc2 = _t(-6.0, grad=True)
    IPOLoss(beta)(pc2, pr, rc, rr)[0].backward()
    assert pc2.grad.item() == pytest.approx(2 * 0.5)


def test_ipo_rejects_bad_beta_and_shapes():
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            IPOLoss(bad)
    with pytest.raises(ValueError):
        IPOLoss(0.1)(torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------------------
# SimPO
# ---------------------------------------------------------------------------


def test_simpo_hand_computed_value():
    pc, pr = _t(-6.0, -10.0), _t(-8.0, -4.0)
    lc, lr = torch.tensor([3, 5]), torch.tensor([4, 1])
    beta, gamma = 2.0, 0.5
    # row 0: r_w = 2 * -6 / 3 = -4, r_l = 2 * -8 / 4 = -4, z = 0 - 0.5 = -0.5
    # row 1: r_w = 2 * -10 / 5 = -4, r_l = 2 * -4 / 1 = -8, z = 4 - 0.5 = 3.5
    # -log sigmoid(z) = log(1 + exp(-z))
    expected = (math.log(1 + math.exp(0.5)) + math.log(1 + math.exp(-3.5))) / 2
    loss, chosen_r, rejected_r = SimPOLoss(beta, gamma)(pc, pr, lc, lr)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    torch.testing.assert_close(chosen_r, _t(-4.0, -4.0))
    torch.testing.assert_close(rejected_r, _t(-4.0, -8.0))

    # label smoothing 0.1: 0.9 * log(1 + e^-z) + 0.1 * log(1 + e^z)
    smoothed = SimPOLoss(beta, gamma, label_smoothing=0.1)(pc, pr, lc, lr)[0]
    expected_ls = sum(
        0.9 * math.log(1 + math.exp(-z)) + 0.1 * math.log(1 + math.exp(z)) for z in (-0.5, 3.5)
    ) / 2
    assert smoothed.item() == pytest.approx(expected_ls, rel=1e-12)


def test_simpo_length_normalisation():
    beta, gamma = 2.5, 1.0
    pr, lr = _t(-9.0), torch.tensor([3.0], dtype=torch.float64)
    # chosen: 4 tokens at -0.5 nats each, then the same response "doubled": 8 tokens at -0.5
    short = SimPOLoss(beta, gamma)(_t(-2.0), pr, torch.tensor([4.0], dtype=torch.float64), lr)
    long = SimPOLoss(beta, gamma)(_t(-4.0), pr, torch.tensor([8.0], dtype=torch.float64), lr)
    assert short[1].item() == pytest.approx(-1.25) and long[1].item() == pytest.approx(-1.25)
    assert short[0].item() == pytest.approx(long[0].item(), rel=1e-12)
    # whereas an unnormalised sum would have changed: doubling the summed logp alone changes the loss
    other = SimPOLoss(beta, gamma)(_t(-4.0), pr, torch.tensor([4.0], dtype=torch.float64), lr)
    assert other[0].item() > short[0].item()


def test_simpo_gradient_scales_with_inverse_length():
    beta, gamma = 1.0, 0.0
    pc = _t(-3.0, grad=True)
    loss = SimPOLoss(beta, gamma)(pc, _t(-3.0), torch.tensor([3.0]), torch.tensor([3.0]))[0]
    loss.backward()
    # z = 0: d/dpc [-log sigmoid(pc/3 - pr/3)] = -(1 - sigmoid(0)) / 3 = -1/6
    assert pc.grad.item() == pytest.approx(-1.0 / 6.0)


def test_simpo_rejects_bad_arguments():
    with pytest.raises(ValueError):
        SimPOLoss(0.0, 0.5)
    with pytest.raises(ValueError):
        SimPOLoss(2.0, -0.1)
    with pytest.raises(ValueError):
        SimPOLoss(2.0, 0.5, label_smoothing=0.7)
    with pytest.raises(ValueError):  # zero-length response
        SimPOLoss(2.0, 0.5)(_t(-1.0), _t(-1.0), torch.tensor([0]), torch.tensor([2]))
    with pytest.raises(ValueError):
        SimPOLoss(2.0, 0.5)(_t(-1.0, -2.0), _t(-1.0), torch.tensor([1]), torch.tensor([2]))


# ---------------------------------------------------------------------------
# ORPO
# ---------------------------------------------------------------------------


def test_orpo_hand_computed_value():
    # mean per-token probabilities: chosen 0.5 and 0.8, rejected 0.25 and 0.5
    pc = _t(math.log(0.5), math.log(0.8))
    pr = _t(math.log(0.25), math.log(0.5))
    nll = -pc
    lam = 0.25
    # odds: 0.5 -> 1, 0.8 -> 4, 0.25 -> 1/3, 0.5 -> 1
    # row 0: log(1 / (1/3)) = log 3, -log sigmoid(log 3) = -log(3/4) = log(4/3)
    # row 1: log(4 / 1) = log 4,     -log sigmoid(log 4) = -log(4/5) = log(5/4)
    odds_ratio_loss = (math.log(4 / 3) + math.log(5 / 4)) / 2
    nll_mean = (-math.log(0.5) - math.log(0.8)) / 2
    loss, stats = ORPOLoss(lam)(pc, pr, nll)
    assert loss.item() == pytest.approx(nll_mean + lam * odds_ratio_loss, rel=1e-12)
    assert stats["odds_ratio_loss"].item() == pytest.approx(odds_ratio_loss, rel=1e-12)
    assert stats["log_odds_ratio"].item() == pytest.approx((math.log(3) + math.log(4)) / 2, rel=1e-12)
    assert stats["nll"].item() == pytest.approx(nll_mean, rel=1e-12)


def test_log1mexp_matches_math_and_is_stable_near_zero():
    xs = [-50.0, -3.0, -0.7, -0.69, -0.1, -1e-3]
    got = log1mexp(torch.tensor(xs, dtype=torch.float64))
    for value, x in zip(got.tolist(), xs):
        assert value == pytest.approx(math.log(1 - math.exp(x)), rel=1e-9)
    # near 0 the naive float32 form loses everything; expm1 keeps it: log(1 - e^x) ~ log(-x)
    tiny = log1mexp(torch.tensor([-1e-9, -1e-20], dtype=torch.float32))
    assert tiny[0].item() == pytest.approx(math.log(1e-9), rel=1e-5)
    assert tiny[1].item() == pytest.approx(math.log(1e-20), rel=1e-5)
    # x = 0 (probability 1) and a round-off positive value stay finite
    edge = log1mexp(torch.tensor([0.0, 1e-7], dtype=torch.float32))
    assert torch.isfinite(edge).all()


def test_orpo_no_nan_for_probability_near_one():
    for dtype in (torch.float32, torch.float64):
        pc = torch.tensor([-1e-9, -0.2], dtype=dtype, requires_grad=True)
        pr = torch.tensor([-1.0, -1e-9], dtype=dtype, requires_grad=True)
        loss, stats = ORPOLoss(0.1)(pc, pr, -pc)
        loss.backward()
        assert torch.isfinite(loss)
        assert torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
        assert all(torch.isfinite(v) for v in stats.values())
        # row 0: log odds(chosen) = -1e-9 - log(1e-9) ~ 20.72
        lo_w = -1e-9 - math.log(-math.expm1(-1e-9))
        lo_l = -1.0 - math.log(1 - math.exp(-1.0))
        lo_w2 = -0.2 - math.log(1 - math.exp(-0.2))
        lo_l2 = -1e-9 - math.log(-math.expm1(-1e-9))
        assert stats["log_odds_ratio"].item() == pytest.approx(((lo_w - lo_l) + (lo_w2 - lo_l2)) / 2, rel=1e-4)


def test_orpo_rejects_bad_lambda():
    with pytest.raises(ValueError):
        ORPOLoss(0.0)
    with pytest.raises(ValueError):
        ORPOLoss(0.1)(_t(-1.0), _t(-1.0, -2.0), _t(1.0))


# ---------------------------------------------------------------------------
# KTO
# ---------------------------------------------------------------------------


def test_kto_hand_computed_value():
    policy = _t(-1.0, -2.0, -3.0)
    reference = _t(-2.0, -1.0, -3.5)
    labels = torch.tensor([True, False, True])
    z0 = torch.tensor(0.2, dtype=torch.float64)
    beta, lam_d, lam_u = 0.5, 1.0, 2.0
    # log-ratios r = 1.0, -1.0, 0.5
    # row 0 desirable:   1 - sigmoid(0.5 * (1.0 - 0.2))      = 1 - sigmoid(0.4)
    # row 1 undesirable: 2 - 2 * sigmoid(0.5 * (0.2 + 1.0))  = 2 - 2 * sigmoid(0.6)
    # row 2 desirable:   1 - sigmoid(0.5 * (0.5 - 0.2))      = 1 - sigmoid(0.15)
    expected = ((1 - _sigmoid(0.4)) + (2 - 2 * _sigmoid(0.6)) + (1 - _sigmoid(0.15))) / 3
    loss, stats = KTOLoss(beta, lam_d, lam_u)(policy, reference, labels, z0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["num_desirable"].item() == 2 and stats["num_undesirable"].item() == 1
    assert stats["desirable_rewards"].item() == pytest.approx(0.5 * (1.0 + 0.5) / 2)
    assert stats["undesirable_rewards"].item() == pytest.approx(0.5 * -1.0)
    assert stats["kl"].item() == pytest.approx(0.2)


@pytest.mark.parametrize("desirable", [True, False])
def test_kto_single_label_kind(desirable):
    policy = _t(-1.0, -4.0, grad=True)
    reference = _t(-1.5, -3.0)
    labels = torch.tensor([desirable, desirable])
    z0 = torch.tensor(0.1, dtype=torch.float64)
    # r = 0.5, -1.0; beta = 1
    if desirable:
        expected = ((1 - _sigmoid(0.5 - 0.1)) + (1 - _sigmoid(-1.0 - 0.1))) / 2
    else:
        expected = ((1 - _sigmoid(0.1 - 0.5)) + (1 - _sigmoid(0.1 + 1.0))) / 2
    loss, stats = KTOLoss(1.0)(policy, reference, labels, z0)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    loss.backward()
    assert torch.isfinite(policy.grad).all()
    # desirable rows are pushed up, undesirable rows down
    assert torch.all(policy.grad < 0) if desirable else torch.all(policy.grad > 0)
    assert all(torch.isfinite(v) for v in stats.values())
    missing = "undesirable_rewards" if desirable else "desirable_rewards"
    assert stats[missing].item() == 0.0


def test_kto_reference_point_is_clamped_and_detached():
    a = torch.tensor([-1.0, -2.0], requires_grad=True)
    # log-ratios 0.5 and -1.0: mean -0.25 -> clamped to 0
    assert kto_reference_point(a, torch.tensor([-1.5, -1.0])).item() == 0.0
    # log-ratios 0.5 and 0.5: mean 0.5
    z0 = kto_reference_point(a, torch.tensor([-1.5, -2.5]))
    assert z0.item() == pytest.approx(0.5)
    assert z0.dim() == 0 and not z0.requires_grad
    # the loss does not back-propagate into the reference point either
    kl = torch.tensor(0.3, requires_grad=True)
    KTOLoss(0.1)(a, torch.tensor([-1.5, -2.5]), torch.tensor([True, False]), kl)[0].backward()
    assert kl.grad is None


def test_kto_rejects_bad_arguments():
    with pytest.raises(ValueError):
        KTOLoss(0.0)
    with pytest.raises(ValueError):
        KTOLoss(0.1, undesirable_weight=-1.0)
    with pytest.raises(ValueError):  # kl must be 0-dim
        KTOLoss(0.1)(torch.zeros(2), torch.zeros(2), torch.ones(2, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(ValueError):
        KTOLoss(0.1)(torch.zeros(2), torch.zeros(3), torch.ones(2, dtype=torch.bool), torch.tensor(0.0))
    with pytest.raises(ValueError):
        kto_reference_point(torch.zeros(0), torch.zeros(0))


# ---------------------------------------------------------------------------
# KL controllers
# ---------------------------------------------------------------------------


def test_adaptive_kl_controller_hand_updates_and_clip():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: error 9/6 - 1 = 0.5, clipped to +0.2 -> beta = 0.1 * (1 + 0.2 * 256 / 10000)
    beta = 0.1 * (1 + 0.2 * 256 / 10000)
    assert ctl.update(9.0, 256) == pytest.approx(beta, rel=1e-12)
    # KL 5.4: error -0.1 (inside the clip) -> * (1 - 0.1 * 512 / 10000)
    beta *= 1 - 0.1 * 512 / 10000
    ctl.update(5.4, 512)
    assert ctl.value == pytest.approx(beta, rel=1e-12)
    # KL 0: error -1, clipped to -0.2 -> * (1 - 0.2 * 1000 / 10000)
    beta *= 1 - 0.2 * 1000 / 10000
    ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(beta, rel=1e-12)
    # KL exactly on target: unchanged; n_steps 0: unchanged
    ctl.update(6.0, 777)
    ctl.update(100.0, 0)
    assert ctl.value == pytest.approx(beta, rel=1e-12)
    # a 0-dim tensor KL is accepted: error 6.6/6 - 1 = 0.1
    ctl.update(torch.tensor(6.6), 100)
    assert ctl.value == pytest.approx(beta * (1 + 0.1 * 100 / 10000), rel=1e-9)


def test_kl_controllers_state_round_trip():
    ctl = AdaptiveKLController(0.05, target=3.0, horizon=500)
    ctl.update(4.5, 64)
    state = json.loads(json.dumps(ctl.state_dict()))
    assert set(state) == {"value", "target", "horizon"}
    restored = AdaptiveKLController(1.0, target=3.0, horizon=500)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    assert ctl.update(1.0, 32) == restored.update(1.0, 32)

    fixed = FixedKLController(0.03)
    assert fixed.update(50.0, 128) == 0.03 and fixed.value == 0.03
    other = FixedKLController(1.0)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.03


def test_kl_controllers_reject_bad_arguments():
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=100)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=6.0, horizon=-1)
    with pytest.raises(ValueError):
        AdaptiveKLController(-0.1, target=6.0, horizon=100)
    with pytest.raises(ValueError):
        FixedKLController(float("nan"))
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=100)
    with pytest.raises(ValueError):
        ctl.update(float("nan"), 1)
    with pytest.raises(ValueError):
        ctl.update(1.0, -1)
    with pytest.raises(ValueError):
        ctl.load_state_dict({"target": 1.0})


# ---------------------------------------------------------------------------
# The pair trainers' divergence guard reading (kl_ref)
# ---------------------------------------------------------------------------


def test_pair_trainer_kl_reading_is_k2_over_chosen_and_rejected():
    """kl_ref = mean over the 2B responses of (log pi - log pi_ref)^2 / 2: a chosen answer pushed up 8 nats
    and a rejected one pushed down 8 read 32 nats each, where whole-response k3 would read e^8 - 9 ~ 2972
    on the chosen one (the reading that stopped round 2 of iterative DPO on a policy moved ~0.25 nats per
    token). A reference-free batch reads NaN."""
    from rlhf_spec.stages.train.pair_trainer import PairBatch, _kl_stat

    pol_c, pol_r = _t(-10.0, -20.0), _t(-38.0, -29.0)
    ref_c, ref_r = _t(-18.0, -20.5), _t(-30.0, -30.0)
    rewards, lengths = _t(0.0, 0.0), _t(32.0, 32.0)
    b = PairBatch(pol_c, pol_r, ref_c, ref_r, rewards, rewards, lengths, lengths)
    expected = (8.0 ** 2 + 0.5 ** 2 + 8.0 ** 2 + 1.0 ** 2) / 2 / 4
    assert _kl_stat(b) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(_kl_stat(PairBatch(pol_c, pol_r, None, None, rewards, rewards, lengths, lengths)))


def test_autocast_runs_reference_passes_at_the_trainers_precision():
    """``autocast(device, mixed_precision)``: bf16 makes a linear layer compute in bfloat16 (so the reference
    side of a log-ratio shares the policy's numerics under accelerate's bf16), "no" leaves float32, and an
    unknown value is refused by name."""
    from rlhf_spec.loops.trainer import autocast

    layer, x = torch.nn.Linear(4, 3), torch.randn(2, 4)
    with autocast("cpu", "bf16"):
        assert layer(x).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "no"):
        assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="'int8'"):
        autocast("cpu", "int8")
