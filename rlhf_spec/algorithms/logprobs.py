"""Logprobs of responses under a causal LM, from tokenized pairs or (prompt, completion) rows."""

from __future__ import annotations

import inspect
from typing import Sequence

from .batching import TokenizedCompletion, TokenizedPair, pad_batch, pad_response_aligned
from .ops import sequence_logprobs, token_logprobs


def _model_device(model):
    return next(model.parameters()).device


def _computes_response_logits_only(model) -> bool:
    """Whether the model's forward takes ``position_ids`` and ``logits_to_keep`` (unwrapping
    DDP/DeepSpeed's ``.module`` and peft's base model); accelerate's autocast wrapper keeps the signature."""
    inner = model
    while hasattr(inner, "module"):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    try:
        params = inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False
    return "position_ids" in params and "logits_to_keep" in params


def _response_logits(model, seqs: Sequence[Sequence[int]], starts: Sequence[int], pad_id: int):
    """One forward pass; returns ``(logits (B, K, V), input_ids (B, K), response_mask (B, K))`` over the
    columns a response logprob needs. With a model that supports it (see :func:`pad_response_aligned`)
    K is the longest response + 1 and the prompt positions' logits are never computed; otherwise the
    right-padded batch of :func:`pad_batch` and all its logits."""
    device = _model_device(model)
    if _computes_response_logits_only(model):
        b = pad_response_aligned(seqs, pad_id, starts, device=device)
        k = b["keep"]
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                       logits_to_keep=k).logits
        return logits, b["input_ids"][:, -k:], b["response_mask"][:, -k:]
    b = pad_batch(seqs, pad_id, starts, device=device)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return logits, b["input_ids"], b["response_mask"]


def pair_logprobs(model, pad_id, items: Sequence[TokenizedPair], temperature: float = 1.0):
    """Sequence logprobs of the chosen and rejected responses of a batch of pairs.

    One forward pass over the 2B sequences, computing logits for the response columns only where the
    model allows (:func:`_response_logits`).

    Args:
        model: a causal LM (train or eval mode; gradients flow when enabled).
        pad_id: the padding id, or a tokenizer (its ``pad_token_id`` is used).
        items: B :class:`~rlhf_spec.algorithms.batching.TokenizedPair`.
        temperature: logits are divided by ``temperature + 1e-7`` (REBEL's form).

    Returns:
        ``(chosen_logps (B,), rejected_logps (B,))`` float32: sums over response tokens of
        ``log pi(y_t | x, y_<t)`` (nats).
    """
    pad = getattr(pad_id, "pad_token_id", pad_id)
    seqs = [it.chosen_ids for it in items] + [it.rejected_ids for it in items]
    logits, ids, mask = _response_logits(model, seqs, [it.prompt_len for it in items] * 2, pad)
    lp = sequence_logprobs(logits, ids, mask, temperature=temperature)
    return lp[: len(items)], lp[len(items):]


def completion_logprobs(model, pad_id: int, items: Sequence[TokenizedCompletion], temperature: float = 1.0,
                        per_token: bool = False):
    """Logprobs of the completions of (prompt, completion) rows, in one forward pass (response columns
    only where the model allows, see :func:`_response_logits`; ``per_token`` keeps the right-padded
    layout its callers index).

    Args:
        model: a causal LM.
        pad_id: the padding id.
        items: B :class:`~rlhf_spec.algorithms.batching.TokenizedCompletion`.
        temperature: logits are divided by ``temperature + 1e-7``.
        per_token: return per-token logprobs instead of their sums.

    Returns:
        ``(B,)`` float32 sums over completion tokens (nats), or, with ``per_token``, a tuple
        ``(logprobs (B, T), response_mask (B, T) bool, batch)`` aligned with the padded ``input_ids``.
    """
    starts = [it.prompt_len for it in items]
    if per_token:
        batch = pad_batch([it.input_ids for it in items], pad_id, starts, device=_model_device(model))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return token_logprobs(logits, batch["input_ids"], batch["response_mask"],
                              temperature), batch["response_mask"], batch
    logits, ids, mask = _response_logits(model, [it.input_ids for it in items], starts, pad_id)
    return sequence_logprobs(logits, ids, mask, temperature=temperature)


def batched_completion_logprobs(model, pad_id: int, items: Sequence[TokenizedCompletion], temperature: float,
                                batch_size: int) -> list[float]:
    """:func:`completion_logprobs` over many rows, ``batch_size`` at a time, without gradients.

    Returns:
        one float (nats) per row, in input order.
    """
    import torch

    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            out += completion_logprobs(model, pad_id, items[i : i + batch_size], temperature).tolist()
    return out
