"""Logprobs of responses under a causal LM, from tokenized pairs or (prompt, completion) rows."""

from __future__ import annotations

from typing import Sequence

from .batching import TokenizedCompletion, TokenizedPair, pad_batch
from .ops import sequence_logprobs, token_logprobs


def _model_device(model):
    return next(model.parameters()).device


def pair_logprobs(model, pad_id, items: Sequence[TokenizedPair], temperature: float = 1.0):
    """Sequence logprobs of the chosen and rejected responses of a batch of pairs.

    One forward pass over the 2B right-padded sequences.

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
    batch = pad_batch(seqs, pad, [it.prompt_len for it in items] * 2, device=_model_device(model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = sequence_logprobs(logits, batch["input_ids"], batch["response_mask"], temperature=temperature)
    return lp[: len(items)], lp[len(items):]


def completion_logprobs(model, pad_id: int, items: Sequence[TokenizedCompletion], temperature: float = 1.0,
                        per_token: bool = False):
    """Logprobs of the completions of (prompt, completion) rows, in one forward pass.

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
    batch = pad_batch([it.input_ids for it in items], pad_id, [it.prompt_len for it in items], device=_model_device(model))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if per_token:
        return token_logprobs(logits, batch["input_ids"], batch["response_mask"], temperature), batch["response_mask"], batch
    return sequence_logprobs(logits, batch["input_ids"], batch["response_mask"], temperature=temperature)


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
