"""Built-in ``filter`` stages on rewards: ``best-of-n`` (rejection sampling, the best-scored completion per
prompt) and ``reward-threshold`` (ReST's Improve step, every completion above a threshold).

For each prompt with samples ``y_1..y_K`` and rewards ``r(x, y_k)`` it keeps ``argmax_k r(x, y_k)`` (ties:
the lowest ``sample_index``), optionally only when that reward clears a threshold or ranks among the
best prompts. Training ``train``/``sft`` on the result is rejection-sampling fine-tuning (Touvron et al.
2023, "Llama 2: Open Foundation and Fine-Tuned Chat Models", section 3.2.3: sample K outputs, keep the
one the reward model scores highest, fine-tune on it).

``reward-threshold`` keeps every sample with ``r(x, y) >= tau``: the Improve step of ReST (Gulcehre et al.
2023, "Reinforced Self-Training (ReST) for Language Modeling", Algorithm 1), whose rounds raise tau
(``repeat.values`` gives each round its threshold).
"""

from __future__ import annotations

import math
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

from ..hookspecs import hookimpl
from ..records import SCORED, StageImpl, StageResult


class BestOfNParams(BaseModel):
    """Params of ``filter``/``best-of-n``. With both set, a prompt's best sample must pass both."""

    model_config = ConfigDict(extra="forbid")

    threshold: Optional[float] = Field(None, description="Keep a prompt's best sample only if its reward is >= this "
                                                         "(reward units).")
    top_fraction: Optional[float] = Field(
        None, gt=0.0, le=1.0, description="Keep only prompts whose best reward is >= the k-th highest best reward, k = "
                                          "ceil(top_fraction x prompts) (ties kept).")


def _mean(xs: list) -> Optional[float]:
    """The mean of ``xs``, None when empty."""
    return sum(xs) / len(xs) if xs else None


def best_per_prompt(prompt_ids: list[str], rewards: list[float], sample_index: list[int]) -> dict[str, int]:
    """Row of the best sample of each prompt: ``argmax_k reward``, ties to the lowest ``sample_index``
    (then the lowest row).

    Returns:
        ``prompt_id -> row index``, prompts in order of first appearance.
    """
    best: dict[str, int] = {}
    for i, pid in enumerate(prompt_ids):
        j = best.get(pid)
        if j is None or (rewards[i], -sample_index[i], -i) > (rewards[j], -sample_index[j], -j):
            best[pid] = i
    return best


def top_cutoff(values: list[float], fraction: float) -> float:
    """The k-th highest of ``values``, ``k = ceil(fraction * len(values))`` (at least 1).

    Raises:
        ValueError: if ``values`` is empty.
    """
    if not values:
        raise ValueError("no values to rank")
    k = max(1, math.ceil(fraction * len(values)))
    return sorted(values, reverse=True)[k - 1]


def run(ctx) -> StageResult:
    """Keep the best-scored sample of each prompt (see the module docstring); the output has the input's
    type and columns. Metrics: ``prompts``, ``kept``, ``dropped_below_threshold``,
    ``dropped_below_top_fraction``, ``mean_best_reward`` (over all prompts' best samples) and
    ``mean_reward`` (over all samples)."""
    p: BestOfNParams = ctx.params
    rows = ctx.input_dataset(0)
    rewards = [float(r) for r in rows["reward"]]
    best = best_per_prompt(list(rows["prompt_id"]), rewards, [int(s) for s in rows["sample_index"]])
    best_rewards = [rewards[i] for i in best.values()]
    cut = top_cutoff(best_rewards, p.top_fraction) if (p.top_fraction is not None and best_rewards) else None
    keep, below_threshold, below_top = [], 0, 0
    for i in best.values():
        if p.threshold is not None and rewards[i] < p.threshold:
            below_threshold += 1
        elif cut is not None and rewards[i] < cut:
            below_top += 1
        else:
            keep.append(i)
    out = rows.select(sorted(keep))
    ctx.save_dataset(out)
    return StageResult(metrics={"prompts": len(best), "kept": len(out), "dropped_below_threshold": below_threshold,
                                "dropped_below_top_fraction": below_top, "mean_best_reward": _mean(best_rewards),
                                "mean_reward": _mean(rewards), "samples": len(rows)},
                       rows=len(out), output_type=ctx.inputs[0].output_type)


class ThresholdParams(BaseModel):
    """Params of ``filter``/``reward-threshold``."""

    model_config = ConfigDict(extra="forbid")

    threshold: float = Field(..., description="Keep every sample whose reward is >= this (reward units): ReST's tau.")
    max_per_prompt: Optional[int] = Field(None, ge=1, description="Keep at most this many of a prompt's samples (the "
                                                                  "highest rewards first).")


def run_threshold(ctx) -> StageResult:
    """Keep every sample with reward >= ``threshold`` (at most ``max_per_prompt`` per prompt, best first);
    the output has the input's type and columns. Metrics: ``samples``, ``kept``, ``prompts_kept``,
    ``kept_fraction``, ``mean_reward`` (all samples) and ``mean_kept_reward``."""
    p: ThresholdParams = ctx.params
    rows = ctx.input_dataset(0)
    rewards = [float(r) for r in rows["reward"]]
    sample_index = [int(x) for x in rows["sample_index"]]
    order = sorted(range(len(rows)), key=lambda i: (-rewards[i], sample_index[i], i))
    taken: dict[str, int] = {}
    keep = []
    pids = list(rows["prompt_id"])
    for i in order:
        if rewards[i] < p.threshold or (p.max_per_prompt is not None and taken.get(pids[i], 0) >= p.max_per_prompt):
            continue
        taken[pids[i]] = taken.get(pids[i], 0) + 1
        keep.append(i)
    out = rows.select(sorted(keep))
    ctx.save_dataset(out)
    return StageResult(metrics={"samples": len(rows), "kept": len(out), "prompts_kept": len(taken),
                                "kept_fraction": len(out) / len(rows) if len(rows) else None,
                                "mean_reward": _mean(rewards),
                                "mean_kept_reward": _mean([rewards[i] for i in keep])},
                       rows=len(out), output_type=ctx.inputs[0].output_type)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="filter", name="best-of-n", params=BestOfNParams, run=run, version="1",
                       inputs=(SCORED,), min_inputs=1, max_inputs=1, output="same",
                       description="rejection sampling: the highest-reward sample per prompt, optional threshold/top "
                                   "fraction"))
    register(StageImpl(kind="filter", name="reward-threshold", params=ThresholdParams, run=run_threshold, version="1",
                       inputs=(SCORED,), min_inputs=1, max_inputs=1, output="same",
                       description="ReST's Improve step: every sample with reward >= threshold"))
