"""Losses on pairs of responses to one prompt: REBEL, DPO (with cDPO label smoothing), IPO and the
Bradley-Terry reward-model loss (the reference-free SimPO and ORPO are in
:mod:`rlhf_spec.algorithms.reference_free`). One ``nn.Module`` per loss, with the paper and
equation beside it.

Arguments follow one naming scheme: ``policy_chosen_logps`` / ``policy_rejected_logps`` (B,) sequence
logprobs under the policy, ``reference_chosen_logps`` / ``reference_rejected_logps`` under the reference
policy, ``chosen_rewards`` / ``rejected_rewards`` (B,) scalar rewards. DPO and IPO share
:class:`_ReferencePairLoss` (input checks, log-ratios, implicit rewards) and state only their equation.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import _require_batch_vectors, require_label_smoothing, require_positive

__all__ = [
    "REBELLoss",
    "rebel_stats",
    "DPOLoss",
    "PairwiseRewardLoss",
    "pairwise_accuracy",
    "IPOLoss",
]


# ---------------------------------------------------------------------------
# log-ratios of a pair against the reference policy
# ---------------------------------------------------------------------------


def _pair_logratios(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    **other_vectors: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Log-ratios ``(pc - rc, pr - rr)`` (each (B,), nats) of the chosen and rejected responses.

    Raises ValueError unless the four logprob vectors and ``other_vectors`` (further (B,) inputs of the
    same loss, checked with them) are all 1-D of one length.
    """
    _require_batch_vectors(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        **other_vectors,
    )
    return policy_chosen_logps - reference_chosen_logps, policy_rejected_logps - reference_rejected_logps


class _ReferencePairLoss(nn.Module):
    """A preference loss on the policy-vs-reference log-ratios of a chosen and a rejected response.

    :meth:`forward` checks the four (B,) logprob vectors, forms the log-ratios
    ``chosen_logratio = pc - rc`` and ``rejected_logratio = pr - rr``, hands them to :meth:`_pair_loss`
    (the subclass's equation) and returns the loss with the implicit rewards ``beta * logratio`` of
    Rafailov et al. 2023 (DPO), section 5. Subclasses set ``self.beta``.
    """

    beta: float

    def forward(
        self,
        policy_chosen_logps: torch.Tensor,
        policy_rejected_logps: torch.Tensor,
        reference_chosen_logps: torch.Tensor,
        reference_rejected_logps: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Compute the loss and the implicit rewards.

        Args:
            policy_chosen_logps: (B,) float, sequence logprob (nats; summed over the response tokens, or
                their mean where the loss says so) of the chosen response under the policy.
            policy_rejected_logps: (B,) float, same for the rejected response.
            reference_chosen_logps: (B,) float, chosen response under the frozen reference policy.
            reference_rejected_logps: (B,) float, rejected response under the reference policy.

        Returns:
            ``(loss, chosen_rewards, rejected_rewards)``: ``loss`` is a 0-dim float tensor (the mean over
            pairs); ``chosen_rewards = beta * (pc - rc)`` and ``rejected_rewards = beta * (pr - rr)`` are
            detached (B,) tensors (the implicit rewards).

        Raises:
            ValueError: if the four inputs are not all 1-D with the same length.
        """
        chosen_logratio, rejected_logratio = _pair_logratios(
            policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps
        )
        loss = self._pair_loss(chosen_logratio, rejected_logratio)
        chosen_rewards = (self.beta * chosen_logratio).detach()
        rejected_rewards = (self.beta * rejected_logratio).detach()
        return loss, chosen_rewards, rejected_rewards

    def _pair_loss(self, chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor) -> torch.Tensor:
        """The 0-dim loss from the (B,) log-ratios (nats); each subclass gives its equation."""
        raise NotImplementedError


# ---------------------------------------------------------------------------
# REBEL
# ---------------------------------------------------------------------------


def _rebel_terms(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(log-ratio margin (B,), reward margin (B,)) after validating shapes."""
    chosen_logratio, rejected_logratio = _pair_logratios(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )
    logratio_margin = chosen_logratio - rejected_logratio
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
        self.eta = require_positive("eta", eta)

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
    vectors = (
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_rewards,
        rejected_rewards,
    )
    loss = REBELLoss(eta)(*vectors)
    logratio_margin, reward_margin = _rebel_terms(*vectors)
    return {
        "loss": loss.detach(),
        "reward_margin": reward_margin.mean().detach(),
        "logratio_margin": logratio_margin.mean().detach(),
        "target_margin": (float(eta) * reward_margin.mean()).detach(),
    }


# ---------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------


class DPOLoss(_ReferencePairLoss):
    """Direct Preference Optimization loss, with optional conservative smoothing.

    With ``h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]``::

        loss = mean( -(1 - ls) * log sigmoid(beta * h) - ls * log sigmoid(-beta * h) )

    ``ls = 0`` is the DPO loss; ``ls > 0`` assumes each preference label is
    flipped with probability ``ls`` (conservative DPO, "cDPO"). ``forward(policy_chosen_logps,
    policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)`` returns ``(loss (nats),
    chosen_rewards, rejected_rewards)`` as described in :meth:`_ReferencePairLoss.forward`.

    Args:
        beta: positive float, strength of the implicit KL constraint to the
            reference policy (inverse temperature of the implicit reward).
        label_smoothing: float in [0, 0.5], assumed label-flip probability.

    Raises:
        ValueError: if ``beta`` is not a finite positive number or ``label_smoothing`` is
            outside [0, 0.5].

    Source: Rafailov et al. 2023, "Direct Preference Optimization: Your Language
    Model is Secretly a Reward Model", Eq. (7); label smoothing per Mitchell
    2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO).
    """

    def __init__(self, beta: float, label_smoothing: float = 0.0):
        super().__init__()
        self.beta = require_positive("beta", beta)
        self.label_smoothing = require_label_smoothing(label_smoothing)

    def _pair_loss(self, chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor) -> torch.Tensor:
        """Eq. (7) with cDPO label smoothing, averaged over the pairs (nats)."""
        logits = self.beta * (chosen_logratio - rejected_logratio)
        ls = self.label_smoothing
        losses = -(1.0 - ls) * F.logsigmoid(logits) - ls * F.logsigmoid(-logits)
        return losses.mean()


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
# IPO
# ---------------------------------------------------------------------------


class IPOLoss(_ReferencePairLoss):
    """Identity Preference Optimisation: regress the log-ratio margin onto a constant.

    With ``h = [log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)]``::

        loss = mean( (h - 1 / (2 * beta)) ** 2 )

    The loss is minimised (value 0, gradient 0) at ``h = 1/(2*beta)``: unlike DPO, the margin is
    pulled towards a finite target instead of being pushed to infinity, so a small ``beta`` (the
    paper's ``tau``) allows a large margin and a large ``beta`` keeps the policy near the reference.

    The inputs are whatever sequence logprobs the caller passes: the sum over response tokens
    (as in the paper, where ``pi(y|x)`` is the probability of the whole response) or the mean per
    token (as some implementations do for IPO). The choice changes the scale of ``h`` and hence
    the meaningful range of ``beta``; this class does not pick one. ``forward(policy_chosen_logps,
    policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)`` returns ``(loss (squared
    nats), chosen_rewards, rejected_rewards)`` as described in :meth:`_ReferencePairLoss.forward`.

    Args:
        beta: positive float, regularisation strength ``tau`` (in 1/nats: the target margin is
            ``1/(2*beta)`` nats).

    Raises:
        ValueError: if ``beta`` is not a finite positive number.

    Source: Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences" (arXiv:2310.12036), Eq. (17), the sampled IPO loss.
    """

    def __init__(self, beta: float):
        super().__init__()
        self.beta = require_positive("beta", beta)

    def _pair_loss(self, chosen_logratio: torch.Tensor, rejected_logratio: torch.Tensor) -> torch.Tensor:
        """Eq. (17): squared distance of the log-ratio margin from ``1/(2*beta)``, averaged over the pairs."""
        margin = chosen_logratio - rejected_logratio
        return (margin - 1.0 / (2.0 * self.beta)).square().mean()
