"""Deprecated import location (one release): the losses live in :mod:`rlhf_spec.algorithms`."""

from .algorithms.kl import kl_estimate  # noqa: F401
from .algorithms.ops import gather_logprobs, masked_mean, masked_whiten, sequence_logprobs, token_logprobs  # noqa: F401
from .algorithms.pairwise import DPOLoss, PairwiseRewardLoss, REBELLoss, pairwise_accuracy, rebel_stats  # noqa: F401
from .algorithms.ppo import PolicyLossPPO, ValueLoss, gae_advantages  # noqa: F401
