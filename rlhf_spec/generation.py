"""Deprecated import location (one release): see :mod:`rlhf_spec.backends`."""

from .backends import SamplingParams, chat_prompt_texts  # noqa: F401


def prompt_lengths(tokenizer, texts: list[str]) -> list[int]:
    """Token counts of rendered prompt texts (no extra special tokens)."""
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
