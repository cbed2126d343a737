"""Reading the spec's datasets into normalised Hugging Face ``datasets``, and splitting rows by prompt.

Every dataset becomes rows of:

* ``prompt_id`` (str): 16 hex characters of sha256 over the canonical prompt messages;
* ``prompt`` (list of ``{"role", "content"}``): the conversation up to the reply;
* ``chosen`` / ``rejected`` (str), for preference data: the final assistant reply;
* ``completion`` (str, the final assistant reply) and ``messages`` (the whole conversation, every
  assistant turn included), for SFT and unpaired data;
* ``label`` (bool, True = desirable), for KTO data; ``reference`` (str) where a source column feeds it.

Which columns a dataset gets is its adapter's business: one :class:`DatasetAdapter` subclass per adapter
(:mod:`rlhf_spec.data.adapters` holds the built-ins), registered through the ``rlhf_spec_register_datasets``
hook. Prompt ids are content hashes, so shards, splits and ``hash_range`` selections depend on the prompts
alone, never on row order or the number of workers; :func:`split_by_prompt` is the one rule that holds
rows out by prompt.
"""

from __future__ import annotations

from .base import FIT, DatasetAdapter  # noqa: F401
from .load import EMPTY_MARKER, load_rows, load_spec_dataset, local_column_problem, save_rows  # noqa: F401
from .messages import (  # noqa: F401
                       ASSISTANT,
                       GSM8K_REPLY,
                       HUMAN,
                       ROLE_ALIASES,
                       apply_prompt_template,
                       gsm8k_reply,
                       hash_unit,
                       normalize_messages,
                       parse_hh_transcript,
                       parse_label,
                       prompt_id,
                       render_transcript,
                       response_text,
                       split_conversation,
                       split_hh_pair,
)
from .split import assign_split, check_test_size, split_by_prompt  # noqa: F401
