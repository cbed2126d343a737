"""Errors with a place: a JSON pointer into the spec, or a plugin and its distribution."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


@dataclass
class Problem:
    """One validation problem.

    Attributes:
        pointer: RFC 6901 JSON pointer into the spec, e.g. ``/stages/2/params/temperature``
            (empty for the whole document).
        message: what is wrong, in one sentence.
        hint: optional suggestion (e.g. ``did you mean 'temperature'?``).
    """

    pointer: str
    message: str
    hint: str = ""

    def render(self) -> str:
        where = self.pointer or "/"
        text = f"{where}: {self.message}"
        if self.hint:
            text += f" ({self.hint})"
        return text


class RLHFSpecError(Exception):
    """Base class of every error rlhf-spec reports without a traceback."""

    exit_code = 1


class SpecError(RLHFSpecError):
    """The spec (or a --set override, or the command line) is invalid. Exit code 2.

    Attributes:
        problems: every problem found, each with its JSON pointer.
        source: the spec file's path, for the message.
    """

    exit_code = 2

    def __init__(self, problems: list[Problem], source: str = ""):
        self.problems = list(problems)
        self.source = source
        lines = [p.render() for p in self.problems]
        head = f"invalid spec {source}".rstrip() + f": {len(lines)} problem" + ("s" if len(lines) != 1 else "")
        super().__init__(head + "\n" + "\n".join("  " + ln for ln in lines))


class UsageError(RLHFSpecError):
    """Bad command-line usage (unknown stage id in --force, bad --set syntax). Exit code 2."""

    exit_code = 2


@dataclass
class PluginFailure:
    """A plugin entry point that failed to import or register.

    Attributes:
        entry_point: the entry-point name in group ``rlhf_spec``.
        distribution: the installed distribution that declares it.
        version: that distribution's version.
        error: the exception text.
    """

    entry_point: str
    distribution: str
    version: str
    error: str


class StageFailed(RLHFSpecError):
    """A stage raised while running. Exit code 1.

    The message names the stage id, the implementation and the distribution
    (with version) that provides it, so a broken plugin is easy to blame.
    """

    exit_code = 1


class CacheError(RLHFSpecError):
    """The cache could not be written or read (disk full, permissions). Exit code 1."""

    exit_code = 1


def did_you_mean(name: object, options: Iterable[object]) -> str:
    """``"did you mean 'x'?"`` for the closest of ``options`` to ``name``, or ``""`` if none is close.

    The one suggestion helper used for unknown keys, stage ids, implementation names and ``--set`` paths.
    """
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


class RewardError(RuntimeError):
    """A reward returned something unusable (wrong number of scores, NaN); names the reward and its JSON pointer."""
