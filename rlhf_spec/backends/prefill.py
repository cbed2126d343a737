"""A batch's prompts run through the model once each, in length buckets, before ``generate`` decodes.

A plain batched ``generate`` runs every row's prompt through the model, padded to the batch's longest
prompt. When a stage asks for n completions per prompt, the same prompt is computed n times; when
prompt lengths vary, most of a long batch's prefill work is padding. On a CPU, where prefill runs at
the matmul rate and a 48-token answer costs less than a 110-token prompt, both dominate the time.

:func:`prefill_cache` computes each distinct prompt once. Prompts are sorted longest first and cut into
buckets of at most ``bucket_tokens`` padded tokens (:func:`~rlhf_spec.algorithms.batching.length_batches`),
so a bucket pads to similar lengths. Each bucket's
keys and values are copied into the rows of the batch's KV cache that hold that prompt, aligned to the
right as the batch's left padding puts them: the prefix sharing that vLLM's paged KV cache does across
a request's samples (Kwon et al. 2023, "Efficient Memory Management for Large Language Model Serving
with PagedAttention", section 4.4), here by copying. The prompt's last token is left out: ``generate`` sees a
cache one token shorter than the batch and computes that token for every row itself, which gives it
the first logits and keeps its own bookkeeping (cache position, attention mask, position ids).

Positions follow ``generate``: a token's position is its index among the row's real tokens
(``attention_mask.cumsum(-1) - 1``), so a prompt's rotary-embedded keys are the same whatever padding
its bucket or its batch gives it. The attention mask hides the cache's padding, which stays zero.
"""

from __future__ import annotations

import inspect

import torch

from ..algorithms.batching import length_batches


def cache_kwarg(model) -> str:
    """The keyword ``forward`` and ``generate`` take a KV cache by: ``cache`` (newer transformers), else
    ``past_key_values``. A peft model is asked through the model it wraps (its own ``forward`` takes ``**kwargs``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def left_padded(seqs: list[list[int]], width: int, pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both (len(seqs), width) int64, each row right-aligned after ``pad``."""
    ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


@torch.no_grad()
def prefill_cache(model, seqs: list[list[int]], pad: int, cache, bucket_tokens: int):
    """Fill ``cache`` with the keys and values of every row's prompt but its last token.

    Args:
        model: a decoder-only transformers model (``config``, ``forward`` with ``position_ids`` and a
            KV cache keyword, :func:`cache_kwarg`), in eval mode.
        seqs: the batch's B prompts as token-id lists, in row order (repeats are computed once).
        pad: the pad token id (its value does not matter: padded positions are masked).
        cache: an empty transformers ``Cache`` (``StaticCache`` sized for the batch's longest prompt
            plus the new tokens, or ``DynamicCache``); each layer receives (B, kv_heads, W - 1, head_dim)
            where W is the longest prompt.
        bucket_tokens: most padded prompt tokens per prefill forward pass.

    Returns:
        ``cache``, holding W - 1 positions per layer, or ``None`` when every prompt is one token long
        (``generate`` then runs the whole prompt itself).

    Raises:
        ValueError: if a prompt is empty.
    """
    from transformers import DynamicCache

    if any(len(s) == 0 for s in seqs):
        raise ValueError("a prompt has no tokens")
    width = max(len(s) for s in seqs) - 1
    if width == 0:
        return None
    device, kwarg = next(model.parameters()).device, cache_kwarg(model)
    rows_of: dict[tuple, list[int]] = {}
    for row, s in enumerate(seqs):
        rows_of.setdefault(tuple(s[:-1]), []).append(row)
    prompts = [p for p in rows_of if p]
    parts = []  # (bucket width, rows in the batch, the bucket row each copies, the bucket's cache)
    for bucket in length_batches([len(p) for p in prompts], len(prompts), bucket_tokens):
        members = [prompts[i] for i in bucket]
        w = len(members[0])
        ids, mask = left_padded(members, w, pad, device)
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        bucket_cache = DynamicCache(config=model.config)  # filled in place by the forward pass
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1,
              **{kwarg: bucket_cache})
        dst = [r for p in members for r in rows_of[p]]
        src = [j for j, p in enumerate(members) for _ in rows_of[p]]
        parts.append((w, torch.tensor(dst, device=device), torch.tensor(src, device=device), bucket_cache))
    for layer in range(len(parts[0][3].layers)):
        keys, values = (_assemble([(w, d, s, getattr(c.layers[layer], name)) for w, d, s, c in parts], len(seqs), width)
                        for name in ("keys", "values"))
        cache.update(keys, values, layer)
    return cache


def _assemble(parts: list, batch: int, width: int) -> torch.Tensor:
    """One layer's (batch, kv_heads, width, head_dim) keys or values from the buckets' (b, kv_heads, w, head_dim)."""
    first = parts[0][3]
    full = first.new_zeros((batch, first.shape[1], width, first.shape[3]))
    for w, dst, src, states in parts:
        full[dst, :, width - w :] = states[src]
    return full
