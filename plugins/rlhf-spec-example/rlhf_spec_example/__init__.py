"""rlhf-spec-example: one reward (``flesch-readability``) and one preference algorithm (``train``/``slic-hf``).

Everything here imports from ``rlhf_spec`` alone, the package's public API.
"""

from rlhf_spec import hookimpl

from .readability import register_reward
from .slic import register_stage


@hookimpl
def rlhf_spec_register_rewards(register):
    register_reward(register)


@hookimpl
def rlhf_spec_register_stages(register):
    register_stage(register)
