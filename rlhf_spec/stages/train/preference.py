"""Built-in ``train`` stages: REBEL and DPO on preference pairs, and Bradley-Terry reward models.

The algorithms live in :mod:`rlhf_spec.algorithms`; this module declares their params and registers
them. Policy training reads ``pairs`` (split ``train``), computes the reference-policy logprobs once (a
shared cache entry) and runs the :class:`~rlhf_spec.loops.trainer.Trainer` loop.
"""

from __future__ import annotations

from pydantic import Field

from ...errors import Problem
from ...hookspecs import hookimpl
from ...records import PAIRS, POLICY, REWARD_MODEL, StageImpl
from .pair_trainer import PairBatch, PolicyTrainParams, pair_trainer, pairs_check
from .reward_model import RewardModelParams, train_reward_model


class RebelParams(PolicyTrainParams):
    """Params of ``train``/``rebel``.

    Loss (REBEL repo form): ``((log pi/pi_0 (y) - log pi/pi_0 (y')) - eta * (r(y) - r(y')))**2``,
    averaged over pairs (Gao et al. 2024, REBEL, Eq. 1, up to the scale of eta).
    """

    eta: float = Field(1e6, gt=0, description="Reward scale eta (REBEL repo: 1e6 with ArmoRM rewards).")


def rebel_loss(p: RebelParams):
    """The REBEL loss on a :class:`~rlhf_spec.stages.train.pair_trainer.PairBatch`, with its margins as stats."""
    from ...algorithms.pairwise import REBELLoss, rebel_stats

    fn = REBELLoss(p.eta)

    def loss(b: PairBatch):
        args = (b.policy_chosen_logps, b.policy_rejected_logps, b.reference_chosen_logps, b.reference_rejected_logps,
                b.chosen_rewards, b.rejected_rewards)
        value = fn(*args)
        st = rebel_stats(*(a.detach() for a in args), eta=p.eta)
        return value, {"loss": float(value.detach()), "reward_margin": float(st["reward_margin"]),
                       "logratio_margin": float(st["logratio_margin"])}

    return loss


class DPOParams(PolicyTrainParams):
    """Params of ``train``/``dpo``: ``-log sigmoid(beta * h)``, h the log-ratio margin (Rafailov et al. 2023, Eq. 7)."""

    beta: float = Field(0.1, gt=0, le=100.0, description="KL strength beta.")
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="Conservative DPO label smoothing.")
    learning_rate: float = Field(5e-7, gt=0, le=1.0, description="Peak learning rate (AdamW).")


def dpo_loss(p: DPOParams):
    """The DPO loss on a :class:`~rlhf_spec.stages.train.pair_trainer.PairBatch`, with implicit-reward stats."""
    from ...algorithms.pairwise import DPOLoss

    fn = DPOLoss(p.beta, p.label_smoothing)

    def loss(b: PairBatch):
        value, cr, rj = fn(b.policy_chosen_logps, b.policy_rejected_logps, b.reference_chosen_logps,
                           b.reference_rejected_logps)
        return value, {"loss": float(value.detach()),
                       "reward_margin": float((b.chosen_rewards - b.rejected_rewards).mean()),
                       "implicit_reward_margin": float((cr - rj).mean()),
                       "implicit_accuracy": float((cr > rj).float().mean())}

    return loss


def dpo_rewards(p: DPOParams, b: PairBatch):
    """DPO's implicit reward per response, shape (B,): ``beta * (log pi(y|x) - log pi_ref(y|x))``
    (Rafailov et al. 2023, section 5); held-out pairs it orders right give ``eval_preference_accuracy``."""
    return p.beta * (b.policy_chosen_logps - b.reference_chosen_logps), p.beta * (
        b.policy_rejected_logps - b.reference_rejected_logps
    )


def rebel_rewards(p: RebelParams, b: PairBatch):
    """REBEL's implied reward per response, shape (B,): ``(log pi(y|x) - log pi_0(y|x)) / eta``, the
    quantity its regression fits to the reward (Gao et al. 2024, Eq. 1)."""
    return (b.policy_chosen_logps - b.reference_chosen_logps) / p.eta, (
        b.policy_rejected_logps - b.reference_rejected_logps
    ) / p.eta


def _rebel_check(params: RebelParams, spec, inputs) -> list[Problem]:
    if params.dataset:
        return [Problem("/dataset", "REBEL regresses on reward differences, which a dataset does not have: give a "
                                    "scored pairs stage in inputs")]
    return []


def _policy_resources(p) -> dict:
    out = {"processes": p.num_processes, "gpus": p.num_processes, "global_batch": p.global_batch(),
           "episodes": p.total_episodes or f"{p.epochs} epoch(s)"}
    if p.total_episodes:
        out["updates"] = max(1, p.total_episodes // p.global_batch())
    return out


def _reward_model_check(params: RewardModelParams, spec, inputs) -> list[Problem]:
    if not params.dataset and not inputs:
        return [Problem("/dataset", "reward-model training needs pairs: set params.dataset or give a pairs stage in "
                                    "inputs")]
    if params.dataset and inputs:
        return [Problem("#/inputs", "reward-model training reads params.dataset or a pairs input, not both")]
    return []


run_rebel = pair_trainer(rebel_loss, rewards=rebel_rewards)
run_dpo = pair_trainer(dpo_loss, rewards=dpo_rewards)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="train", name="rebel", params=RebelParams, run=run_rebel, version="1",
                       inputs=(PAIRS,), min_inputs=1, max_inputs=1, output=POLICY, check=_rebel_check,
                       description="REBEL: regress log-ratio differences onto eta * reward differences",
                       resources=_policy_resources))
    register(StageImpl(kind="train", name="dpo", params=DPOParams, run=run_dpo, version="1",
                       inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=POLICY, check=pairs_check,
                       description="DPO: -log sigmoid(beta * log-ratio margin)", resources=_policy_resources))
    register(StageImpl(kind="train", name="reward-model", params=RewardModelParams, run=train_reward_model, version="2",
                       inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=REWARD_MODEL, check=_reward_model_check,
                       description="Bradley-Terry reward model (optional Llama 2 margin), held-out pairwise accuracy",
                       resources=_policy_resources))
