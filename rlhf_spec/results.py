"""Finishing a sample or score stage the same way in every implementation (built-in or plugin):
save the output dataset and report the standard metrics."""

from __future__ import annotations

from .hookspecs import StageResult


def samples_result(ctx, prompts: int, skipped: int, result, generated_tokens: int) -> StageResult:
    """Save ``result`` (a samples ``datasets.Dataset``) and return the sample metrics.

    Args:
        ctx: the stage's :class:`~rlhf_spec.context.StageContext` (its ``generate`` timer gives tokens/s).
        prompts: prompts sampled. skipped: prompts left out as too long.
        generated_tokens: completion tokens generated in this attempt (count).

    Returns:
        metrics prompts, prompts_skipped_too_long, samples, generated_tokens, tokens_per_second (tokens/s or None).
    """
    ctx.save_dataset(result)
    secs = ctx.timings.get("generate", 0.0)
    return StageResult(
        metrics={"prompts": prompts, "prompts_skipped_too_long": skipped, "samples": len(result),
                 "generated_tokens": generated_tokens,
                 "tokens_per_second": round(generated_tokens / secs, 2) if secs > 0 and generated_tokens else None},
        rows=len(result),
    )


def scored_result(ctx, out, **extra) -> StageResult:
    """Save ``out`` (a scored ``datasets.Dataset`` with a float ``reward`` column) and return
    scored, reward_mean, reward_min and reward_max (reward units of the model), plus ``extra``."""
    ctx.save_dataset(out)
    r = list(out["reward"]) if len(out) else [0.0]
    return StageResult(metrics={"scored": len(out), **extra, "reward_mean": float(sum(r) / len(r)),
                                "reward_min": float(min(r)), "reward_max": float(max(r))}, rows=len(out))
