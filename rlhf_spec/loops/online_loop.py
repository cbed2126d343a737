"""Online RL: one experience -> train loop; PPO, GRPO, RLOO and REINFORCE++ plug into it as
:class:`~rlhf_spec.algorithms.policy_gradient.Algorithm` objects.

The loop (:func:`run_online`), once per rollout step ``s = 1 .. total_steps``:

1. **prompts**: the next ``rollout_prompts`` prompts of a seeded permutation of the prompt set (a new
   permutation per pass over it); the position is part of the checkpointed state;
2. **experience** (:class:`~rlhf_spec.loops.experience.ExperienceMaker`): ``group_size`` completions
   per prompt from the *live* policy weights through the generation engine the stage gives, seeded
   with ``derive_seed(spec seed, s)``; their scores from the reward the stage gives (a non-finite score
   stops the stage naming the step); per-token logprobs under the policy before the update ("old")
   and the frozen reference policy, the per-token KL ``log pi - log pi_ref`` (k1), the policy's
   entropy, and for PPO the critic's values; ``max_kl`` stops the stage on a KL blow-up;
3. **advantages**: per algorithm (:class:`Algorithm`);
4. **optimisation**: ``ppo_epochs`` passes over the step's rollouts in a seeded order, in minibatches
   of ``minibatch_size`` rollouts (one optimizer update each), made of micro-batches of
   ``per_device_train_batch_size`` with gradient accumulation, on the accelerate core
   (:class:`~rlhf_spec.loops.core.TrainingCore`, shared with :class:`~rlhf_spec.loops.trainer.Trainer`);
5. **bookkeeping**: logs one row per step (trackers and ``history.json``), evaluates every
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

from pathlib import Path
from typing import Any, Callable, Optional

from ..algorithms.policy_gradient import Algorithm, Experience, OnlineTrainingStopped
from ..records import StageResult
from ..runtime import derive_seed, kill_point
from .core import TrainingCore
from .experience import ExperienceMaker, rollout_stats
from .online_setup import EVAL, SET_SEED, VALUE_HEAD, OnlineInputs, load_online_models, prompt_order
from .online_update import PolicyUpdate

__all__ = ["run_online"]


class _Loop:
    """State and phases of one online training run (see the module docstring)."""

    def __init__(self, ctx, algo: Algorithm, inputs: OnlineInputs):
        self.ctx, self.p, self.algo, self.inp = ctx, ctx.params, algo, inputs
        self.evals: list[list] = []

    def setup(self) -> None:
        ctx, p, inp = self.ctx, self.p, self.inp
        part = Path(ctx.partial_dir)
        self.core = core = TrainingCore(p, part / "tensorboard", part / "checkpoints", derive_seed(ctx.seed, SET_SEED),
                                        prefix="step", state_file="state.json")
        ds_plugin = getattr(core.accelerator.state, "deepspeed_plugin", None)
        if ds_plugin is not None and ds_plugin.zero_stage == 3:
            raise ValueError("online training does not support DeepSpeed ZeRO-3 yet: generating from partitioned live "
                             "weights needs them gathered for the whole generate call on every process; use ZeRO stage "
                             "2 (with offload_optimizer for CPU-offloaded AdamW states) or one process")
        model, reference = load_online_models(ctx, inp.tokenizer, self.algo.needs_values, core.accelerator.device,
                                              derive_seed(ctx.seed, VALUE_HEAD))
        micro_per_epoch = p.rollout_prompts // core.world * p.group_size // p.per_device_train_batch_size
        self.num_updates = p.total_steps * (p.ppo_epochs * micro_per_epoch // p.gradient_accumulation_steps)
        core.prepare(model, self.num_updates, ctx.stage_id, part="policy")
        temperature, pad_id = (p.temperature if p.temperature > 0 else 1.0), inp.tokenizer.pad_token_id
        engine = inp.make_engine(self.live_policy())
        self.maker = ExperienceMaker(engine, inp.reward, reference, core.model, self.live_policy, pad_id=pad_id,
                                     device=core.accelerator.device, temperature=temperature,
                                     logprob_batch_size=p.logprob_batch_size, needs_values=self.algo.needs_values,
                                     any_process=core.any_process, timer=ctx.timer)
        self.update = PolicyUpdate(core, self.algo, p, seed=ctx.seed, pad_id=pad_id, temperature=temperature,
                                   ptx_items=inp.ptx_items, micro_per_epoch=micro_per_epoch)

    def live_policy(self):
        return self.core.accelerator.unwrap_model(self.core.model).policy

    def resume(self) -> int:
        """Load the newest checkpoint, if any; returns the number of finished steps."""
        loaded = self.core.load_checkpoint()
        if loaded is None:
            return 0
        path, _, state = loaded
        self.evals = state.get("evals", [])
        self.algo.load_state_dict(state.get("algorithm", {}))
        step = int(state["step"])
        if state.get("prompt_position") != step * self.p.rollout_prompts:
            raise RuntimeError(f"checkpoint {path.name}: prompt position {state.get('prompt_position')} "
                               f"does not match step {step}")
        return step

    def save(self, step: int) -> None:
        state = {"step": step, "prompt_position": step * self.p.rollout_prompts, "algorithm": self.algo.state_dict(),
                 "evals": self.evals}
        self.core.save_checkpoint(step, state, {"step": step}, f"{self.ctx.key[:12]}:{step}")

    def kept(self) -> str:
        last = self.core.last_checkpoint
        return f"the last checkpoint (step {last}) is kept" if last else "no checkpoint had been written yet"

    def experience(self, step: int) -> tuple[Experience, dict]:
        ctx, p, core = self.ctx, self.p, self.core
        per_rank = p.rollout_prompts // core.world
        order = prompt_order(len(self.inp.prompts), ctx.seed, (step - 1) * p.rollout_prompts, p.rollout_prompts)
        rows = self.inp.prompts.select(order[core.rank * per_rank : (core.rank + 1) * per_rank])
        return self.maker.make(rows, p.sampling(), p.group_size, derive_seed(ctx.seed, step),
                               f"at rollout step {step}; {self.kept()}",
                               on_generated=lambda: kill_point("rollout", f"{ctx.key[:12]}:{step}"))

    def _epoch_done(self, step: int, epoch: int) -> None:
        kill_point("update", f"{self.ctx.key[:12]}:{step}:{epoch}")

    def evaluate(self, step: int) -> Optional[float]:
        rows = self.inp.eval_prompts
        if rows is None:
            return None
        with self.ctx.timer("evaluation"):
            comps = self.maker.generate(rows, self.inp.eval_sampling, 1, derive_seed(self.ctx.seed, EVAL))
            where = f"in the evaluation after rollout step {step}; {self.kept()}"
            out = self.maker.score(rows, [c[0].text for c in comps], where)
        return sum(float(s) for s in out.scores) / len(out.scores)

    def run(self) -> dict:
        ctx, p, core = self.ctx, self.p, self.core
        done = self.resume()
        ctx.progress.start(p.total_steps, unit="steps")
        ctx.progress.advance(done)
        if done == 0 and self.inp.eval_prompts is not None:
            self.evals.append([0, self.evaluate(0)])
        for step in range(done + 1, p.total_steps + 1):
            ctx.progress.note(f"rollout step {step}/{p.total_steps}")
            exp, info = self.experience(step)
            row = rollout_stats(exp, info, core.gather, core.mean)
            row["kl_coef"] = self.algo.kl_coef
            if p.max_kl is not None and core.any_process(row["kl"] > p.max_kl):
                raise OnlineTrainingStopped(
                    f"KL(policy || reference) is {row['kl']:.6g} nats per sequence at rollout step {step}, above "
                    f"max_kl {p.max_kl}; stopped before updating on it; {self.kept()} "
                    "(lower learning_rate, raise kl_coef or raise max_kl)")
            with ctx.timer("advantages"):
                row.update(core.mean(self.algo.prepare(exp)))
            with ctx.timer("optimisation"):
                row.update(self.update.run(exp, step, self.kept(), self._epoch_done))
            self.algo.after_step(row["kl"], len(exp) * core.world)
            row["learning_rate"] = core.learning_rate()
            row.update({f"reward_count/{name}": n for name, n in info["counts"].items()})
            due = (p.eval_every and step % p.eval_every == 0) or step == p.total_steps
            if self.inp.eval_prompts is not None and due:
                self.evals.append([step, self.evaluate(step)])
                row["eval_reward_mean"] = self.evals[-1][1]
            row["step"] = step
            core.history.append(row)
            if step % p.log_every == 0 or step == p.total_steps:
                core.log(row, step, skip="step")
            ctx.progress.advance(1)
            if step < p.total_steps and step % p.save_every == 0:
                self.save(step)
        return self.final(done if done else None, p.total_steps - done)

    def final(self, resumed_from: Optional[int], steps_run: int) -> dict:
        p, history = self.p, self.core.history
        out: dict[str, Any] = {"algorithm": self.algo.name, "steps": p.total_steps,
                               "rollouts_per_step": p.rollout_prompts * p.group_size, "updates": self.num_updates,
                               "processes": self.core.world, "prompts": len(self.inp.prompts),
                               "prompts_skipped_too_long": self.inp.skipped}
        for k, v in (history[-1] if history else {}).items():
            if k not in ("step", "eval_reward_mean") and isinstance(v, (int, float)):
                out[f"{k}_last"] = v
        if history:
            out["reward_mean_first"] = history[0]["reward_mean"]
        if self.evals:
            out["eval_reward_mean_first"], out["eval_reward_mean_last"] = self.evals[0][1], self.evals[-1][1]
            out["eval_steps"] = [s for s, _ in self.evals]
        if resumed_from is not None:
            out["resumed_from_step"] = resumed_from
        timings = self.ctx.output.timings
        for name in ("generation", "scoring", "reference", "optimisation"):
            out[f"seconds_per_step_{name}"] = round(timings.get(name, 0.0) / steps_run, 4) if steps_run else None
        self.core.finish_trackers()
        return out


def run_online(ctx, make_algorithm: Callable, inputs: OnlineInputs) -> StageResult:
    """Run (or resume) online training with ``make_algorithm(params)`` on ``inputs`` and save the policy.

    The value head (or critic) is not part of the ``policy`` artifact; with ``save_value_model`` it is
    written beside it, under ``value_model/``.

    Raises:
        RewardError: a reward returned an unusable value (the message names the step).
        OnlineTrainingStopped: KL past ``max_kl``. TrainingDiverged: a NaN/inf loss.
        ValueError: DeepSpeed ZeRO-3, or a reference policy or critic with another tokenizer.
    """
    from .save import save_policy, save_value_model

    loop = _Loop(ctx, make_algorithm(ctx.params), inputs)
    loop.setup()
    metrics = loop.run()
    with ctx.timer("save"):
        save_policy(ctx, loop.core, inputs.tokenizer)
        if getattr(ctx.params, "save_value_model", False):
            save_value_model(ctx, loop.core)
    return StageResult(metrics=metrics)
