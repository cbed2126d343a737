"""Online RL objectives: the rollout batch (:class:`Experience`) and PPO, GRPO, RLOO and REINFORCE++ as
its advantages, loss and KL coefficient. Pure torch: the loop that makes the experience and runs the
updates is :mod:`rlhf_spec.loops.online_loop`.

Sources: PPO (Schulman et al. 2017, Eq. 7; InstructGPT, Ouyang et al. 2022, Eq. 2 for the KL-penalised
reward), GRPO (Shao et al. 2024, DeepSeekMath, Eq. 3), RLOO (Ahmadian et al. 2024, Eq. 5), REINFORCE++
(Hu 2025, Eq. 4-6).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Algorithm", "PPO", "GRPO", "RLOO", "ReinforcePP", "Experience", "OnlineTrainingStopped"]


class OnlineTrainingStopped(RuntimeError):
    """Online training stopped on purpose (a KL blow-up past ``max_kl``); the message names the step."""


# ----------------------------------------------------------------------------- experience


@dataclass
class Experience:
    """One process's rollouts of one step, in the response-token layout (N rollouts, L = longest response).

    Attributes:
        items: N tokenized rollouts (``input_ids`` = prompt ids + generated ids, ``prompt_len``).
        resp_lens: N response lengths in tokens (the end-of-turn token included when generated).
        scores: (N,) rewards; mask: (N, L) bool, set on response tokens.
        old_logprobs, ref_logprobs: (N, L) per-token logprobs under the policy at rollout time and the
            reference policy (nats; 0 outside the mask).
        entropy: (N, L) the policy's per-token entropy at rollout time (nats).
        values: (N, L) the critic's V(s_t) at rollout time (PPO only).
        advantages: (N, L), set by the algorithm; returns: (N, L) value targets (PPO only).
        group_size: completions per prompt, prompt-major (rollout ``i*G + j`` is completion j of prompt i).
    """

    items: list
    resp_lens: list[int]
    scores: Any
    mask: Any
    old_logprobs: Any
    ref_logprobs: Any
    entropy: Any
    group_size: int
    values: Any = None
    advantages: Any = None
    returns: Any = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def kl_tokens(self):
        """(N, L) per-token k1 KL estimate ``log pi_old - log pi_ref`` (0 outside the mask)."""
        return self.old_logprobs - self.ref_logprobs


# ----------------------------------------------------------------------------- algorithms


class Algorithm:
    """What an online algorithm adds to the loop: its advantages, its loss, and its KL coefficient.

    Args:
        p: the stage's params (an ``OnlineParams`` subclass).
    """

    name = "online"
    #: whether the loop computes values (a value head or a critic is built and trained)
    needs_values = False

    def __init__(self, p):
        self.p = p

    @property
    def kl_coef(self) -> float:
        return float(getattr(self.p, "kl_coef", 0.0))

    def prepare(self, exp: Experience) -> dict:
        """Set ``exp.advantages`` (and ``exp.returns``); return statistics to log."""
        raise NotImplementedError

    def loss(self, logprobs, values, exp: Experience, idx, L: int) -> tuple[Any, dict]:
        """The loss of one micro-batch: ``logprobs`` (b, L) with gradients (``values`` too, for PPO),
        rows ``idx`` of ``exp`` cut to ``L`` tokens. Returns ``(loss, stats of floats)``."""
        raise NotImplementedError

    def token_mean(self) -> bool:
        """True when the loss is a mean over the tokens of a minibatch (its micro-batches are then
        weighted by their token counts, so gradient accumulation gives the minibatch's token mean)."""
        return getattr(self.p, "loss_aggregation", "token-mean") == "token-mean"

    def after_step(self, kl: float, n: int) -> None:
        """Called once a step is done with its measured KL (nats per sequence) over ``n`` rollouts."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def _clipped(self, kl_coef: float = 0.0):
        from .ppo import ClippedPolicyLoss

        agg = getattr(self.p, "loss_aggregation", "token-mean")
        return ClippedPolicyLoss(self.p.clip_eps, getattr(self.p, "clip_eps_high", None), kl_coef, agg,
                                 float(self.p.max_new_tokens) if agg == "seq-mean-token-sum-norm" else None)

    def _policy_loss(self, fn, logprobs, exp: Experience, idx, L: int, ref: bool = False):
        old, adv, mask = exp.old_logprobs[idx, :L], exp.advantages[idx, :L], exp.mask[idx, :L]
        dev = logprobs.device
        loss, st = fn(logprobs, old.to(dev), adv.to(dev), mask.to(dev),
                      exp.ref_logprobs[idx, :L].to(dev) if ref else None)
        stats = {"policy_loss": float(st["pg_loss"]), "clip_fraction": float(st["clip_fraction"]),
                 "approx_kl": float(st["approx_kl"])}
        if "ref_kl" in st:
            stats["kl_loss"] = float(st["ref_kl"])
        return loss, stats


class PPO(Algorithm):
    """PPO with a learned critic (Schulman et al. 2017), as applied to language models by Ziegler et
    al. 2019 and Ouyang et al. 2022 (InstructGPT).

    Per response token ``t`` of rollout ``y`` to prompt ``x``, with ``beta`` the KL coefficient::

        r_t    = -beta * (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] * R(x, y)     (KL-penalised reward)
        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t),   A_t = sum_l (gamma lam)^l delta_{t+l}   (GAE)
        A_t    <- whiten(A_t) over the step's tokens,   G_t = A_t(unwhitened) + V(s_t)      (value target)
        L_pi   = token-mean max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)),  rho_t = pi(y_t) / pi_old(y_t)
        L_V    = 0.5 * token-mean max((V - G)^2, (clip(V, V_old - eps_v, V_old + eps_v) - G)^2)
        L      = L_pi + vf_coef * L_V  [+ ptx_coef * L_ptx]

    ``beta`` is fixed, or adapted after every step by the proportional controller of Ziegler et al.
    2019, Sec. 2.2 (``target_kl``, ``horizon``; TRL's ``adap_kl_ctrl``). The optional PPO-ptx term is
    InstructGPT's Eq. 2 with supervised data instead of pretraining data:
    ``L_ptx = -mean log pi(y_t | x, y_<t)`` over the assistant tokens of ``ptx_dataset`` rows (one
    micro-batch of them per micro-step).

    Sources: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", Eq. 7 and 9; Schulman
    et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation", Eq. 16;
    Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2; Ouyang et al.
    2022, "Training language models to follow instructions with human feedback", Eq. 2.
    """

    name = "ppo"
    needs_values = True

    def __init__(self, p):
        super().__init__(p)
        from .kl import AdaptiveKLController, FixedKLController
        from .ppo import ValueLoss

        if p.kl_controller == "adaptive":
            self.ctl = AdaptiveKLController(p.kl_coef, p.target_kl, p.horizon)
        else:
            self.ctl = FixedKLController(p.kl_coef)
        self.pg = self._clipped()
        self.vf = ValueLoss(p.value_clip)

    @property
    def kl_coef(self) -> float:
        return float(self.ctl.value)

    def token_mean(self) -> bool:
        return True

    def prepare(self, exp: Experience) -> dict:
        from .advantages import kl_penalized_token_rewards
        from .ops import masked_mean, masked_whiten
        from .ppo import gae_advantages

        rewards = kl_penalized_token_rewards(exp.scores, exp.kl_tokens, exp.mask, self.kl_coef)
        adv, ret = gae_advantages(rewards, exp.values, exp.mask, self.p.gamma, self.p.lam)
        exp.returns = ret
        exp.advantages = masked_whiten(adv, exp.mask)
        return {"value_mean": float(masked_mean(exp.values, exp.mask)),
                "return_mean": float(masked_mean(ret, exp.mask))}

    def loss(self, logprobs, values, exp, idx, L):
        pg, stats = self._policy_loss(self.pg, logprobs, exp, idx, L)
        dev = values.device
        vloss = self.vf(values, exp.values[idx, :L].to(dev), exp.returns[idx, :L].to(dev), exp.mask[idx, :L].to(dev))
        stats["value_loss"] = float(vloss.detach())
        return pg + self.p.vf_coef * vloss, stats

    def after_step(self, kl: float, n: int) -> None:
        self.ctl.update(kl, n)

    def state_dict(self) -> dict:
        return {"kl_controller": self.ctl.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "kl_controller" in state:
            self.ctl.load_state_dict(state["kl_controller"])


class GRPO(Algorithm):
    """Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath), with the Dr. GRPO and DAPO
    variants.

    For the G completions ``o_1 .. o_G`` of one prompt with rewards ``r_i``::

        A_i   = (r_i - mean(r)) / (std(r) + eps)       scale "std" (GRPO)
        A_i   =  r_i - mean(r)                         scale "none" (Dr. GRPO, Liu et al. 2025)
        A_i,t = A_i                                    (every token of o_i)
        L     = agg( max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high)) ) + beta * agg(k3_t)
        k3_t  = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1     (KL to the reference, in the loss)

    ``agg`` is ``loss_aggregation``: ``seq-mean-token-mean`` (GRPO, Eq. 3), ``token-mean`` (DAPO,
    Eq. 8) or ``seq-mean-token-sum-norm`` (Dr. GRPO: divide by the constant ``max_new_tokens``).
    ``clip_eps_high > clip_eps`` is DAPO's clip-higher. ``kl_coef = 0`` drops the KL term (DAPO).

    Sources: Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300), Eq. 3 and 4, Sec. 4.1.2; Liu et al.
    2025, "Understanding R1-Zero-Like Training" (arXiv:2503.20783); Yu et al. 2025, "DAPO"
    (arXiv:2503.14476), Eq. 8-10.
    """

    name = "grpo"

    def __init__(self, p):
        super().__init__(p)
        self.fn = self._clipped(p.kl_coef)

    def prepare(self, exp: Experience) -> dict:
        from .advantages import expand_to_tokens, group_advantages

        seq = group_advantages(exp.scores, exp.group_size, scale=self.p.scale)
        exp.advantages = expand_to_tokens(seq, exp.mask)
        flat = exp.scores.view(-1, exp.group_size)
        return {"groups_all_equal": float((flat.max(1).values == flat.min(1).values).float().mean())}

    def loss(self, logprobs, values, exp, idx, L):
        return self._policy_loss(self.fn, logprobs, exp, idx, L, ref=self.p.kl_coef > 0)


class RLOO(Algorithm):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024), with the KL penalty in the sequence reward.

    For the k completions of one prompt::

        R_i = r_i - beta * sum_t (log pi_old(y_i,t) - log pi_ref(y_i,t))     (sequence-level KL penalty)
        A_i = R_i - 1/(k - 1) * sum_{j != i} R_j                            (leave-one-out baseline)
        L   = agg( max(-A_i rho_t, -A_i clip(rho_t, 1 - eps, 1 + eps)) )

    With one optimisation epoch over one minibatch per step the ratio is 1 and the clip never binds,
    so the update is the paper's REINFORCE estimator ``A_i * grad log pi(y_i | x)``; the default
    aggregation ``seq-mean-token-sum-norm`` sums the token terms of a sequence as that estimator does
    (divided by the constant ``max_new_tokens``). ``normalize_advantages`` whitens ``A`` over the step.

    Sources: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs" (arXiv:2402.14740), Eq. 7 and Sec. 3; Kool et al. 2019,
    "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
    """

    name = "rloo"

    def __init__(self, p):
        super().__init__(p)
        self.fn = self._clipped()

    def prepare(self, exp: Experience) -> dict:
        from .advantages import expand_to_tokens, rloo_advantages

        penalised = exp.scores - self.p.kl_coef * exp.kl_tokens.sum(dim=1)
        seq = rloo_advantages(penalised, exp.group_size)
        if self.p.normalize_advantages:
            seq = (seq - seq.mean()) / (seq.std() + 1e-8)
        exp.advantages = expand_to_tokens(seq, exp.mask)
        return {"penalised_reward_mean": float(penalised.mean())}

    def loss(self, logprobs, values, exp, idx, L):
        return self._policy_loss(self.fn, logprobs, exp, idx, L)


class ReinforcePP(Algorithm):
    """REINFORCE++ (Hu 2025): PPO's clipped update without a critic, with the KL penalty in the
    per-token reward and the advantages whitened over the whole batch::

        r_t = -beta * (log pi_old(y_t) - log pi_ref(y_t)) + [t = last] * R(x, y)
        G_t = sum_{s >= t} gamma^(s - t) r_s
        A_t = (G_t - mean(G)) / std(G)                 (over every response token of the step)
        L   = agg( max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) )

    Source: Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language
    Models" (arXiv:2501.03262), Sec. 3 (token-level KL penalty, global advantage normalisation).
    """

    name = "reinforce++"

    def __init__(self, p):
        super().__init__(p)
        self.fn = self._clipped()

    def prepare(self, exp: Experience) -> dict:
        from .advantages import kl_penalized_token_rewards, reinforce_pp_advantages

        rewards = kl_penalized_token_rewards(exp.scores, exp.kl_tokens, exp.mask, self.p.kl_coef)
        exp.advantages = reinforce_pp_advantages(rewards, exp.mask, self.p.gamma)
        return {}

    def loss(self, logprobs, values, exp, idx, L):
        return self._policy_loss(self.fn, logprobs, exp, idx, L)
