"""Built-in stage implementations. Each module is a plugin registered through the
``rlhf_spec`` entry-point group in rlhf-spec's own pyproject, exactly like a
third-party plugin."""
