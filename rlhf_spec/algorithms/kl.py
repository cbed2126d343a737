"""KL estimators between the policy and the reference policy.

(Adaptive and fixed KL controllers for the per-token KL penalty live here too.)

Sign convention, used by every function here: ``log_ratio = log pi(y) - log pi_ref(y)`` (nats), the
policy's logprob minus the reference policy's, on tokens (or sequences) sampled from the policy.
"""

from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Sequence

import torch

__all__ = ["KL_ESTIMATORS", "kl_terms", "kl_term_float", "kl_mean_float", "kl_estimate", "FixedKLController",
           "AdaptiveKLController"]

from .ops import _require_same_shape

#: The sample-based KL estimators of Schulman 2020, by name.
KL_ESTIMATORS = ("k1", "k2", "k3")


# ---------------------------------------------------------------------------
# KL estimators
# ---------------------------------------------------------------------------


def _check_estimator(estimator: str) -> None:
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")


def kl_terms(log_ratio: torch.Tensor, estimator: str) -> torch.Tensor:
    """Elementwise sample-based estimate of KL(policy || reference policy), one term per sample.

    With ``x = log_ratio = log pi - log pi_ref`` of a sample drawn from the policy::

        k1 = x                          unbiased, high variance, can be < 0
        k2 = x ** 2 / 2                 biased (low for nearby policies), >= 0
        k3 = (exp(-x) - 1) + x          unbiased, >= 0, lower variance

    k3 is evaluated as ``expm1(-x) + x`` and clamped at 0, so it is non-negative as in exact arithmetic
    (for a faithfully rounded ``expm1`` the clamp never changes a finite value; NaN stays NaN).

    Args:
        log_ratio: float tensor of any shape, per-token (or per-sequence) log-ratios in nats.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        a tensor of the same shape and dtype (nats), differentiable with respect to ``log_ratio``.

    Raises:
        ValueError: on an unknown ``estimator``.

    Source: Schulman 2020, "Approximating KL Divergence" (http://joschu.net/blog/kl-approx.html),
    estimators k1, k2, k3. That note writes ``r = p(x)/q(x)`` with ``x ~ q``, ``q`` the sampling policy and
    ``p`` the reference; its ``log r`` is our ``-x``.
    """
    _check_estimator(estimator)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    return (torch.expm1(-log_ratio) + log_ratio).clamp_min(0.0)


def kl_term_float(log_ratio: float, estimator: str) -> float:
    """:func:`kl_terms` for one Python float, in float64 with the C library's ``expm1``.

    torch's vectorised ``expm1`` and ``math.expm1`` differ in the last bit on a few percent of
    float64 inputs, so a figure computed in Python floats keeps this path to stay bit-identical.
    k3 is ``max(0.0, expm1(-x) + x)`` (a NaN gives 0.0 here, unlike the tensor path).

    Args:
        log_ratio: ``log pi - log pi_ref`` of one sample (nats).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        the estimate (float, nats).

    Raises:
        ValueError: on an unknown ``estimator``. OverflowError: k3 of a log-ratio below about -709.

    Source: as :func:`kl_terms`.
    """
    _check_estimator(estimator)
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * (log_ratio * log_ratio)
    return max(0.0, math.expm1(-log_ratio) + log_ratio)


def kl_mean_float(log_ratios: Sequence[float], estimator: str) -> float:
    """Mean of :func:`kl_term_float` over N log-ratios, summed left to right in Python floats.

    Args:
        log_ratios: N floats, ``log pi - log pi_ref`` per sample (nats), N >= 1.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
        ``sum(terms) / N`` (float, nats).

    Raises:
        ValueError: on an unknown ``estimator`` or an empty ``log_ratios``.
    """
    _check_estimator(estimator)
    if not len(log_ratios):
        raise ValueError("kl_mean_float needs at least one log-ratio")
    return sum(kl_term_float(x, estimator) for x in log_ratios) / len(log_ratios)


def _check_kl_args(logprobs, ref_logprobs, mask, estimator: str) -> None:
    _check_estimator(estimator)
    if mask is None:
        _require_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    else:
        _require_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask)
    if logprobs.dim() not in (1, 2):
        raise ValueError(f"logprobs must have shape (B, T) or (B,), got {tuple(logprobs.shape)}")


def kl_estimate(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    estimator: str = "k1",
) -> torch.Tensor:
    """Sample-based estimate of KL(policy || reference policy), per sequence.

    The per-token terms are :func:`kl_terms` of ``log_ratio = logprobs - ref_logprobs`` (policy minus
    reference), summed over the masked tokens of each sequence. For k1 this sum is the standard
    estimate of the sequence-level KL; for k2/k3 it is the sum of the per-token estimates, as used for
    token-level KL penalties.

    Args:
        logprobs: (B, T) or (B,) float, logprobs (nats) of the sampled tokens
            under the policy that sampled them.
        ref_logprobs: same shape, logprobs of the same tokens under the
            reference policy.
        mask: optional bool/0-1 tensor of the same shape; entries where it is 0
            contribute exactly 0 (even if they hold inf/NaN).
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (see :func:`kl_terms`).

    Returns:
        (B,) float tensor: for (B, T) inputs the masked sum over T; for (B,)
        inputs the per-entry estimate (each entry one sample), masked.

    Raises:
        ValueError: on an unknown ``estimator``, if the inputs' shapes differ, or if
            they are neither 1-D nor 2-D.

    Source: Schulman 2020, "Approximating KL Divergence" (see :func:`kl_terms`).
    """
    _check_kl_args(logprobs, ref_logprobs, mask, estimator)

    per_token = kl_terms(logprobs - ref_logprobs, estimator)
    if mask is not None:
        per_token = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if per_token.dim() == 2:
        return per_token.sum(dim=-1)
    return per_token


# ---------------------------------------------------------------------------
# KL coefficient controllers
# ---------------------------------------------------------------------------


def _require_finite(name: str, value: float, minimum: float = 0.0, strict: bool = False) -> float:
    """Return ``float(value)``; ValueError unless finite and ``>= minimum`` (``>`` if strict)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"{name} must be a finite number {relation} {minimum}, got {value!r}")
    return float(value)


def _require_steps(n_steps: int) -> int:
    """Return ``n_steps``; ValueError unless it is an int >= 0."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
    return n_steps


class FixedKLController:
    """Constant coefficient ``beta`` of the per-token KL penalty (``update`` leaves it unchanged).

    The penalised reward is ``r(x, y) - beta * KL`` (see
    :func:`rlhf_spec.algorithms.advantages.kl_penalized_token_rewards`); this controller keeps
    ``beta`` fixed.

    Args:
        value: float >= 0, the KL coefficient (reward units per nat).

    Raises:
        ValueError: if ``value`` is negative or not finite.

    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593), Sec. 2.2 (fixed ``beta``, the alternative to the adaptive schedule).
    """

    def __init__(self, value: float):
        self.value = _require_finite("value", value)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Do nothing and return ``value``.

        Args:
            current_kl: float (or 0-dim tensor), measured KL (nats); only validated (finite).
            n_steps: int >= 0, number of samples (or steps) since the last update.

        Returns:
            the unchanged coefficient (float).

        Raises:
            ValueError: if ``current_kl`` is not finite or ``n_steps`` is not an int >= 0.
        """
        _require_finite("current_kl", current_kl, minimum=-math.inf)
        _require_steps(n_steps)
        return self.value

    def state_dict(self) -> Dict[str, float]:
        """``{"value": float}``, JSON-serialisable."""
        return {"value": self.value}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Restore ``value`` from :meth:`state_dict` output; ValueError if missing or invalid."""
        if "value" not in state:
            raise ValueError(f"KL controller state needs a 'value' entry, got keys {sorted(state)}")
        self.value = _require_finite("value", state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the measured KL towards a target.

    After each batch with measured KL ``KL_t`` (nats, per sequence) covering ``n_steps`` samples::

        e_t     = clip(KL_t / target - 1, -0.2, 0.2)
        beta   <- beta * (1 + e_t * n_steps / horizon)

    so ``beta`` grows when the KL exceeds the target and shrinks when it is below; the clip bounds
    the relative change per update at ``0.2 * n_steps / horizon``. The paper writes the gain as
    ``K_beta`` (0.1 there); here ``K_beta = n_steps / horizon``, the form of the original
    ``lm-human-preferences`` code and TRL's ``AdaptiveKLController``.

    Args:
        init_kl_coef: float >= 0, initial ``beta`` (reward units per nat).
        target: float > 0, target KL (nats).
        horizon: float > 0, number of samples over which the controller acts.

    Raises:
        ValueError: if an argument is out of range or not finite.

    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences"
    (arXiv:1909.08593), Sec. 2.2 (the log-space proportional controller for ``beta``).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value = _require_finite("init_kl_coef", init_kl_coef)
        self.target = _require_finite("target", target, strict=True)
        self.horizon = _require_finite("horizon", horizon, strict=True)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Apply one controller step and return the new coefficient.

        Args:
            current_kl: float (or 0-dim tensor), KL (nats) measured on the last batch.
            n_steps: int >= 0, number of samples in that batch.

        Returns:
            the new ``value`` (float); clamped at 0, which only matters if
            ``n_steps > 5 * horizon``.

        Raises:
            ValueError: if ``current_kl`` is not finite or ``n_steps`` is not an int >= 0.
        """
        current_kl = _require_finite("current_kl", current_kl, minimum=-math.inf)
        n_steps = _require_steps(n_steps)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value = max(self.value * (1.0 + error * n_steps / self.horizon), 0.0)
        return self.value

    def state_dict(self) -> Dict[str, float]:
        """``{"value", "target", "horizon"}`` as plain floats, JSON-serialisable."""
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: Dict[str, float]) -> None:
        """Restore from :meth:`state_dict` output (``target``/``horizon`` only if present).

        Raises:
            ValueError: if ``value`` is missing or any entry is out of range.
        """
        if "value" not in state:
            raise ValueError(f"KL controller state needs a 'value' entry, got keys {sorted(state)}")
        self.value = _require_finite("value", state["value"])
        if "target" in state:
            self.target = _require_finite("target", state["target"], strict=True)
        if "horizon" in state:
            self.horizon = _require_finite("horizon", state["horizon"], strict=True)
