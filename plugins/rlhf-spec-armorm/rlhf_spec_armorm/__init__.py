"""rlhf-spec plugin: the ``score``/``armorm`` stage (see :mod:`rlhf_spec_armorm.plugin`)."""

__version__ = "0.1.0"
