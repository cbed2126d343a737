"""Built-in rewards: the ``classifier`` reward model, rule rewards (``math-answer``, ``length``,
``format``), an LLM judge, and combinations. Each registers on the reward surface through the
``rlhf_spec`` entry-point group, as a third-party reward would."""
