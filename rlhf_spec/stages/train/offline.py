"""Offline ``train`` stages beside REBEL and DPO: SFT, IPO, SimPO, ORPO and KTO.

* ``sft``: supervised fine-tuning on conversations, loss on assistant tokens only
  (:mod:`rlhf_spec.stages.train.sft`); data from a dataset or a samples/scored stage (best-of-n output:
  rejection-sampling fine-tuning, Touvron et al. 2023, Llama 2, section 3.2.3).
* ``ipo``, ``simpo``, ``orpo``: losses on preference pairs (:mod:`rlhf_spec.algorithms.pairwise`), trained
  like DPO; SimPO and ORPO are reference-free and compute no reference logprobs.
* ``kto``: unpaired desirable/undesirable completions (:mod:`rlhf_spec.stages.train.unpaired`).
* Conservative DPO (cDPO, Mitchell 2023) is ``dpo`` with ``label_smoothing`` = the assumed share of
  flipped labels: ``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)``; no stage of its own.

Every preference stage reports the held-out preference accuracy of its implicit reward
(``eval_preference_accuracy``: the share of held-out pairs whose chosen response gets the higher
implicit reward, ties counting one half) and the training time per optimizer update
(``seconds_per_update``, evaluation excluded).
"""

from __future__ import annotations

from pydantic import Field

from ...hookspecs import hookimpl
from ...records import PAIRS, POLICY, SAMPLES, SCORED, StageImpl
from .pair_trainer import PairBatch, PolicyTrainParams, pair_trainer, pairs_check
from .sft import SFTParams, sft_check, train_sft
from .unpaired import KTOParams, kto_check, train_kto


class IPOParams(PolicyTrainParams):
    """Params of ``train``/``ipo``: ``(h - 1/(2 beta))**2`` with h the log-ratio margin
    (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences", Eq. 17)."""

    beta: float = Field(0.1, gt=0, le=100.0, description="Regularisation tau: the margin h is pulled to 1/(2 beta).")
    length_normalized: bool = Field(True, description="Use mean per-token logprobs in h (as TRL's IPO); false: summed "
                                                      "logprobs, as the paper's pi(y|x).")
    learning_rate: float = Field(5e-7, gt=0, le=1.0, description="Peak learning rate (AdamW).")


class SimPOParams(PolicyTrainParams):
    """Params of ``train``/``simpo``: ``-log sigmoid(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)``,
    reference-free (Meng, Xia & Chen 2024, "SimPO", Eq. 6). Defaults: the paper's beta = 2, gamma/beta = 0.5."""

    beta: float = Field(2.0, gt=0, le=100.0, description="Reward scale beta (per nat of mean per-token logprob).")
    gamma: float = Field(1.0, ge=0, le=100.0, description="Target reward margin gamma (reward units).")
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="Assumed share of flipped labels (as cDPO).")
    learning_rate: float = Field(5e-7, gt=0, le=1.0, description="Peak learning rate (AdamW).")


class ORPOParams(PolicyTrainParams):
    """Params of ``train``/``orpo``: ``NLL(y_w) + lam * -log sigmoid(log odds(y_w) - log odds(y_l))`` on mean
    per-token logprobs, reference-free (Hong, Lee & Thorne 2024, "ORPO", Eqs. 6-7)."""

    lam: float = Field(0.1, gt=0, le=100.0, description="Weight lambda of the odds-ratio term (the paper: 0.1).")
    learning_rate: float = Field(5e-6, gt=0, le=1.0, description="Peak learning rate (AdamW); ORPO starts from a base "
                                                                 "model, as SFT does.")


# ----------------------------------------------------------------------------- losses and implicit rewards


def _mean_logps(b: PairBatch):
    """(chosen, rejected) policy logprobs per response token (nats/token)."""
    return b.policy_chosen_logps / b.chosen_lengths, b.policy_rejected_logps / b.rejected_lengths


def ipo_loss(p: IPOParams):
    """The IPO loss on a :class:`~rlhf_spec.PairBatch` (``IPOLoss``, on mean per-token logprobs when
    ``length_normalized``), with the implicit-reward margin and accuracy as stats."""
    from ...algorithms.pairwise import IPOLoss

    fn = IPOLoss(p.beta)

    def loss(b: PairBatch):
        value, cr, rj = fn(*_ipo_inputs(p, b))
        return value, {"loss": float(value.detach()), "implicit_reward_margin": float((cr - rj).mean()),
                       "implicit_accuracy": float((cr > rj).float().mean())}

    return loss


def _ipo_inputs(p: IPOParams, b: PairBatch):
    args = (b.policy_chosen_logps, b.policy_rejected_logps, b.reference_chosen_logps, b.reference_rejected_logps)
    if not p.length_normalized:
        return args
    lens = (b.chosen_lengths, b.rejected_lengths) * 2
    return tuple(a / n for a, n in zip(args, lens))


def ipo_rewards(p: IPOParams, b: PairBatch):
    """IPO's implicit reward per response: ``beta * (log pi - log pi_ref)`` (per token when length-normalised)."""
    pc, pr, rc, rr = _ipo_inputs(p, b)
    return p.beta * (pc - rc), p.beta * (pr - rr)


def simpo_loss(p: SimPOParams):
    """The SimPO loss on a :class:`~rlhf_spec.PairBatch` (``SimPOLoss`` with the response lengths)."""
    from ...algorithms.reference_free import SimPOLoss

    fn = SimPOLoss(p.beta, p.gamma, p.label_smoothing)

    def loss(b: PairBatch):
        value, cr, rj = fn(b.policy_chosen_logps, b.policy_rejected_logps, b.chosen_lengths, b.rejected_lengths)
        return value, {"loss": float(value.detach()), "implicit_reward_margin": float((cr - rj).mean()),
                       "implicit_accuracy": float((cr > rj).float().mean())}

    return loss


def simpo_rewards(p: SimPOParams, b: PairBatch):
    """SimPO's reward per response: ``beta * log pi(y|x) / |y|``."""
    c, r = _mean_logps(b)
    return p.beta * c, p.beta * r


def orpo_loss(p: ORPOParams):
    """The ORPO loss on a :class:`~rlhf_spec.PairBatch`: ``ORPOLoss`` on mean per-token logprobs, the NLL
    term being the chosen response's mean per-token NLL ``-log pi(y_w|x) / |y_w|``."""
    from ...algorithms.reference_free import ORPOLoss

    fn = ORPOLoss(p.lam)

    def loss(b: PairBatch):
        c, r = _mean_logps(b)
        value, st = fn(c, r, -c)
        return value, {"loss": float(value.detach()), **{k: float(v) for k, v in st.items()},
                       "implicit_accuracy": float((c > r).float().mean().detach())}

    return loss


def orpo_rewards(p: ORPOParams, b: PairBatch):
    """ORPO's implicit reward per response: its mean per-token logprob (nats/token)."""
    return _mean_logps(b)


def _resources(p) -> dict:
    return {"processes": p.num_processes, "gpus": p.num_processes, "global_batch": p.global_batch(),
            "episodes": p.total_episodes or f"{p.epochs} epoch(s)"}


run_ipo = pair_trainer(ipo_loss, rewards=ipo_rewards)
run_simpo = pair_trainer(simpo_loss, reference_free=True, rewards=simpo_rewards)
run_orpo = pair_trainer(orpo_loss, reference_free=True, rewards=orpo_rewards)


@hookimpl
def rlhf_spec_register_stages(register):
    pair_stage = dict(inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=POLICY, resources=_resources, version="1",
                      check=pairs_check)
    register(StageImpl(kind="train", name="sft", params=SFTParams, run=train_sft, version="1", inputs=(SAMPLES, SCORED),
                       min_inputs=0, max_inputs=1, output=POLICY, check=sft_check, resources=_resources,
                       description="SFT: cross-entropy on assistant tokens (dataset or best-of-n rows), packing, "
                                   "LoRA/QLoRA"))
    register(StageImpl(kind="train", name="ipo", params=IPOParams, run=run_ipo, **pair_stage,
                       description="IPO: (log-ratio margin - 1/(2 beta))**2"))
    register(StageImpl(kind="train", name="simpo", params=SimPOParams, run=run_simpo, **pair_stage,
                       description="SimPO: reference-free, length-normalised reward margin above gamma"))
    register(StageImpl(kind="train", name="orpo", params=ORPOParams, run=run_orpo, **pair_stage,
                       description="ORPO: SFT loss plus a log-odds-ratio penalty, reference-free"))
    register(
        StageImpl(
            kind="train",
            name="kto",
            params=KTOParams,
            run=train_kto,
            version="2",
            inputs=(PAIRS,),
            min_inputs=0,
            max_inputs=1,
            output=POLICY,
            check=kto_check,
            resources=_resources,
            description="KTO: unpaired desirable/undesirable completions against a batch KL reference point",
        )
    )
