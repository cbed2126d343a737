"""Online RL ``train`` stages: ``ppo``, ``grpo``, ``rloo`` and ``reinforce++``.

Each generates from the live policy, scores with a reward spec, and updates the policy, step after
step (the loop: :mod:`rlhf_spec.loops.online_loop`). They read no upstream data: prompts come from a
spec dataset (``prompts``), the reward is a ``{"uses", "params"}`` object, and the output is a
``policy``. This module declares their params and checks, builds what the loop is handed (prompts,
reward, generation engine: :func:`online_inputs`), and registers them.

Memory notes: ``optimizer: "adamw_8bit"`` keeps AdamW's moments in 8 bits (bitsandbytes). AdamW with
its states offloaded to CPU memory is DeepSpeed's ``offload_optimizer`` setting: write it in the
DeepSpeed config that ``accelerate_config`` names (ZeRO stage 2 or 3), with ``num_processes`` above 1
so the runner starts the stage under ``accelerate launch``; no param of these stages is needed.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal, Optional

from pydantic import Field

from ...backends import SamplingParams
from ...errors import Problem
from ...hookspecs import hookimpl
from ...loops.trainer import OptimParams
from ...records import (
    POLICY,
    REWARD_MODEL,
    BackendSpec,
    DatasetRef,
    ModelRef,
    NotInKey,
    RewardSpec,
    StageImpl,
    pairwise_reward_problems,
)

Aggregation = Literal["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]


class OnlineParams(OptimParams, SamplingParams):
    """Params every online algorithm shares: models, data, reward, backend, sampling, the rollout
    schedule, evaluation and the shared optimizer settings (:class:`~rlhf_spec.OptimParams`).

    One rollout step generates ``rollout_prompts * group_size`` rollouts and makes
    ``ppo_epochs * rollouts / minibatch_size`` optimizer updates.
    """

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="Policy to start from: a /models "
                                                                                   "name or a train stage id.")
    reference: Optional[Annotated[str, ModelRef(artifacts=(POLICY,))]] = Field(
        None, description="Frozen reference policy for the KL terms (never trained); default: the starting policy. It "
                          "must use the policy's tokenizer.")
    prompts: Annotated[str, DatasetRef(columns=("prompt",))] = Field(
        ..., description="Training prompts (a /datasets name); other row columns (reference, ...) reach the reward.")
    reward: RewardSpec = Field(..., description="The reward: {\"uses\": name, \"params\": {...}}. It reads completion "
                                                "texts, so it may use another tokenizer and device.")
    backend: BackendSpec = Field(default_factory=lambda: BackendSpec(uses="transformers"),
                                 description="Generation backend; it must generate from the live policy weights "
                                             "('transformers').")
    total_steps: int = Field(100, ge=1, le=10_000_000, description="Rollout steps (generate, score, optimise).")
    rollout_prompts: int = Field(
        8,
        ge=1,
        le=1_000_000,
        description="Prompts per rollout step, taken in a seeded order "
        "that is reshuffled on every pass over the prompts.",
    )
    group_size: int = Field(1, ge=1, le=1024, description="Completions per prompt (GRPO's G, RLOO's k).")
    ppo_epochs: int = Field(1, ge=1, le=1000, description="Passes over a step's rollouts (TRL's num_ppo_epochs / "
                                                          "GRPO's num_iterations).")
    minibatch_size: Optional[int] = Field(
        None, ge=1, description="Rollouts per optimizer update; it must equal per_device_train_batch_size * "
                                "gradient_accumulation_steps * num_processes "
        "(the default) and divide rollout_prompts * group_size.")
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="Skip prompts longer than this (chat template "
                                                                     "included).")
    optimizer: Literal["adamw", "adamw_8bit"] = Field("adamw", description="'adamw' (torch) or 'adamw_8bit' "
                                                                           "(bitsandbytes, 8-bit moments). For AdamW "
                                                                           "with offloaded states see the module docs "
                                                                           "(DeepSpeed offload via accelerate_config).")
    max_kl: Optional[float] = Field(None, gt=0, description="Stop the stage when the mean per-sequence KL to the "
                                                            "reference (k1, nats) of a step's rollouts exceeds this.")
    eval_prompts: Optional[Annotated[str, DatasetRef(columns=("prompt",))]] = Field(
        None, description="Held-out prompts: the mean reward on them (eval_reward_mean) before training, every "
                          "eval_every steps and at the end.")
    eval_every: Annotated[Optional[int], NotInKey()] = Field(None, ge=1, description="Evaluate every N rollout steps "
                                                                                     "(also before the first and after "
                                                                                     "the last). Not part of the key.")
    eval_limit: Optional[int] = Field(None, ge=1, description="Evaluate on at most this many held-out prompts.")
    eval_temperature: float = Field(0.0, ge=0.0, le=10.0, description="Sampling temperature of the evaluation; 0 is "
                                                                      "greedy. Sampled evaluations use one fixed seed.")
    logprob_batch_size: Annotated[int, NotInKey()] = Field(8, ge=1, description="Rollouts per forward pass when "
                                                                                "computing old and reference logprobs. "
                                                                                "Not part of the key.")
    save_value_model: bool = Field(False, description="Also write the value head or critic (PPO) under value_model/ "
                                                      "beside the policy.")
    # shared settings with defaults for online training
    temperature: float = Field(1.0, ge=0.0, le=10.0, description="Sampling temperature of the rollouts (> 0); logprobs "
                                                                 "are computed at the same temperature.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; below 1 the rollouts are not samples "
                                                          "of the policy whose logprobs are trained on.")
    max_new_tokens: int = Field(128, ge=1, le=32768, description="Most tokens per completion (and the constant of "
                                                                 "seq-mean-token-sum-norm).")
    learning_rate: float = Field(1e-6, gt=0, le=1.0, description="Peak learning rate.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "constant", description="LR schedule over all updates."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Share of updates spent warming up.")
    per_device_train_batch_size: int = Field(4, ge=1, le=4096, description="Rollouts per micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer update.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm (None: no clipping).")
    save_every: Annotated[int, NotInKey()] = Field(10, ge=1, description="Checkpoint every N rollout steps for resume. "
                                                                         "Not part of the key.")


class PPOParams(OnlineParams):
    """Params of ``train``/``ppo`` (equations: :class:`rlhf_spec.algorithms.policy_gradient.PPO`)."""

    critic: Optional[Annotated[str, ModelRef(artifacts=(REWARD_MODEL, POLICY))]] = Field(
        None, description="Separate critic, initialised from a reward model or a policy (a sequence classifier whose "
                          "head is applied per token; "
        "it must use the policy's tokenizer). Default: a linear value head on the policy's last hidden state.")
    kl_coef: float = Field(0.05, ge=0.0, le=1000.0, description="KL penalty coefficient beta in the per-token reward "
                                                                "(the initial value with the adaptive controller).")
    kl_controller: Literal["fixed", "adaptive"] = Field("fixed", description="'adaptive': Ziegler et al. 2019's "
                                                                             "proportional controller towards "
                                                                             "target_kl.")
    target_kl: float = Field(6.0, gt=0.0, description="Adaptive controller: target KL (nats per sequence).")
    horizon: float = Field(10000.0, gt=0.0, description="Adaptive controller: horizon in rollouts.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="Clip range of the probability ratio.")
    value_clip: float = Field(0.2, gt=0.0, description="Clip range of the value prediction around its rollout-time "
                                                       "value (reward units).")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss.")
    ppo_epochs: int = Field(4, ge=1, le=1000, description="Passes over a step's rollouts.")
    ptx_coef: float = Field(0.0, ge=0.0, description="PPO-ptx: weight of the cross-entropy on ptx_dataset's replies "
                                                     "(InstructGPT's gamma).")
    ptx_dataset: Optional[Annotated[str, DatasetRef(columns=("prompt",))]] = Field(
        None, description="Supervised data for PPO-ptx: the loss is the cross-entropy on each row's reply (its "
                          "'completion' column, "
        "else its 'chosen' one) given its prompt.")
    ptx_max_response_tokens: int = Field(256, ge=1, description="PPO-ptx replies are truncated to this many tokens.")


class GRPOParams(OnlineParams):
    """Params of ``train``/``grpo`` (equations: :class:`rlhf_spec.algorithms.policy_gradient.GRPO`)."""

    group_size: int = Field(4, ge=1, le=1024, description="Completions per prompt G (at least 2).")
    kl_coef: float = Field(0.04, ge=0.0, le=1000.0, description="Weight beta of the k3 KL to the reference in the loss "
                                                                "(0: no reference term, as DAPO).")
    scale: Literal["std", "none"] = Field("std", description="'std': divide by the group's reward std (GRPO); 'none': "
                                                             "Dr. GRPO.")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="Lower clip range (and upper, unless clip_eps_high is "
                                                             "set).")
    clip_eps_high: Optional[float] = Field(None, gt=0.0, lt=10.0, description="Upper clip range (DAPO's clip-higher, "
                                                                              "e.g. 0.28).")
    loss_aggregation: Aggregation = Field(
        "seq-mean-token-mean",
        description="'seq-mean-token-mean' (GRPO), 'token-mean' (DAPO), 'seq-mean-token-sum-norm' (Dr. GRPO).")


class RLOOParams(OnlineParams):
    """Params of ``train``/``rloo`` (equations: :class:`rlhf_spec.algorithms.policy_gradient.RLOO`)."""

    group_size: int = Field(4, ge=1, le=1024, description="Completions per prompt k (at least 2).")
    kl_coef: float = Field(0.05, ge=0.0, le=1000.0, description="Weight beta of the sequence-level KL penalty in the "
                                                                "reward.")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="Clip range of the probability ratio (inactive with one "
                                                             "epoch over one minibatch).")
    normalize_advantages: bool = Field(False, description="Whiten the leave-one-out advantages over the step.")
    loss_aggregation: Aggregation = Field("seq-mean-token-sum-norm", description="How token terms are reduced; the "
                                                                                 "default sums a sequence's terms "
                                                                                 "(divided by max_new_tokens), as "
                                                                                 "REINFORCE does.")


class ReinforcePPParams(OnlineParams):
    """Params of ``train``/``reinforce++`` (equations: :class:`rlhf_spec.algorithms.policy_gradient.ReinforcePP`)."""

    kl_coef: float = Field(0.01, ge=0.0, le=1000.0,
                           description="Weight beta of the per-token KL penalty in the reward.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount of the return-to-go.")
    clip_eps: float = Field(0.2, gt=0.0, lt=1.0, description="Clip range of the probability ratio.")
    loss_aggregation: Aggregation = Field("token-mean", description="How token terms are reduced.")


# ----------------------------------------------------------------------------- checks


def check_online(params: OnlineParams, spec=None, inputs=()) -> list[Problem]:
    """Problems every online algorithm shares (pointers relative to the params)."""
    out: list[Problem] = []
    if params.backend.uses != "transformers":
        out.append(Problem("/backend/uses", f"online training needs a backend that generates from the live policy "
                                            f"weights; "
                           f"'{params.backend.uses}' would need weight sync", "use 'transformers'"))
    backend = params.backend._parsed
    if params.backend.uses == "transformers" and backend is not None and getattr(backend, "dtype", "model") != "model":
        out.append(Problem("/backend/params/dtype", "online training generates with the live policy in its training "
                                                    "dtype",
                           "leave dtype at 'model' (set the policy's dtype in /models, or mixed_precision)"))
    if params.temperature <= 0:
        out.append(Problem("/temperature", "online training samples its rollouts; temperature 0 (greedy) makes them "
                                           "deterministic",
                           "set a temperature > 0 (1.0 samples the policy as is)"))
    global_batch = params.global_batch()
    n = params.rollout_prompts * params.group_size
    if params.minibatch_size is not None and params.minibatch_size != global_batch:
        out.append(Problem("/minibatch_size", f"minibatch_size {params.minibatch_size} must equal "
                                              f"per_device_train_batch_size x "
                           f"gradient_accumulation_steps x num_processes = {global_batch}",
                           "change gradient_accumulation_steps or per_device_train_batch_size, or leave minibatch_size "
                           "unset"))
    elif n % global_batch:
        out.append(
            Problem(
                "/rollout_prompts",
                f"a step's {n} rollouts (rollout_prompts x group_size) do not split "
                f"into minibatches of "
                f"{global_batch} (per_device_train_batch_size x gradient_accumulation_steps x num_processes)",
                "make rollout_prompts x group_size a multiple of the minibatch size",
            )
        )
    if params.rollout_prompts % params.num_processes:
        out.append(Problem("/rollout_prompts", f"rollout_prompts {params.rollout_prompts} must be a multiple of "
                                               f"num_processes {params.num_processes}"))
    if params.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        out.append(Problem("/optimizer", "'adamw_8bit' needs the bitsandbytes package, which is not installed",
                           "pip install bitsandbytes, or use 'adamw'"))
    if params.eval_every is not None and not params.eval_prompts:
        out.append(Problem("/eval_every", "eval_every needs eval_prompts", "set eval_prompts to a /datasets name"))
    if params.total_episodes is not None:
        out.append(Problem("/total_episodes", "online training counts rollout steps", "use total_steps"))
    if params.epochs != 1.0:
        out.append(Problem("/epochs", "online training counts rollout steps", "use total_steps (and ppo_epochs for "
                                                                              "passes over a step's rollouts)"))
    return out + pairwise_reward_problems(params.reward)


def _check_group(params, spec=None, inputs=()) -> list[Problem]:
    out = check_online(params, spec, inputs)
    if params.group_size < 2:
        out.append(Problem("/group_size", f"group_size {params.group_size}: the baseline is computed within each "
                                          f"prompt's group "
                           "of completions, so it needs at least 2", "set group_size to 2 or more (GRPO commonly uses "
                                                                     "4 to 16)"))
    return out


def _check_ppo(params: PPOParams, spec=None, inputs=()) -> list[Problem]:
    out = check_online(params, spec, inputs)
    if params.ptx_coef > 0 and not params.ptx_dataset:
        out.append(Problem("/ptx_dataset", "ptx_coef > 0 needs ptx_dataset (prompt and chosen reply columns)"))
    if params.ptx_dataset and params.ptx_coef == 0:
        out.append(Problem("/ptx_dataset", "ptx_dataset is unused with ptx_coef 0",
                           "set ptx_coef > 0 or remove ptx_dataset"))
    datasets = getattr(spec, "datasets", None) or {}
    if params.ptx_dataset in datasets:
        have = datasets[params.ptx_dataset].columns()
        if "completion" not in have and "chosen" not in have:
            out.append(Problem("/ptx_dataset", f"dataset '{params.ptx_dataset}' has no reply column for PPO-ptx (it "
                                               f"provides {', '.join(have)})",
                               "use supervised data with a 'completion' column, or preference data (its 'chosen' "
                               "replies are used)"))
    return out


def _resources(p: OnlineParams) -> dict:
    n = p.rollout_prompts * p.group_size
    return {"processes": p.num_processes, "gpus": p.num_processes, "rollout_steps": p.total_steps,
            "rollouts_per_step": n,
            "updates": p.total_steps * p.ppo_epochs * max(1, n // p.global_batch()), "backend": p.backend.uses,
            "reward": p.reward.uses}


# ----------------------------------------------------------------------------- runs


def online_inputs(ctx):
    """What the online loop is handed (:class:`~rlhf_spec.loops.online_setup.OnlineInputs`): the policy's
    tokenizer (left padding), the training and held-out prompts within ``max_prompt_tokens`` (chat
    template applied), the PPO-ptx rows, the reward, and a factory of the ``transformers`` engine over
    the live policy.

    Raises:
        ValueError: no training prompt is left after ``max_prompt_tokens``, or ``ptx_dataset`` has no rows.
    """
    from ...backends import prepare_prompts
    from ...backends.transformers import TransformersEngine
    from ...loops.online_setup import OnlineInputs

    p = ctx.params
    tok = ctx.model("policy").load_tokenizer(padding_side="left")
    with ctx.timer("load_data"):
        rows, skipped = prepare_prompts(tok, ctx.dataset("prompts"), p.max_prompt_tokens)
        if len(rows) == 0:
            raise ValueError("no training prompts left after max_prompt_tokens")
        eval_rows = None
        if p.eval_prompts:
            ev, _ = prepare_prompts(tok, ctx.dataset("eval_prompts"), p.max_prompt_tokens)
            if p.eval_limit:
                ev = ev.select(range(min(p.eval_limit, len(ev))))
            eval_rows = ev if len(ev) else None
        ptx = _ptx_items(ctx, tok)
    with ctx.timer("load_reward"):
        ctx.progress.note("loading reward")
        reward = ctx.reward("reward")
    eval_sampling = SamplingParams(temperature=p.eval_temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens)
    return OnlineInputs(tokenizer=tok, prompts=rows, skipped=skipped, reward=reward, eval_prompts=eval_rows,
                        make_engine=lambda policy: TransformersEngine(policy, tok, p.backend.parsed),
                        eval_sampling=eval_sampling, ptx_items=ptx)


def _ptx_items(ctx, tok):
    """PPO-ptx rows: each ``ptx_dataset`` row's prompt and reply (``completion``, else ``chosen``), tokenized."""
    p = ctx.params
    if not getattr(p, "ptx_coef", 0.0):
        return None
    from ...algorithms.batching import tokenize_completions

    rows = ctx.dataset("ptx_dataset")
    if len(rows) == 0:
        raise ValueError("ptx_dataset has no rows")
    column = "completion" if "completion" in rows.column_names else "chosen"
    return tokenize_completions(tok, list(rows["prompt"]), list(rows[column]), p.max_prompt_tokens,
                                p.ptx_max_response_tokens)


def _runner(algorithm: str):
    def run(ctx):
        from ...algorithms import policy_gradient as pg
        from ...loops.online_loop import run_online

        cls = {"ppo": pg.PPO, "grpo": pg.GRPO, "rloo": pg.RLOO, "reinforce++": pg.ReinforcePP}[algorithm]
        return run_online(ctx, cls, online_inputs(ctx))

    run.__name__ = f"run_{algorithm.replace('+', 'p')}"
    return run


run_ppo, run_grpo, run_rloo, run_reinforce_pp = (_runner(a) for a in ("ppo", "grpo", "rloo", "reinforce++"))


@hookimpl
def rlhf_spec_register_stages(register):
    common = dict(kind="train", version="1", inputs=(), min_inputs=0, max_inputs=0, output=POLICY, resources=_resources)
    register(StageImpl(name="ppo", params=PPOParams, run=run_ppo, check=_check_ppo,
                       description="online PPO: value head or critic, KL-penalised rewards, GAE, clipped policy and "
                                   "value losses", **common))
    register(
        StageImpl(
            name="grpo",
            params=GRPOParams,
            run=run_grpo,
            check=_check_group,
            description="online GRPO (Dr. GRPO, DAPO options): group-relative advantages, k3 KL in the loss",
            **common,
        )
    )
    register(StageImpl(name="rloo", params=RLOOParams, run=run_rloo, check=_check_group,
                       description="online RLOO: leave-one-out baseline, sequence-level KL penalty in the reward",
                       **common))
    register(StageImpl(name="reinforce++", params=ReinforcePPParams, run=run_reinforce_pp, check=check_online,
                       description="online REINFORCE++: per-token KL in the reward, globally whitened returns",
                       **common))
