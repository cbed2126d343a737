"""``train``/``slic-hf``: Sequence Likelihood Calibration with human feedback, on preference pairs.

    L = max(0, delta - log pi(y_w|x) + log pi(y_l|x)) - lambda * log pi(y_w|x)

(Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback", arXiv:2305.10425,
Eq. 1 with the chosen reply as the regularisation target). The rank-calibration hinge pushes the
chosen reply's sequence logprob at least ``delta`` nats above the rejected one's; the cross-entropy
term keeps the policy near its data. No reference policy is needed, so no reference logprobs are
computed. The pairs come from a ``pairs`` stage in ``inputs`` or from ``params.dataset``, exactly one
of them: ``pair_trainer`` checks that at ``validate`` time.
"""

from __future__ import annotations

from pydantic import Field

from rlhf_spec import PAIRS, POLICY, PairBatch, PolicyTrainParams, StageImpl, pair_trainer


class SlicParams(PolicyTrainParams):
    """Params of ``train``/``slic-hf``; the optimizer, batch and LoRA params are rlhf-spec's shared ones."""

    delta: float = Field(1.0, gt=0, description="Calibration margin delta, in nats of sequence logprob.")
    regularization: float = Field(0.1, ge=0, description="Weight lambda of the cross-entropy term on the chosen reply.")
    learning_rate: float = Field(1e-6, gt=0, le=1.0, description="Peak learning rate (AdamW).")


def slic_loss(params: SlicParams):
    """The SLiC-HF loss on a :class:`rlhf_spec.PairBatch` (mean over the B pairs), with its two terms as stats.

    Inputs are (B,) sequence logprobs (nats) of the chosen and rejected replies under the policy.
    """
    def loss(b: PairBatch):
        hinge = (params.delta - b.policy_chosen_logps + b.policy_rejected_logps).clamp_min(0.0)
        value = hinge.mean() - params.regularization * b.policy_chosen_logps.mean()
        return value, {"loss": float(value.detach()), "calibration": float(hinge.detach().mean()),
                       "chosen_logps": float(b.policy_chosen_logps.detach().mean()),
                       "hinge_active": float((hinge.detach() > 0).float().mean())}

    return loss


def register_stage(register) -> None:
    register(StageImpl(kind="train", name="slic-hf", params=SlicParams,
                       run=pair_trainer(slic_loss, reference_free=True),
                       version="1", inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=POLICY,
                       description="SLiC-HF: hinge calibration of sequence logprobs on pairs, plus cross-entropy on "
                                   "the chosen reply"))
