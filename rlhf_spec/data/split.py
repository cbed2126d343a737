"""The one rule that splits rows into training and held-out rows by prompt.

Every stage that holds rows out (the ``pair`` stages' ``test_size``, the train stages' ``eval_size``)
calls :func:`split_by_prompt`, so no prompt ever lands on both sides and the held-out set depends on
the prompts' content alone, never on row order.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence, Union

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


def check_test_size(test_size: Union[int, float]) -> Union[int, float]:
    """A pair stage's ``test_size``: a count of prompts (int) or a share of them below 1 (float).

    Raises:
        ValueError: a float share of 1 or more.
    """
    if isinstance(test_size, float) and not test_size < 1.0:
        raise ValueError(f"a share of prompts must be below 1 (got {test_size}); give a whole number for a count")
    return test_size


def assign_split(prompt_ids: Sequence[str], test_size: Union[int, float], seed: int) -> list[str]:
    """``"test"`` for the rows of the first ``n_test`` prompts in the seeded order of :func:`split_by_prompt`,
    ``"train"`` for the rest, with ``n_test = test_size`` (int) or ``round(test_size * n)`` (float) over the
    ``n`` rows (the ``pair`` stages' one row per prompt).

    Raises:
        ValueError: if the split leaves no training row.
    """
    n = len(prompt_ids)
    n_test = int(test_size) if isinstance(test_size, int) else int(round(test_size * n))
    if n_test >= n:
        raise ValueError(f"test_size {test_size} leaves no training pairs ({n} pairs)")
    test_rows = set(split_by_prompt(prompt_ids, n_test, seed=seed)[1])
    return ["test" if i in test_rows else "train" for i in range(n)]
