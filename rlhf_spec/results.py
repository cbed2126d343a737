"""Deprecated import location (one release): sample and score stages now finish in :mod:`rlhf_spec.stages`."""

from __future__ import annotations

from .records import StageResult


def samples_result(ctx, prompts: int, skipped: int, result, generated_tokens: int) -> StageResult:
    """Save a samples dataset and return the sample metrics (see :func:`rlhf_spec.stages.sample.samples_result`)."""
    ctx.save_dataset(result)
    secs = ctx.output.timings.get("generate", 0.0)
    return StageResult(metrics={"prompts": prompts, "prompts_skipped_too_long": skipped, "samples": len(result),
                                "generated_tokens": generated_tokens,
                                "tokens_per_second": round(generated_tokens / secs, 2) if secs > 0 and generated_tokens else None},
                       rows=len(result))


def scored_result(ctx, out, **extra) -> StageResult:
    """Save a scored dataset and return scored, reward_mean, reward_min and reward_max, plus ``extra``."""
    ctx.save_dataset(out)
    r = list(out["reward"]) if len(out) else [0.0]
    return StageResult(metrics={"scored": len(out), **extra, "reward_mean": float(sum(r) / len(r)),
                                "reward_min": float(min(r)), "reward_max": float(max(r))}, rows=len(out))
