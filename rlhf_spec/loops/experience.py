"""The experience maker of online RL: generate -> score -> logprobs, through the generation engine and
the reward it is given (it builds neither), into an :class:`~rlhf_spec.algorithms.policy_gradient.Experience`.

For one step's prompts it

1. generates ``group_size`` completions per prompt from the live policy weights (the engine's model is
   set to the live policy for the call, in eval mode);
2. scores the completion texts with the reward (a :class:`~rlhf_spec.RewardBatch` carrying the prompt
   rows' data columns, :meth:`~rlhf_spec.RewardBatch.from_rows`); a reward error on any process stops
   every process, naming where it happened;
3. computes, without gradients, the per-token logprobs of the rollouts under the frozen reference
   policy and under the policy before the update ("old"), the policy's entropy and, for PPO, the
   critic's values.

Shape of the design: OpenRLHF's ``experience_maker.py`` (experience-making apart from the loss and the
optimiser).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional

from ..algorithms.policy_gradient import Experience

__all__ = ["ExperienceMaker", "rollout_stats"]


def _pad_rows(rows: list, dtype=None):
    """B 1-D tensors of lengths ``n_b`` -> (B, max n_b) right-padded with 0 (``dtype``: the first row's)."""
    import torch

    L = max(int(r.numel()) for r in rows)
    out = torch.zeros((len(rows), L), dtype=dtype or rows[0].dtype)
    for i, r in enumerate(rows):
        out[i, : r.numel()] = r
    return out


def _forward_rows(forward: Callable, items: list, pad_id: int, device, temperature: float, batch_size: int,
                  entropy: bool = False, values: bool = False):
    """Per-response-token logprobs (entropies, values) of ``items`` without gradients, ``batch_size`` at a
    time. ``forward(input_ids, attention_mask) -> (logits, values or None)``. Returns lists of 1-D tensors."""
    import torch

    from ..algorithms.batching import pad_batch
    from ..algorithms.value_head import gather_response, response_positions

    lps, ents, vals = [], [], []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i : i + batch_size]
            batch = pad_batch([it.input_ids for it in chunk], pad_id, device=device)
            lens = [len(it.input_ids) - it.prompt_len for it in chunk]
            pos, mask = response_positions([it.prompt_len for it in chunk], lens, device=device)
            logits, v = forward(batch["input_ids"], batch["attention_mask"])
            lp, ent, val = gather_response(logits, batch["input_ids"], pos, mask, temperature, entropy=entropy,
                                           values=v if values else None)
            for b, n in enumerate(lens):
                lps.append(lp[b, :n].float().cpu())
                if entropy:
                    ents.append(ent[b, :n].float().cpu())
                if values:
                    vals.append(val[b, :n].float().cpu())
    return lps, ents, vals


class ExperienceMaker:
    """Makes one step's experience from prompt rows (see the module docstring).

    Args:
        engine: a generation engine over the live policy: ``engine.generate(prompt_token_ids, sampling, n,
            seed) -> one list of n completions (``.text``, ``.token_ids``) per prompt``; its ``model``
            attribute is set to ``live_policy()`` before each call.
        reward: ``reward.score(RewardBatch) -> RewardOutput`` (scores, optional components and counts).
        reference: the frozen reference policy, a causal LM on ``device``.
        model: the policy being trained: ``model(input_ids, attention_mask, values=bool) -> (logits,
            values or None)`` (an :class:`~rlhf_spec.algorithms.value_head.ActorCritic`, prepared).
        live_policy: returns the unwrapped policy module to generate from.
        pad_id: the tokenizer's pad id; device: where the forward passes run.
        temperature: logprobs are of the policy's distribution at this sampling temperature.
        logprob_batch_size: rollouts per no-gradient forward pass.
        needs_values: also read the critic's values (PPO).
        any_process: ``any_process(flag) -> bool``, true where ``flag`` is true on some process (a collective).
        timer: ``timer(name)`` a context manager timing a phase (``generation``, ``scoring``, ``reference``).
    """

    def __init__(self, engine, reward, reference, model, live_policy: Callable, *, pad_id: int, device,
                 temperature: float, logprob_batch_size: int, needs_values: bool,
                 any_process: Callable[[bool], bool] = bool, timer: Optional[Callable] = None):
        self.engine, self.reward, self.reference = engine, reward, reference
        self.model, self.live_policy = model, live_policy
        self.pad_id, self.device, self.temperature = pad_id, device, temperature
        self.batch_size, self.needs_values, self.any_process = logprob_batch_size, needs_values, any_process
        self.timer = timer or (lambda name: contextlib.nullcontext())

    def generate(self, rows, sampling, n: int, seed: int) -> list[list]:
        """``n`` completions per row of ``rows`` (its ``token_ids`` column) from the live policy, seeded ``seed``."""
        policy = self.live_policy()
        was_training = policy.training
        policy.eval()
        try:
            self.engine.model = policy
            return self.engine.generate([list(t) for t in rows["token_ids"]], sampling, n, seed)
        finally:
            policy.train(was_training)

    def score(self, rows, texts: list[str], where: str):
        """The reward's output for ``texts``: as many consecutive completions for each row of ``rows`` (the
        rows' prompts and data columns reach the reward: :meth:`~rlhf_spec.RewardBatch.from_rows`).

        Raises:
            RewardError: the reward refused its input or returned an unusable value on this or another
                process; the message ends with ``where``.
        """
        from ..errors import RewardError
        from ..records import RewardBatch

        batch = RewardBatch.from_rows(rows, texts)
        err = None
        try:
            out = self.reward.score(batch)
        except RewardError as exc:
            err, out = exc, None
        if self.any_process(err is not None):
            msg = str(err) if err is not None else "a reward on another process returned an unusable value"
            raise RewardError(f"{msg} {where}") from err
        return out

    def make(self, rows, sampling, group_size: int, seed: int, where: str,
             on_generated: Optional[Callable[[], None]] = None) -> tuple[Experience, dict]:
        """One step's experience for prompt ``rows`` (this process's share, whole groups).

        Args:
            sampling: the rollouts' sampling settings; seed: the generation seed.
            group_size: completions per prompt G (rollout ``i*G + j`` is completion j of prompt i).
            where: appended to a reward error's message (``"at rollout step 3; ..."``).
            on_generated: called once the completions are generated (a kill point for tests).

        Returns:
            the :class:`Experience` (N = rows x G rollouts; L = longest response) and the reward's
            extras: ``{"components": {name: (N,) tensor}, "counts": {name: int}}``.

        Raises:
            RewardError: see :meth:`score`.
        """
        import torch

        from ..algorithms.batching import TokenizedCompletion

        with self.timer("generation"):
            comps = self.generate(rows, sampling, group_size, seed)
        if on_generated is not None:
            on_generated()
        flat = [c for per in comps for c in per]
        with self.timer("scoring"):
            out = self.score(rows, [c.text for c in flat], where)
        scores = torch.tensor([float(s) for s in out.scores], dtype=torch.float32)
        items = [TokenizedCompletion(list(ids) + list(c.token_ids), len(ids))
                 for ids, per in zip(rows["token_ids"], comps) for c in per]
        resp_lens = [len(c.token_ids) for c in flat]
        with self.timer("reference"):
            ref_lp, old_lp, ent, vals = self._logprobs(items)
        mask = _pad_rows([torch.ones(n, dtype=torch.bool) for n in resp_lens])
        exp = Experience(items=items, resp_lens=resp_lens, scores=scores, mask=mask, old_logprobs=_pad_rows(old_lp),
                         ref_logprobs=_pad_rows(ref_lp), entropy=_pad_rows(ent), group_size=group_size,
                         values=_pad_rows(vals) if vals else None)
        info = {"components": {k: torch.tensor([float(x) for x in v]) for k, v in out.components.items()},
                "counts": dict(out.counts)}
        return exp, info

    def _logprobs(self, items: list) -> tuple[list, list, list, list]:
        """Reference logprobs, then the policy's old logprobs, entropies and values (in eval mode)."""
        def ref_fwd(ids, am):
            return self.reference(input_ids=ids, attention_mask=am, use_cache=False).logits, None

        ref_lp, _, _ = _forward_rows(ref_fwd, items, self.pad_id, self.device, self.temperature, self.batch_size)
        self.model.eval()
        try:
            old_lp, ent, vals = _forward_rows(lambda ids, am: self.model(ids, am, values=self.needs_values), items,
                                              self.pad_id, self.device, self.temperature, self.batch_size,
                                              entropy=True, values=self.needs_values)
        finally:
            self.model.train()
        return ref_lp, old_lp, ent, vals


def rollout_stats(exp: Experience, info: dict, gather: Callable, mean: Callable) -> dict:
    """The statistics logged per rollout step: reward mean/std and response length over every process's
    rollouts (``gather``), per-sequence KL to the reference (k1: sum of ``x = log pi - log pi_ref``; k3:
    sum of :func:`~rlhf_spec.algorithms.kl.kl_terms` ``(x, "k3")``, Schulman 2020) and token-mean
    entropy averaged over processes (``mean``), and each reward component's mean/std.

    Args:
        exp: the step's experience; info: :meth:`ExperienceMaker.make`'s extras.
        gather: ``gather((N,) tensor) -> (N_all,) tensor``; mean: ``mean(dict) -> dict`` over processes.
    """
    import torch

    from ..algorithms.kl import kl_terms
    from ..algorithms.ops import masked_mean

    kl_seq = exp.kl_tokens.sum(dim=1)
    k3 = kl_terms(exp.kl_tokens, "k3")
    k3 = torch.where(exp.mask, k3, torch.zeros_like(k3)).sum(dim=1)
    scores = gather(exp.scores)
    lengths = gather(torch.tensor(exp.resp_lens, dtype=torch.float32))
    row: dict[str, Any] = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std(unbiased=False)),
                           "response_length_mean": float(lengths.mean())}
    row.update(mean({"kl": float(kl_seq.mean()), "kl_k3": float(k3.mean()),
                     "entropy": float(masked_mean(exp.entropy, exp.mask))}))
    for name, vals in info["components"].items():
        got = gather(vals)
        row[f"reward/{name}_mean"] = float(got.mean())
        row[f"reward/{name}_std"] = float(got.std(unbiased=False))
    return row
