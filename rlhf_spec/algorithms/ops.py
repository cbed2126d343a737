"""Tensor operations shared by the losses: masked means, shape checks, and logprobs from logits.

Notation
--------
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

"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "masked_mean",
    "masked_whiten",
    "gather_logprobs",
    "sequence_logprobs",
    "token_logprobs",
    "require_positive",
    "require_label_smoothing",
]

# Added to the sampling temperature before dividing the logits, exactly as in the
# REBEL reference code (``logits /= temperature + 1e-7``); it also makes
# temperature 0 (greedy) finite.
_TEMPERATURE_EPS = 1e-7


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
# hyperparameter checks of the losses
# ---------------------------------------------------------------------------


def require_positive(name: str, value: float) -> float:
    """Check a loss hyperparameter that must be a finite number > 0 (beta, eta, lambda, a weight).

    Args:
        name: the hyperparameter's name, used in the error message.
        value: int or float.

    Returns:
        ``float(value)``.

    Raises:
        ValueError: ``"<name> must be a finite positive number, got <value>"`` unless ``value`` is an int or
            float, finite and > 0.
    """
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def require_label_smoothing(label_smoothing: float) -> float:
    """Check the label smoothing of a preference loss: the assumed probability that a label is flipped.

    Args:
        label_smoothing: float in [0, 0.5] (0: labels trusted; 0.5: labels carry no information).

    Returns:
        ``float(label_smoothing)``.

    Raises:
        ValueError: ``"label_smoothing must be in [0, 0.5], got <value>"`` if it is outside [0, 0.5] or NaN.

    Source: the label-flip probability of conservative DPO (Mitchell 2023, "A note on DPO with noisy
    preferences & relationship to IPO").
    """
    if not (0.0 <= label_smoothing <= 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    return float(label_smoothing)


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




def token_logprobs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-token logprobs of the response tokens, aligned with ``input_ids``.

    ``out[b, t] = log pi(input_ids[b, t] | input_ids[b, :t])`` where ``response_mask[b, t]`` is set,
    else 0; ``out[:, 0]`` is always 0 (nothing predicts the first token).

    Args:
        logits: (B, T, V) float causal-LM logits (see :func:`gather_logprobs` for dtypes).
        input_ids: (B, T) integer token ids.
        response_mask: (B, T) bool or 0/1, 1 on response tokens.
        temperature: sampling temperature (>= 0); logits are divided by ``temperature + 1e-7``.

    Returns:
        (B, T) float tensor (nats), differentiable with respect to ``logits``.

    Raises:
        ValueError: on the shape problems of :func:`gather_logprobs`, or a mask of another shape.

    Source: the autoregressive factorisation ``log pi(y|x) = sum_t log pi(y_t | x, y_<t)``; the
    per-token form is what PPO's per-token ratio and KL penalty use (Ouyang et al. 2022).
    """
    _require_same_shape(input_ids=input_ids, response_mask=response_mask)
    lp = gather_logprobs(logits, input_ids, temperature=temperature)
    lp = torch.where(response_mask[:, 1:].bool(), lp, torch.zeros_like(lp))
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], dim=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``values`` to mean 0 and variance 1 over the masked entries.

    ``(values - mean) / sqrt(var + eps)`` with mean and (unbiased) variance over ``mask``; with
    ``shift_mean=False`` the mean is added back (used for rewards). Masked-out entries become 0.

    Args:
        values: float tensor of any shape.
        mask: bool or 0/1 tensor of the same shape.
        shift_mean: subtract the mean (True) or keep it (False).
        eps: added to the variance.

    Returns:
        tensor like ``values``.

    Raises:
        ValueError: if the shapes differ.

    Source: advantage whitening of PPO implementations (Engstrom et al. 2020, "Implementation
    Matters in Deep Policy Gradients"; Ziegler et al. 2019).
    """
    _require_same_shape(values=values, mask=mask)
    m = mask.bool()
    n = m.sum().clamp_min(1)
    mean = torch.where(m, values, torch.zeros_like(values)).sum() / n
    var = torch.where(m, (values - mean) ** 2, torch.zeros_like(values)).sum() / (n - 1).clamp_min(1)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, torch.zeros_like(out))
