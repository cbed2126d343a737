"""Online RL: one experience -> train loop; PPO, GRPO, RLOO and REINFORCE++ plug into it as
:class:`~rlhf_spec.algorithms.policy_gradient.Algorithm` objects.

The loop (:func:`run_online`), once per rollout step ``s = 1 .. total_steps``:

1. **prompts**: the next ``rollout_prompts`` prompts of a seeded permutation of the prompt set (a new
   permutation per pass over it); the position is part of the checkpointed state;
2. **generation**: ``group_size`` completions per prompt from the *live* policy weights through the
   generation backend (the built-in ``transformers`` engine over the unwrapped model), seeded with
   ``derive_seed(spec seed, s)``;
3. **scoring**: the ``reward`` spec scores the completion *texts* (so the reward may use another
   tokenizer and device than the policy); a non-finite score stops the stage naming the step;
4. **logprobs**: per-token logprobs of the rollouts under the policy before the update ("old"),
   under the frozen reference policy, the per-token KL ``log pi - log pi_ref`` (k1), the policy's
   entropy, and for PPO the critic's values; ``max_kl`` stops the stage on a KL blow-up;
5. **advantages**: per algorithm (:class:`Algorithm`);
6. **optimisation**: ``ppo_epochs`` passes over the step's rollouts in a seeded order, in minibatches
   of ``minibatch_size`` rollouts (one optimizer update each), made of micro-batches of
   ``per_device_batch_size`` with gradient accumulation, through accelerate;
7. **bookkeeping**: logs one row per step (trackers and ``history.json``), evaluates every
   ``eval_every`` steps, and checkpoints every ``save_every`` steps.

Everything that decides a step (prompts, generation seed, minibatch order) is a function of the spec
seed and the step number, dropout is off by default, and a checkpoint holds the model, value head,
optimizer, scheduler and RNG states (accelerate ``save_state``) plus the KL controller, the prompt
position and the history; so a run killed at any point and resumed ends with the weights of an
uninterrupted run (the tests kill runs with SIGKILL mid-rollout and mid-optimisation and compare the
final weights within 1e-6 on CPU).

Several processes (``num_processes > 1``, started by the runner): each generates, scores and trains on
its own ``rollout_prompts / num_processes`` prompts (whole groups), gradients are averaged by DDP (or
DeepSpeed ZeRO-1/2), and the logged statistics are averaged over processes. PPO's advantage whitening
and REINFORCE++'s "global" whitening are then per process. ZeRO-3 is refused: generating from
partitioned weights needs them gathered for the whole ``generate`` call on every process.

Kill points for tests (:func:`rlhf_spec.runtime.commit_hook`): ``rollout`` with detail
``<key12>:<step>`` once a step's rollouts are generated, ``update`` with ``<key12>:<step>:<epoch>``
after each optimisation epoch, ``checkpoint`` with ``<key12>:<step>`` once a checkpoint is durable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

from ..algorithms.policy_gradient import Algorithm, Experience, OnlineTrainingStopped
from ..records import StageResult
from ..runtime import commit_hook, derive_seed, kill_point

__all__ = ["run_online", "prompt_order"]

# Salts of the seeds the loop derives from the spec seed (derive_seed(spec_seed, SALT, ...)).
_PROMPT_ORDER, _MINIBATCH_ORDER, _VALUE_HEAD, _PTX_ORDER, _EVAL, _SET_SEED = 101, 102, 103, 104, 105, 106


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
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, _PROMPT_ORDER, epoch))).tolist()
        take = min(count - len(out), n - off)
        out += perms[epoch][off : off + take]
        pos += take
    return out


def _pad_rows(rows: list, dtype=None):
    """B 1-D tensors -> (B, L) right-padded with 0."""
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


def _reward_columns(rows) -> dict:
    """Row columns other than the prompt's own, for :class:`~rlhf_spec.RewardBatch` (``reference``, ...)."""
    skip = {"prompt_id", "prompt", "token_ids", "prompt_tokens", "chosen", "rejected"}
    return {c: list(rows[c]) for c in rows.column_names if c not in skip}


def _same_vocab(a, b) -> bool:
    return len(a) == len(b) and a.get_vocab() == b.get_vocab()


class _Saver:
    """What :func:`rlhf_spec.save_policy` reads from a trainer: the accelerator, the history, the policy."""

    def __init__(self, accelerator, model, history: list, lora: bool):
        self.accelerator, self.model, self.history, self.lora = accelerator, model, history, lora

    def full_state_dict(self):
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED or self.lora:
            return None
        full = self.accelerator.get_state_dict(self.model)
        return None if full is None else {k[len("policy."):]: v for k, v in full.items() if k.startswith("policy.")}

    def unwrapped(self):
        policy = self.accelerator.unwrap_model(self.model).policy
        return policy.merge_and_unload() if self.lora else policy


# ----------------------------------------------------------------------------- the loop


class _Loop:
    """State and phases of one online training run (see the module docstring)."""

    def __init__(self, ctx, algo: Algorithm):
        self.ctx, self.p, self.algo = ctx, ctx.params, algo
        self.history: list[dict] = []
        self.evals: list[list] = []
        self.last_ckpt: Optional[int] = None
        self.ckpt_dir = Path(ctx.partial_dir) / "checkpoints"

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate.utils import set_seed

        from ..backends.transformers import TransformersEngine
        from .trainer import configure_deepspeed, flat_config, make_accelerator, prepare_model
        from ..algorithms.value_head import ActorCritic, ValueHead

        ctx, p = self.ctx, self.p
        src = ctx.model("policy")
        self.tok = src.load_tokenizer(padding_side="left")
        self.pad_id = self.tok.pad_token_id
        with ctx.timer("load_data"):
            self._load_prompts()
        self.accelerator = acc = make_accelerator(p, Path(ctx.partial_dir) / "tensorboard")
        self.world, self.rank = acc.num_processes, acc.process_index
        ds_plugin = getattr(acc.state, "deepspeed_plugin", None)
        if ds_plugin is not None and ds_plugin.zero_stage == 3:
            raise ValueError("online training does not support DeepSpeed ZeRO-3 yet: generating from partitioned live weights "
                             "needs them gathered for the whole generate call on every process; use ZeRO stage 2 (with "
                             "offload_optimizer for CPU-offloaded AdamW states) or one process")
        set_seed(derive_seed(ctx.seed, _SET_SEED))
        with ctx.timer("load_models"):
            ctx.progress.note("loading policy and reference")
            policy = src.load_causal_lm()
            ref_src = ctx.model("reference") if p.reference else src
            if p.reference and not _same_vocab(ref_src.load_tokenizer(), self.tok):
                raise ValueError("the reference policy must use the policy's tokenizer (its logprobs are read on the policy's tokens)")
            self.reference = ref_src.load_causal_lm(device=acc.device)
            self.reference.requires_grad_(False)
            critic = self._critic() if self.algo.needs_values and getattr(p, "critic", None) else None
        policy = prepare_model(policy, p, "CAUSAL_LM")
        head = None
        if self.algo.needs_values and critic is None:
            head = ValueHead(policy.config.hidden_size, seed=derive_seed(ctx.seed, _VALUE_HEAD))
        model = ActorCritic(policy, head, critic)
        model.train()
        self.rollouts_local = p.rollout_prompts // self.world * p.group_size
        self.micro = p.per_device_batch_size
        self.gas = p.gradient_accumulation_steps
        self.micro_per_epoch = self.rollouts_local // self.micro
        self.updates_per_step = p.ppo_epochs * self.micro_per_epoch // self.gas
        self.num_updates = p.total_steps * self.updates_per_step
        opt, self.scheduler = self._optimizer(model)
        configure_deepspeed(acc, p)
        self.model, self.optimizer = acc.prepare(model, opt)
        acc.register_for_checkpointing(self.scheduler)
        acc.init_trackers(ctx.stage_id, config=flat_config(p))
        with ctx.timer("load_reward"):
            ctx.progress.note("loading reward")
            self.reward = ctx.reward("reward")
        self.engine = TransformersEngine(self.live_policy(), self.tok, p.backend.parsed)
        self.temperature = p.temperature if p.temperature > 0 else 1.0

    def _load_prompts(self) -> None:
        """Training and held-out prompts within ``max_prompt_tokens`` (ValueError if no training prompt is left),
        and the PPO-ptx items."""
        from ..stages.sample import prepare_prompts

        ctx, p = self.ctx, self.p
        self.rows, self.skipped = prepare_prompts(self.tok, ctx.dataset("prompts"), p.max_prompt_tokens)
        if len(self.rows) == 0:
            raise ValueError("no training prompts left after max_prompt_tokens")
        self.eval_rows = None
        if p.eval_prompts:
            ev, _ = prepare_prompts(self.tok, ctx.dataset("eval_prompts"), p.max_prompt_tokens)
            if p.eval_limit:
                ev = ev.select(range(min(p.eval_limit, len(ev))))
            self.eval_rows = ev if len(ev) else None
        self.ptx_items = self._ptx_items()

    def live_policy(self):
        return self.accelerator.unwrap_model(self.model).policy

    def _critic(self):
        p, src = self.p, self.ctx.model("critic")
        if not _same_vocab(src.load_tokenizer(), self.tok):
            raise ValueError("the critic must use the policy's tokenizer: its values are read per policy token; "
                             "leave params.critic unset for a value head on the policy, or use a critic built on the policy's backbone")
        critic = src.load_sequence_classifier(num_labels=1)
        if critic.config.pad_token_id is None:
            critic.config.pad_token_id = self.pad_id
        if p.disable_dropout:
            from .trainer import disable_dropout

            disable_dropout(critic)
        if p.gradient_checkpointing and hasattr(critic, "gradient_checkpointing_enable"):
            critic.gradient_checkpointing_enable()
        return critic

    def _optimizer(self, model):
        from .trainer import make_optimizer

        p = self.p
        if p.optimizer == "adamw":
            return make_optimizer(model, p, self.num_updates)
        import bitsandbytes as bnb
        from transformers import get_scheduler

        trainable = [q for q in model.parameters() if q.requires_grad]
        opt = bnb.optim.AdamW8bit(trainable, lr=p.learning_rate, betas=tuple(p.betas), eps=p.eps, weight_decay=p.weight_decay)
        sched = get_scheduler(p.scheduler, opt, num_warmup_steps=int(p.warmup_ratio * self.num_updates),
                              num_training_steps=self.num_updates)
        return opt, sched

    def _ptx_items(self):
        p = self.p
        if not getattr(p, "ptx_coef", 0.0):
            return None
        from ..algorithms.batching import tokenize_completions

        rows = self.ctx.dataset("ptx_dataset")
        if len(rows) == 0:
            raise ValueError("ptx_dataset has no rows")
        column = "completion" if "completion" in rows.column_names else "chosen"
        return tokenize_completions(self.tok, list(rows["prompt"]), list(rows[column]), p.max_prompt_tokens,
                                    p.ptx_max_response_tokens)

    # -- checkpoints -------------------------------------------------------------------------

    def _latest(self):
        from .trainer import latest_checkpoint

        return latest_checkpoint(self.ckpt_dir)

    def resume(self) -> int:
        """Load the newest checkpoint, if any; returns the number of finished steps."""
        latest = self._latest()
        if latest is None:
            return 0
        path, _ = latest
        self.accelerator.load_state(str(path))
        state = json.loads((path / "state.json").read_text())
        self.history = state.get("history", [])
        self.evals = state.get("evals", [])
        self.algo.load_state_dict(state.get("algorithm", {}))
        step = int(state["step"])
        if state.get("prompt_position") != step * self.p.rollout_prompts:
            raise RuntimeError(f"checkpoint {path.name}: prompt position {state.get('prompt_position')} does not match step {step}")
        self.last_ckpt = step
        return step

    def save(self, step: int) -> None:
        from ..cache.fs import atomic_write_json, commit_tree

        acc = self.accelerator
        name = f"step-{step:07d}"
        final, tmp = self.ckpt_dir / name, self.ckpt_dir / f".{name}.tmp"
        acc.wait_for_everyone()
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(tmp / "state.json", {
                "step": step, "prompt_position": step * self.p.rollout_prompts, "algorithm": self.algo.state_dict(),
                "history": self.history, "evals": self.evals})
            commit_tree(tmp, final, replace=True)
            atomic_write_json(self.ckpt_dir / "latest.json", {"dir": name, "step": step})
            for old in self.ckpt_dir.glob("step-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
            commit_hook("checkpoint", f"{self.ctx.key[:12]}:{step}")
        acc.wait_for_everyone()
        self.last_ckpt = step

    def kept(self) -> str:
        return (f"the last checkpoint (step {self.last_ckpt}) is kept" if self.last_ckpt
                else "no checkpoint had been written yet")

    # -- collectives -------------------------------------------------------------------------

    def _mean(self, values: dict) -> dict:
        """Means over processes (each process's value weighs the same)."""
        if self.world == 1 or not values:
            return values
        import torch

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, (float(x) for x in t.tolist())))

    def _gather(self, t):
        return t if self.world == 1 else self.accelerator.gather(t.to(self.accelerator.device)).cpu()

    def _any(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # -- one step ----------------------------------------------------------------------------

    def _generate(self, rows, sampling, n: int, seed: int) -> list[list]:
        policy = self.live_policy()
        was_training = policy.training
        policy.eval()
        try:
            self.engine.model = policy
            return self.engine.generate([list(t) for t in rows["token_ids"]], sampling, n, seed)
        finally:
            policy.train(was_training)

    def _score(self, rows, texts: list[str], n: int, where: str):
        from ..context import RewardError
        from ..records import RewardBatch

        prompts = [pr for pr in rows["prompt"] for _ in range(n)]
        cols = {k: [v for v in vals for _ in range(n)] for k, vals in _reward_columns(rows).items()}
        err = None
        try:
            out = self.reward.score(RewardBatch(prompts, texts, cols))
        except RewardError as exc:
            err, out = exc, None
        if self._any(err is not None):
            msg = str(err) if err is not None else "a reward on another process returned an unusable value"
            raise RewardError(f"{msg} {where}; {self.kept()}") from err
        return out

    def experience(self, step: int) -> tuple[Experience, dict]:
        import torch

        from ..algorithms.batching import TokenizedCompletion

        ctx, p = self.ctx, self.p
        per_rank = p.rollout_prompts // self.world
        order = prompt_order(len(self.rows), ctx.seed, (step - 1) * p.rollout_prompts, p.rollout_prompts)
        rows = self.rows.select(order[self.rank * per_rank : (self.rank + 1) * per_rank])
        G = p.group_size
        with ctx.timer("generation"):
            comps = self._generate(rows, p.sampling(), G, derive_seed(ctx.seed, step))
        kill_point("rollout", f"{ctx.key[:12]}:{step}")
        flat = [c for per in comps for c in per]
        with ctx.timer("scoring"):
            out = self._score(rows, [c.text for c in flat], G, f"at rollout step {step}")
        scores = torch.tensor([float(s) for s in out.scores], dtype=torch.float32)
        items = [TokenizedCompletion(list(ids) + list(c.token_ids), len(ids))
                 for ids, per in zip(rows["token_ids"], comps) for c in per]
        resp_lens = [len(c.token_ids) for c in flat]
        with ctx.timer("reference"):
            ref_fwd = lambda ids, am: (self.reference(input_ids=ids, attention_mask=am, use_cache=False).logits, None)  # noqa: E731
            ref_lp, _, _ = _forward_rows(ref_fwd, items, self.pad_id, self.accelerator.device, self.temperature,
                                         p.logprob_batch_size)
            self.model.eval()
            try:
                pol_fwd = lambda ids, am: self.model(ids, am, values=self.algo.needs_values)  # noqa: E731
                old_lp, ent, vals = _forward_rows(pol_fwd, items, self.pad_id, self.accelerator.device, self.temperature,
                                                  p.logprob_batch_size, entropy=True, values=self.algo.needs_values)
            finally:
                self.model.train()
        mask = _pad_rows([torch.ones(n, dtype=torch.bool) for n in resp_lens])
        exp = Experience(items=items, resp_lens=resp_lens, scores=scores, mask=mask, old_logprobs=_pad_rows(old_lp),
                         ref_logprobs=_pad_rows(ref_lp), entropy=_pad_rows(ent), group_size=G,
                         values=_pad_rows(vals) if vals else None)
        info = {"components": {k: torch.tensor([float(x) for x in v]) for k, v in out.components.items()},
                "counts": dict(out.counts)}
        return exp, info

    def step_stats(self, exp: Experience, info: dict) -> dict:
        import torch

        from ..algorithms.ops import masked_mean

        kl_seq = exp.kl_tokens.sum(dim=1)
        k3 = (torch.expm1(-exp.kl_tokens) + exp.kl_tokens).clamp_min(0)
        k3 = torch.where(exp.mask, k3, torch.zeros_like(k3)).sum(dim=1)
        scores = self._gather(exp.scores)
        lengths = self._gather(torch.tensor(exp.resp_lens, dtype=torch.float32))
        row = {"reward_mean": float(scores.mean()), "reward_std": float(scores.std(unbiased=False)),
               "response_length_mean": float(lengths.mean())}
        row.update(self._mean({"kl": float(kl_seq.mean()), "kl_k3": float(k3.mean()),
                               "entropy": float(masked_mean(exp.entropy, exp.mask))}))
        for name, vals in info["components"].items():
            got = self._gather(vals)
            row[f"reward/{name}_mean"] = float(got.mean())
            row[f"reward/{name}_std"] = float(got.std(unbiased=False))
        return row

    def optimise(self, exp: Experience, step: int) -> dict:
        import torch

        from ..algorithms.batching import pad_batch
        from .trainer import TrainingDiverged
        from ..algorithms.value_head import gather_response, response_positions

        p, acc = self.p, self.accelerator
        N = len(exp)
        sums: dict[str, float] = {}
        count = 0
        token_mean = self.algo.token_mean()
        for epoch in range(p.ppo_epochs):
            g = torch.Generator().manual_seed(derive_seed(self.ctx.seed, _MINIBATCH_ORDER, step, epoch))
            perm = torch.randperm(N, generator=g).tolist()
            micros = [perm[i : i + self.micro] for i in range(0, N, self.micro)]
            for k, idx in enumerate(micros):
                first = (k // self.gas) * self.gas
                mb_tokens = sum(exp.resp_lens[i] for m in micros[first : first + self.gas] for i in m)
                weight = sum(exp.resp_lens[i] for i in idx) * self.gas / mb_tokens if token_mean else 1.0
                ptx = self._ptx_batch(step, epoch, k)
                with acc.accumulate(self.model):
                    rl_items = [exp.items[i] for i in idx]
                    seqs = [it.input_ids for it in rl_items] + [it.input_ids for it in ptx]
                    batch = pad_batch(seqs, self.pad_id, device=acc.device)
                    logits, values = self.model(batch["input_ids"], batch["attention_mask"], values=self.algo.needs_values)
                    b = len(rl_items)
                    lens = [exp.resp_lens[i] for i in idx]
                    pos, mask = response_positions([it.prompt_len for it in rl_items], lens, device=acc.device)
                    lp, _, v = gather_response(logits[:b], batch["input_ids"][:b], pos, mask, self.temperature,
                                               values=values[:b] if values is not None else None)
                    loss, stats = self.algo.loss(lp, v, exp, idx, max(lens))
                    loss = loss * weight
                    if ptx:
                        pl = [len(it.input_ids) - it.prompt_len for it in ptx]
                        ppos, pmask = response_positions([it.prompt_len for it in ptx], pl, device=acc.device)
                        plp, _, _ = gather_response(logits[b:], batch["input_ids"][b:], ppos, pmask, 1.0)
                        ptx_loss = -(plp.sum() / pmask.sum())
                        loss = loss + p.ptx_coef * ptx_loss
                        stats["ptx_loss"] = float(ptx_loss.detach())
                    if not torch.isfinite(loss.detach()).all():
                        raise TrainingDiverged(f"loss is {loss.item()} at rollout step {step} (epoch {epoch + 1}, "
                                               f"micro-batch {k + 1}); lower params.learning_rate; {self.kept()}")
                    acc.backward(loss)
                    if acc.sync_gradients and p.max_grad_norm:
                        acc.clip_grad_norm_(self.model.parameters(), p.max_grad_norm)
                    self.optimizer.step()
                    if acc.sync_gradients:
                        self.scheduler.step()
                    self.optimizer.zero_grad()
                for key, val in stats.items():
                    sums[key] = sums.get(key, 0.0) + val
                count += 1
            kill_point("update", f"{self.ctx.key[:12]}:{step}:{epoch}")
        return self._mean({k: v / max(1, count) for k, v in sums.items()})

    def _ptx_batch(self, step: int, epoch: int, k: int) -> list:
        """The PPO-ptx rows of micro-step ``k`` of ``epoch`` of ``step``: consecutive rows of a seeded
        permutation of the SFT data per pass, so the choice depends only on the position."""
        if not self.ptx_items:
            return []
        n, b = len(self.ptx_items), self.micro
        micro_index = ((step - 1) * self.p.ppo_epochs + epoch) * self.micro_per_epoch + k
        start = (micro_index * self.world + self.rank) * b
        return [self.ptx_items[i] for i in prompt_order(n, derive_seed(self.ctx.seed, _PTX_ORDER), start, b)]

    def evaluate(self, step: int) -> Optional[float]:
        if self.eval_rows is None:
            return None
        from ..backends import SamplingParams

        p = self.p
        sampling = SamplingParams(temperature=p.eval_temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens)
        with self.ctx.timer("evaluation"):
            comps = self._generate(self.eval_rows, sampling, 1, derive_seed(self.ctx.seed, _EVAL))
            out = self._score(self.eval_rows, [c[0].text for c in comps], 1, f"in the evaluation after rollout step {step}")
        return sum(float(s) for s in out.scores) / len(out.scores)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> dict:
        ctx, p, acc = self.ctx, self.p, self.accelerator
        done = self.resume()
        resumed_from = done if done else None
        ctx.progress.start(p.total_steps, unit="steps")
        ctx.progress.advance(done)
        if done == 0 and self.eval_rows is not None:
            self.evals.append([0, self.evaluate(0)])
        steps_run = 0
        for step in range(done + 1, p.total_steps + 1):
            ctx.progress.note(f"rollout step {step}/{p.total_steps}")
            exp, info = self.experience(step)
            row = self.step_stats(exp, info)
            row["kl_coef"] = self.algo.kl_coef
            if p.max_kl is not None and self._any(row["kl"] > p.max_kl):
                raise OnlineTrainingStopped(
                    f"KL(policy || reference) is {row['kl']:.6g} nats per sequence at rollout step {step}, above "
                    f"max_kl {p.max_kl}; stopped before updating on it; {self.kept()} (lower learning_rate, raise kl_coef or raise max_kl)")
            with ctx.timer("advantages"):
                row.update(self._mean(self.algo.prepare(exp)))
            with ctx.timer("optimisation"):
                row.update(self.optimise(exp, step))
            self.algo.after_step(row["kl"], len(exp) * self.world)
            row["learning_rate"] = float(self.scheduler.get_last_lr()[0])
            for name, n in info["counts"].items():
                row[f"reward_count/{name}"] = n
            if self.eval_rows is not None and ((p.eval_every and step % p.eval_every == 0) or step == p.total_steps):
                value = self.evaluate(step)
                self.evals.append([step, value])
                row["eval_reward_mean"] = value
            row["step"] = step
            self.history.append(row)
            if step % p.log_every == 0 or step == p.total_steps:
                acc.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=step)
            steps_run += 1
            ctx.progress.advance(1)
            if step < p.total_steps and step % p.save_every == 0:
                self.save(step)
        return self.final(resumed_from, steps_run)

    def final(self, resumed_from, steps_run: int) -> dict:
        p = self.p
        out: dict[str, Any] = {"algorithm": self.algo.name, "steps": p.total_steps,
                               "rollouts_per_step": p.rollout_prompts * p.group_size, "updates": self.num_updates,
                               "processes": self.world, "prompts": len(self.rows), "prompts_skipped_too_long": self.skipped}
        last = self.history[-1] if self.history else {}
        for k, v in last.items():
            if k not in ("step", "eval_reward_mean") and isinstance(v, (int, float)):
                out[f"{k}_last"] = v
        if self.history:
            out["reward_mean_first"] = self.history[0]["reward_mean"]
        if self.evals:
            out["eval_reward_mean_first"], out["eval_reward_mean_last"] = self.evals[0][1], self.evals[-1][1]
            out["eval_steps"] = [s for s, _ in self.evals]
        if resumed_from is not None:
            out["resumed_from_step"] = resumed_from
        timings = self.ctx.output.timings
        for name in ("generation", "scoring", "reference", "optimisation"):
            out[f"seconds_per_step_{name}"] = round(timings.get(name, 0.0) / steps_run, 4) if steps_run else None
        for tracker in self.accelerator.trackers:
            tracker.finish()
        return out


def run_online(ctx, make_algorithm: Callable) -> StageResult:
    """Run (or resume) online training with ``make_algorithm(params)`` and save the policy.

    The value head (or critic) is not part of the ``policy`` artifact; with ``save_value_model`` it is
    written beside it, under ``value_model/``.

    Raises:
        RewardError: a reward returned an unusable value (the message names the step).
        OnlineTrainingStopped: KL past ``max_kl``. TrainingDiverged: a NaN/inf loss.
    """
    from .save import save_policy

    loop = _Loop(ctx, make_algorithm(ctx.params))
    loop.setup()
    metrics = loop.run()
    with ctx.timer("save"):
        save_policy(ctx, _Saver(loop.accelerator, loop.model, loop.history, ctx.params.lora is not None), loop.tok)
        if getattr(ctx.params, "save_value_model", False):
            _save_value_model(ctx, loop)
    return StageResult(metrics=metrics)


def _save_value_model(ctx, loop: _Loop) -> None:
    """``value_model/``: the critic's ``save_pretrained`` folder, or the value head's weights
    (``value_head.safetensors``, keys ``summary.weight`` and ``summary.bias``) with ``value_head.json``."""
    if not loop.accelerator.is_main_process:
        return
    ac = loop.accelerator.unwrap_model(loop.model)
    out = ctx.out_dir / "value_model"
    if ac.critic is not None:
        ac.critic.save_pretrained(str(out))
    elif ac.value_head is not None:
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in ac.value_head.state_dict().items()}, str(out / "value_head.safetensors"))
        (out / "value_head.json").write_text(json.dumps({"hidden_size": ac.value_head.hidden_size,
                                                          "reads": "the policy's last hidden state at position t - 1"}))
