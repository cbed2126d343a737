"""Advantage estimators (GAE, GRPO, Dr. GRPO, RLOO, REINFORCE++), KL-penalised token rewards,
loss aggregation and the clipped policy loss, against values worked out by hand."""

import math
import statistics

import pytest
import torch

from rlhf_spec.algorithms.advantages import (
    expand_to_tokens,
    group_advantages,
    kl_penalized_token_rewards,
    reinforce_pp_advantages,
    rloo_advantages,
)
from rlhf_spec.algorithms.ppo import ClippedPolicyLoss, PolicyLossPPO, aggregate_loss, gae_advantages

NAN = float("nan")


def _close_list(got, expected, tol=1e-9):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=tol)


# ---------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------


def _gae_from_paper(rewards, values, start, end, gamma, lam):
    """Schulman et al. 2016, Eq. (16), for one episode occupying positions start..end-1.

    delta_t = r_t + gamma V(s_{t+1}) - V(s_t) with V = 0 after the last step, and
    A_t = sum_{l=0}^{inf} (gamma lam)^l delta_{t+l} (the sum stops at the episode end).
    """
    v = list(values[start:end]) + [0.0]
    r = list(rewards[start:end])
    n = end - start
    deltas = [r[i] + gamma * v[i + 1] - v[i] for i in range(n)]
    return [sum((gamma * lam) ** l * deltas[i + l] for l in range(n - i)) for i in range(n)]


def test_gae_matches_paper_loop_on_random_ragged_batch():
    gamma, lam = 0.9, 0.8
    gen = torch.Generator().manual_seed(123)
    batch, length = 6, 9
    rewards = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    values = torch.randn(batch, length, generator=gen, dtype=torch.float64)
    # (start, end) of the response in each row: right padding, a prompt before it, one token, empty
    spans = [(0, 9), (0, 4), (3, 9), (2, 6), (5, 6), (0, 0)]
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = True
    rewards[~mask] = 1e6  # garbage outside the mask must not leak in
    values[~mask] = -1e6

    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    for b, (s, e) in enumerate(spans):
        expected = _gae_from_paper(rewards[b].tolist(), values[b].tolist(), s, e, gamma, lam)
        _close_list(adv[b, s:e].tolist(), expected)
        _close_list(ret[b, s:e].tolist(), [a + values[b, s + i].item() for i, a in enumerate(expected)])
        outside = ~mask[b]
        assert torch.all(adv[b][outside] == 0) and torch.all(ret[b][outside] == 0)


def test_gae_hand_values_two_steps():
    # one row, two tokens: r = (0, 1), V = (0.5, 0.25), gamma = 0.5, lam = 0.5
    # delta_1 = 1 + 0 - 0.25 = 0.75; delta_0 = 0 + 0.5 * 0.25 - 0.5 = -0.375
    # A_1 = 0.75; A_0 = -0.375 + 0.25 * 0.75 = -0.1875
    adv, ret = gae_advantages(
        torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.25]]), torch.ones(1, 2), gamma=0.5, lam=0.5
    )
    _close_list(adv[0].tolist(), [-0.1875, 0.75], tol=1e-7)
    _close_list(ret[0].tolist(), [0.3125, 1.0], tol=1e-7)


# ---------------------------------------------------------------------------
# GRPO / Dr. GRPO / RLOO
# ---------------------------------------------------------------------------


def test_grpo_two_groups_of_three():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)
    # group 1: mean 2, deviations (-1, 0, 1), unbiased std sqrt((1 + 0 + 1) / 2) = 1
    # group 2: mean 2, deviations (-2, -2, 4), unbiased std sqrt((4 + 4 + 16) / 2) = sqrt(12)
    eps = 1e-6
    s2 = math.sqrt(12.0)
    expected = [-1 / (1 + eps), 0.0, 1 / (1 + eps), -2 / (s2 + eps), -2 / (s2 + eps), 4 / (s2 + eps)]
    _close_list(group_advantages(rewards, 3).tolist(), expected, tol=1e-12)
    # Dr. GRPO only centres
    _close_list(group_advantages(rewards, 3, scale="none").tolist(), [-1, 0, 1, -2, -2, 4], tol=1e-12)


def test_grpo_groups_of_four_and_constant_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0, 5.0, 5.0])
    # group 1: mean 0.5, deviations +-0.5, unbiased variance 4 * 0.25 / 3 = 1/3
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    got = group_advantages(rewards, 4)
    _close_list(got.tolist(), [a, -a, -a, a, 0.0, 0.0, 0.0, 0.0], tol=1e-6)
    assert got.dtype == torch.float32
    # a constant group has no signal in either mode
    assert torch.all(group_advantages(rewards, 4, scale="none")[4:] == 0)


def test_rloo_two_groups():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0], dtype=torch.float64)
    # 1 - (2 + 3)/2 = -1.5; 2 - (1 + 3)/2 = 0; 3 - (1 + 2)/2 = 1.5
    # 0 - (0 + 6)/2 = -3;   0 - (0 + 6)/2 = -3; 6 - (0 + 0)/2 = 6
    _close_list(rloo_advantages(rewards, 3).tolist(), [-1.5, 0.0, 1.5, -3.0, -3.0, 6.0], tol=1e-12)
    # groups of 4: 4 - (1 + 2 + 5)/3 = 4/3 etc.
    r4 = torch.tensor([4.0, 1.0, 2.0, 5.0], dtype=torch.float64)
    _close_list(rloo_advantages(r4, 4).tolist(), [4 - 8 / 3, 1 - 11 / 3, 2 - 10 / 3, 5 - 7 / 3], tol=1e-12)


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages])
def test_group_estimators_reject_bad_groups(fn):
    with pytest.raises(ValueError):
        fn(torch.zeros(4), 1)
    with pytest.raises(ValueError):
        fn(torch.zeros(5), 2)
    with pytest.raises(ValueError):
        fn(torch.zeros(2, 2), 2)
    with pytest.raises(ValueError):
        fn(torch.zeros(4), 2.0)


def test_group_advantages_rejects_unknown_scale():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, scale="mad")
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(4), 2, eps=-1.0)


# ---------------------------------------------------------------------------
# REINFORCE++ and the KL-penalised token rewards
# ---------------------------------------------------------------------------


def _whiten(xs):
    mean = statistics.fmean(xs)
    std = math.sqrt(statistics.variance(xs) + 1e-8)  # unbiased variance, as documented
    return [(x - mean) / std for x in xs]


@pytest.mark.parametrize(
    "gamma, returns",
    [
        # row 0 rewards (0.1, -0.2, 1.0), row 1 (0.0, 2.0)
        (1.0, [0.1 - 0.2 + 1.0, -0.2 + 1.0, 1.0, 0.0 + 2.0, 2.0]),
        (0.5, [0.1 + 0.5 * -0.2 + 0.25 * 1.0, -0.2 + 0.5 * 1.0, 1.0, 0.0 + 0.5 * 2.0, 2.0]),
    ],
)
def test_reinforce_pp_hand_values(gamma, returns):
    token_rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0], [0.0, 2.0, 7.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = reinforce_pp_advantages(token_rewards, mask, gamma=gamma)
    expected = _whiten(returns)
    _close_list(got[0, :3].tolist() + got[1, :2].tolist(), expected, tol=1e-7)
    assert got[0, 3] == 0 and got[1, 2] == 0 and got[1, 3] == 0


def test_kl_penalized_token_rewards_hand_values():
    scores = torch.tensor([1.0, -0.5], dtype=torch.float64)
    ref_kl = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.5, -0.1, 9.0, NAN]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]])  # row 0 has a prompt token at position 0
    got = kl_penalized_token_rewards(scores, ref_kl, mask, kl_coef=0.1)
    expected = [[0.0, -0.02, -0.03 + 1.0, 0.0], [-0.05, 0.01 - 0.5, 0.0, 0.0]]
    _close_list(got.flatten().tolist(), sum(expected, []), tol=1e-12)
    # a gap inside the mask: the score goes on the LAST masked token
    gap = kl_penalized_token_rewards(scores[:1], torch.zeros(1, 4), torch.tensor([[1, 0, 1, 0]]), 0.1)
    _close_list(gap[0].tolist(), [0.0, 0.0, 1.0, 0.0])
    # summed over a response the rewards are score - kl_coef * (sum of its per-token KL)
    rows = kl_penalized_token_rewards(scores, ref_kl, mask, kl_coef=0.1)[1]
    assert rows.sum().item() == pytest.approx(-0.5 - 0.1 * (0.5 - 0.1))


def test_kl_penalized_token_rewards_errors():
    with pytest.raises(ValueError):  # a row without response tokens would lose its score
        kl_penalized_token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.tensor([[1, 1, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError):
        kl_penalized_token_rewards(torch.zeros(3), torch.zeros(2, 3), torch.ones(2, 3), 0.1)
    with pytest.raises(ValueError):
        kl_penalized_token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 3), -0.1)
    with pytest.raises(ValueError):
        reinforce_pp_advantages(torch.zeros(2, 3), torch.ones(2, 3), gamma=1.5)
    with pytest.raises(ValueError):
        reinforce_pp_advantages(torch.zeros(2, 3), torch.ones(2, 4))


def test_expand_to_tokens():
    mask = torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])
    got = expand_to_tokens(torch.tensor([2.0, -1.0]), mask)
    assert got.tolist() == [[0.0, 2.0, 2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError):
        expand_to_tokens(torch.zeros(3), mask)


# ---------------------------------------------------------------------------
# aggregate_loss
# ---------------------------------------------------------------------------


def test_aggregate_loss_modes_on_ragged_mask():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, NAN, NAN, NAN], [NAN, 7.0, 8.0, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])  # row 2 empty
    # token-mean: (1 + 2 + 3 + 4) / 4
    assert aggregate_loss(per_token, mask, "token-mean").item() == pytest.approx(2.5)
    # seq-mean-token-mean: rows (1 + 2 + 3)/3 = 2, 4/1 = 4, empty row 0 -> (2 + 4 + 0) / 3
    assert aggregate_loss(per_token, mask, "seq-mean-token-mean").item() == pytest.approx(2.0)
    # seq-mean-token-sum-norm with max_tokens 4: (6/4 + 4/4 + 0) / 3
    got = aggregate_loss(per_token, mask, "seq-mean-token-sum-norm", max_tokens=4)
    assert got.item() == pytest.approx((1.5 + 1.0) / 3)
    # without the empty row
    assert aggregate_loss(per_token[:2], mask[:2], "seq-mean-token-mean").item() == pytest.approx(3.0)


def test_aggregate_loss_errors():
    x, m = torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError):
        aggregate_loss(x, m, "sum")
    with pytest.raises(ValueError):
        aggregate_loss(x, m, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        aggregate_loss(x, m, "seq-mean-token-sum-norm", max_tokens=0)
    with pytest.raises(ValueError):
        aggregate_loss(x, torch.ones(2, 4))
    with pytest.raises(ValueError):
        aggregate_loss(torch.zeros(3), torch.ones(3))


# ---------------------------------------------------------------------------
# ClippedPolicyLoss
# ---------------------------------------------------------------------------

# four response tokens and one padding token (NaN logprob), all sampled with old logprob 0:
#   a: ratio 1.5,  A = +1  -> above 1 + eps_high: clipped, loss -1.28, no gradient
#   b: ratio 0.5,  A = -1  -> below 1 - eps_low: clipped, loss 0.8, no gradient
#   c: ratio 1.25, A = +1  -> inside [0.8, 1.28]: loss -1.25, gradient -1.25
#   d: ratio 0.5,  A = +2  -> pessimistic side, not clipped: loss -1.0, gradient -1.0
_RATIOS = [1.5, 0.5, 1.25, 0.5]
_ADV = [[1.0, -1.0, 1.0, 2.0, 50.0]]
_MASK = [[1, 1, 1, 1, 0]]


def _logprobs():
    return torch.tensor([[math.log(r) for r in _RATIOS] + [NAN]], dtype=torch.float64, requires_grad=True)


def test_clipped_policy_loss_clip_higher_hand_values():
    lp = _logprobs()
    loss, stats = ClippedPolicyLoss(0.2, 0.28)(lp, torch.zeros(1, 5), torch.tensor(_ADV), torch.tensor(_MASK))
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 1.25 - 1.0) / 4)
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    loss.backward()
    _close_list(lp.grad[0].tolist(), [0.0, 0.0, -1.25 / 4, -1.0 / 4, 0.0], tol=1e-12)
    # k3 estimate of KL(old || new): mean of (r - 1 - log r)
    k3 = sum(r - 1 - math.log(r) for r in _RATIOS) / 4
    assert stats["approx_kl"].item() == pytest.approx(k3)
    assert "ref_kl" not in stats


def test_clipped_policy_loss_symmetric_matches_ppo():
    lp = _logprobs()
    loss, stats = ClippedPolicyLoss(0.2)(lp, torch.zeros(1, 5), torch.tensor(_ADV), torch.tensor(_MASK))
    # token c is now clipped at 1.2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 1.2 - 1.0) / 4)
    assert stats["clip_fraction"].item() == pytest.approx(0.75)
    loss.backward()
    _close_list(lp.grad[0].tolist(), [0.0, 0.0, 0.0, -1.0 / 4, 0.0], tol=1e-12)
    ppo = PolicyLossPPO(0.2)(lp[:, :4].detach(), torch.zeros(1, 4), torch.tensor(_ADV)[:, :4], torch.ones(1, 4))
    assert loss.item() == pytest.approx(ppo.item())


def test_clipped_policy_loss_k3_reference_penalty():
    lp = _logprobs()
    ref = torch.tensor([[0.0, 0.0, math.log(1.25), -1.0, 0.0]], dtype=torch.float64)
    coef = 0.1
    loss_fn = ClippedPolicyLoss(0.2, 0.28, kl_coef=coef)
    loss, stats = loss_fn(lp, torch.zeros(1, 5), torch.tensor(_ADV), torch.tensor(_MASK), ref_logprobs=ref)
    # k3 = exp(ref - lp) - (ref - lp) - 1 per token
    lps = [math.log(r) for r in _RATIOS]
    refs = [0.0, 0.0, math.log(1.25), -1.0]
    k3 = [math.exp(q - p) - (q - p) - 1 for p, q in zip(lps, refs)]
    assert k3[2] == pytest.approx(0.0)
    assert stats["ref_kl"].item() == pytest.approx(sum(k3) / 4)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 1.25 - 1.0) / 4 + coef * sum(k3) / 4)
    loss.backward()
    # d k3 / d lp = 1 - exp(ref - lp); clipped tokens only get the KL gradient
    kl_grad = [coef * (1 - math.exp(q - p)) / 4 for p, q in zip(lps, refs)]
    pg_grad = [0.0, 0.0, -1.25 / 4, -1.0 / 4]
    _close_list(lp.grad[0, :4].tolist(), [a + b for a, b in zip(pg_grad, kl_grad)], tol=1e-12)
    assert lp.grad[0, 4].item() == 0.0
    with pytest.raises(ValueError):
        loss_fn(lp, torch.zeros(1, 5), torch.tensor(_ADV), torch.tensor(_MASK))


def test_clipped_policy_loss_sequence_aggregation():
    # inside the clip range (ratio 1): per-token loss is -A
    adv = torch.tensor([[1.0, 2.0, 3.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    zeros = torch.zeros(2, 3)
    seq = ClippedPolicyLoss(0.2, aggregation="seq-mean-token-mean")(zeros, zeros, adv, mask)[0]
    assert seq.item() == pytest.approx(-((1 + 2 + 3) / 3 + 6) / 2)
    tok = ClippedPolicyLoss(0.2)(zeros, zeros, adv, mask)[0]
    assert tok.item() == pytest.approx(-(1 + 2 + 3 + 6) / 4)
    norm = ClippedPolicyLoss(0.2, aggregation="seq-mean-token-sum-norm", max_tokens=10)(zeros, zeros, adv, mask)[0]
    assert norm.item() == pytest.approx(-(6 / 10 + 6 / 10) / 2)


def test_clipped_policy_loss_rejects_bad_arguments():
    with pytest.raises(ValueError):
        ClippedPolicyLoss(0.0)
    with pytest.raises(ValueError):
        ClippedPolicyLoss(0.2, clip_eps_high=-0.1)
    with pytest.raises(ValueError):
        ClippedPolicyLoss(0.2, kl_coef=-1.0)
    with pytest.raises(ValueError):
        ClippedPolicyLoss(0.2, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        ClippedPolicyLoss(0.2)(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
