"""The accelerate core every trainer shares: the accelerator, model preparation (dropout, gradient
checkpointing, LoRA), the optimizer (AdamW or 8-bit AdamW) and its schedule, one optimizer micro-step
with gradient accumulation and clipping, checkpoint save/resume, cross-process averaging of logged
statistics, and the experiment trackers.

:class:`TrainingCore` holds that state for one run; :class:`~rlhf_spec.loops.trainer.Trainer` (a loop
over row indices) is one, and the online RL loop (:mod:`rlhf_spec.loops.online_loop`) holds one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

from .checkpoint import latest_checkpoint, read_checkpoint_state, write_checkpoint

__all__ = ["TrainingCore", "TrainingDiverged", "make_accelerator", "make_optimizer", "prepare_model", "apply_lora",
           "disable_dropout", "configure_deepspeed", "flat_config", "autocast"]


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the update and micro-step."""


def disable_dropout(model) -> None:
    """Set ``p = 0`` on every ``torch.nn.Dropout`` and zero dropout fields of the config."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    for attr in ("attention_dropout", "hidden_dropout", "dropout", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, attr) and isinstance(getattr(model.config, attr), float):
            setattr(model.config, attr, 0.0)


def apply_lora(model, lora, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with peft LoRA adapters (``lora``: :class:`~rlhf_spec.LoraParams`; Hu et al. 2021).

    Raises:
        ValueError from peft if ``target_modules`` match no module.
    """
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=list(lora.target_modules), task_type=task_type)
    return get_peft_model(model, cfg)


def prepare_model(model, params, task_type: str):
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


def make_accelerator(params, log_dir: Path):
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
    return Accelerator(gradient_accumulation_steps=params.gradient_accumulation_steps,
                       mixed_precision=params.mixed_precision, cpu=cpu, kwargs_handlers=handlers,
                       log_with=list(params.log_with) or None, project_dir=str(log_dir))


def make_optimizer(model, params, num_updates: int):
    """The optimizer over the trainable parameters and its learning-rate schedule over ``num_updates`` updates.

    The optimizer is ``params.optimizer`` where the params have that field: ``"adamw"`` (torch's AdamW,
    also the default) or ``"adamw_8bit"`` (bitsandbytes' AdamW8bit: the moments in 8 bits, Dettmers et
    al. 2022, "8-bit Optimizers via Block-wise Quantization"). The schedule is
    ``transformers.get_scheduler(params.scheduler)`` with ``warmup_ratio * num_updates`` warm-up updates.

    Returns:
        (optimizer, scheduler).

    Raises:
        ImportError: ``"adamw_8bit"`` without the bitsandbytes package.
        ValueError: another optimizer name.
    """
    import torch
    from transformers import get_scheduler

    kind = getattr(params, "optimizer", "adamw")
    if kind == "adamw":
        cls = torch.optim.AdamW
    elif kind == "adamw_8bit":
        import bitsandbytes as bnb

        cls = bnb.optim.AdamW8bit
    else:
        raise ValueError(f"optimizer must be 'adamw' or 'adamw_8bit', not {kind!r}")
    trainable = [q for q in model.parameters() if q.requires_grad]
    opt = cls(trainable, lr=params.learning_rate, betas=tuple(params.betas), eps=params.eps,
              weight_decay=params.weight_decay)
    sched = get_scheduler(params.scheduler, opt, num_warmup_steps=int(params.warmup_ratio * num_updates),
                          num_training_steps=num_updates)
    return opt, sched


def configure_deepspeed(accelerator, params) -> None:
    """DeepSpeed reads batch and clipping settings from its own config. No DataLoader is prepared
    (batches are index lists), so the micro-batch is set here; and clipping follows
    ``params.max_grad_norm`` instead of accelerate's default of 1.0 for ``"auto"``."""
    ds_plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds_plugin is None:
        return
    cfg = ds_plugin.deepspeed_config
    if ds_plugin.is_auto("train_micro_batch_size_per_gpu"):
        cfg["train_micro_batch_size_per_gpu"] = params.per_device_train_batch_size
    if ds_plugin.is_auto("gradient_clipping"):
        cfg["gradient_clipping"] = float(params.max_grad_norm or 0.0)


def flat_config(params) -> dict:
    """The params as tracker hyperparameters: scalars kept, everything else as JSON text."""
    out = {}
    for k, v in params.model_dump(mode="json").items():
        out[k] = v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
    return {k: ("" if v is None else v) for k, v in out.items()}


class TrainingCore:
    """The accelerate state of one training run and what every loop does with it.

    Built in two steps, so that a loop can build its model between them with the seeded RNG: the
    constructor makes the accelerator and seeds every RNG (``accelerate.utils.set_seed(seed)``);
    :meth:`prepare` then makes the optimizer and schedule, prepares the model, registers the schedule for
    checkpointing and starts the trackers. It is also what :func:`~rlhf_spec.loops.save.save_policy`
    reads (``accelerator``, ``history``, :meth:`unwrapped`, :meth:`full_state_dict`).

    Args:
        params: the stage's :class:`~rlhf_spec.OptimParams` (subclass).
        log_dir: where the trackers write.
        ckpt_dir: where checkpoints live (the stage's ``partial_dir/checkpoints``).
        seed: seeds Python, NumPy and torch.
        prefix: checkpoint folders are named ``<prefix>-<number:07d>``.
        state_file: the name of the loop-state JSON inside a checkpoint.
    """

    def __init__(self, params, log_dir: Path, ckpt_dir: Path, seed: int, prefix: str = "update",
                 state_file: str = "position.json"):
        from accelerate.utils import set_seed

        self.p, self.ckpt_dir, self.prefix, self.state_file = params, Path(ckpt_dir), prefix, state_file
        self.accelerator = make_accelerator(params, Path(log_dir))
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        set_seed(seed)
        self.history: list[dict] = []
        self.last_checkpoint: Optional[int] = None
        self.model = self.optimizer = self.scheduler = None
        self.part: Optional[str] = None

    def prepare(self, model, num_updates: int, run_name: str, part: Optional[str] = None) -> None:
        """Optimizer and schedule over ``num_updates`` updates (:func:`make_optimizer`), the DeepSpeed
        batch settings, ``accelerator.prepare``, and the trackers' run ``run_name``. ``part`` names the
        attribute of the model that is saved as the trained model (``"policy"`` of an actor-critic)."""
        opt, self.scheduler = make_optimizer(model, self.p, num_updates)
        configure_deepspeed(self.accelerator, self.p)
        self.model, self.optimizer = self.accelerator.prepare(model, opt)
        # The schedule counts optimizer updates, so it is stepped by hand on each update rather than
        # prepared (a prepared scheduler steps once per process); it is still saved with the state.
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.accelerator.init_trackers(run_name, config=flat_config(self.p))
        self.part = part

    # -- one micro-step ------------------------------------------------------------------------

    def micro_step(self, compute: Callable, where: str) -> dict:
        """One micro-batch under gradient accumulation: ``compute() -> (loss, stats)`` (the forward pass),
        backward, and on the last micro-step of an update: gradient clipping to ``params.max_grad_norm``,
        the optimizer step and the schedule step. Returns ``stats``.

        Raises:
            TrainingDiverged: a NaN/inf loss; the message is ``"loss is <value> " + where``.
        """
        import torch

        acc = self.accelerator
        with acc.accumulate(self.model):
            loss, stats = compute()
            if not torch.isfinite(loss.detach()).all():
                raise TrainingDiverged(f"loss is {loss.item()} {where}")
            acc.backward(loss)
            if acc.sync_gradients and self.p.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), self.p.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        return stats

    def learning_rate(self) -> float:
        """The schedule's current learning rate."""
        return float(self.scheduler.get_last_lr()[0])

    # -- across processes ----------------------------------------------------------------------

    def mean(self, values: dict) -> dict:
        """Means of scalar statistics over processes (each process's value weighs the same; float64
        all-reduce). With one process ``values`` is returned as is."""
        if self.world == 1 or not values:
            return values
        import torch

        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.accelerator.device)
        t = self.accelerator.reduce(t, reduction="mean")
        return dict(zip(keys, (float(x) for x in t.tolist())))

    def gather(self, t):
        """Every process's ``t`` (N, ...) concatenated along dim 0, on CPU (``t`` itself with one process)."""
        return t if self.world == 1 else self.accelerator.gather(t.to(self.accelerator.device)).cpu()

    def any_process(self, flag: bool) -> bool:
        """True where ``flag`` is true on at least one process (a collective: every process must call it)."""
        if self.world == 1:
            return flag
        import torch

        t = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(t, reduction="sum").item() > 0)

    # -- trackers ------------------------------------------------------------------------------

    def log(self, row: dict, step: int, skip: str) -> None:
        """Log ``row`` to the trackers as ``train/<name>`` at ``step``, leaving out the key ``skip``."""
        self.accelerator.log({f"train/{k}": v for k, v in row.items() if k != skip}, step=step)

    def finish_trackers(self) -> None:
        """Close the trackers (not ``end_training()``: it would end the process group before saving)."""
        for tracker in self.accelerator.trackers:
            tracker.finish()

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, number: int, state: dict, pointer: dict, detail: str) -> None:
        """Checkpoint ``<prefix>-<number>``: the accelerate state plus ``state`` and the history as
        JSON (:func:`~rlhf_spec.loops.checkpoint.write_checkpoint`). Every process must call it."""
        write_checkpoint(self.accelerator, self.ckpt_dir, self.prefix, number, self.state_file,
                         {**state, "history": self.history}, pointer, detail)
        self.last_checkpoint = number

    def load_checkpoint(self) -> Optional[tuple[Path, dict, dict]]:
        """Load the newest checkpoint, if any, into the accelerator and the history.

        Returns:
            None without a checkpoint, else (its folder, the ``latest.json`` pointer, the loop state
            saved with it; ``{}`` when that file is unreadable).
        """
        latest = latest_checkpoint(self.ckpt_dir)
        if latest is None:
            return None
        path, pointer = latest
        self.accelerator.load_state(str(path))
        state = read_checkpoint_state(path, self.state_file)
        self.history = state.get("history", [])
        self.last_checkpoint = int(path.name.rsplit("-", 1)[1])
        return path, pointer, state

    # -- the trained model ---------------------------------------------------------------------

    def unwrapped(self):
        """The trained model (its ``part``, if set) with adapters merged (if LoRA), ready for ``save_pretrained``."""
        model = self.accelerator.unwrap_model(self.model)
        if self.part is not None:
            model = getattr(model, self.part)
        return model.merge_and_unload() if self.p.lora is not None else model

    def full_state_dict(self) -> Optional[dict]:
        """The whole model's weights when they are sharded across processes (DeepSpeed), else ``None``.

        Under DeepSpeed ZeRO-3 each process holds a slice of every parameter, so the unwrapped module
        cannot be saved as is. This gathers the 16-bit weights (it needs
        ``stage3_gather_16bit_weights_on_model_save``, which accelerate's ``zero3_save_16bit_model: true``
        sets). Every process must call it (it is a collective); pass the result to
        ``save_pretrained(state_dict=...)`` on the main process. With a ``part``, only its weights are
        kept, without the ``<part>.`` prefix.

        Raises:
            ValueError: from accelerate, if the DeepSpeed config does not gather 16-bit weights on save.
        """
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type != DistributedType.DEEPSPEED or self.p.lora is not None:
            return None
        full = self.accelerator.get_state_dict(self.model)
        if full is None or self.part is None:
            return full
        pre = self.part + "."
        return {k[len(pre):]: v for k, v in full.items() if k.startswith(pre)}
