"""Tests for the losses in rlhf_spec.algorithms: logprob helpers, REBEL, DPO, Bradley-Terry, KL, PPO, GAE."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_spec.algorithms.kl import kl_estimate
from rlhf_spec.algorithms.ops import gather_logprobs, masked_mean, sequence_logprobs
from rlhf_spec.algorithms.pairwise import DPOLoss, PairwiseRewardLoss, REBELLoss, pairwise_accuracy, rebel_stats
from rlhf_spec.algorithms.ppo import PolicyLossPPO, ValueLoss, gae_advantages

EPS = 1e-7  # the temperature offset used by gather_logprobs


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _hand_token_logprobs(logits, input_ids, scale):
    """Reference: explicit loop with log_softmax(logits * scale) per position."""
    batch, length, _ = logits.shape
    out = torch.empty(batch, length - 1, dtype=torch.float64)
    for b in range(batch):
        for t in range(length - 1):
            row = torch.log_softmax(logits[b, t].double() * scale, dim=-1)
            out[b, t] = row[input_ids[b, t + 1]]
    return out


# ---------------------------------------------------------------------------
# gather_logprobs / sequence_logprobs
# ---------------------------------------------------------------------------


def test_gather_logprobs_matches_hand_loop_on_tiny_llama(tiny_llama):
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 64, (3, 9), generator=gen)
    logits = _logits(tiny_llama, input_ids)

    got = gather_logprobs(logits, input_ids)
    assert got.shape == (3, 8)
    assert got.dtype == torch.float32
    expected = _hand_token_logprobs(logits, input_ids, 1.0 / (1.0 + EPS))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    assert torch.all(got <= 0)


def test_gather_logprobs_temperature_half_equals_doubled_logits(tiny_llama):
    gen = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 64, (2, 7), generator=gen)
    logits = _logits(tiny_llama, input_ids)

    hot = gather_logprobs(logits, input_ids, temperature=0.5)
    doubled = gather_logprobs(logits * 2.0, input_ids, temperature=1.0)
    torch.testing.assert_close(hot, doubled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        hot.double(), _hand_token_logprobs(logits, input_ids, 2.0), rtol=1e-5, atol=1e-5
    )
    # and the temperature really changes the values
    plain = gather_logprobs(logits, input_ids, temperature=1.0)
    assert (hot - plain).abs().max() > 1e-3


def test_gather_logprobs_bf16_is_computed_in_float32():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 11, generator=gen).to(torch.bfloat16)
    input_ids = torch.randint(0, 11, (2, 5), generator=gen)
    got = gather_logprobs(logits, input_ids)
    assert got.dtype == torch.float32
    expected = _hand_token_logprobs(logits.float(), input_ids, 1.0 / (1.0 + EPS))
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_gather_logprobs_gradient_matches_softmax():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(1, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    input_ids = torch.tensor([[0, 2, 4]])
    gather_logprobs(logits, input_ids).sum().backward()
    scale = 1.0 / (1.0 + EPS)
    probs = torch.softmax(logits.detach()[0, :2] * scale, dim=-1)
    expected = -probs * scale
    expected[0, 2] += scale
    expected[1, 4] += scale
    torch.testing.assert_close(logits.grad[0, :2], expected)
    assert torch.all(logits.grad[0, 2] == 0)  # last position predicts nothing


def test_sequence_logprobs_sums_response_tokens_only(tiny_llama):
    gen = torch.Generator().manual_seed(5)
    input_ids = torch.randint(1, 64, (2, 10), generator=gen)
    # row 0: prompt 0..2, response 3..6, padding 7..9; row 1: prompt 0..3, response 4..9
    response_mask = torch.zeros(2, 10, dtype=torch.bool)
    response_mask[0, 3:7] = True
    response_mask[1, 4:] = True
    logits = _logits(tiny_llama, input_ids)

    got = sequence_logprobs(logits, input_ids, response_mask, temperature=0.7)
    token = _hand_token_logprobs(logits, input_ids, 1.0 / (0.7 + EPS))
    expected = torch.stack([token[0, 2:6].sum(), token[1, 3:9].sum()])
    assert got.shape == (2,)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_ignores_padding_tokens(tiny_llama):
    gen = torch.Generator().manual_seed(6)
    input_ids = torch.randint(1, 64, (1, 10), generator=gen)
    response_mask = torch.zeros(1, 10, dtype=torch.bool)
    response_mask[0, 3:7] = True  # padding starts right after the response

    changed = input_ids.clone()
    changed[0, 7] = (changed[0, 7] + 17) % 64  # first padding position
    changed[0, 9] = (changed[0, 9] + 5) % 64

    before = sequence_logprobs(_logits(tiny_llama, input_ids), input_ids, response_mask)
    after = sequence_logprobs(_logits(tiny_llama, changed), changed, response_mask)
    torch.testing.assert_close(before, after, rtol=0, atol=0)

    # whereas changing a response token does change the value
    changed_resp = input_ids.clone()
    changed_resp[0, 6] = (changed_resp[0, 6] + 1) % 64
    other = sequence_logprobs(_logits(tiny_llama, changed_resp), changed_resp, response_mask)
    assert not torch.allclose(before, other)


def test_sequence_logprobs_inf_outside_mask_contributes_nothing():
    logits = torch.zeros(1, 4, 3)
    logits[0, 2, :] = torch.tensor([0.0, -math.inf, -math.inf])  # predicts token 3
    input_ids = torch.tensor([[0, 1, 2, 2]])  # token 3 gets logprob -inf
    mask = torch.tensor([[0, 1, 1, 0]])
    got = sequence_logprobs(logits, input_ids, mask, temperature=1.0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, torch.tensor([2 * -math.log(3.0)]), rtol=1e-6, atol=1e-6)


def test_response_aligned_layout_puts_every_response_in_the_same_columns():
    """Prompts left-padded, responses right-padded; positions count from each row's first real token."""
    from rlhf_spec.algorithms.batching import pad_response_aligned

    b = pad_response_aligned([[5, 6, 7, 8], [9, 10, 11, 12, 13, 14]], 0, [3, 2])
    assert b["keep"] == 5
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0, 0], [0, 9, 10, 11, 12, 13, 14]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1]]
    assert b["response_mask"].int().tolist() == [[0, 0, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 6], [0, 0, 1, 2, 3, 4, 5]]
    with pytest.raises(ValueError, match="sequence 1: response start 0"):
        pad_response_aligned([[5, 6], [7, 8]], 0, [1, 0])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_response_only_logits_equal_the_full_right_padded_pass(attn):
    """pair_logprobs/completion_logprobs compute logits for the response columns only (logits_to_keep on
    the aligned layout); the logprobs and their gradients equal those of the full right-padded pass,
    with prompts of different lengths and an empty response."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf_spec.algorithms.batching import pad_batch
    from rlhf_spec.algorithms.logprobs import _response_logits

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, attn_implementation=attn))
    seqs = [torch.randint(1, 64, (n,)).tolist() for n in (12, 30, 7, 20, 9)]
    starts = [5, 25, 3, 8, 9]
    full = pad_batch(seqs, 0, starts)
    want = sequence_logprobs(model(input_ids=full["input_ids"], attention_mask=full["attention_mask"]).logits,
                             full["input_ids"], full["response_mask"], temperature=0.8)
    want_grad = torch.autograd.grad(want.sum(), model.lm_head.weight)[0]
    logits, ids, mask = _response_logits(model, seqs, starts, 0)
    got = sequence_logprobs(logits, ids, mask, temperature=0.8)
    assert logits.shape[1] == 13 and got[4].item() == 0.0  # longest response 12 tokens + 1; row 4 has none
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), model.lm_head.weight)[0], want_grad, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------------------
# REBEL
# ---------------------------------------------------------------------------


def test_rebel_hand_computed_value():
    pc = torch.tensor([-10.0, -4.0])
    pr = torch.tensor([-12.0, -3.0])
    rc = torch.tensor([-11.0, -5.0])
    rr = torch.tensor([-11.5, -2.0])
    Rc = torch.tensor([0.30, 0.10])
    Rr = torch.tensor([0.10, 0.40])
    eta = 2.0
    # row 0: h = (1) - (-0.5) = 1.5; target = 2 * 0.2 = 0.4; diff = 1.1 -> 1.21
    # row 1: h = (1) - (-1)   = 2.0; target = 2 * -0.3 = -0.6; diff = 2.6 -> 6.76
    loss = REBELLoss(eta)(pc, pr, rc, rr, Rc, Rr)
    assert loss.shape == ()
    assert loss.item() == pytest.approx((1.21 + 6.76) / 2, rel=1e-5)

    # the paper's form (1/eta * h - dr)^2 is this loss divided by eta^2
    h = (pc - rc) - (pr - rr)
    paper = ((h / eta - (Rc - Rr)) ** 2).mean()
    assert loss.item() == pytest.approx(eta**2 * paper.item(), rel=1e-5)

    stats = rebel_stats(pc, pr, rc, rr, Rc, Rr, eta=eta)
    assert set(stats) == {"loss", "reward_margin", "logratio_margin", "target_margin"}
    assert stats["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert stats["reward_margin"].item() == pytest.approx((0.2 - 0.3) / 2, abs=1e-6)
    assert stats["logratio_margin"].item() == pytest.approx(1.75, abs=1e-6)
    assert stats["target_margin"].item() == pytest.approx(eta * (0.2 - 0.3) / 2, abs=1e-6)


def test_rebel_zero_when_logratio_margin_matches_target():
    eta = 1e6  # ArmoRM-scale rewards
    gen = torch.Generator().manual_seed(7)
    Rc = torch.rand(5, generator=gen, dtype=torch.float64) * 1e-4
    Rr = torch.rand(5, generator=gen, dtype=torch.float64) * 1e-4
    rc = -torch.rand(5, generator=gen, dtype=torch.float64) * 50
    rr = -torch.rand(5, generator=gen, dtype=torch.float64) * 50
    pr = rr + torch.randn(5, generator=gen, dtype=torch.float64)
    # choose pc so that (pc - rc) - (pr - rr) == eta * (Rc - Rr)
    pc = rc + (pr - rr) + eta * (Rc - Rr)
    loss = REBELLoss(eta)(pc, pr, rc, rr, Rc, Rr)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    # and moving away from it gives a positive loss
    assert REBELLoss(eta)(pc + 0.1, pr, rc, rr, Rc, Rr).item() == pytest.approx(0.01, rel=1e-6)


def test_rebel_sgd_step_reduces_loss_and_moves_toward_target():
    gen = torch.Generator().manual_seed(8)
    theta = torch.randn(2, 6, generator=gen, requires_grad=True)  # policy chosen / rejected logps
    rc = torch.randn(6, generator=gen)
    rr = torch.randn(6, generator=gen)
    Rc = torch.randn(6, generator=gen)
    Rr = torch.randn(6, generator=gen)
    loss_fn = REBELLoss(eta=3.0)

    loss0 = loss_fn(theta[0], theta[1], rc, rr, Rc, Rr)
    loss0.backward()
    gap = ((theta[0] - rc) - (theta[1] - rr) - 3.0 * (Rc - Rr)).detach()
    # d loss / d pc = 2 * gap / B: raise pc when the log-ratio margin is below target
    torch.testing.assert_close(theta.grad[0], 2 * gap / 6)
    torch.testing.assert_close(theta.grad[1], -2 * gap / 6)
    with torch.no_grad():
        theta -= 0.1 * theta.grad
    loss1 = loss_fn(theta[0], theta[1], rc, rr, Rc, Rr)
    assert loss1.item() < loss0.item()


def test_rebel_rejects_bad_eta():
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            REBELLoss(bad)


# ---------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------


def test_dpo_log2_when_policy_equals_reference():
    gen = torch.Generator().manual_seed(9)
    pc, pr = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    loss, chosen_r, rejected_r = DPOLoss(beta=0.1)(pc, pr, pc.clone(), pr.clone())
    assert loss.item() == pytest.approx(math.log(2.0), rel=1e-6)
    assert torch.all(chosen_r == 0) and torch.all(rejected_r == 0)


def test_dpo_implicit_rewards_detached_and_scaled():
    pc = torch.tensor([-3.0, -5.0], requires_grad=True)
    pr = torch.tensor([-4.0, -2.0], requires_grad=True)
    rc = torch.tensor([-3.5, -5.0])
    rr = torch.tensor([-3.0, -2.5])
    loss, chosen_r, rejected_r = DPOLoss(beta=0.5)(pc, pr, rc, rr)
    torch.testing.assert_close(chosen_r, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(rejected_r, torch.tensor([-0.5, 0.25]))
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    h = torch.tensor([1.5, -0.5])
    assert loss.item() == pytest.approx((-F.logsigmoid(0.5 * h)).mean().item(), rel=1e-6)


def test_dpo_loss_decreases_as_chosen_logprob_increases():
    loss_fn = DPOLoss(beta=0.2)
    pr, rc, rr = torch.tensor([-5.0]), torch.tensor([-5.0]), torch.tensor([-5.0])
    losses = [loss_fn(torch.tensor([v]), pr, rc, rr)[0].item() for v in (-8.0, -6.0, -5.0, -3.0, 0.0)]
    assert all(a > b for a, b in zip(losses, losses[1:]))


def test_dpo_label_smoothing():
    pc, pr = torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -4.0])
    rc, rr = torch.tensor([-2.5, -1.5]), torch.tensor([-2.0, -3.0])
    beta = 0.7
    h = (pc - rc) - (pr - rr)
    ls = 0.2
    loss = DPOLoss(beta, label_smoothing=ls)(pc, pr, rc, rr)[0]
    # an independent form: binary cross-entropy of p = sigmoid(beta h) against the soft label 1 - ls
    # (the preference is right with probability 1 - ls), written out with math on each pair
    hs = [((-2.0) - (-2.5)) - ((-3.0) - (-2.0)), ((-1.0) - (-1.5)) - ((-4.0) - (-3.0))]
    bce = []
    for hv in hs:
        p = 1.0 / (1.0 + math.exp(-beta * hv))
        bce.append(-((1 - ls) * math.log(p) + ls * math.log(1 - p)))
    assert loss.item() == pytest.approx(sum(bce) / 2, rel=1e-6)
    # smoothing 0.5 is symmetric: swapping chosen and rejected gives the same loss
    half = DPOLoss(beta, label_smoothing=0.5)
    assert half(pc, pr, rc, rr)[0].item() == pytest.approx(half(pr, pc, rr, rc)[0].item(), rel=1e-6)
    # smoothing ls on swapped pairs equals smoothing 1-ls-weighted original terms
    swapped = DPOLoss(beta, label_smoothing=ls)(pr, pc, rr, rc)[0]
    expected_swapped = (-(1 - ls) * F.logsigmoid(-beta * h) - ls * F.logsigmoid(beta * h)).mean()
    assert swapped.item() == pytest.approx(expected_swapped.item(), rel=1e-6)
    # and smoothing makes a confidently-correct pair cost more than plain DPO
    assert loss.item() > DPOLoss(beta)(pc, pr, rc, rr)[0].item()


def test_dpo_rejects_bad_hyperparameters():
    with pytest.raises(ValueError):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError):
        DPOLoss(beta=0.1, label_smoothing=0.6)
    with pytest.raises(ValueError):
        DPOLoss(beta=0.1, label_smoothing=-0.1)


# ---------------------------------------------------------------------------
# Bradley-Terry reward loss and accuracy
# ---------------------------------------------------------------------------


def test_bradley_terry_log2_for_equal_rewards():
    r = torch.tensor([0.3, -1.2, 4.0])
    assert PairwiseRewardLoss()(r, r.clone()).item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_bradley_terry_margin_increases_loss():
    loss_fn = PairwiseRewardLoss()
    rc, rr = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 0.2])
    plain = loss_fn(rc, rr)
    with_margin = loss_fn(rc, rr, margin=torch.tensor([1.0, 0.5]))
    assert with_margin.item() > plain.item()
    expected = -F.logsigmoid(torch.tensor([0.0, -0.2])).mean()
    assert with_margin.item() == pytest.approx(expected.item(), rel=1e-6)
    zero_margin = loss_fn(rc, rr, margin=torch.zeros(2))
    assert zero_margin.item() == pytest.approx(plain.item(), rel=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up_rejected_down():
    rc = torch.tensor([0.2, -0.4, 1.0], requires_grad=True)
    rr = torch.tensor([0.5, -0.4, 0.0], requires_grad=True)
    PairwiseRewardLoss()(rc, rr).backward()
    assert torch.all(rc.grad < 0)  # gradient descent increases r_chosen
    assert torch.all(rr.grad > 0)  # and decreases r_rejected
    torch.testing.assert_close(rc.grad, -rr.grad)
    expected = -torch.sigmoid(-(rc - rr).detach()) / 3
    torch.testing.assert_close(rc.grad, expected)


def test_pairwise_accuracy_with_ties():
    rc = torch.tensor([1.0, 0.0, 2.0, 3.0, -1.0])
    rr = torch.tensor([0.0, 0.0, 2.5, 3.0, -2.0])
    # correct, tie, wrong, tie, correct -> (1 + .5 + 0 + .5 + 1) / 5
    acc = pairwise_accuracy(rc, rr)
    assert isinstance(acc, float)
    assert acc == pytest.approx(0.6)
    with pytest.raises(ValueError):
        pairwise_accuracy(torch.tensor([]), torch.tensor([]))


# ---------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------


def test_kl_estimators_k1_k3_unbiased_for_categorical():
    p = torch.tensor([0.6, 0.25, 0.1, 0.05], dtype=torch.float64)  # policy (sampling)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)  # reference
    exact = float((p * (p / q).log()).sum())
    reverse = float((q * (q / p).log()).sum())
    assert abs(exact - reverse) > 0.05  # the direction matters for this pair

    gen = torch.Generator().manual_seed(1234)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    logp, logq = p.log()[samples], q.log()[samples]

    k1 = kl_estimate(logp, logq, estimator="k1")
    k3 = kl_estimate(logp, logq, estimator="k3")
    assert k1.shape == k3.shape == (200_000,)
    assert abs(k1.mean().item() - exact) < 0.01
    assert abs(k3.mean().item() - exact) < 0.01
    assert torch.all(k3 >= 0)
    assert k3.var() < k1.var()

    k2 = kl_estimate(logp, logq, estimator="k2")
    torch.testing.assert_close(k2, 0.5 * (logp - logq) ** 2)
    assert torch.all(k2 >= 0)


def test_kl_estimate_sums_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -0.2, -0.3]])
    logq = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -0.2, float("-inf")]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    lr = torch.tensor([[0.5, -1.0], [0.2, 0.0]])
    torch.testing.assert_close(kl_estimate(logp, logq, mask, estimator="k1"), lr.sum(-1))
    torch.testing.assert_close(kl_estimate(logp, logq, mask, estimator="k2"), (0.5 * lr**2).sum(-1))
    k3 = (torch.exp(-lr) - 1 + lr).sum(-1)
    torch.testing.assert_close(kl_estimate(logp, logq, mask, estimator="k3"), k3)
    no_mask = kl_estimate(logp[:1], logq[:1], estimator="k1")
    torch.testing.assert_close(no_mask, torch.tensor([-0.5]))


def test_kl_estimate_unknown_estimator():
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'"):
        kl_estimate(torch.zeros(2, 3), torch.zeros(2, 3), estimator="k4")


# ---------------------------------------------------------------------------
# PPO policy and value losses
# ---------------------------------------------------------------------------


def _ppo_grad(ratio, advantage, clip_eps=0.2):
    logprobs = torch.tensor([[math.log(ratio)]], requires_grad=True)
    loss = PolicyLossPPO(clip_eps)(logprobs, torch.zeros(1, 1), torch.tensor([[advantage]]), torch.ones(1, 1))
    loss.backward()
    return loss.item(), logprobs.grad.item()


def test_ppo_clipped_ratio_gives_zero_gradient():
    # positive advantage, ratio above 1 + eps: clipped, no gradient
    loss, grad = _ppo_grad(1.5, 2.0)
    assert grad == 0.0
    assert loss == pytest.approx(-2.0 * 1.2)
    # negative advantage, ratio below 1 - eps: clipped, no gradient
    loss, grad = _ppo_grad(0.5, -1.0)
    assert grad == 0.0
    assert loss == pytest.approx(0.8)
    # positive advantage, ratio below 1 - eps: not clipped (pessimistic side)
    loss, grad = _ppo_grad(0.5, 2.0)
    assert grad == pytest.approx(-2.0 * 0.5)
    assert loss == pytest.approx(-1.0)
    # inside the clip range: plain surrogate gradient -A * ratio
    _, grad = _ppo_grad(1.1, 3.0)
    assert grad == pytest.approx(-3.0 * 1.1, rel=1e-6)


def test_ppo_masked_mean_over_tokens():
    logprobs = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([[1.0, 2.0, 100.0], [3.0, -1.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    loss = PolicyLossPPO()(logprobs, old, adv, mask)
    assert loss.item() == pytest.approx(-(1 + 2 + 3 - 1 + 7) / 5)


def test_value_loss_clipping():
    values = torch.tensor([[1.0, 0.0, 5.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[0.5, 1.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss = ValueLoss(clip_eps=0.2)(values, old, returns, mask)
    # token 0: unclipped (1-0.5)^2=0.25, clipped (0.2-0.5)^2=0.09 -> 0.25
    # token 1: both (0-1)^2 = 1
    assert loss.item() == pytest.approx(0.5 * (0.25 + 1.0) / 2)
    loss.backward()
    assert values.grad[0, 2] == 0.0

    # pessimistic clipping: moving past the clip range toward the target gains nothing
    v = torch.tensor([[0.9]], requires_grad=True)
    out = ValueLoss(clip_eps=0.2)(v, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    assert out.item() == pytest.approx(0.5 * 0.8**2)
    out.backward()
    assert v.grad.item() == 0.0


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 0.0, 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(7.0 / 3)
    torch.testing.assert_close(masked_mean(x, m, dim=1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_mean(x, torch.zeros(2, 3), dim=1), torch.zeros(2))
    assert masked_mean(torch.tensor([1.0, 3.0])).item() == 2.0


# ---------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------


def test_gae_lambda_one_gamma_one_is_return_minus_value():
    gen = torch.Generator().manual_seed(10)
    rewards = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    values = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    adv, ret = gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    for b in range(3):
        n = int(mask[b].sum())
        for t in range(n):
            future = rewards[b, t:n].sum()
            assert adv[b, t].item() == pytest.approx((future - values[b, t]).item(), abs=1e-10)
            assert ret[b, t].item() == pytest.approx(future.item(), abs=1e-10)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_gae_matches_direct_sum_with_ragged_mask():
    gamma, lam = 0.99, 0.95
    gen = torch.Generator().manual_seed(11)
    rewards = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    values = torch.randn(4, 8, generator=gen, dtype=torch.float64)
    lengths = [8, 5, 1, 3]
    mask = torch.zeros(4, 8, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    # garbage outside the mask must not leak in
    rewards[~mask] = 1e6
    values[~mask] = -1e6

    adv, ret = gae_advantages(rewards, values, mask, gamma=gamma, lam=lam)
    for b, n in enumerate(lengths):
        v = [values[b, t].item() for t in range(n)] + [0.0]
        deltas = [rewards[b, t].item() + gamma * v[t + 1] - v[t] for t in range(n)]
        for t in range(n):
            expected = sum((gamma * lam) ** l * deltas[t + l] for l in range(n - t))
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-9)
            assert ret[b, t].item() == pytest.approx(expected + v[t], abs=1e-9)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_gae_rejects_bad_arguments():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError):
        gae_advantages(x, x, torch.ones(2, 3), gamma=1.5)
    with pytest.raises(ValueError):
        gae_advantages(x, x, torch.ones(2, 3), lam=-0.1)


# ---------------------------------------------------------------------------
# shape mismatches
# ---------------------------------------------------------------------------

_b3 = torch.zeros(3)
_b4 = torch.zeros(4)
_bt = torch.zeros(2, 5)
_bt_bad = torch.zeros(2, 4)


@pytest.mark.parametrize(
    "call",
    [
        lambda: gather_logprobs(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long)),
        lambda: gather_logprobs(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long)),
        lambda: gather_logprobs(torch.zeros(2, 5, 7), torch.zeros(2, 5)),
        lambda: gather_logprobs(torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), temperature=-1.0),
        lambda: sequence_logprobs(
            torch.zeros(2, 5, 7), torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool)
        ),
        lambda: REBELLoss(1.0)(_b3, _b3, _b3, _b3, _b3, _b4),
        lambda: REBELLoss(1.0)(_bt, _bt, _bt, _bt, _bt, _bt),
        lambda: rebel_stats(_b3, _b4, _b3, _b3, _b3, _b3, eta=1.0),
        lambda: DPOLoss(0.1)(_b3, _b3, _b4, _b3),
        lambda: PairwiseRewardLoss()(_b3, _b4),
        lambda: PairwiseRewardLoss()(_b3, _b3, margin=_b4),
        lambda: pairwise_accuracy(_b3, _b4),
        lambda: kl_estimate(_bt, _bt_bad),
        lambda: kl_estimate(_bt, _bt, mask=torch.ones(2, 4)),
        lambda: kl_estimate(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)),
        lambda: PolicyLossPPO()(_bt, _bt, _bt_bad, torch.ones(2, 5)),
        lambda: ValueLoss()(_bt, _bt, _bt, torch.ones(2, 4)),
        lambda: gae_advantages(_bt, _bt_bad, torch.ones(2, 5)),
        lambda: masked_mean(_bt, torch.ones(2, 4)),
    ],
)
def test_shape_mismatch_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
