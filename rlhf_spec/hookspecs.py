"""The hooks a plugin may implement, one per surface (stages, rewards, generation backends, dataset adapters).

A plugin is a module named by an entry point in group ``rlhf_spec``::

    from rlhf_spec import RewardImpl, hookimpl

    @hookimpl
    def rlhf_spec_register_rewards(register):
        register(RewardImpl(name="my-rm", params=MyParams, load=load, version="1"))

rlhf-spec's built-ins register the same way, through entry points in its own ``pyproject.toml``.
An exception raised by a hook marks that plugin as broken; ``rlhf-spec plugins`` reports it with its
distribution, and other plugins are unaffected.
"""

from __future__ import annotations

import pluggy

PROJECT = "rlhf_spec"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def rlhf_spec_register_stages(register):
    """Register stage implementations: call ``register(StageImpl(...))`` once per implementation."""


@hookspec
def rlhf_spec_register_rewards(register):
    """Register rewards: call ``register(RewardImpl(...))`` once per reward."""


@hookspec
def rlhf_spec_register_backends(register):
    """Register generation backends: call ``register(BackendImpl(...))`` once per backend."""


@hookspec
def rlhf_spec_register_datasets(register):
    """Register dataset adapters: call ``register(MyAdapter())`` once per adapter, a subclass of
    :class:`rlhf_spec.data.DatasetAdapter`."""
