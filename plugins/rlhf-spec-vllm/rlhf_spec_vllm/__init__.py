"""rlhf-spec plugin: the ``sample``/``vllm`` stage (see :mod:`rlhf_spec_vllm.plugin`)."""

__version__ = "0.1.0"
