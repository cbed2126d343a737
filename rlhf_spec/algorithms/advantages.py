"""Advantage estimators of the critic-free policy-gradient methods (GRPO, Dr. GRPO, RLOO,
REINFORCE++) and the per-token KL-penalised rewards they (and PPO) start from.

Layout: sequence-level tensors are (B,); token-level tensors are (B, T) with a ``mask`` (bool or
0/1, 1 on response tokens). For the group methods, B = num_prompts * group_size laid out
prompt-major: group ``i`` is rows ``i*G .. i*G + G - 1``. No gradient flows through any of these
functions (advantages and rewards are constants for the policy update).
"""

from __future__ import annotations

import math

import torch

from .ops import _compute_dtype, _require_batch_vectors, _require_same_shape, masked_whiten

__all__ = [
    "group_advantages",
    "rloo_advantages",
    "reinforce_pp_advantages",
    "kl_penalized_token_rewards",
    "expand_to_tokens",
]

_GROUP_SCALES = ("std", "none")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B,) rewards -> detached (B/G, G) view in the compute dtype, after validation."""
    n = _require_batch_vectors(rewards=rewards)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if n % group_size != 0:
        raise ValueError(f"batch size {n} is not a multiple of group_size {group_size}")
    return rewards.detach().to(_compute_dtype(rewards.dtype)).view(-1, group_size)


def _require_token_layout(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """ValueError unless ``mask`` and ``tensors`` share one 2-D shape (B, T)."""
    _require_same_shape(**tensors, mask=mask)
    if mask.dim() != 2:
        raise ValueError(f"token-level inputs must have shape (B, T), got {tuple(mask.shape)}")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages of GRPO (``scale="std"``) and Dr. GRPO (``scale="none"``).

    For each group ``g`` of ``G`` responses to one prompt (outcome supervision)::

        std:   A_i = (r_i - mean_g(r)) / (std_g(r) + eps)
        none:  A_i =  r_i - mean_g(r)

    ``std_g`` is the unbiased sample standard deviation (divisor ``G - 1``, ``torch.std``'s
    default), which is what the public GRPO implementations (TRL, OpenRLHF, verl) use; the paper
    only says "standard deviation". A group whose rewards are all equal gets advantage 0 in both
    modes. Dr. GRPO drops the division because it weights prompts by the inverse of their reward
    spread (too easy / too hard prompts get larger updates).

    Args:
        rewards: (B,) float, one scalar reward per response (reward units), prompt-major.
        group_size: int >= 2, responses per prompt ``G``.
        scale: ``"std"`` (GRPO) or ``"none"`` (Dr. GRPO).
        eps: float >= 0 added to the standard deviation.

    Returns:
        (B,) tensor, float32 (float64 for float64 rewards), detached; dimensionless for
        ``"std"``, reward units for ``"none"``.

    Raises:
        ValueError: if ``rewards`` is not 1-D, ``group_size`` is not an int >= 2, B is not a
            multiple of it, ``scale`` is unknown, or ``eps`` is negative.

    Source: Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open
    Language Models" (arXiv:2402.03300), Sec. 4.1.2, outcome supervision; Liu et al. 2025,
    "Understanding R1-Zero-Like Training: A Critical Perspective" (arXiv:2503.20783), Sec. 3
    (the Dr. GRPO objective: no division by the group standard deviation).
    """
    if scale not in _GROUP_SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {_GROUP_SCALES}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    grouped = _grouped(rewards, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "std":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: each reward minus the mean of the others in its group.

    For a group of ``G`` responses to one prompt::

        A_i = r_i - 1/(G - 1) * sum_{j != i} r_j  =  G/(G - 1) * (r_i - mean_g(r))

    The baseline of response ``i`` does not depend on ``r_i``, so the policy-gradient estimate
    stays unbiased.

    Args:
        rewards: (B,) float, one (possibly KL-penalised) reward per response, prompt-major.
        group_size: int >= 2, responses per prompt ``G`` (the paper's ``k``).

    Returns:
        (B,) tensor (reward units), float32 (float64 for float64 rewards), detached.

    Raises:
        ValueError: if ``rewards`` is not 1-D, ``group_size`` is not an int >= 2, or B is not a
            multiple of it.

    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs" (arXiv:2402.14740), Eq. (7); the estimator is from
    Kool, van Hoof & Welling 2019, "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
    """
    grouped = _grouped(rewards, group_size)
    others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others_mean).reshape(-1)


def reinforce_pp_advantages(
    token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0
) -> torch.Tensor:
    """REINFORCE++ advantages: per-token discounted return-to-go, whitened over the whole batch.

    With ``r_s`` the per-token rewards (0 outside the mask)::

        G_t = sum_{s >= t} gamma ** (s - t) * r_s          (backward: G_t = r_t + gamma * G_{t+1})
        A_t = (G_t - mean(G)) / sqrt(var(G) + 1e-8)        mean/var over all masked tokens of B

    (the whitening is :func:`rlhf_spec.algorithms.ops.masked_whiten`, unbiased variance). The
    exponent ``s - t`` counts positions, so with ``gamma < 1`` a masked-out gap inside a row
    (e.g. tool output in a multi-turn response) still discounts; with ``gamma = 1`` gaps are
    irrelevant and the return passes through them. Typical input: the output of
    :func:`kl_penalized_token_rewards`, so that ``A_t`` carries the score minus the KL penalty
    of the tokens from ``t`` on.

    Args:
        token_rewards: (B, T) float per-token rewards (reward units).
        mask: (B, T) bool/0-1, 1 on response tokens.
        gamma: discount factor in [0, 1].

    Returns:
        (B, T) tensor, dimensionless, 0 outside the mask, float32 (float64 for float64 input),
        detached.

    Raises:
        ValueError: if the shapes differ or are not 2-D, or ``gamma`` is outside [0, 1].

    Source: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models" (arXiv:2501.03262): the token-level KL-penalised reward, its return-to-go as the
    advantage, and the global batch advantage normalisation.
    """
    _require_token_layout(mask, token_rewards=token_rewards)
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma must be in [0, 1], got {gamma!r}")
    valid = mask.bool()
    rewards = token_rewards.detach().to(_compute_dtype(token_rewards.dtype))
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return masked_whiten(returns, valid)


def kl_penalized_token_rewards(
    scores: torch.Tensor, ref_kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: a KL penalty on every response token plus the score on the last one.

    ::

        rewards[b, t] = -kl_coef * ref_kl[b, t] + (t == last_b) * scores[b]   where mask[b, t]
        rewards[b, t] = 0                                                      elsewhere

    with ``last_b`` the last position of row ``b`` where the mask is set. Summed over a response
    this is ``score - kl_coef * sum_t ref_kl_t``, the KL-penalised reward
    ``r(x, y) - beta * log(pi(y|x) / pi_ref(y|x))`` when ``ref_kl = logprobs - ref_logprobs``.

    Args:
        scores: (B,) float, sequence reward (reward units), e.g. a reward-model score.
        ref_kl: (B, T) float, per-token KL estimate (nats), e.g. ``logprobs - ref_logprobs``
            (the k1 estimator); values outside the mask are ignored.
        mask: (B, T) bool/0-1, 1 on response tokens.
        kl_coef: float >= 0, ``beta`` (reward units per nat), e.g. a KL controller's ``value``.

    Returns:
        (B, T) tensor (reward units), float32 (float64 for float64 inputs), detached.

    Raises:
        ValueError: if ``scores`` is not (B,) or ``ref_kl``/``mask`` are not one (B, T) shape,
            ``kl_coef`` is negative or not finite, or a row has no response token.

    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593), Sec. 2.2 (``R(x, y) = r(x, y) - beta * log(pi/rho)``); Ouyang et al.
    2022, "Training language models to follow instructions with human feedback", Eq. (2).
    """
    _require_token_layout(mask, ref_kl=ref_kl)
    if scores.dim() != 1 or scores.shape[0] != mask.shape[0]:
        raise ValueError(f"scores must have shape ({mask.shape[0]},), got {tuple(scores.shape)}")
    if not (math.isfinite(kl_coef) and kl_coef >= 0):
        raise ValueError(f"kl_coef must be a finite number >= 0, got {kl_coef!r}")
    valid = mask.bool()
    if not bool(valid.any(dim=1).all()):
        raise ValueError("every row needs at least one response token (mask row is all 0)")
    dtype = _compute_dtype(torch.promote_types(scores.dtype, ref_kl.dtype))
    rewards = -kl_coef * ref_kl.detach().to(dtype)
    rewards = torch.where(valid, rewards, torch.zeros_like(rewards))
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[rows, last] += scores.detach().to(dtype)
    return rewards


def expand_to_tokens(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcast one advantage per sequence onto its response tokens.

    ``out[b, t] = advantages[b]`` where ``mask[b, t]`` is set, else 0; used by the critic-free
    methods (GRPO, Dr. GRPO, RLOO), where every token of a response shares its sequence advantage.

    Args:
        advantages: (B,) float sequence advantages.
        mask: (B, T) bool/0-1, 1 on response tokens.

    Returns:
        (B, T) tensor with the dtype of ``advantages``, detached.

    Raises:
        ValueError: if ``mask`` is not 2-D or ``advantages`` is not of shape (B,).

    Source: outcome supervision in Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), Sec.
    4.1.2: "sets the advantages of all tokens in the output as the normalized reward".
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (B, T), got {tuple(mask.shape)}")
    if advantages.dim() != 1 or advantages.shape[0] != mask.shape[0]:
        raise ValueError(f"advantages must have shape ({mask.shape[0]},), got {tuple(advantages.shape)}")
    adv = advantages.detach()
    expanded = adv.unsqueeze(1).expand(mask.shape)
    return torch.where(mask.bool(), expanded, torch.zeros_like(expanded))
