"""KTO: a preference loss on unpaired examples, each labelled desirable or undesirable.

Arguments follow the scheme of :mod:`rlhf_spec.algorithms.pairwise`: ``policy_logps`` /
``reference_logps`` (B,) sequence logprobs (nats) of each example's response under the policy and
the frozen reference policy, ``labels`` (B,) bool.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn

from .ops import _require_batch_vectors, require_positive

__all__ = ["KTOLoss", "kto_reference_point"]


@torch.no_grad()
def kto_reference_point(policy_kl_logps: torch.Tensor, reference_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO reference point ``z0``: a batch estimate of KL(pi || pi_ref), clamped at 0, detached.

    ``z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])`` where ``y'_i`` is a
    completion that does NOT belong to prompt ``x_i`` (e.g. the completion of another row of the
    batch, shifted by one), so that the average is a biased but cheap estimate of the KL between
    the policy and the reference over the data distribution. The estimate is clamped at 0 (a KL
    divergence is non-negative) and carries no gradient. In distributed training, average the
    per-row log-ratios over all processes before calling this, or call it on the gathered rows.

    Args:
        policy_kl_logps: (B,) float, sequence logprobs (nats) of the mismatched completions under
            the policy.
        reference_kl_logps: (B,) float, the same completions under the reference policy.

    Returns:
        0-dim float tensor (nats), ``>= 0``, detached.

    Raises:
        ValueError: if the inputs are not 1-D of one length, or are empty.

    Source: Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization"
    (arXiv:2402.01306), the estimate of ``z0`` that follows Eq. (8) (mismatched pairs
    ``(x_i, y_j)`` within the batch, clamped at 0, no back-propagation through it).
    """
    n = _require_batch_vectors(policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    if n == 0:
        raise ValueError("kto_reference_point needs at least one completion, got B=0")
    return (policy_kl_logps - reference_kl_logps).mean().clamp_min(0.0).detach()


class KTOLoss(nn.Module):
    """Kahneman-Tversky Optimisation loss for unpaired desirable / undesirable examples.

    With the log-ratio ``r = log pi(y|x) - log pi_ref(y|x)`` per example and the reference point
    ``z0`` (see :func:`kto_reference_point`)::

        v(x, y) = lambda_D * sigmoid(beta * (r - z0))   if y is desirable
                  lambda_U * sigmoid(beta * (z0 - r))   if y is undesirable
        loss    = mean_over_examples( lambda_y - v(x, y) )

    ``lambda_y`` is ``lambda_D`` (``desirable_weight``) or ``lambda_U`` (``undesirable_weight``)
    according to the example's label. The mean runs over all B examples, so a batch with only one
    kind of label is fine. ``z0`` is treated as a constant (detached). The paper recommends
    weights with ``lambda_D * n_D / (lambda_U * n_U)`` in ``[1, 4/3]``.

    Args:
        beta: positive float, inverse temperature of the implicit reward (1/nats).
        desirable_weight: positive float ``lambda_D``.
        undesirable_weight: positive float ``lambda_U``.

    Raises:
        ValueError: if any argument is not a finite positive number.

    Source: Ethayarajh, Xu, Muennighoff, Jurafsky & Kiela 2024, "KTO: Model Alignment as
    Prospect Theoretic Optimization" (arXiv:2402.01306), Eq. (8).
    """

    def __init__(self, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__()
        self.beta = require_positive("beta", beta)
        self.desirable_weight = require_positive("desirable_weight", desirable_weight)
        self.undesirable_weight = require_positive("undesirable_weight", undesirable_weight)

    def forward(
        self,
        policy_logps: torch.Tensor,
        reference_logps: torch.Tensor,
        labels: torch.Tensor,
        kl: torch.Tensor,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Compute the KTO loss.

        Args:
            policy_logps: (B,) float, sequence logprob (nats) of each response under the policy.
            reference_logps: (B,) float, the same responses under the reference policy.
            labels: (B,) bool (or 0/1), True where the response is desirable.
            kl: 0-dim float tensor, the reference point ``z0`` (nats), e.g. from
                :func:`kto_reference_point`; it is detached here.

        Returns:
            ``(loss, stats)``: 0-dim loss (dimensionless, in [0, max(lambda_D, lambda_U)]) and a
            dict of detached 0-dim tensors: ``kl`` (``z0``), ``num_desirable``,
            ``num_undesirable`` (counts, float), ``desirable_rewards`` / ``undesirable_rewards``
            (mean implicit reward ``beta * r`` over that kind; 0 when the batch has none of it).

        Raises:
            ValueError: if the (B,) inputs differ in shape or are not 1-D, B is 0, or ``kl`` is
                not a 0-dim tensor.
        """
        n = _require_batch_vectors(policy_logps=policy_logps, reference_logps=reference_logps, labels=labels)
        if n == 0:
            raise ValueError("KTOLoss needs at least one example, got B=0")
        if not (isinstance(kl, torch.Tensor) and kl.dim() == 0):
            raise ValueError(f"kl must be a 0-dim tensor (the reference point z0), got {kl!r}")
        desirable = labels.bool()
        logratio = policy_logps - reference_logps
        z0 = kl.detach().to(logratio.dtype)
        values = torch.where(
            desirable,
            self.desirable_weight * torch.sigmoid(self.beta * (logratio - z0)),
            self.undesirable_weight * torch.sigmoid(self.beta * (z0 - logratio)),
        )
        weights = torch.where(
            desirable,
            torch.full_like(logratio, self.desirable_weight),
            torch.full_like(logratio, self.undesirable_weight),
        )
        loss = (weights - values).mean()
        rewards = (self.beta * logratio).detach()
        num_desirable = desirable.sum().to(rewards.dtype)
        num_undesirable = (~desirable).sum().to(rewards.dtype)
        zero = torch.zeros_like(rewards)
        stats = {
            "kl": z0,
            "num_desirable": num_desirable,
            "num_undesirable": num_undesirable,
            "desirable_rewards": torch.where(desirable, rewards, zero).sum() / num_desirable.clamp_min(1),
            "undesirable_rewards": torch.where(~desirable, rewards, zero).sum() / num_undesirable.clamp_min(1),
        }
        return loss, stats
