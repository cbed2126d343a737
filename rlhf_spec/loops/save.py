"""What every trainer does when it finishes: write the trained model by the ``policy`` /
``reward_model`` artifact contract, and the figures read around training (held-out metrics before
the first update, seconds per update)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Optional


def save_policy(ctx, trainer, tokenizer, meta: Optional[dict] = None, padding_side: Optional[str] = "left") -> Path:
    """Write a trained model by the ``policy`` (or ``reward_model``) artifact contract (docs/plugins.md):
    ``model/`` (``save_pretrained`` weights with LoRA merged, config, tokenizer with left padding),
    ``history.json`` (one dict of logged values per update) and ``tensorboard/``.

    Every process must call it: under DeepSpeed ZeRO-3 gathering the weights is a collective;
    only the main process writes.

    Args:
        meta: optional JSON written as ``model/rlhf_spec_reward.json`` (reward models' input format).
        padding_side: set on the saved tokenizer (left, for generation); None keeps it.

    Returns:
        the ``model/`` folder.
    """
    state = trainer.full_state_dict()
    out = ctx.model_out_dir
    if trainer.accelerator.is_main_process:
        trainer.unwrapped().save_pretrained(str(out), state_dict=state)
        if padding_side:
            tokenizer.padding_side = padding_side
        tokenizer.save_pretrained(str(out))
        if meta is not None:
            (out / "rlhf_spec_reward.json").write_text(json.dumps(meta))
        (ctx.out_dir / "history.json").write_text(json.dumps(trainer.history))
        tb = ctx.partial_dir / "tensorboard"
        if tb.is_dir():
            shutil.copytree(tb, ctx.out_dir / "tensorboard", dirs_exist_ok=True)
    return out


def seconds_per_update(ctx, metrics: dict) -> Optional[float]:
    """Seconds of training per optimizer update run in this attempt: the ``train`` timer less the
    ``eval`` timer (evaluation inside training), over the updates not resumed from a checkpoint.

    Returns:
        seconds (float), or None when no update ran here (everything resumed).
    """
    ran = metrics.get("updates", 0) - metrics.get("resumed_from_update", 0)
    secs = ctx.output.timings.get("train", 0.0) - ctx.output.timings.get("eval", 0.0)
    return round(secs / ran, 4) if ran > 0 else None


def metrics_before(trainer, evaluate: Callable, at_reference: bool = False) -> dict:
    """``evaluate`` at the starting weights, before any update: each numeric figure ``k`` as
    ``eval_<k>_before`` (``eval_loss_before``, ``eval_preference_accuracy_before``, ...), so a run's
    held-out figures can be read against where the policy started.

    With ``at_reference`` (see :func:`starts_at_reference`) the starting policy's logprobs are the
    reference logprobs already computed, so ``evaluate(None)`` reads them instead of running the
    held-out pass again; the figures are the same up to the batch's padding round-off."""
    if at_reference:
        out = evaluate(None)
    else:
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.eval()
        try:
            out = evaluate(model)
        finally:
            model.train()
    return {f"eval_{k}_before": v for k, v in out.items() if isinstance(v, float)}


def save_value_model(ctx, trainer) -> None:
    """Write the value model of an actor-critic run under ``value_model/`` beside the policy: the critic's
    ``save_pretrained`` folder, or the value head's weights (``value_head.safetensors``, keys
    ``summary.weight`` (1, H) and ``summary.bias`` (1,)) with ``value_head.json``. Only the main process
    writes; ``trainer.model`` is the prepared :class:`~rlhf_spec.algorithms.value_head.ActorCritic`."""
    if not trainer.accelerator.is_main_process:
        return
    ac = trainer.accelerator.unwrap_model(trainer.model)
    out = ctx.out_dir / "value_model"
    if ac.critic is not None:
        ac.critic.save_pretrained(str(out))
    elif ac.value_head is not None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().cpu().contiguous() for k, v in ac.value_head.state_dict().items()}
        save_file(weights, str(out / "value_head.safetensors"))
        (out / "value_head.json").write_text(json.dumps({"hidden_size": ac.value_head.hidden_size,
                                                          "reads": "the policy's last hidden state at position t - 1"}))
