"""Built-in ``score`` stage: any reward rates every completion, shard by shard.

The output keeps the samples' columns and adds ``reward`` (float) and, for a reward with components
(a combination, ArmoRM's objectives), one ``reward/<component>`` column per component.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field

from ..hookspecs import hookimpl
from ..records import (
    SAMPLES,
    SCORED,
    RewardBatch,
    RewardSpec,
    StageImpl,
    StageResult,
    component_resources,
    pairwise_reward_problems,
)


class ScoreParams(BaseModel):
    """Params of ``score``/``reward``."""

    model_config = ConfigDict(extra="forbid")

    reward: RewardSpec = Field(..., description="The reward: {\"uses\": name, \"params\": {...}} (see 'rlhf-spec "
                                                "plugins').")
    num_shards: int = Field(8, ge=1, le=100000, description="Content-defined shards committed one by one, so a killed "
                                                            "run resumes.")


def _stats(name: str, values: list[float]) -> dict:
    n = max(1, len(values))
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / n)
    return {f"{name}_mean": mean, f"{name}_std": std, f"{name}_min": min(values, default=0.0),
            f"{name}_max": max(values, default=0.0)}


def run(ctx) -> StageResult:
    """Add ``reward`` (and ``reward/<component>``) columns to the input samples.

    Metrics: ``scored``; mean, std, min and max of the reward and of every component; the reward's
    event counts (``unparseable``, ``correct``, ...) summed over shards. The same figures, and a
    histogram of every reward column, go to TensorBoard under ``tensorboard/`` in the output.
    """
    rows = ctx.input_dataset(0)
    with ctx.timer("load_reward"):
        ctx.progress.note("loading reward")
        reward = ctx.reward("reward")
    ctx.progress.note("scoring")

    def process(shard_rows, shard: int):
        out = reward.score(RewardBatch.from_rows(shard_rows, list(shard_rows["completion"])))
        shard_rows = shard_rows.add_column("reward", [float(x) for x in out.scores])
        for name, values in out.components.items():
            shard_rows = shard_rows.add_column(f"reward/{name}", [float(x) for x in values])
        ctx.progress.advance(len(shard_rows))
        return shard_rows, dict(out.counts)

    with ctx.timer("score"):
        out = ctx.run_shards(rows, process, ctx.params.num_shards)
    ctx.save_dataset(out)
    names = ["reward"] + [c for c in out.column_names if c.startswith("reward/")]
    columns = {c: list(out[c]) if len(out) else [] for c in names}
    metrics = {"scored": len(out)}
    for name, values in columns.items():
        metrics.update(_stats(name, values))
    write_tensorboard(ctx.out_dir / "tensorboard", columns, metrics)
    return StageResult(metrics=metrics, rows=len(out))


def write_tensorboard(folder, columns: dict[str, list[float]], metrics: dict) -> None:
    """TensorBoard events for a score stage: one histogram per reward column (``reward``,
    ``reward/<component>``; N floats each, the reward's own units; none for N = 0) and the numeric
    scalars of ``metrics`` (mean, std, min, max of each), all at step 0, under ``folder``.

    Raises:
        OSError: if ``folder`` cannot be written.
    """
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        for name, values in columns.items():
            if values:  # an empty histogram has no bins
                writer.add_histogram(name, np.asarray(values, dtype=np.float64), global_step=0)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(key, float(value), global_step=0)
    finally:
        writer.close()


def _check(params: ScoreParams, spec, inputs) -> list:
    """A problem at ``/reward`` when the reward is pairwise (:func:`~rlhf_spec.records.pairwise_reward_problems`)."""
    return pairwise_reward_problems(params.reward)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="score", name="reward", params=ScoreParams, run=run, version="2", check=_check,
                       inputs=(SAMPLES,), min_inputs=1, max_inputs=1, output=SCORED,
                       description="rate every completion with a reward (and keep its components as columns)",
                       resources=lambda p: {"processes": 1, "gpus": "0-1", "reward": p.reward.uses,
                                            **component_resources(p.reward)}))

