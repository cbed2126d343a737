"""From rows to token batches: chat prompts and responses to token ids, right-padded batches with a
response mask, and length-bucketed batch plans. Every padded batch in rlhf-spec is built here."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class TokenizedPair:
    """One preference pair as token ids.

    Attributes:
        chosen_ids, rejected_ids: prompt ids followed by the response ids and the end-of-turn token.
        prompt_len: number of prompt tokens at the start of both.
    """

    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_len: int

    def __getitem__(self, name):  # dict-style access, as older plugins used
        return getattr(self, name)


@dataclass
class TokenizedCompletion:
    """One (prompt, completion) row as token ids: ``input_ids`` = prompt ids + completion ids (+ end-of-turn)."""

    input_ids: list[int]
    prompt_len: int


def prompt_ids(tokenizer, messages: list[dict], max_prompt: Optional[int] = None) -> list[int]:
    """Token ids of chat ``messages`` rendered with the chat template and the generation prompt,
    left-truncated to ``max_prompt`` tokens (the last turns survive).

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template; use a chat model or set one")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt:] if max_prompt else ids


def response_ids(tokenizer, text: str, max_response: Optional[int] = None) -> list[int]:
    """Token ids of a response followed by the end-of-turn (EOS) token, right-truncated so the whole
    is at most ``max_response`` tokens."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if max_response:
        ids = ids[: max_response - 1]
    return ids + [tokenizer.eos_token_id]


def tokenize_pairs(tokenizer, rows, max_prompt: int, max_response: int) -> list[TokenizedPair]:
    """Token ids of every (prompt, chosen) and (prompt, rejected) sequence of a ``pairs`` dataset.

    The prompt is the chat template with the generation prompt (left-truncated to ``max_prompt``);
    each response is followed by the end-of-turn token and right-truncated to ``max_response``.

    Args:
        tokenizer: the policy's tokenizer (with a chat template).
        rows: a mapping or dataset with ``prompt`` (messages), ``chosen`` and ``rejected`` (str) columns.

    Returns:
        one :class:`TokenizedPair` per row.
    """
    out = []
    for prompt, chosen, rejected in zip(rows["prompt"], rows["chosen"], rows["rejected"]):
        p = prompt_ids(tokenizer, prompt, max_prompt)
        out.append(TokenizedPair(p + response_ids(tokenizer, chosen, max_response),
                                 p + response_ids(tokenizer, rejected, max_response), len(p)))
    return out


def tokenize_completions(tokenizer, prompts: Sequence[list[dict]], completions: Sequence[str],
                         max_prompt: Optional[int] = None,
                         max_response: Optional[int] = None) -> list[TokenizedCompletion]:
    """Token ids of (prompt, completion) rows, laid out as :func:`tokenize_pairs` lays out one response."""
    out = []
    for prompt, completion in zip(prompts, completions):
        p = prompt_ids(tokenizer, prompt, max_prompt)
        out.append(TokenizedCompletion(p + response_ids(tokenizer, completion, max_response), len(p)))
    return out


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, response_starts: Optional[Sequence[int]] = None,
              token_type_ids: Optional[Sequence[Sequence[int]]] = None, device=None) -> dict:
    """Right-pad token sequences into one batch.

    Args:
        sequences: B lists of token ids (lengths may differ).
        pad_id: the id written into padding (a model's ``pad_token_id``).
        response_starts: optional B ints: position where each sequence's response begins.
        token_type_ids: optional B lists (BERT-style sentence pairs), padded with 0.
        device: optional torch device for the tensors.

    Returns:
        ``{"input_ids": (B, T) long, "attention_mask": (B, T) long}`` with T the longest length, plus
        ``"response_mask": (B, T) bool`` (True from each start to the sequence's end) when
        ``response_starts`` is given, and ``"token_type_ids": (B, T) long`` when given.

    Raises:
        ValueError: if ``sequences`` is empty.
    """
    import torch

    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in sequences)
    batch = {"input_ids": torch.full((len(sequences), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros((len(sequences), width), dtype=torch.long)}
    if response_starts is not None:
        batch["response_mask"] = torch.zeros((len(sequences), width), dtype=torch.bool)
    if token_type_ids is not None:
        batch["token_type_ids"] = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        n = len(seq)
        batch["input_ids"][i, :n] = torch.tensor(list(seq), dtype=torch.long)
        batch["attention_mask"][i, :n] = 1
        if response_starts is not None:
            batch["response_mask"][i, response_starts[i]:n] = True
        if token_type_ids is not None:
            batch["token_type_ids"][i, :n] = torch.tensor(list(token_type_ids[i]), dtype=torch.long)
    return {k: v.to(device) for k, v in batch.items()} if device is not None else batch


def pad_response_aligned(sequences: Sequence[Sequence[int]], pad_id: int, response_starts: Sequence[int],
                         device=None) -> dict:
    """Pad (prompt + response) sequences so that every response starts in the same column: prompts
    left-padded to the longest prompt, responses right-padded to the longest response.

    With this layout the logits a logprob needs (the last prompt position and every response
    position) are the last ``keep`` columns for every row, so a causal LM can compute only those
    (transformers' ``logits_to_keep``): the (B, T, V) logits of the prompt positions are never
    built. ``position_ids`` count from each row's first real token, so every token sees the
    positions it has in the right-padded layout of :func:`pad_batch`.

    Args:
        sequences: B lists of token ids, prompt then response.
        pad_id: the id written into padding.
        response_starts: B ints >= 1: where each sequence's response begins.
        device: optional torch device for the tensors.

    Returns:
        ``{"input_ids", "attention_mask", "position_ids": (B, T) long, "response_mask": (B, T) bool,
        "keep": int}`` with ``T = max start + max response length`` and ``keep = max response
        length + 1``.

    Raises:
        ValueError: if ``sequences`` is empty or a start is outside ``[1, len(sequence)]``.
    """
    import torch

    if not sequences:
        raise ValueError("pad_response_aligned needs at least one sequence")
    for i, (seq, start) in enumerate(zip(sequences, response_starts)):
        if not 1 <= start <= len(seq):
            raise ValueError(f"sequence {i}: response start {start} is outside [1, {len(seq)}]")
    prompt_width = max(response_starts)
    response_width = max(len(s) - st for s, st in zip(sequences, response_starts))
    shape = (len(sequences), prompt_width + response_width)
    batch = {"input_ids": torch.full(shape, pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(shape, dtype=torch.long),
             "position_ids": torch.zeros(shape, dtype=torch.long),
             "response_mask": torch.zeros(shape, dtype=torch.bool)}
    for i, (seq, start) in enumerate(zip(sequences, response_starts)):
        lo, hi = prompt_width - start, prompt_width - start + len(seq)
        batch["input_ids"][i, lo:hi] = torch.tensor(list(seq), dtype=torch.long)
        batch["attention_mask"][i, lo:hi] = 1
        batch["position_ids"][i, lo:] = torch.arange(shape[1] - lo)
        batch["response_mask"][i, prompt_width:hi] = True
    out = {k: v.to(device) for k, v in batch.items()} if device is not None else batch
    out["keep"] = response_width + 1
    return out


def length_batches(lengths: list[int], batch_size: int, max_batch_tokens: Optional[int] = None) -> list[list[int]]:
    """Batches of indices, longest first, each with at most ``batch_size`` rows and, when
    ``max_batch_tokens`` is set, at most that many padded tokens (rows x longest row).

    A sequence longer than ``max_batch_tokens`` gets a batch of its own. Ties keep input order.

    Returns:
        lists of indices into ``lengths``; every index appears exactly once.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (
            len(cur) >= batch_size or (max_batch_tokens and lengths[cur[0]] * (len(cur) + 1) > max_batch_tokens)
        ):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches
