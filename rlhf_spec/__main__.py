"""``python -m rlhf_spec`` runs the command line."""

from .cli import entry

entry()
