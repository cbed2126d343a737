"""rlhf-spec: run a whole RLHF pipeline from one declarative JSON spec.

This module is the public API for plugin authors: everything in ``__all__``. Other modules may
change without notice. Names are loaded on first use, so ``import rlhf_spec`` stays fast (torch is
imported only when a training helper is used).

Plugin surfaces (one hook each, see :mod:`rlhf_spec.hookspecs`): stages (:class:`StageImpl`),
rewards (:class:`RewardImpl`) and generation backends (:class:`BackendImpl`). A plugin imports from
``rlhf_spec`` only; its tests may also use :mod:`rlhf_spec.testing`.
"""

from __future__ import annotations

import importlib

__version__ = "0.3.0"

_EXPORTS = {
    # hook markers
    "hookimpl": "hookspecs", "hookspec": "hookspecs",
    # records, the shared reward/backend syntax, artifact types and params markers
    "StageImpl": "records", "RewardImpl": "records", "BackendImpl": "records", "StageResult": "records",
    "DatasetAdapter": "data",
    "RewardBatch": "records", "RewardOutput": "records", "Reward": "records", "Completion": "records",
    "Engine": "records",
    "RewardSpec": "records", "BackendSpec": "records", "ModelRef": "records", "DatasetRef": "records",
    "NotInKey": "records",
    "KINDS": "records", "ARTIFACT_TYPES": "records", "SAMPLES": "records", "SCORED": "records", "PAIRS": "records",
    "POLICY": "records", "REWARD_MODEL": "records", "METRICS": "records",
    # what a stage, a reward or a backend gets
    "StageContext": "context", "ComponentContext": "context", "InputArtifact": "context", "Progress": "context",
    "RewardError": "errors", "ModelSource": "model_source", "Spec": "spec.models",
    # generation as the sample stage does it: prompts -> token ids -> passes with their seeds
    "SamplingParams": "backends", "generate_passes": "backends", "prompt_token_ids": "backends",
    "prepare_prompts": "backends", "sampling_seed": "runtime",
    # statistics of a policy against a reference policy (what evaluate reports), and cache keys
    "compare": "stats", "compare_preferences": "stats", "win_rate": "stats", "reward_difference": "stats",
    "bootstrap_mean_ci": "stats", "wilson_interval": "stats", "length_controlled_win_rate": "stats",
    "key_view": "refs",
    # errors
    "Problem": "errors", "RLHFSpecError": "errors", "SpecError": "errors", "StageFailed": "errors",
    # training: shared params and loop, pairs -> batches, logprobs, saving a policy
    "OptimParams": "loops.trainer", "LoraParams": "loops.trainer", "Trainer": "loops.trainer",
    "TrainingDiverged": "loops.trainer", "PolicyTrainParams": "stages.train.pair_trainer",
    "PairBatch": "stages.train.pair_trainer", "pair_trainer": "stages.train.pair_trainer",
    "pairs_check": "stages.train.pair_trainer",
    "train_on_pairs": "stages.train.pair_trainer", "save_policy": "loops.save",
    "reference_logprobs": "stages.train.pair_trainer", "tokenize_pairs": "algorithms.batching",
    "tokenize_completions": "algorithms.batching", "pad_batch": "algorithms.batching",
    "length_batches": "algorithms.batching", "TokenizedPair": "algorithms.batching",
    "TokenizedCompletion": "algorithms.batching", "pair_logprobs": "algorithms.logprobs",
    "completion_logprobs": "algorithms.logprobs", "sequence_logprobs": "algorithms.ops",
    "token_logprobs": "algorithms.ops",
    "masked_mean": "algorithms.ops",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'rlhf_spec' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
