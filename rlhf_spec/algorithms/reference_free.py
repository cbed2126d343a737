"""Reference-free losses on pairs of responses: SimPO (length-normalised log-likelihood margin) and
ORPO (an SFT loss plus a log-odds-ratio penalty), with the paper and equation beside each.

Arguments follow :mod:`rlhf_spec.algorithms.pairwise`: ``policy_chosen_logps`` /
``policy_rejected_logps`` (B,) sequence logprobs under the policy.
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import _compute_dtype, _require_batch_vectors, require_label_smoothing, require_positive

__all__ = ["SimPOLoss", "ORPOLoss", "log1mexp"]


class SimPOLoss(nn.Module):
    """Simple Preference Optimisation: reference-free, length-normalised reward with a margin.

    With the summed policy logprobs ``log pi(y|x)`` and response lengths ``|y|`` in tokens::

        r(y)   = beta / |y| * log pi(y|x)                   (the SimPO reward)
        z      = r(y_w) - r(y_l) - gamma
        loss   = mean( -(1 - ls) * log sigmoid(z) - ls * log sigmoid(-z) )

    ``ls = 0`` is the paper's loss; ``ls > 0`` is the same label smoothing as :class:`DPOLoss`
    (each label assumed flipped with probability ``ls``). ``gamma`` is the target reward margin
    in reward units, as in the paper (some implementations instead take ``gamma / beta``).
    Because the reward uses the mean per-token logprob, a response twice as long with the same
    per-token logprob has the same reward.

    Args:
        beta: positive float, reward scale (reward units per nat of mean per-token logprob).
        gamma: float >= 0, target reward margin (reward units).
        label_smoothing: float in [0, 0.5], assumed label-flip probability.

    Raises:
        ValueError: if ``beta <= 0``, ``gamma < 0`` or not finite, or ``label_smoothing`` is
            outside [0, 0.5].

    Source: Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
    Reward" (arXiv:2405.14734), Eq. (6).
    """

    def __init__(self, beta: float, gamma: float, label_smoothing: float = 0.0):
        super().__init__()
        self.beta = require_positive("beta", beta)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        self.gamma = float(gamma)
        self.label_smoothing = require_label_smoothing(label_smoothing)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_lengths: torch.Tensor,
        rejected_lengths: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the SimPO loss and the length-normalised rewards.

        Args:
            policy_chosen_logps: (B,) float, summed logprob (nats) of the chosen response.
            policy_rejected_logps: (B,) float, summed logprob of the rejected response.
            chosen_lengths: (B,) int or float, number of response tokens of the chosen response.
            rejected_lengths: (B,) int or float, same for the rejected response.

        Returns:
            ``(loss, chosen_rewards, rejected_rewards)``: 0-dim loss (nats) and the detached (B,)
            rewards ``beta * logp / length``.

        Raises:
            ValueError: if the inputs are not all 1-D of one length, or a length is <= 0.
        """
        _require_batch_vectors(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths,
        )
        if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
            raise ValueError("chosen_lengths and rejected_lengths must all be > 0 (tokens)")
        dtype = torch.promote_types(policy_chosen_logps.dtype, policy_rejected_logps.dtype)
        chosen = self.beta * policy_chosen_logps / chosen_lengths.to(dtype)
        rejected = self.beta * policy_rejected_logps / rejected_lengths.to(dtype)
        z = chosen - rejected - self.gamma
        ls = self.label_smoothing
        losses = -(1.0 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
        return losses.mean(), chosen.detach(), rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range.

    Uses ``log(-expm1(x))`` for ``x > -log 2`` and ``log1p(-exp(x))`` otherwise (each form is
    accurate on its side). ``x`` is first capped at ``-tiny`` (the smallest normal number of its
    dtype), so ``x = 0`` or a round-off positive value gives a large finite result (about -87.3
    in float32, -708.4 in float64) instead of ``-inf``; the gradient is 0 where the cap applies.

    Args:
        x: float tensor of any shape, log-probabilities (nats), expected <= 0.

    Returns:
        tensor like ``x`` (nats): the log of the complementary probability.

    Raises:
        Nothing (values > 0 are capped, not rejected: they only arise from round-off).

    Source: Maechler 2012, "Accurately Computing log(1 - exp(-|a|)) Assessed by the Rmpfr
    package" (CRAN vignette), the ``log1mexp`` definition with the switch point ``log 2``.
    """
    x = x.clamp_max(-torch.finfo(x.dtype).tiny)
    near_zero = x > -math.log(2.0)
    # each branch is evaluated on a safe input so that neither produces NaN gradients
    small = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, -1.0))))
    large = torch.log1p(-torch.exp(torch.where(near_zero, torch.full_like(x, -1.0), x)))
    return torch.where(near_zero, small, large)


class ORPOLoss(nn.Module):
    """Odds-Ratio Preference Optimisation: SFT loss plus a log-odds-ratio penalty.

    With ``l(y) = (1/|y|) * sum_t log pi(y_t | x, y_<t)`` the mean per-token logprob (so
    ``P(y|x) = exp(l(y))``) and ``log odds(y) = l(y) - log(1 - exp(l(y)))``::

        L_OR = -log sigmoid( log odds(y_w) - log odds(y_l) )
        loss = mean(nll_chosen) + lam * mean(L_OR)

    where ``nll_chosen`` is the SFT negative log-likelihood of the chosen response supplied by the
    caller (normally ``-l(y_w)``). No reference model is used. ``log(1 - exp(l))`` is computed with
    :func:`log1mexp`, which stays finite for ``l`` near 0 (``P`` near 1).

    Args:
        lam: positive float, weight ``lambda`` of the odds-ratio term.

    Raises:
        ValueError: if ``lam`` is not a finite positive number.

    Source: Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
    Model" (arXiv:2403.07691), Eq. (6) (total loss) and Eq. (7) (odds-ratio loss).
    """

    def __init__(self, lam: float):
        super().__init__()
        self.lam = require_positive("lam", lam)

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        chosen_nll: torch.Tensor,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Compute the ORPO loss.

        Args:
            policy_chosen_logps: (B,) float, MEAN per-token logprob (nats per token, <= 0) of the
                chosen response under the policy.
            policy_rejected_logps: (B,) float, mean per-token logprob of the rejected response.
            chosen_nll: (B,) float, SFT negative log-likelihood of the chosen response (nats per
                token; usually ``-policy_chosen_logps``).

        Returns:
            ``(loss, stats)``: 0-dim loss (nats) and a dict of detached 0-dim tensors: ``nll``
            (mean of ``chosen_nll``), ``odds_ratio_loss`` (mean ``L_OR``, before ``lam``),
            ``log_odds_ratio`` (mean of ``log odds(y_w) - log odds(y_l)``, nats).

        Raises:
            ValueError: if the three inputs are not all 1-D with the same length.
        """
        _require_batch_vectors(
            policy_chosen_logps=policy_chosen_logps,
            policy_rejected_logps=policy_rejected_logps,
            chosen_nll=chosen_nll,
        )
        dtype = _compute_dtype(torch.promote_types(policy_chosen_logps.dtype, policy_rejected_logps.dtype))
        chosen = policy_chosen_logps.to(dtype)
        rejected = policy_rejected_logps.to(dtype)
        log_odds_ratio = (chosen - log1mexp(chosen)) - (rejected - log1mexp(rejected))
        odds_ratio_loss = -F.logsigmoid(log_odds_ratio)
        nll = chosen_nll.to(dtype).mean()
        loss = nll + self.lam * odds_ratio_loss.mean()
        stats = {
            "nll": nll.detach(),
            "odds_ratio_loss": odds_ratio_loss.mean().detach(),
            "log_odds_ratio": log_odds_ratio.mean().detach(),
        }
        return loss, stats
