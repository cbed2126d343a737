"""Built-in rewards: the ``classifier`` reward model, rule rewards (``math-answer``, ``length``,
``format``), an LLM judge, and combinations. Each registers on the reward surface through the
``rlhf_spec`` entry-point group, as a third-party reward would."""

# Deprecated import location (one release) of the classifier helpers.
from ..algorithms.batching import length_batches  # noqa: F401
from .classifier import (  # noqa: F401
    CPU_BATCH_TOKENS, META_FILE, RewardFormat, collate, encode_for_reward, resolve_format, reward_forward, score_pairs,
)
