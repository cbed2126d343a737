"""What an online RL run starts from: the inputs the stage hands the loop (:class:`OnlineInputs`), the
seeded order the prompts are read in (:func:`prompt_order`), and the models (:func:`load_online_models`:
the policy, with its value head or a separate critic for PPO, as one trainable
:class:`~rlhf_spec.algorithms.value_head.ActorCritic`, and the frozen reference policy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..runtime import derive_seed
from .core import disable_dropout, prepare_model

__all__ = ["OnlineInputs", "prompt_order", "load_online_models"]

# Salts of the seeds an online run derives from the spec seed (derive_seed(spec_seed, SALT, ...)).
PROMPT_ORDER, MINIBATCH_ORDER, VALUE_HEAD, PTX_ORDER, EVAL, SET_SEED = 101, 102, 103, 104, 105, 106


@dataclass
class OnlineInputs:
    """What the stage hands the online loop, built above the loops layer: data, reward and generation engine.

    Attributes:
        tokenizer: the policy's tokenizer (left padding).
        prompts: training prompt rows (``prompt``, ``token_ids`` with the chat template, other columns
            that reach the reward); skipped: prompts dropped as longer than ``max_prompt_tokens``.
        reward: ``reward.score(RewardBatch) -> RewardOutput``.
        make_engine: ``make_engine(live policy) -> generation engine`` over the policy being trained.
        eval_prompts: held-out prompt rows or None; eval_sampling: their sampling settings.
        ptx_items: PPO-ptx :class:`~rlhf_spec.algorithms.batching.TokenizedCompletion` rows, or None.
    """

    tokenizer: Any
    prompts: Any
    skipped: int
    reward: Any
    make_engine: Callable
    eval_prompts: Any = None
    eval_sampling: Any = None
    ptx_items: Optional[list] = None


def prompt_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices ``start .. start + count - 1`` of the endless prompt stream: pass ``e`` over the ``n``
    prompts is the permutation seeded ``derive_seed(seed, 101, e)``."""
    import torch

    out: list[int] = []
    pos = start
    perms: dict[int, list[int]] = {}
    while len(out) < count:
        epoch, off = divmod(pos, n)
        if epoch not in perms:
            g = torch.Generator().manual_seed(derive_seed(seed, PROMPT_ORDER, epoch))
            perms[epoch] = torch.randperm(n, generator=g).tolist()
        take = min(count - len(out), n - off)
        out += perms[epoch][off : off + take]
        pos += take
    return out


def _same_vocab(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


def _critic(ctx, p, tok):
    src = ctx.model("critic")
    if not _same_vocab(src.load_tokenizer(), tok):
        raise ValueError("the critic must use the policy's tokenizer: its values are read per policy token; leave "
                         "params.critic unset for a value head on the policy, or use a critic built on the policy's "
                         "backbone")
    critic = src.load_sequence_classifier(num_labels=1)
    if critic.config.pad_token_id is None:
        critic.config.pad_token_id = tok.pad_token_id
    if p.disable_dropout:
        disable_dropout(critic)
    if p.gradient_checkpointing and hasattr(critic, "gradient_checkpointing_enable"):
        critic.gradient_checkpointing_enable()
    return critic


def load_online_models(ctx, tok, needs_values: bool, device, value_head_seed: int):
    """Load the models of ``ctx``'s online stage, in an order that fixes what the seeded RNG initialises.

    The policy (``params.policy``), the reference policy on ``device`` (``params.reference``, default the
    starting policy; gradients off), for ``needs_values`` the critic (``params.critic``: a sequence
    classifier, its head applied per token) or else a fresh :class:`~rlhf_spec.algorithms.value_head.ValueHead`
    seeded ``value_head_seed``; the policy prepared by
    :func:`~rlhf_spec.loops.core.prepare_model` (dropout, gradient checkpointing, LoRA).

    Returns:
        (the actor-critic in train mode, on CPU; the reference policy).

    Raises:
        ValueError: the reference policy or the critic does not use the policy's tokenizer ``tok``.
    """
    from ..algorithms.value_head import ActorCritic, ValueHead

    p = ctx.params
    with ctx.timer("load_models"):
        ctx.progress.note("loading policy and reference")
        src = ctx.model("policy")
        policy = src.load_causal_lm()
        ref_src = ctx.model("reference") if p.reference else src
        if p.reference and not _same_vocab(ref_src.load_tokenizer(), tok):
            raise ValueError("the reference policy must use the policy's tokenizer "
                             "(its logprobs are read on the policy's tokens)")
        reference = ref_src.load_causal_lm(device=device)
        reference.requires_grad_(False)
        critic = _critic(ctx, p, tok) if needs_values and getattr(p, "critic", None) else None
    policy = prepare_model(policy, p, "CAUSAL_LM")
    head = None
    if needs_values and critic is None:
        head = ValueHead(policy.config.hidden_size, seed=value_head_seed)
    model = ActorCritic(policy, head, critic)
    model.train()
    return model, reference
