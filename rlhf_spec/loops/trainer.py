"""The training loop shared by the built-in ``train`` implementations.

It runs through accelerate (one process here; ``accelerate launch`` starts more),
checkpoints every ``save_every`` updates (model, optimizer, scheduler, every RNG
state, and the data position), and resumes from the last checkpoint after a
crash with the same data order, so a resumed run matches an uninterrupted one
where the computation is deterministic.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..records import NotInKey
from ..runtime import commit_hook


class LoraParams(BaseModel):
    """LoRA adapters via peft (Hu et al. 2021). The saved model has the adapters merged."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1, le=4096, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names to adapt."
    )


class OptimParams(BaseModel):
    """Optimizer, schedule, batch and distribution settings shared by every ``train`` implementation.

    Global batch = ``per_device_batch_size * gradient_accumulation_steps * num_processes``.
    """

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(3e-7, gt=0, le=1.0, description="Peak learning rate (AdamW).")

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data: Any) -> Any:
        # 'lr' was the name up to 0.1; accepted (with a FutureWarning) so that older specs keep their keys
        if isinstance(data, dict) and "lr" in data:
            if "learning_rate" in data:
                raise ValueError("give 'learning_rate' only ('lr' is its old name)")
            import warnings

            warnings.warn("train params: 'lr' is now called 'learning_rate'", FutureWarning, stacklevel=2)
            data = {("learning_rate" if k == "lr" else k): v for k, v in data.items()}
        return data
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    weight_decay: float = Field(1e-6, ge=0, description="AdamW weight decay.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("cosine", description="LR schedule (transformers.get_scheduler).")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Share of updates spent warming up.")
    per_device_batch_size: int = Field(1, ge=1, le=4096, description="Pairs per micro-batch per process.")
    gradient_accumulation_steps: int = Field(16, ge=1, le=65536, description="Micro-batches per optimizer update.")
    num_processes: int = Field(1, ge=1, le=4096, description="Processes (GPUs); more than 1 runs under 'accelerate launch'.")
    total_episodes: Optional[int] = Field(None, ge=1, description="Pairs to train on in total (REBEL: 60000). Overrides epochs.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training pairs when total_episodes is unset.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field("no", description="accelerate mixed precision.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    disable_dropout: bool = Field(True, description="Set every dropout probability to 0 (REBEL does).")
    lora: Optional[LoraParams] = Field(None, description="Train LoRA adapters instead of all weights.")
    accelerate_config: Optional[str] = Field(None, description="accelerate config file (e.g. DeepSpeed ZeRO-3) for multi-process runs.")
    max_grad_norm: Optional[float] = Field(None, gt=0, description="Clip the gradient norm (None: no clipping, as REBEL).")
    save_every: Annotated[int, NotInKey()] = Field(200, ge=1, description="Checkpoint every N updates for resume. Not part of the key.")
    log_every: Annotated[int, NotInKey()] = Field(1, ge=1, description="Log to the trackers every N updates. Not part of the key.")
    log_with: Annotated[list[Literal["tensorboard", "wandb", "mlflow"]], NotInKey()] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Experiment trackers (accelerate's log_with); wandb and mlflow need their package installed. Not part of the key.")

    @field_validator("log_with")
    @classmethod
    def _installed(cls, v: list[str]) -> list[str]:
        import importlib.util

        missing = [t for t in v if t != "tensorboard" and importlib.util.find_spec(t) is None]
        if missing:
            raise ValueError(f"tracker package {missing[0]!r} is not installed (pip install {missing[0]})")
        return v

    def global_batch(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.num_processes

    def num_updates(self, n_train: int) -> int:
        """Optimizer updates for ``n_train`` training rows (at least 1).

        Raises:
            ValueError: if there are no training rows.
        """
        if n_train <= 0:
            raise ValueError("no training rows")
        episodes = self.total_episodes if self.total_episodes else int(math.ceil(self.epochs * n_train))
        return max(1, episodes // self.global_batch())


def disable_dropout(model) -> None:
    """Set ``p = 0`` on every ``torch.nn.Dropout`` and zero dropout fields of the config."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, attr) and isinstance(getattr(model.config, attr), float):
            setattr(model.config, attr, 0.0)


def apply_lora(model, lora: LoraParams, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with peft LoRA adapters.

    Raises:
        ValueError from peft if ``target_modules`` match no module.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type=task_type)
    return get_peft_model(model, cfg)


def latest_checkpoint(ckpt_dir: Path) -> Optional[tuple[Path, dict]]:
    """The checkpoint ``ckpt_dir/latest.json`` points to, as (folder, pointer dict), or None when there is
    none yet, the pointer is unreadable, or its folder is gone (a resume then starts from scratch)."""
    ptr = ckpt_dir / "latest.json"
    if not ptr.is_file():
        return None
    try:
        pos = json.loads(ptr.read_text())
    except ValueError:
        return None
    path = ckpt_dir / pos["dir"]
    return (path, pos) if path.is_dir() else None


def autocast(device, mixed_precision: str):
    """A ``torch.autocast`` context for forward passes outside accelerate (reference logprobs, the KL
    pass of ``evaluate``), so they run at the trainer's precision: ``"bf16"`` or ``"fp16"`` autocast on
    ``device``'s type, ``"no"`` a null context. Logits come out in the autocast dtype;
    :func:`~rlhf_spec.algorithms.ops.gather_logprobs` upcasts them before the log-softmax.

    Raises:
        ValueError: on another ``mixed_precision``.
    """
    import contextlib

    import torch

    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if mixed_precision not in dtypes:
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', not {mixed_precision!r}")
    return torch.autocast(device_type=torch.device(device).type, dtype=dtypes[mixed_precision])


def make_accelerator(params: OptimParams, log_dir: Path):
    """An ``accelerate.Accelerator`` for the params: gradient accumulation, mixed precision, the
    trackers of ``params.log_with`` writing under ``log_dir``, and gloo for DeepSpeed without CUDA."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # One process may run several train stages (the runner runs single-process stages in-process),
    # and accelerate keeps the first stage's settings (mixed precision, ...) in a process-wide
    # singleton, refusing different ones later. Each stage starts from a fresh one; the distributed
    # process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    cpu, handlers = not torch.cuda.is_available(), []
    if cpu and os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        # DeepSpeed under 'accelerate launch' on a machine without CUDA (tests): accelerate finds no
        # backend for it by itself, so name gloo; DeepSpeed then runs on its CPU accelerator.
        from accelerate.utils import InitProcessGroupKwargs

        cpu, handlers = False, [InitProcessGroupKwargs(backend="gloo")]
    return Accelerator(gradient_accumulation_steps=params.gradient_accumulation_steps, mixed_precision=params.mixed_precision,
                       cpu=cpu, kwargs_handlers=handlers, log_with=list(params.log_with) or None, project_dir=str(log_dir))


def prepare_model(model, params: OptimParams, task_type: str):
    """Dropout off (if asked), gradient checkpointing, LoRA adapters; the model in train mode."""
    if params.disable_dropout:
        disable_dropout(model)
    if params.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable()
        if hasattr(model.config, "use_cache"):
            model.config.use_cache = False
    if params.lora is not None:
        model = apply_lora(model, params.lora, task_type)
    model.train()
    return model


def make_optimizer(model, params: OptimParams, num_updates: int):
    """AdamW over the trainable parameters and its learning-rate schedule over ``num_updates`` updates."""
    import torch
    from transformers import get_scheduler

    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=params.learning_rate, betas=tuple(params.betas), eps=params.eps, weight_decay=params.weight_decay)
    sched = get_scheduler(params.scheduler, opt, num_warmup_steps=int(params.warmup_ratio * num_updates),
                          num_training_steps=num_updates)
    return opt, sched


def configure_deepspeed(accelerator, params: OptimParams) -> None:
    """DeepSpeed reads batch and clipping settings from its own config. No DataLoader is prepared
    (batches are index lists), so the micro-batch is set here; and clipping follows
    ``params.max_grad_norm`` instead of accelerate's default of 1.0 for ``"auto"``."""
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is None:
        return
    cfg = ds_plugin.deepspeed_config
    if ds_plugin.is_auto("train_micro_batch_size_per_gpu"):
        cfg["train_micro_batch_size_per_gpu"] = params.per_device_batch_size
    if ds_plugin.is_auto("gradient_clipping"):
        cfg["gradient_clipping"] = float(params.max_grad_norm or 0.0)


def flat_config(params) -> dict:
    """The params as tracker hyperparameters: scalars kept, everything else as JSON text."""
    out = {}
    for k, v in params.model_dump(mode="json").items():
        out[k] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return {k: ("" if v is None else v) for k, v in out.items()}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the update and micro-step."""


class Trainer:
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
        from accelerate.utils import set_seed

        self.p, self.n_train, self.step_fn, self.seed = params, n_train, step, seed
        self.ckpt_dir, self.progress, self.evaluate, self.eval_every = Path(ckpt_dir), progress, evaluate, eval_every
        self.accelerator = make_accelerator(params, Path(log_dir))
        set_seed(seed)
        model = prepare_model(model, params, task_type)
        self.num_updates = params.num_updates(n_train)
        self.world = self.accelerator.num_processes
        opt, self.scheduler = make_optimizer(model, params, self.num_updates)
        configure_deepspeed(self.accelerator, params)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        # The schedule counts optimizer updates, so it is stepped by hand on each update rather than
        # prepared (a prepared scheduler steps once per process); it is still saved with the state.
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.accelerator.init_trackers(run_name, config=flat_config(params))
        self.history: list[dict] = []

    # -- data order --------------------------------------------------------------------------

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        """This process's micro-batches of epoch ``epoch`` (a seeded permutation, split across processes)."""
        import torch

        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(self.n_train, generator=g).tolist()
        per_update = self.p.per_device_batch_size * self.world
        out = []
        for start in range(0, len(perm) - per_update + 1, per_update):
            chunk = perm[start : start + per_update]
            r = self.accelerator.process_index
            out.append(chunk[r * self.p.per_device_batch_size : (r + 1) * self.p.per_device_batch_size])
        return out

    def _batches(self, start_micro: int):
        """Yield micro-batches from global micro-step ``start_micro`` on, cycling epochs."""
        micro = 0
        epoch = 0
        while True:
            mbs = self._micro_batches(epoch)
            if not mbs:
                raise ValueError(f"fewer training rows ({self.n_train}) than one micro-batch across processes ({self.p.per_device_batch_size * self.world})")
            for mb in mbs:
                if micro >= start_micro:
                    yield micro, mb
                micro += 1
            epoch += 1

    # -- checkpoints -------------------------------------------------------------------------

    def _latest(self) -> Optional[tuple[Path, dict]]:
        return latest_checkpoint(self.ckpt_dir)

    def _save(self, update: int, micro: int) -> None:
        from ..cache.fs import atomic_write_json, commit_tree

        name = f"update-{update:07d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / f".{name}.tmp"
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_write_json(tmp / "position.json", {"update": update, "micro": micro, "history": self.history})
            commit_tree(tmp, final, replace=True)
            atomic_write_json(self.ckpt_dir / "latest.json", {"dir": name, "update": update, "micro": micro})
            for old in self.ckpt_dir.glob("update-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
            commit_hook("checkpoint", f"{self.ckpt_dir.parent.name[:12]}:{update}")
        self.accelerator.wait_for_everyone()

    # -- loop -------------------------------------------------------------------------------

    def _resume(self) -> tuple[int, int, Optional[int]]:
        """Load the newest checkpoint if any: ``(update, next micro-step, update resumed from or None)``."""
        latest = self._latest()
        if latest is None:
            return 0, 0, None
        path, pos = latest
        self.accelerator.load_state(str(path))
        try:
            self.history = json.loads((path / "position.json").read_text()).get("history", [])
        except (OSError, ValueError):
            self.history = []
        return pos["update"], pos["micro"], pos["update"]

    def _micro_step(self, mb: list[int], update: int, micro: int) -> dict:
        """Forward, backward and (on the last micro-step of an update) clip, step and schedule."""
        import torch

        with self.accelerator.accumulate(self.model):
            loss, stats = self.step_fn(self.model, mb)
            if not torch.isfinite(loss.detach()).all():
                raise TrainingDiverged(f"loss is {loss.item()} at update {update + 1} (micro-step {micro + 1}); "
                                       "lower params.learning_rate or check the rewards")
            self.accelerator.backward(loss)
            if self.accelerator.sync_gradients and self.p.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.p.max_grad_norm)
            self.optimizer.step()
            if self.accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return stats

    def _log_update(self, update: int, acc: dict, n_acc: int) -> None:
        row = self._global_means(acc, n_acc)
        row["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        row["update"] = update
        self.history.append(row)
        max_kl = getattr(self.p, "max_kl", None)
        if max_kl is not None and row.get("kl_ref", 0.0) > max_kl:  # the same on every process (a global mean)
            raise TrainingDiverged(f"the KL to the reference policy reached {row['kl_ref']:.4g} nats at update {update}, above "
                                   f"max_kl {max_kl}; the last checkpoint is kept (lower params.learning_rate or raise max_kl)")
        if update % self.p.log_every == 0:
            self.accelerator.log({f"train/{k}": v for k, v in row.items() if k != "update"}, step=update)
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
            if self.evaluate is not None and self.eval_every and update % self.eval_every == 0 and update < self.num_updates:
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
        (every process holds ``per_device_batch_size`` pairs per micro-step).
        """
        row = {k: v / max(1, n_acc) for k, v in acc.items()}
        if self.world > 1 and row:
            import torch

            keys = sorted(row)
            t = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
            t = self.accelerator.reduce(t, reduction="mean")
            row = dict(zip(keys, (float(x) for x in t.tolist())))
        return row

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
        out: dict[str, Any] = {"updates": self.num_updates, "global_batch": self.p.global_batch() // self.p.num_processes * self.world,
                               "processes": self.world, "distributed_type": str(self.accelerator.distributed_type.value)}
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
        for tracker in self.accelerator.trackers:  # not end_training(): it would end the process group before saving
            tracker.finish()
        return out

    def unwrapped(self):
        """The trained model with adapters merged (if LoRA), ready for ``save_pretrained``."""
        model = self.accelerator.unwrap_model(self.model)
        if self.p.lora is not None:
            model = model.merge_and_unload()
        return model

    def full_state_dict(self) -> Optional[dict]:
        """The whole model's weights when they are sharded across processes (DeepSpeed), else ``None``.

        Under DeepSpeed ZeRO-3 each process holds a slice of every parameter, so the
        unwrapped module cannot be saved as is. This gathers the 16-bit weights (it needs
        ``stage3_gather_16bit_weights_on_model_save``, which accelerate's
        ``zero3_save_16bit_model: true`` sets). Every process must call it (it is a
        collective); pass the result to ``save_pretrained(state_dict=...)`` on the main process.

        Raises:
            ValueError: from accelerate, if the DeepSpeed config does not gather 16-bit weights on save.
        """
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED or self.p.lora is not None:
            return None
        return self.accelerator.get_state_dict(self.model)
