"""The one rule that splits rows into training and held-out rows by prompt.

Every stage that holds rows out (the ``pair`` stages' ``test_size``, the train stages' ``eval_size``)
calls :func:`split_by_prompt`, so no prompt ever lands on both sides and the held-out set depends on
the prompts' content alone, never on row order.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

from .messages import hash_unit


def prompt_rank(pid: str, seed: Optional[int] = None) -> tuple:
    """Sort key of a prompt id in the split: ``(hash_unit(pid), pid)`` without a seed (the train stages'
    ``eval_size``), else the hex sha256 of ``"<seed>:<pid>"`` (the ``pair`` stages' ``split_seed``)."""
    if seed is None:
        return (hash_unit(pid), pid)
    return (hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest(), pid)


def split_by_prompt(prompt_ids: Sequence[str], n: int, seed: Optional[int] = None) -> tuple[list[int], list[int]]:
    """Split row indices into (kept, held out) by whole prompts.

    Prompts are taken in :func:`prompt_rank` order and each is held out with all of its rows until at
    least ``n`` rows are held out. With one row per prompt that is exactly ``n`` prompts (what the
    ``pair`` stages' ``test_size`` counts); with several rows per prompt the last prompt taken may
    carry the count past ``n``, never splitting its rows.

    Args:
        prompt_ids: one prompt id per row.
        n: rows to hold out at least; ``n <= 0`` holds out nothing.
        seed: ``None`` for the unseeded order (by :func:`~rlhf_spec.data.messages.hash_unit`), or the
            seed of a seeded order.

    Returns:
        two sorted lists of row indices that together cover every row once.
    """
    if n <= 0:
        return list(range(len(prompt_ids))), []
    rows_of: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        rows_of.setdefault(pid, []).append(i)
    held: list[int] = []
    for pid in sorted(rows_of, key=lambda q: prompt_rank(q, seed)):
        if len(held) >= n:
            break
        held += rows_of[pid]
    out = set(held)
    return [i for i in range(len(prompt_ids)) if i not in out], sorted(held)
