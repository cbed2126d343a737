"""PPO's clipped policy loss, the clipped value loss, Generalized Advantage Estimation, and the
GRPO/DAPO-style clipped policy loss with its loss-aggregation modes."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from .kl import kl_terms
from .ops import _require_same_shape, masked_mean

__all__ = ["PolicyLossPPO", "ValueLoss", "gae_advantages", "aggregate_loss", "ClippedPolicyLoss"]


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


def _check_gae_args(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> None:
    """ValueError unless rewards/values/mask share one (B, T) shape and gamma, lam lie in [0, 1]."""
    _require_same_shape(rewards=rewards, values=values, mask=mask)
    if rewards.dim() != 2:
        raise ValueError(f"rewards/values/mask must have shape (B, T), got {tuple(rewards.shape)}")
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    if not (0.0 <= lam <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
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
    _check_gae_args(rewards, values, mask, gamma, lam)
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


# ---------------------------------------------------------------------------
# loss aggregation and the GRPO / DAPO clipped policy loss
# ---------------------------------------------------------------------------

_AGGREGATION_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _check_aggregation(mode: str, max_tokens: Optional[float]) -> None:
    """ValueError on an unknown mode, or a missing / non-positive ``max_tokens`` where needed."""
    if mode not in _AGGREGATION_MODES:
        raise ValueError(f"unknown aggregation mode {mode!r}; expected one of {_AGGREGATION_MODES}")
    if mode == "seq-mean-token-sum-norm":
        ok = isinstance(max_tokens, (int, float)) and not isinstance(max_tokens, bool)
        if not (ok and math.isfinite(max_tokens) and max_tokens > 0):
            raise ValueError(f"mode {mode!r} needs max_tokens > 0 (a constant length), got {max_tokens!r}")


def aggregate_loss(
    per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", max_tokens: Optional[float] = None
) -> torch.Tensor:
    """Reduce a (B, T) per-token loss to a scalar, in one of three conventions.

    With ``m`` the mask and ``|o_b| = sum_t m[b, t]`` the response length of row ``b``::

        token-mean:               sum_{b,t} m * l / sum_{b,t} m
        seq-mean-token-mean:      (1/B) * sum_b [ sum_t m * l / |o_b| ]
        seq-mean-token-sum-norm:  (1/B) * sum_b [ sum_t m * l / max_tokens ]

    ``token-mean`` (DAPO) weights every token equally, so long responses are not down-weighted;
    ``seq-mean-token-mean`` (original GRPO) weights every response equally, so its tokens count
    ``1/|o_b|`` each; ``seq-mean-token-sum-norm`` (Dr. GRPO) divides by one constant (e.g. the
    generation budget) instead of the length, which removes GRPO's length bias. In the two
    ``seq-mean`` modes all B rows count, and a row with an all-zero mask contributes 0. Entries
    outside the mask are ignored even if they hold inf/NaN.

    Args:
        per_token: (B, T) float per-token loss.
        mask: (B, T) bool/0-1, 1 on response tokens.
        mode: one of ``"token-mean"``, ``"seq-mean-token-mean"``, ``"seq-mean-token-sum-norm"``.
        max_tokens: positive number, the constant divisor of ``seq-mean-token-sum-norm``
            (tokens); ignored by the other modes.

    Returns:
        0-dim tensor, dtype of ``per_token``, in the units of ``per_token``.

    Raises:
        ValueError: if the shapes differ or are not 2-D, ``mode`` is unknown, or
            ``seq-mean-token-sum-norm`` is asked for without a positive ``max_tokens``.

    Source: Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale"
    (arXiv:2503.14476), Eq. (8) (token-level loss); Shao et al. 2024, "DeepSeekMath"
    (arXiv:2402.03300), Eq. (3) (per-sequence mean); Liu et al. 2025, "Understanding R1-Zero-Like
    Training: A Critical Perspective" (arXiv:2503.20783), Dr. GRPO (constant normaliser).
    """
    _require_same_shape(per_token=per_token, mask=mask)
    if per_token.dim() != 2:
        raise ValueError(f"per_token and mask must have shape (B, T), got {tuple(per_token.shape)}")
    _check_aggregation(mode, max_tokens)
    if mode == "token-mean":
        return masked_mean(per_token, mask)
    if mode == "seq-mean-token-mean":
        return masked_mean(per_token, mask, dim=1).mean()
    kept = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    return (kept.sum(dim=1) / float(max_tokens)).mean()


class ClippedPolicyLoss(nn.Module):
    """Clipped surrogate policy loss with asymmetric clip range and an optional k3 KL penalty.

    Per token, with ``ratio = exp(logprobs - old_logprobs)`` and advantage ``A``::

        pg_t = max(-A * ratio, -A * clip(ratio, 1 - eps_low, 1 + eps_high))
        kl_t = exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1     (k3, >= 0)
        loss = agg(pg) + kl_coef * agg(kl)

    ``agg`` is :func:`aggregate_loss` with the chosen ``aggregation``. ``eps_high > eps_low``
    is DAPO's "clip-higher" (more room to raise the probability of unlikely tokens);
    ``eps_high = eps_low`` is the PPO / GRPO clip. The KL term (GRPO; ``kl_coef = 0`` as in DAPO
    turns it off) is the k3 estimator of KL(pi_theta || pi_ref) (:func:`~rlhf_spec.algorithms.kl.kl_terms`).
    Masked-out positions are replaced by 0 before any arithmetic, so padding holding inf/NaN affects
    neither the loss nor its gradient.

    Args:
        clip_eps_low: float in (0, 1), lower clip range ``eps_low``.
        clip_eps_high: float > 0, upper clip range ``eps_high``; None means ``eps_low``.
        kl_coef: float >= 0, weight ``beta`` of the KL penalty (0 disables it).
        aggregation: an :func:`aggregate_loss` mode.
        max_tokens: constant divisor for ``"seq-mean-token-sum-norm"`` (tokens).

    Raises:
        ValueError: on an argument out of range, an unknown aggregation, or a missing
            ``max_tokens`` for ``"seq-mean-token-sum-norm"``.

    Source: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), Eq. (3) (GRPO objective) and
    Eq. (4) (k3 KL estimator; Schulman 2020, "Approximating KL Divergence"); Yu et al. 2025,
    "DAPO" (arXiv:2503.14476), Eq. (8) (decoupled clip range, token-level loss).
    """

    def __init__(
        self,
        clip_eps_low: float = 0.2,
        clip_eps_high: Optional[float] = None,
        kl_coef: float = 0.0,
        aggregation: str = "token-mean",
        max_tokens: Optional[float] = None,
    ):
        super().__init__()
        if not (0.0 < clip_eps_low < 1.0):
            raise ValueError(f"clip_eps_low must be in (0, 1), got {clip_eps_low!r}")
        high = clip_eps_low if clip_eps_high is None else clip_eps_high
        if not (math.isfinite(high) and high > 0):
            raise ValueError(f"clip_eps_high must be a finite number > 0, got {clip_eps_high!r}")
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
        _check_aggregation(aggregation, max_tokens)
        self.clip_eps_low = float(clip_eps_low)
        self.clip_eps_high = float(high)
        self.kl_coef = float(kl_coef)
        self.aggregation = aggregation
        self.max_tokens = max_tokens

    def forward(
        self,
        logprobs: torch.Tensor,
        old_logprobs: torch.Tensor,
        advantages: torch.Tensor,
        mask: torch.Tensor,
        ref_logprobs: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Compute the loss and detached statistics.

        Args:
            logprobs: (B, T) float, per-token logprobs (nats) under the current policy (grad).
            old_logprobs: (B, T) float, logprobs under the policy that sampled the tokens.
            advantages: (B, T) float per-token advantages (e.g. :func:`expand_to_tokens`).
            mask: (B, T) bool/0-1, 1 on response tokens.
            ref_logprobs: (B, T) float, logprobs under the reference policy; required when
                ``kl_coef > 0``, ignored otherwise.

        Returns:
            ``(loss, stats)``: 0-dim loss; ``stats`` holds detached 0-dim tensors ``pg_loss``
            (the aggregated surrogate), ``clip_fraction`` (share of masked tokens where the
            clipped term is active, i.e. with zero gradient), ``approx_kl`` (masked token mean of
            the k3 estimate of KL(pi_old || pi_theta), nats) and, when ``kl_coef > 0``,
            ``ref_kl`` (the aggregated k3 KL to the reference, nats).

        Raises:
            ValueError: if the shapes differ or are not 2-D, or ``ref_logprobs`` is missing
                while ``kl_coef > 0``.
        """
        _require_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
        if self.kl_coef > 0 and ref_logprobs is None:
            raise ValueError("ref_logprobs is required when kl_coef > 0")
        valid = mask.bool()
        zero = torch.zeros_like(logprobs)
        log_ratio = torch.where(valid, logprobs - old_logprobs, zero)
        adv = torch.where(valid, advantages.detach().to(logprobs.dtype), zero)
        ratio = torch.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * ratio.clamp(1.0 - self.clip_eps_low, 1.0 + self.clip_eps_high)
        pg_loss = aggregate_loss(torch.maximum(unclipped, clipped), mask, self.aggregation, self.max_tokens)
        detached = log_ratio.detach()
        stats = {
            "pg_loss": pg_loss.detach(),
            "clip_fraction": masked_mean((clipped > unclipped).detach().to(logprobs.dtype), mask),
            "approx_kl": masked_mean(kl_terms(-detached, "k3"), mask),  # KL(pi_old || pi_theta)
        }
        if self.kl_coef == 0:
            return pg_loss, stats
        _require_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
        ref_log_ratio = torch.where(valid, logprobs - ref_logprobs.detach(), zero)
        kl = kl_terms(ref_log_ratio, "k3")
        ref_kl = aggregate_loss(kl, mask, self.aggregation, self.max_tokens)
        stats["ref_kl"] = ref_kl.detach()
        return pg_loss + self.kl_coef * ref_kl, stats
