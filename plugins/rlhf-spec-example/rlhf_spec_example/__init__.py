"""rlhf-spec-example: one reward (``flesch-readability``), one preference algorithm (``train``/``slic-hf``)
and one sampling stage (``sample``/``greedy-and-sampled``).

Everything here imports from ``rlhf_spec`` alone, the package's public API.
"""

from rlhf_spec import hookimpl

from . import greedy, slic
from .readability import register_reward


@hookimpl
def rlhf_spec_register_rewards(register):
    register_reward(register)


@hookimpl
def rlhf_spec_register_stages(register):
    slic.register_stage(register)
    greedy.register_stage(register)
