"""Loss functions and small numeric helpers for RLHF training.

Every loss here is a ``torch.nn.Module`` (or a plain function for helpers) whose
docstring gives the equation it computes, the tensor shapes and dtypes it
expects, the errors it raises, and the paper (with equation number) it comes
from.

Notation used throughout
------------------------
``B``  batch size (number of sequences, or number of preference pairs).
``T``  sequence length in tokens.
``V``  vocabulary size.
``logprob`` / ``logps``  natural-log probabilities (nats) of tokens or of whole
    responses under a model.
``policy``  the model being trained, pi_theta.
``reference policy``  a frozen model the policy is compared against (the SFT
    model in DPO/PPO; the policy snapshot pi_theta_t for REBEL, see
    :class:`REBELLoss`).
``chosen`` / ``rejected``  the preferred / dispreferred response of a pair.
``reward``  a scalar score per response from a reward model (arbitrary units).

This module imports only ``torch``, ``typing`` and ``math``.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "masked_mean",
    "gather_logprobs",
    "sequence_logprobs",
    "REBELLoss",
    "rebel_stats",
    "DPOLoss",
    "PairwiseRewardLoss",
    "pairwise_accuracy",
    "kl_estimate",
    "PolicyLossPPO",
    "ValueLoss",
    "gae_advantages",
]

# Added to the sampling temperature before dividing the logits, exactly as in the
# REBEL reference code (``logits /= temperature + 1e-7``); it also makes
# temperature 0 (greedy) finite.
_TEMPERATURE_EPS = 1e-7

_KL_KINDS = ("k1", "k2", "k3")


# ---------------------------------------------------------------------------
# validation helpers (private)
# ---------------------------------------------------------------------------


def _require_same_shape(**tensors: torch.Tensor) -> torch.Size:
    """Raise ValueError unless all given tensors share one shape; return it."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, tensor in items[1:]:
        if tensor.shape != first.shape:
            described = ", ".join(f"{n}={tuple(t.shape)}" for n, t in items)
            raise ValueError(
                f"shape mismatch: {name} has shape {tuple(tensor.shape)} but "
                f"{first_name} has shape {tuple(first.shape)} ({described})"
            )
    return first.shape


def _require_batch_vectors(**tensors: torch.Tensor) -> int:
    """Raise ValueError unless all tensors are 1-D of one length B; return B."""
    shape = _require_same_shape(**tensors)
    if len(shape) != 1:
        described = ", ".join(f"{n}={tuple(t.shape)}" for n, t in tensors.items())
        raise ValueError(f"expected 1-D tensors of shape (B,), got {described}")
    return shape[0]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16 inputs, otherwise keep (e.g. float64) precision."""
    return torch.promote_types(dtype, torch.float32)


# ---------------------------------------------------------------------------
# generic helpers
# ---------------------------------------------------------------------------


def masked_mean(
    values: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    dim: Optional[int] = None,
) -> torch.Tensor:
    """Mean of ``values`` over the entries where ``mask`` is set.

    ``masked_mean = sum(values * mask) / sum(mask)`` (over ``dim``, or over all
    entries when ``dim`` is None).

    Args:
        values: float tensor of any shape.
        mask: bool or 0/1 tensor with exactly the shape of ``values``; None means
            every entry counts (plain mean). Entries where the mask is 0 are
            ignored even if they hold inf/NaN (they are selected away with
            ``torch.where``, not multiplied by 0).
        dim: dimension to reduce, or None to reduce over every entry.

    Returns:
        A 0-dim tensor when ``dim`` is None, otherwise ``values`` with ``dim``
        removed; dtype of ``values``. Rows with an all-zero mask give 0 (not NaN).

    Raises:
        ValueError: if ``mask`` does not have the same shape as ``values``.

    Source: standard helper (no paper); used for the token-level averages of the
    PPO losses below.
    """
    if mask is None:
        return values.mean() if dim is None else values.mean(dim=dim)
    _require_same_shape(values=values, mask=mask)
    weights = mask.to(values.dtype)
    kept = torch.where(mask.bool(), values, torch.zeros_like(values)) * weights
    if dim is None:
        return kept.sum() / weights.sum().clamp_min(1e-8)
    return kept.sum(dim=dim) / weights.sum(dim=dim).clamp_min(1e-8)


# ---------------------------------------------------------------------------
# log-probabilities from logits
# ---------------------------------------------------------------------------


def gather_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token logprob of each next token under temperature-scaled logits.

    ``out[b, t] = log softmax(logits[b, t] / (temperature + 1e-7))[input_ids[b, t + 1]]``
    for ``t = 0 .. T-2``, i.e. the logprob of token ``t+1`` given the prefix
    ``input_ids[b, :t+1]`` (causal-LM convention: logits at position t predict
    the token at position t+1). It is computed as
    ``gathered_logit - logsumexp(logits)``, which never materialises a second
    (B, T, V) log-softmax tensor.

    Args:
        logits: (B, T, V) float tensor of a causal LM's output logits (any float
            dtype; float16/bfloat16 are cast to float32 before the softmax,
            float64 stays float64).
        input_ids: (B, T) integer (long) token ids the logits were computed on.
        temperature: sampling temperature (>= 0, dimensionless) the tokens were
            drawn at; the logits are divided by ``temperature + 1e-7``.

    Returns:
        (B, T-1) tensor of logprobs in nats (float32, or float64 for float64
        logits); differentiable with respect to ``logits``.

    Raises:
        ValueError: if ``logits`` is not 3-D, ``input_ids`` is not 2-D, their
            (B, T) dimensions differ, ``input_ids`` is not an integer tensor, or
            ``temperature`` is negative.

    Source: the temperature scaling ``logits / (temperature + 1e-7)`` follows
    the REBEL reference implementation (Gao et al. 2024, "REBEL: Reinforcement
    Learning via Regressing Relative Rewards", arXiv:2404.16767); the
    log-softmax itself is the usual autoregressive factorisation
    ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape (B, T, V), got {tuple(logits.shape)}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"shape mismatch: logits {tuple(logits.shape)} vs input_ids "
            f"{tuple(input_ids.shape)}; the first two dimensions must agree"
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")

    scaled = logits[:, :-1].to(_compute_dtype(logits.dtype)) / (temperature + _TEMPERATURE_EPS)
    targets = input_ids[:, 1:].long().unsqueeze(-1)
    picked = scaled.gather(dim=-1, index=targets).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def sequence_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Logprob of each response, summed over its tokens.

    ``out[b] = sum_{t >= 1} response_mask[b, t] * log pi(input_ids[b, t] | input_ids[b, :t])``

    Position ``t`` of ``response_mask`` refers to the token ``input_ids[:, t]``;
    so ``response_mask[:, 1:]`` is aligned with the output of
    :func:`gather_logprobs`. Position 0 has no logprob (nothing predicts it) and
    is ignored. Tokens outside the mask (prompt, padding) contribute exactly 0,
    whatever their value.

    Args:
        logits: (B, T, V) float tensor of causal-LM logits (see
            :func:`gather_logprobs` for dtype handling).
        input_ids: (B, T) integer token ids (prompt + response + padding).
        response_mask: (B, T) bool or 0/1 tensor, 1 on response tokens.
        temperature: sampling temperature (>= 0); logits are divided by
            ``temperature + 1e-7``.

    Returns:
        (B,) tensor of summed logprobs in nats (float32, or float64 for float64
        logits); differentiable with respect to ``logits``.

    Raises:
        ValueError: on any shape problem listed in :func:`gather_logprobs`, or if
            ``response_mask`` does not have the shape of ``input_ids``.

    Source: sequence logprob ``log pi(y|x)`` as used in the REBEL regression
    objective (Gao et al. 2024, arXiv:2404.16767, Eq. (1)) with the
    temperature-scaled logits of the REBEL reference code.
    """
    _require_same_shape(input_ids=input_ids, response_mask=response_mask)
    token_logps = gather_logprobs(logits, input_ids, temperature=temperature)
    mask = response_mask[:, 1:].bool()
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)


# ---------------------------------------------------------------------------
# REBEL
# ---------------------------------------------------------------------------


def _rebel_terms(
    eta: float,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-ratio margin (B,), reward margin (B,)) after validating shapes."""
    _require_batch_vectors(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )
    logratio_margin = (policy_chosen_logps - reference_chosen_logps) - (
        policy_rejected_logps - reference_rejected_logps
    )
    reward_margin = chosen_rewards - rejected_rewards
    return logratio_margin, reward_margin


class REBELLoss(nn.Module):
    """REBEL least-squares regression of log-ratio margins onto reward margins.

    For a pair of responses (chosen ``y``, rejected ``y'``) to one prompt ``x``::

        h    = [log pi(y|x) - log pi_t(y|x)] - [log pi(y'|x) - log pi_t(y'|x)]
        loss = mean_over_pairs( (h - eta * (r(x, y) - r(x, y'))) ** 2 )

    where ``pi`` is the policy being trained and ``pi_t`` the "reference" policy
    of the REBEL iteration. Note: in REBEL the reference is the policy snapshot
    ``pi_theta_t`` the ratio is taken against (the policy that generated the
    pair in the online algorithm; the initial policy in the REBEL code's
    offline large-batch variant), not necessarily the SFT model. "chosen" only
    labels the first response of the pair; the loss does not require
    ``r(y) > r(y')``.

    This is the form of the REBEL reference code (``(ratio - eta * (r_c -
    r_r)) ** 2``; its UltraFeedback/ArmoRM large-batch script uses
    ``eta = 1e6``). The paper writes the same objective as
    ``((1/eta) * h - (r(y) - r(y')))**2``, which equals this loss divided by
    ``eta**2``: same minimiser, gradients scaled by ``1/eta**2``. So ``eta`` here
    multiplies the reward (larger eta = larger step towards the reward margin).

    Args:
        eta: positive float; scale of the reward margin in log-ratio units
            (nats per reward unit).

    Raises:
        ValueError: if ``eta`` is not a finite positive number.

    Source: Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing
    Relative Rewards" (arXiv:2404.16767, NeurIPS 2024), Eq. (1) / Algorithm 1
    (the per-iteration least-squares problem).
    """

    def __init__(self, eta: float):
        super().__init__()
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta > 0):
            raise ValueError(f"eta must be a finite positive number, got {eta!r}")
        self.eta = float(eta)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
    ) -> torch.Tensor:
        """Compute the REBEL loss.

        Args:
            policy_chosen_logps: (B,) float, sequence logprob (nats) of the
                chosen response under the policy (requires grad in training).
            policy_rejected_logps: (B,) float, same for the rejected response.
            reference_chosen_logps: (B,) float, sequence logprob of the chosen
                response under the reference policy ``pi_theta_t`` (no grad).
            reference_rejected_logps: (B,) float, same for the rejected response.
            chosen_rewards: (B,) float, reward of the chosen response.
            rejected_rewards: (B,) float, reward of the rejected response.

        Returns:
            0-dim float tensor: ``mean((h - eta * (Rc - Rr)) ** 2)``.

        Raises:
            ValueError: if the six inputs are not all 1-D with the same length.
        """
        logratio_margin, reward_margin = _rebel_terms(
            self.eta,
            policy_chosen_logps,
            policy_rejected_logps,
            reference_chosen_logps,
            reference_rejected_logps,
            chosen_rewards,
            rejected_rewards,
        )
        return ((logratio_margin - self.eta * reward_margin) ** 2).mean()


@torch.no_grad()
def rebel_stats(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    eta: float,
) -> Dict[str, torch.Tensor]:
    """Detached logging statistics for one REBEL batch.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_rewards, rejected_rewards: (B,) float
            tensors, exactly as for :meth:`REBELLoss.forward`.
        eta: positive float, as for :class:`REBELLoss`.

    Returns:
        Dict of detached 0-dim tensors:
        ``loss`` (the :class:`REBELLoss` value),
        ``reward_margin`` (mean of ``Rc - Rr``, reward units),
        ``logratio_margin`` (mean of ``(pc - rc) - (pr - rr)``, nats),
        ``target_margin`` (``eta * mean(Rc - Rr)``, nats: what the log-ratio
        margin is regressed onto).

    Raises:
        ValueError: if the inputs are not all 1-D of one length, or ``eta`` is
            not a finite positive number.

    Source: quantities of the REBEL objective, Gao et al. 2024
    (arXiv:2404.16767), Eq. (1).
    """
    loss = REBELLoss(eta)(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_rewards,
        rejected_rewards,
    )
    logratio_margin, reward_margin = _rebel_terms(
        eta,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_rewards,
        rejected_rewards,
    )
    return {
        "loss": loss.detach(),
        "reward_margin": reward_margin.mean().detach(),
        "logratio_margin": logratio_margin.mean().detach(),
        "target_margin": (float(eta) * reward_margin.mean()).detach(),
    }


# ---------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------


class DPOLoss(nn.Module):
    """Direct Preference Optimization loss, with optional conservative smoothing.

    With ``h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]``::

        loss = mean( -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h) )

    ``ls = 0`` is the DPO loss; ``ls > 0`` assumes each preference label is
    flipped with probability ``ls`` (conservative DPO, "cDPO").

    Args:
        beta: positive float, strength of the implicit KL constraint to the
            reference policy (inverse temperature of the implicit reward).
        label_smoothing: float in [0, 0.5], assumed label-flip probability.

    Raises:
        ValueError: if ``beta <= 0`` or ``label_smoothing`` is outside [0, 0.5].

    Source: Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model", Eq. (7); label smoothing per Mitchell
    2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO).
    """

    def __init__(self, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        if not (math.isfinite(beta) and beta > 0):
            raise ValueError(f"beta must be a finite positive number, got {beta!r}")
        if not (0.0 <= label_smoothing <= 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
        self.beta = float(beta)
        self.label_smoothing = float(label_smoothing)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the DPO loss and the implicit rewards.

        Args:
            policy_chosen_logps: (B,) float, sequence logprob (nats) of the
                chosen response under the policy.
            policy_rejected_logps: (B,) float, same for the rejected response.
            reference_chosen_logps: (B,) float, chosen response under the frozen
                reference policy.
            reference_rejected_logps: (B,) float, rejected response under the
                reference policy.

        Returns:
            ``(loss, chosen_rewards, rejected_rewards)``: ``loss`` is a 0-dim
            float tensor; ``chosen_rewards = beta * (pc - rc)`` and
            ``rejected_rewards = beta * (pr - rr)`` are detached (B,) tensors
            (the DPO implicit rewards, in nats).

        Raises:
            ValueError: if the four inputs are not all 1-D with the same length.
        """
        _require_batch_vectors(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            reference_chosen_logps=reference_chosen_logps,
            reference_rejected_logps=reference_rejected_logps,
        )
        chosen_logratio = policy_chosen_logps - reference_chosen_logps
        rejected_logratio = policy_rejected_logps - reference_rejected_logps
        logits = self.beta * (chosen_logratio - rejected_logratio)
        ls = self.label_smoothing
        losses = -(1.0 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)
        chosen_rewards = (self.beta * chosen_logratio).detach()
        rejected_rewards = (self.beta * rejected_logratio).detach()
        return losses.mean(), chosen_rewards, rejected_rewards


# ---------------------------------------------------------------------------
# reward-model training
# ---------------------------------------------------------------------------


class PairwiseRewardLoss(nn.Module):
    """Bradley-Terry pairwise loss for training a reward model.

    ``loss = mean( -log sigmoid(r_chosen - r_rejected - m) )`` with an optional
    per-pair margin ``m`` (0 when not given). Under the Bradley-Terry model
    ``P(chosen > rejected) = sigmoid(r_chosen - r_rejected)``, so this is the
    negative log-likelihood of the human preference labels.

    Source: Bradley & Terry 1952, "Rank Analysis of Incomplete Block Designs";
    Ouyang et al. 2022, "Training language models to follow instructions with
    human feedback" (InstructGPT), Eq. (1); margin ``m(r)`` from Touvron et al.
    2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", Eq. (2).
    """

    def forward(
        self,
        chosen_rewards: torch.Tensor,
        rejected_rewards: torch.Tensor,
        margin: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Compute the Bradley-Terry loss.

        Args:
            chosen_rewards: (B,) float, reward-model score of the chosen response.
            rejected_rewards: (B,) float, score of the rejected response.
            margin: optional (B,) float, required score gap per pair (same units
                as the rewards; e.g. larger for "significantly better" labels).

        Returns:
            0-dim float tensor (mean negative log-likelihood, nats).

        Raises:
            ValueError: if the inputs are not all 1-D with the same length.
        """
        if margin is None:
            _require_batch_vectors(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
            gap = chosen_rewards - rejected_rewards
        else:
            _require_batch_vectors(
                chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, margin=margin
            )
            gap = chosen_rewards - rejected_rewards - margin
        return -F.logsigmoid(gap).mean()


def pairwise_accuracy(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> float:
    """Share of pairs the reward ranks correctly (``r_chosen > r_rejected``).

    Ties (``r_chosen == r_rejected``) count as half correct.

    Args:
        chosen_rewards: (B,) float scores of the chosen responses.
        rejected_rewards: (B,) float scores of the rejected responses.

    Returns:
        Python float in [0, 1].

    Raises:
        ValueError: if the inputs are not 1-D of one length, or are empty.

    Source: the preference accuracy reported for reward models, e.g. Ouyang et
    al. 2022 (InstructGPT) and Touvron et al. 2023 (Llama 2); the half-credit
    for ties is this project's convention.
    """
    n = _require_batch_vectors(chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards)
    if n == 0:
        raise ValueError("pairwise_accuracy needs at least one pair, got B=0")
    chosen = chosen_rewards.detach()
    rejected = rejected_rewards.detach()
    score = (chosen > rejected).double() + 0.5 * (chosen == rejected).double()
    return float(score.mean().item())


# ---------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    kind: str = "k1",
) -> torch.Tensor:
    """Sample-based estimate of KL(policy || reference), per sequence.

    With tokens sampled from the policy and ``log r = logprobs - ref_logprobs``
    (policy minus reference, per token)::

        k1 = log r                          unbiased, high variance, can be < 0
        k2 = (log r) ** 2 / 2               biased (low for nearby policies), >= 0
        k3 = (exp(-log r) - 1) + log r      unbiased, >= 0, lower variance

    (k3 is evaluated as ``expm1(-log r) + log r`` and clamped at 0 against
    round-off, since it is non-negative in exact arithmetic.) Per-token values
    are summed over the masked tokens of each sequence. For k1 this sum is the
    standard estimate of the sequence-level KL; for k2/k3 it is the sum of the
    per-token estimates, as used for token-level KL penalties.

    Args:
        logprobs: (B, T) or (B,) float, logprobs (nats) of the sampled tokens
            under the policy that sampled them.
        ref_logprobs: same shape, logprobs of the same tokens under the
            reference policy.
        mask: optional bool/0-1 tensor of the same shape; entries where it is 0
            contribute exactly 0 (even if they hold inf/NaN).
        kind: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        (B,) float tensor: for (B, T) inputs the masked sum over T; for (B,)
        inputs the per-entry estimate (each entry one sample), masked.

    Raises:
        ValueError: on an unknown ``kind``, if the inputs' shapes differ, or if
            they are neither 1-D nor 2-D.

    Source: Schulman 2020, "Approximating KL Divergence" (blog note,
    http://joschu.net/blog/kl-approx.html), estimators k1, k2, k3 with
    ``r = q(x)/p(x)`` there; here ``-log r`` of that note is our ``log r``
    because we write the ratio as policy over reference.
    """
    if kind not in _KL_KINDS:
        raise ValueError(f"unknown KL estimator kind {kind!r}; expected one of {_KL_KINDS}")
    if mask is None:
        _require_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    else:
        _require_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must have shape (B, T) or (B,), got {tuple(logprobs.shape)}")

    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        per_token = log_ratio
    elif kind == "k2":
        per_token = 0.5 * log_ratio.square()
    else:
        per_token = (torch.expm1(-log_ratio) + log_ratio).clamp_min(0.0)

    if mask is not None:
        per_token = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if per_token.dim() == 2:
        return per_token.sum(dim=-1)
    return per_token


# ---------------------------------------------------------------------------
# PPO
# ---------------------------------------------------------------------------


class PolicyLossPPO(nn.Module):
    """PPO clipped surrogate policy loss (to be minimised).

    With ``ratio = exp(logprobs - old_logprobs)`` per token::

        loss = masked_mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

    i.e. the negative of the clipped objective ``min(ratio * A, clip(ratio) * A)``,
    averaged over all unmasked tokens of the batch. When the ratio is already
    outside the clip range in the direction the advantage favours, the clipped
    (constant) term wins and the token gives no gradient.

    Args:
        clip_eps: float in (0, 1), the clip range epsilon.

    Raises:
        ValueError: if ``clip_eps`` is not in (0, 1).

    Source: Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
    Eq. (7) (L^CLIP); applied per token to language models as in Ouyang et al.
    2022 (InstructGPT).
    """

    def __init__(self, clip_eps: float = 0.2):
        super().__init__()
        if not (0.0 < clip_eps < 1.0):
            raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
        self.clip_eps = float(clip_eps)

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Compute the clipped surrogate loss.

        Args:
            logprobs: (B, T) float, per-token logprobs (nats) under the current
                policy (requires grad).
            old_logprobs: (B, T) float, logprobs under the policy that sampled
                the tokens (no grad).
            advantages: (B, T) float advantage estimates (e.g. from
                :func:`gae_advantages`; no grad).
            mask: optional (B, T) bool/0-1, 1 on response tokens.

        Returns:
            0-dim float tensor.

        Raises:
            ValueError: if the inputs' shapes differ.
        """
        if mask is None:
            _require_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
        else:
            _require_same_shape(
                logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
            )
        ratio = torch.exp(logprobs - old_logprobs)
        clipped = ratio.clamp(1.0 - self.clip_eps, 1.0 + self.clip_eps)
        per_token = torch.maximum(-advantages * ratio, -advantages * clipped)
        return masked_mean(per_token, mask)


class ValueLoss(nn.Module):
    """Clipped value-function (critic) loss used with PPO.

    With ``v_clip = clip(values, old_values - eps, old_values + eps)``::

        loss = 0.5 * masked_mean( max((values - returns) ** 2, (v_clip - returns) ** 2) )

    The clipping keeps the new value prediction within ``eps`` of the one used
    to compute the advantages, pessimistically (the larger error is used).

    Args:
        clip_eps: positive float, clip range in value (reward) units.

    Raises:
        ValueError: if ``clip_eps <= 0``.

    Source: value clipping from the OpenAI Baselines PPO2 implementation, as
    described by Engstrom et al. 2020, "Implementation Matters in Deep Policy
    Gradients: A Case Study on PPO and TRPO" (ICLR 2020; value function clipping
    optimization). There is no numbered equation for it in Schulman et al. 2017;
    the unclipped term is the squared-error loss L^VF of that paper's Eq. (9).
    """

    def __init__(self, clip_eps: float = 0.2):
        super().__init__()
        if not clip_eps > 0:
            raise ValueError(f"clip_eps must be > 0, got {clip_eps!r}")
        self.clip_eps = float(clip_eps)

    def forward(
        self,
        values: torch.Tensor,
        old_values: torch.Tensor,
        returns: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Compute the clipped value loss.

        Args:
            values: (B, T) float, current critic predictions (requires grad).
            old_values: (B, T) float, critic predictions at rollout time.
            returns: (B, T) float regression targets (e.g. from
                :func:`gae_advantages`).
            mask: optional (B, T) bool/0-1, 1 on response tokens.

        Returns:
            0-dim float tensor (squared reward units).

        Raises:
            ValueError: if the inputs' shapes differ.
        """
        if mask is None:
            _require_same_shape(values=values, old_values=old_values, returns=returns)
        else:
            _require_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
        clipped = old_values + (values - old_values).clamp(-self.clip_eps, self.clip_eps)
        per_token = torch.maximum((values - returns).square(), (clipped - returns).square())
        return 0.5 * masked_mean(per_token, mask)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation over token sequences.

    For each sequence, with ``V_{t} = 0`` at and beyond the end of the masked
    region::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = sum_{l >= 0} (gamma * lam) ** l * delta_{t+l}
        R_t     = A_t + V_t                      (the value-function target)

    computed by the backward recursion ``A_t = delta_t + gamma * lam * A_{t+1}``.
    A 0 in ``mask`` ends an episode: nothing after it is bootstrapped into
    earlier positions. The usual layout is a contiguous run of 1s per row (the
    response), e.g. right-padded rows. Masked-out positions of both outputs are
    0. No gradient flows (inputs are used detached).

    Args:
        rewards: (B, T) float per-token rewards (e.g. KL penalty per token plus
            the reward-model score on the last response token).
        values: (B, T) float critic predictions V(s_t).
        mask: (B, T) bool/0-1, 1 on valid (response) tokens.
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1] (lam=1: Monte-Carlo return minus value;
            lam=0: one-step TD error).

    Returns:
        ``(advantages, returns)``, both (B, T) with the dtype of ``values``.

    Raises:
        ValueError: if the shapes differ, the inputs are not 2-D, or ``gamma``
            / ``lam`` lie outside [0, 1].

    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", Eq. (16).
    """
    _require_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards/values/mask must have shape (B, T), got {tuple(rewards.shape)}")
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")

    valid = mask.bool()
    zeros = torch.zeros_like(values)
    values = torch.where(valid, values.detach(), zeros)
    rewards = torch.where(valid, rewards.detach().to(values.dtype), zeros)

    num_steps = rewards.shape[1]
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[:, 0])
    next_value = torch.zeros_like(values[:, 0])
    for t in reversed(range(num_steps)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        current = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zeros[:, t])
        advantages[:, t] = current
        # A masked-out position resets the bootstrap for everything before it.
        next_advantage = current
        next_value = values[:, t]
    returns = torch.where(valid, advantages + values, zeros)
    return advantages, returns
