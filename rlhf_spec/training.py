"""Deprecated import location (one release): import these from ``rlhf_spec``."""

from .algorithms.training import LoraParams, OptimParams, Trainer, TrainingDiverged, apply_lora, disable_dropout  # noqa: F401
