"""Batched sampling of chat completions with transformers ``generate``.

Shared by the built-in ``sample`` and ``evaluate`` stages.
"""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """Sampling settings shared by ``sample`` and ``evaluate``.

    Defaults follow the REBEL tutorial (temperature 0.8, top_p 0.9).
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.8, ge=0.0, le=10.0, description="Softmax temperature; 0 means greedy decoding.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Most tokens generated per completion.")


def chat_prompt_texts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Render chat messages with the tokenizer's chat template and the generation prompt.

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the policy's tokenizer has no chat template; use a chat model or set one")
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]


def prompt_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token counts of rendered prompt texts (no extra special tokens)."""
    enc = tokenizer(texts, add_special_tokens=False)
    return [len(ids) for ids in enc["input_ids"]]


def generate_completions(
    model,
    tokenizer,
    texts: list[str],
    sampling: SamplingParams,
    batch_size: int,
    seed: int,
    sort_by_length: bool = True,
    progress=None,
    lengths: Optional[list[int]] = None,
) -> tuple[list[str], list[int]]:
    """Sample one completion for each rendered prompt text.

    Prompts are left-padded. With ``sort_by_length`` they are batched longest
    first, so each batch pads to a similar length (less wasted compute than
    arrival order). Batch ``b`` is seeded with ``seed + b``, so the result depends
    only on the texts, their order, the batch size and ``seed``.

    Args:
        model: a causal LM (eval mode).
        tokenizer: its tokenizer; ``padding_side`` is set to ``"left"``.
        texts: N rendered prompts.
        sampling: temperature, top_p, max_new_tokens.
        batch_size: prompts per ``generate`` call.
        seed: base seed.
        progress: optional :class:`rlhf_spec.context.Progress`, advanced per prompt.
        lengths: optional precomputed prompt token counts (for sorting).

    Returns:
        (completions, completion_token_counts), both length N, in the order of ``texts``.

    Raises:
        torch.OutOfMemoryError / MemoryError: lower ``batch_size`` or ``max_new_tokens``.
    """
    import torch
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"
    texts = list(texts)
    n = len(texts)
    if lengths is None:
        lengths = prompt_lengths(tokenizer, texts)
    lengths = list(lengths)
    order = sorted(range(n), key=lambda i: -lengths[i]) if sort_by_length else list(range(n))
    eos_ids = tokenizer.eos_token_id
    gen_cfg = GenerationConfig(
        do_sample=sampling.temperature > 0,
        temperature=sampling.temperature if sampling.temperature > 0 else None,
        top_p=sampling.top_p if sampling.temperature > 0 else None,
        top_k=0,  # nucleus sampling only, as REBEL's vLLM sampler (None would mean transformers' default of 50)
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
    )
    device = next(model.parameters()).device
    out_text: list[str] = [""] * n
    out_tok: list[int] = [0] * n
    stop = {tokenizer.pad_token_id, *(eos_ids if isinstance(eos_ids, list) else [eos_ids])}
    for b, start in enumerate(range(0, n, batch_size)):
        idx = order[start : start + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        torch.manual_seed(seed + b)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=gen_cfg)
        gen = out[:, enc["input_ids"].shape[1]:].tolist()
        for row, i in zip(gen, idx):
            k = 0
            while k < len(row) and row[k] not in stop:
                k += 1
            out_tok[i] = min(k + 1, len(row))  # count the end-of-turn token when present
            out_text[i] = tokenizer.decode(row[:k], skip_special_tokens=True).strip()
        if progress is not None:
            progress.advance(len(idx))
    return out_text, out_tok
