"""Conversations as SFT training sequences: the chat template rendered once, a loss mask on the
assistant tokens, packing, padding, and the masked cross-entropy (pure torch and tokenizers).

The loss is the mean cross-entropy over the masked tokens::

    L = - (1 / |A|) * sum_{t in A} log pi(x_t | x_<t)          A = masked (assistant) positions t >= 1

the usual SFT objective restricted to the responses (Ouyang et al. 2022, "Training language models to
follow instructions with human feedback", section 3.5). The ``train``/``sft`` stage that runs it is
:mod:`rlhf_spec.stages.train.sft`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class SFTExample:
    """One training sequence: ``input_ids`` (token ids) and ``loss_mask`` (one bool per token, True on
    the assistant tokens the loss covers)."""

    input_ids: list[int]
    loss_mask: list[bool]


# ----------------------------------------------------------------------------- the assistant mask


def render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template applied to ``messages`` as text (no tokenization).

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use a chat model or set params.chat_template")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def assistant_spans(tokenizer, messages: list[dict], turns: str = "all") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each trained assistant turn.

    For assistant turn ``i``: ``before = render(messages[:i], add_generation_prompt=True)`` (everything up
    to and including the assistant header) and ``after = render(messages[:i+1])``; the turn is the text
    ``[len(before), len(after))`` of the whole rendering: its content and the end-of-turn text the
    template writes after it (a trailing newline too, for ChatML-style templates).

    This rests on the *template-prefix assumption*: rendering a prefix of the conversation gives a
    prefix of the whole rendering, and the generation prompt is what the template writes before an
    assistant turn. It is checked for every turn; templates that rewrite earlier turns (for example
    ones that drop the reasoning of earlier assistant turns) fail it.

    Args:
        messages: ``{role, content}`` dicts; ``turns``: ``"all"`` assistant turns or the ``"last"`` one.

    Returns:
        ``(text, spans)``: the rendered conversation and ``(start, end)`` character offsets.

    Raises:
        ValueError: no chat template, no assistant turn, or the template breaks the assumption.
    """
    text = render(tokenizer, messages, False)
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not idx:
        raise ValueError("the conversation has no assistant turn to train on")
    spans = []
    for i in idx[-1:] if turns == "last" else idx:
        before = render(tokenizer, messages[:i], True)
        after = render(tokenizer, messages[: i + 1], False)
        if not (after.startswith(before) and text.startswith(after)):
            raise ValueError(f"the chat template does not render the conversation before assistant turn {i} as a "
                             f"prefix of the "
                             "whole conversation, so the assistant tokens cannot be found by rendering prefixes; use a "
                             "template "
                             "that renders turns independently (params.chat_template)")
        spans.append((len(before), len(after)))
    return text, spans


def _mask_by_offsets(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and a mask of the tokens that start inside a span (fast tokenizers)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= start < e for s, e in spans) for start, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


def mask_by_token_prefix(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and the mask of the spans' tokens, found by tokenizing the text up to each
    span boundary: the tokens of ``text[:b]`` must be a prefix of the tokens of ``text`` (slow tokenizers,
    which give no character offsets).

    Raises:
        ValueError: if tokenizing up to a boundary is not a prefix of the whole tokenization.
    """
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    mask = [False] * len(ids)
    for s, e in spans:
        bounds = []
        for b in (s, e):
            head = list(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
            if ids[: len(head)] != head:
                raise ValueError(f"tokenizing the conversation up to character {b} is not a prefix of its whole "
                                 f"tokenization")
            bounds.append(len(head))
        mask[bounds[0] : bounds[1]] = [True] * (bounds[1] - bounds[0])
    return ids, mask


def tokenize_conversation(tokenizer, messages: list[dict], max_length: Optional[int] = None,
                          turns: str = "all") -> SFTExample:
    """One conversation as an :class:`SFTExample`: the chat template rendered once and tokenized without
    added special tokens, the mask True on the tokens of the trained assistant turns (see
    :func:`assistant_spans`), both right-truncated to ``max_length`` tokens.

    Raises:
        ValueError: as :func:`assistant_spans` and :func:`mask_by_token_prefix`.
    """
    text, spans = assistant_spans(tokenizer, messages, turns)
    if getattr(tokenizer, "is_fast", False):
        ids, mask = _mask_by_offsets(tokenizer, text, spans)
    else:
        ids, mask = mask_by_token_prefix(tokenizer, text, spans)
    if max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return SFTExample(ids, mask)


def pack_examples(examples: list[SFTExample], block: int) -> list[SFTExample]:
    """Concatenate the examples (in order) and cut the stream into blocks of exactly ``block`` tokens; an
    example longer than the room left in a block continues in the next one.

    The remainder shorter than a block is dropped, and so is a block with no masked token after its
    first position. This simple packing lets attention cross example boundaries inside a block (no
    block-diagonal mask, positions run on across examples): a later example can attend to the end of
    the one before it. Cheap and common (TRL's ``packing``, "wrapped" strategy), not exact.

    Returns:
        blocks of exactly ``block`` tokens.

    Raises:
        ValueError: if the examples hold fewer than ``block`` tokens in all.
    """
    ids = [t for ex in examples for t in ex.input_ids]
    mask = [m for ex in examples for m in ex.loss_mask]
    if len(ids) < block:
        raise ValueError(f"packing: the data holds {len(ids)} tokens, fewer than one block of max_length={block}")
    out = []
    for start in range(0, len(ids) - block + 1, block):
        if any(mask[start + 1 : start + block]):
            out.append(SFTExample(ids[start : start + block], mask[start : start + block]))
    return out


# ----------------------------------------------------------------------------- the loss


def collate(examples: list[SFTExample], pad_id: int, device=None) -> dict:
    """Right-padded batch: ``input_ids``, ``attention_mask`` (B, T) long and ``loss_mask`` (B, T) bool.

    Raises:
        ValueError: if ``examples`` is empty.
    """
    import torch

    from .batching import pad_batch

    batch = pad_batch([ex.input_ids for ex in examples], pad_id)
    mask = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    for i, ex in enumerate(examples):
        mask[i, : len(ex.loss_mask)] = torch.tensor(ex.loss_mask, dtype=torch.bool)
    batch["loss_mask"] = mask
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def assistant_nll(model, batch: dict):
    """Summed negative log-likelihood of the masked tokens and their count.

    ``nll = - sum_{b, t >= 1, loss_mask[b, t]} log softmax(logits[b, t - 1])[input_ids[b, t]]`` (nats),
    computed with float32 cross-entropy; position 0 has no prediction and never counts.

    Args:
        model: a causal LM. batch: from :func:`collate` (on the model's device).

    Returns:
        ``(nll, n)``: 0-dim float32 tensor (nats, differentiable) and the number of tokens (int).
    """
    import torch.nn.functional as F

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["input_ids"][:, 1:].masked_fill(~batch["loss_mask"][:, 1:], -100)
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return nll, int(batch["loss_mask"][:, 1:].sum())


def heldout_loss(model, examples: list[SFTExample], pad_id: int, batch_size: int) -> dict:
    """Mean NLL per assistant token over ``examples`` (token-weighted, no gradients).

    Returns:
        ``{"loss": nats per token, "tokens": count, "sequences": count}``.
    """
    import torch

    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            nll, n = assistant_nll(model, collate(examples[i : i + batch_size], pad_id, device))
            total, count = total + float(nll), count + n
    return {"loss": total / max(1, count), "tokens": count, "sequences": len(examples)}
