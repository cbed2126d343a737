"""The optimisation phase of an online RL step: ``ppo_epochs`` passes over the step's experience in a
seeded order, in minibatches (one optimizer update each) of micro-batches run on the accelerate core.

Micro-batch weights: where the algorithm's loss is a token mean over the minibatch, micro-batch ``k``'s
loss (a token mean over its own rollouts) is scaled by ``tokens(k) * gas / tokens(minibatch)``, so the
accumulated gradient is the minibatch's token mean. The PPO-ptx term (InstructGPT, Ouyang et al. 2022,
Eq. 2) adds ``ptx_coef * -mean log pi(y_t | x, y_<t)`` over one micro-batch of supervised replies per
micro-step, read at position ``((step - 1) * ppo_epochs + epoch) * micro_per_epoch + k`` of a seeded
stream over them, so the choice depends only on that position.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from ..algorithms.policy_gradient import Algorithm, Experience
from ..runtime import derive_seed
from .core import TrainingCore
from .online_setup import MINIBATCH_ORDER, PTX_ORDER, prompt_order

__all__ = ["PolicyUpdate"]


class PolicyUpdate:
    """Updates the policy (and critic) on one step's :class:`Experience`.

    Args:
        core: the run's prepared :class:`~rlhf_spec.loops.core.TrainingCore` (its model: an ActorCritic).
        algo: the algorithm (its loss, and whether it is a token mean).
        params: the stage's params (``ppo_epochs``, ``per_device_train_batch_size``, ``gradient_accumulation_steps``,
            ``ptx_coef``).
        seed: the spec seed: epoch ``e`` of step ``s`` is ordered by ``derive_seed(seed, 102, s, e)``, the
            PPO-ptx stream (:func:`~rlhf_spec.loops.online_setup.prompt_order`) is seeded ``derive_seed(seed, 104)``.
        pad_id: the tokenizer's pad id; temperature: the rollouts' sampling temperature (logprobs use it).
        ptx_items: PPO-ptx rows (``TokenizedCompletion``) or None.
        micro_per_epoch: micro-batches per pass over a step's rollouts on this process.
    """

    def __init__(self, core: TrainingCore, algo: Algorithm, params, *, seed: int, pad_id: int, temperature: float,
                 ptx_items, micro_per_epoch: int):
        self.core, self.algo, self.p = core, algo, params
        self.seed, self.pad_id, self.temperature = seed, pad_id, temperature
        self.ptx_items, self.micro_per_epoch = ptx_items, micro_per_epoch
        self.micro, self.gas = params.per_device_train_batch_size, params.gradient_accumulation_steps

    def run(self, exp: Experience, step: int, kept: str, after_epoch: Callable[[int, int], None]) -> dict:
        """Every epoch of step ``step``; returns the loss statistics averaged over micro-steps and processes.

        Args:
            kept: a note on the kept checkpoint, for the divergence message.
            after_epoch: called with ``(step, epoch)`` after each pass (a kill point for tests).

        Raises:
            TrainingDiverged: a NaN/inf loss, naming the step, epoch and micro-batch.
        """
        import torch

        sums: dict[str, float] = {}
        count, n = 0, len(exp)
        for epoch in range(self.p.ppo_epochs):
            g = torch.Generator().manual_seed(derive_seed(self.seed, MINIBATCH_ORDER, step, epoch))
            perm = torch.randperm(n, generator=g).tolist()
            micros = [perm[i : i + self.micro] for i in range(0, n, self.micro)]
            for k, idx in enumerate(micros):
                first = (k // self.gas) * self.gas
                mb_tokens = sum(exp.resp_lens[i] for m in micros[first : first + self.gas] for i in m)
                weight = sum(exp.resp_lens[i] for i in idx) * self.gas / mb_tokens if self.algo.token_mean() else 1.0
                ptx = self._ptx_batch(step, epoch, k)
                where = f"at rollout step {step} (epoch {epoch + 1}, micro-batch {k + 1}); lower params.learning_rate; "
                stats = self.core.micro_step(partial(self._loss, exp, idx, ptx, weight), where + kept)
                for key, val in stats.items():
                    sums[key] = sums.get(key, 0.0) + val
                count += 1
            after_epoch(step, epoch)
        return self.core.mean({k: v / max(1, count) for k, v in sums.items()})

    def _loss(self, exp: Experience, idx: list, ptx: list, weight: float):
        """The weighted loss of one micro-batch (rows ``idx`` of ``exp``, plus the PPO-ptx rows) and its stats."""
        from ..algorithms.batching import pad_batch
        from ..algorithms.value_head import gather_response, response_positions

        dev, rl_items = self.core.accelerator.device, [exp.items[i] for i in idx]
        batch = pad_batch([it.input_ids for it in rl_items] + [it.input_ids for it in ptx], self.pad_id, device=dev)
        logits, values = self.core.model(batch["input_ids"], batch["attention_mask"], values=self.algo.needs_values)
        b, lens = len(rl_items), [exp.resp_lens[i] for i in idx]
        pos, mask = response_positions([it.prompt_len for it in rl_items], lens, device=dev)
        lp, _, v = gather_response(logits[:b], batch["input_ids"][:b], pos, mask, self.temperature,
                                   values=values[:b] if values is not None else None)
        loss, stats = self.algo.loss(lp, v, exp, idx, max(lens))
        loss = loss * weight
        if ptx:
            pl = [len(it.input_ids) - it.prompt_len for it in ptx]
            ppos, pmask = response_positions([it.prompt_len for it in ptx], pl, device=dev)
            plp, _, _ = gather_response(logits[b:], batch["input_ids"][b:], ppos, pmask, 1.0)
            ptx_loss = -(plp.sum() / pmask.sum())
            loss = loss + self.p.ptx_coef * ptx_loss
            stats["ptx_loss"] = float(ptx_loss.detach())
        return loss, stats

    def _ptx_batch(self, step: int, epoch: int, k: int) -> list:
        """The PPO-ptx rows of micro-step ``k`` of ``epoch`` of ``step`` (see the module docstring)."""
        if not self.ptx_items:
            return []
        micro_index = ((step - 1) * self.p.ppo_epochs + epoch) * self.micro_per_epoch + k
        start = (micro_index * self.core.world + self.core.rank) * self.micro
        order = prompt_order(len(self.ptx_items), derive_seed(self.seed, PTX_ORDER), start, self.micro)
        return [self.ptx_items[i] for i in order]
