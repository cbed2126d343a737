"""The training loop shared by the built-in ``train`` implementations, and their shared params.

:class:`Trainer` is a loop over row indices on the accelerate core (:class:`~rlhf_spec.loops.core.TrainingCore`:
one process here; ``accelerate launch`` starts more). It checkpoints every ``save_every`` updates
(model, optimizer, scheduler, every RNG state, and the data position), and resumes from the last
checkpoint after a crash with the same data order, so a resumed run matches an uninterrupted one
where the computation is deterministic.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..records import NotInKey
from .core import TrainingCore, TrainingDiverged, apply_lora, autocast, prepare_model

# Names the train stages and plugins import from this module (their one copy is in .core).
__all__ = ["LoraParams", "OptimParams", "Trainer", "TrainingDiverged", "apply_lora", "autocast"]


class LoraParams(BaseModel):
    """LoRA adapters via peft (Hu et al. 2021). The saved model has the adapters merged."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names to adapt."
    )


#: Old train param names -> their names now (read with a FutureWarning).
OLD_PARAM_NAMES = {"lr": "learning_rate", "per_device_batch_size": "per_device_train_batch_size"}


class OptimParams(BaseModel):
    """Optimizer, schedule, batch and distribution settings shared by every ``train`` implementation.

    Global batch = ``per_device_train_batch_size * gradient_accumulation_steps * num_processes``.
    """

    model_config = ConfigDict(extra="forbid")
    #: Renamed fields keep the name their cache keys were written with (see rlhf_spec.refs.key_name).
    key_names: ClassVar[dict[str, str]] = {"per_device_train_batch_size": "per_device_batch_size"}

    learning_rate: float = Field(3e-7, gt=0, le=1.0, description="Peak learning rate (AdamW).")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        # earlier names, read with a FutureWarning so that older specs keep working: 'lr' (up to 0.1) and
        # 'per_device_batch_size' (up to 0.2; transformers and TRL name it per_device_train_batch_size)
        if not isinstance(data, dict):
            return data
        for old, new in OLD_PARAM_NAMES.items():
            if old in data:
                if new in data:
                    raise ValueError(f"give '{new}' only ('{old}' is its old name)")
                warnings.warn(f"train params: '{old}' is now called '{new}'", FutureWarning, stacklevel=2)
                data = {(new if k == old else k): v for k, v in data.items()}
        return data

    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(1e-6, ge=0, description="AdamW weight decay.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "cosine", description="LR schedule (transformers.get_scheduler).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of updates spent warming up.")
    per_device_train_batch_size: int = Field(1, ge=1, le=4096, description="Pairs per micro-batch per process.")
    gradient_accumulation_steps: int = Field(16, ge=1, le=65536, description="Micro-batches per optimizer update.")
    num_processes: int = Field(1, ge=1, le=4096, description="Processes (GPUs); more than 1 runs under 'accelerate "
                                                             "launch'.")
    total_episodes: Optional[int] = Field(None, ge=1, description="Pairs to train on in total (REBEL: 60000). "
                                                                  "Overrides epochs.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs when total_episodes is unset.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    disable_dropout: bool = Field(True, description="Set every dropout probability to 0 (REBEL does).")
    lora: Optional[LoraParams] = Field(None, description="Train LoRA adapters instead of all weights.")
    accelerate_config: Optional[str] = Field(None, description="accelerate config file (e.g. DeepSpeed ZeRO-3) for "
                                                               "multi-process runs.")
    max_grad_norm: Optional[float] = Field(None, gt=0, description="Clip the gradient norm (None: no clipping, as "
                                                                   "REBEL).")
    save_every: Annotated[int, NotInKey()] = Field(200, ge=1, description="Checkpoint every N updates for resume. Not "
                                                                          "part of the key.")
    log_every: Annotated[int, NotInKey()] = Field(1, ge=1, description="Log to the trackers every N updates. Not part "
                                                                       "of the key.")
    log_with: Annotated[list[Literal["tensorboard", "wandb", "mlflow"]], NotInKey()] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers (accelerate's log_with); wandb and mlflow need their package installed. Not "
                    "part of the key.")

    @field_validator("log_with")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        import importlib.util

        missing = [t for t in v if t != "tensorboard" and importlib.util.find_spec(t) is None]
        if missing:
            raise ValueError(f"tracker package {missing[0]!r} is not installed (pip install {missing[0]})")
        return v

    def global_batch(self) -> int:
        return self.per_device_train_batch_size * self.gradient_accumulation_steps * self.num_processes

    def num_updates(self, n_train: int) -> int:
        """Optimizer updates for ``n_train`` training rows (at least 1).

        Raises:
            ValueError: if there are no training rows.
        """
        if n_train <= 0:
            raise ValueError("no training rows")
        episodes = self.total_episodes if self.total_episodes else int(math.ceil(self.epochs * n_train))
        return max(1, episodes // self.global_batch())


class Trainer(TrainingCore):
    """A small accelerate training loop over row indices with checkpoint/resume and experiment tracking.

    Args:
        params: the stage's :class:`OptimParams` (subclass).
        model: the model to train (already on CPU; accelerate moves it).
        n_train: number of training rows; batches are lists of row indices.
        step: ``step(model, indices) -> (loss tensor, stats dict of floats)`` for one micro-batch.
        ckpt_dir: where checkpoints live (the stage's ``partial_dir/checkpoints``).
        log_dir: where the trackers write (TensorBoard event files under ``log_dir/<run_name>``).
        seed: seeds the data order (epoch ``e`` uses ``seed + e``) and every RNG.
        progress: :class:`rlhf_spec.Progress`, advanced per update.
        evaluate: optional ``evaluate(model) -> dict`` run every ``eval_every`` updates and at the end.
        task_type: peft task type for LoRA (``"CAUSAL_LM"`` or ``"SEQ_CLS"``).
        run_name: the trackers' run name (the stage id).
    """

    def __init__(self, params: OptimParams, model, n_train: int, step: Callable, ckpt_dir: Path, log_dir: Path,
                 seed: int, progress=None, evaluate: Optional[Callable] = None, eval_every: Optional[int] = None,
                 task_type: str = "CAUSAL_LM", run_name: str = "train"):
        super().__init__(params, Path(log_dir), Path(ckpt_dir), seed)
        self.n_train, self.step_fn, self.seed = n_train, step, seed
        self.progress, self.evaluate, self.eval_every = progress, evaluate, eval_every
        model = prepare_model(model, params, task_type)
        self.num_updates = params.num_updates(n_train)
        self.prepare(model, self.num_updates, run_name)

    # -- data order --------------------------------------------------------------------------

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of epoch ``epoch`` (a seeded permutation, split across processes)."""
        import torch

        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n_train, generator=g).tolist()
        per_update = self.p.per_device_train_batch_size * self.world
        out = []
        for start in range(0, len(perm) - per_update + 1, per_update):
            chunk = perm[start : start + per_update]
            r = self.accelerator.process_index
            out.append(chunk[r * self.p.per_device_train_batch_size : (r + 1) * self.p.per_device_train_batch_size])
        return out

    def _batches(self, start_micro: int):
        """Yield micro-batches from global micro-step ``start_micro`` on, cycling epochs."""
        micro = 0
        epoch = 0
        while True:
            mbs = self._micro_batches(epoch)
            if not mbs:
                raise ValueError(f"fewer training rows ({self.n_train}) than one micro-batch across processes "
                                 f"({self.p.per_device_train_batch_size * self.world})")
            for mb in mbs:
                if micro >= start_micro:
                    yield micro, mb
                micro += 1
            epoch += 1

    # -- checkpoints -------------------------------------------------------------------------

    def _save(self, update: int, micro: int) -> None:
        pos = {"update": update, "micro": micro}
        self.save_checkpoint(update, pos, pos, f"{self.ckpt_dir.parent.name[:12]}:{update}")

    # -- loop -------------------------------------------------------------------------------

    def _resume(self) -> tuple[int, int, Optional[int]]:
        """Load the newest checkpoint if any: ``(update, next micro-step, update resumed from or None)``."""
        loaded = self.load_checkpoint()
        if loaded is None:
            return 0, 0, None
        _, pos, _ = loaded
        return pos["update"], pos["micro"], pos["update"]

    def _micro_step(self, mb: list[int], update: int, micro: int) -> dict:
        """Forward, backward and (on the last micro-step of an update) clip, step and schedule."""
        where = f"at update {update + 1} (micro-step {micro + 1}); lower params.learning_rate or check the rewards"
        return self.micro_step(partial(self.step_fn, self.model, mb), where)

    def _log_update(self, update: int, acc: dict, n_acc: int) -> None:
        row = self._global_means(acc, n_acc)
        row["learning_rate"] = self.learning_rate()
        row["update"] = update
        self.history.append(row)
        max_kl = getattr(self.p, "max_kl", None)
        if max_kl is not None and row.get("kl_ref", 0.0) > max_kl:  # the same on every process (a global mean)
            raise TrainingDiverged(f"the KL to the reference policy reached {row['kl_ref']:.4g} nats at update "
                                   f"{update}, above max_kl {max_kl}; the last checkpoint is kept (lower "
                                   "params.learning_rate or raise max_kl)")
        if update % self.p.log_every == 0:
            self.log(row, update, skip="update")
        if self.progress is not None:
            self.progress.advance(1)

    def train(self) -> dict:
        """Run (or resume) training to ``num_updates`` updates; returns final metrics.

        Raises:
            TrainingDiverged: a NaN/inf loss, naming the update and micro-step.
        """
        update, start_micro, resumed_from = self._resume()
        if self.progress is not None:
            self.progress.start(self.num_updates, unit="updates")
            self.progress.advance(update)
        acc: dict[str, float] = {}
        n_acc, eval_metrics = 0, {}
        for micro, mb in ([] if update >= self.num_updates else self._batches(start_micro)):
            for k, v in self._micro_step(mb, update, micro).items():
                acc[k] = acc.get(k, 0.0) + float(v)
            n_acc += 1
            if not self.accelerator.sync_gradients:
                continue
            update += 1
            self._log_update(update, acc, n_acc)
            acc, n_acc = {}, 0
            due = self.eval_every and update % self.eval_every == 0 and update < self.num_updates
            if self.evaluate is not None and due:
                eval_metrics = self._run_eval(update)
            if update >= self.num_updates:
                break
            if update % self.p.save_every == 0:
                self._save(update, micro + 1)
        return self._final(resumed_from, eval_metrics)

    def _global_means(self, acc: dict[str, float], n_acc: int) -> dict[str, float]:
        """Per-update means of the step statistics over every micro-step of every process.

        Each process sums its own micro-batch statistics; with several processes the
        per-process means are averaged (all-reduce), so the logged loss of an update is
        the same whether its global batch ran in one process or was split across many
        (every process holds ``per_device_train_batch_size`` pairs per micro-step).
        """
        return self.mean({k: v / max(1, n_acc) for k, v in acc.items()})

    def _run_eval(self, update: int) -> dict:
        self.model.eval()
        try:
            m = self.evaluate(self.accelerator.unwrap_model(self.model))
        finally:
            self.model.train()
        self.accelerator.log({f"eval/{k}": v for k, v in m.items() if isinstance(v, (int, float))}, step=update)
        return m

    def _final(self, resumed_from, eval_metrics) -> dict:
        if self.evaluate is not None:
            eval_metrics = self._run_eval(self.num_updates)
        last = self.history[-1] if self.history else {}
        n = max(1, min(10, len(self.history)))
        tail = self.history[-n:]
        out: dict[str, Any] = {"updates": self.num_updates,
                               "global_batch": self.p.global_batch() // self.p.num_processes * self.world,
                               "processes": self.world,
                               "distributed_type": str(self.accelerator.distributed_type.value)}
        ds_plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if ds_plugin is not None:
            out["zero_stage"] = ds_plugin.deepspeed_config.get("zero_optimization", {}).get("stage")
        for k in last:
            if k not in ("update", "learning_rate"):
                out[f"train_{k}_last10"] = sum(r.get(k, 0.0) for r in tail) / len(tail)
        if self.history:
            out["train_loss_first"] = self.history[0].get("loss")
        out.update({f"eval_{k}": v for k, v in eval_metrics.items()})
        if resumed_from is not None:
            out["resumed_from_update"] = resumed_from
        self.finish_trackers()
        return out
