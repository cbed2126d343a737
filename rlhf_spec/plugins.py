"""Discovering stage implementations through the ``rlhf_spec`` entry-point group.

Every entry point, the built-ins included, is loaded on its own inside a
try/except, so one broken plugin is reported (with its distribution and
version) instead of aborting the load for everyone, and only the specs that
use it fail.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.metadata as md
import sys
import traceback
from dataclasses import dataclass, field
from typing import Iterable, Optional

import pluggy

from . import hookspecs
from .errors import PluginFailure
from .hookspecs import KINDS, PROJECT, StageImpl

GROUP = "rlhf_spec"


@dataclass
class Registry:
    """The stage implementations found, keyed by ``(kind, name)``.

    Attributes:
        impls: ``(kind, name) -> StageImpl``.
        failures: plugins that failed to import or register.
        conflicts: ``(kind, name) -> [origins]`` when two distributions register the same pair.
    """

    impls: dict[tuple[str, str], StageImpl] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def names(self, kind: str) -> list[str]:
        """Sorted implementation names registered for ``kind``."""
        return sorted(n for (k, n) in self.impls if k == kind)

    def lookup(self, kind: str, name: str) -> tuple[Optional[StageImpl], str]:
        """Find an implementation; on failure return ``(None, reason)`` with suggestions.

        The reason lists what is installed for ``kind``, a "did you mean", the
        kinds that do have ``name``, two distributions that both claim it, and any
        plugins that failed to load (one of which may have provided it).
        """
        if (kind, name) in self.conflicts:
            return None, (
                f"'{name}' is registered for kind '{kind}' by more than one distribution: "
                + ", ".join(self.conflicts[(kind, name)])
                + "; uninstall one of them"
            )
        impl = self.impls.get((kind, name))
        if impl is not None:
            return impl, ""
        installed = self.names(kind)
        msg = f"no '{kind}' implementation named '{name}'; installed for '{kind}': " + (
            ", ".join(installed) if installed else "none"
        )
        close = difflib.get_close_matches(name, installed, n=1)
        if close:
            msg += f"; did you mean '{close[0]}'?"
        other = sorted(k for (k, n) in self.impls if n == name and k != kind)
        if other:
            msg += f"; '{name}' exists for kind {', '.join(repr(k) for k in other)}"
        for f in self.failures:
            msg += f"; note: plugin '{f.entry_point}' from {f.distribution} {f.version} failed to load: {f.error}"
        return None, msg

    def rows(self) -> list[dict]:
        """One dict per implementation, sorted by kind then name, for ``rlhf-spec plugins``."""
        order = {k: i for i, k in enumerate(KINDS)}
        out = []
        for (kind, name), impl in sorted(self.impls.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][1])):
            out.append(
                {
                    "kind": kind,
                    "name": name,
                    "distribution": impl.distribution,
                    "version": impl.dist_version,
                    "impl_version": impl.impl_version,
                    "entry_point": impl.entry_point,
                    "inputs": list(impl.inputs),
                    "output": impl.output,
                    "description": impl.description,
                }
            )
        return out


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    return dist.metadata["Name"] or dist.name, dist.version


def _make_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 400 else text[:400] + "..."


def load_registry(extra: Iterable[object] = (), entry_points: bool = True) -> Registry:
    """Load every ``rlhf_spec`` entry point (and ``extra`` plugin modules) into a :class:`Registry`.

    Args:
        extra: plugin objects registered in addition to the entry points, reported as
            distribution ``"<in-process>"`` (for tests and notebooks).
        entry_points: set False to skip installed plugins.

    Returns:
        the registry; it never raises for a broken plugin, it records a :class:`PluginFailure`.
    """
    reg = Registry()
    pm = _make_manager()
    origin: dict[str, tuple[str, str, str]] = {}

    eps = []
    if entry_points:
        seen = set()
        for ep in md.entry_points(group=GROUP):
            dist, ver = _dist_of(ep)
            ident = (dist, ep.name, ep.value)
            if ident in seen:  # the same distribution visible twice on sys.path
                continue
            seen.add(ident)
            eps.append((ep, dist, ver))
    for ep, dist, ver in eps:
        pname = f"{dist}:{ep.name}"
        try:
            plugin = ep.load()
            pm.register(plugin, name=pname)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
            reg.failures.append(PluginFailure(ep.name, dist, ver, _short_error(exc)))
            continue
        origin[pname] = (dist, ver, ep.name)
    for i, plugin in enumerate(extra):
        pname = f"<in-process>:{getattr(plugin, '__name__', i)}"
        pm.register(plugin, name=pname)
        origin[pname] = ("<in-process>", "", pname.split(":", 1)[1])

    for hook_impl in pm.hook.rlhf_spec_register_stages.get_hookimpls():
        dist, ver, ep_name = origin.get(hook_impl.plugin_name, ("unknown", "", hook_impl.plugin_name))
        records: list[StageImpl] = []
        try:
            hook_impl.function(register=records.append)
            for rec in records:
                _check_record(rec)
        except Exception as exc:  # noqa: BLE001
            if "--debug" in sys.argv:
                traceback.print_exc()
            reg.failures.append(PluginFailure(ep_name, dist, ver, _short_error(exc)))
            continue
        for rec in records:
            rec = dataclasses.replace(rec, distribution=dist, dist_version=ver, entry_point=ep_name)
            key = (rec.kind, rec.name)
            if key in reg.impls or key in reg.conflicts:
                prev = reg.impls.pop(key, None)
                lst = reg.conflicts.setdefault(key, [prev.origin()] if prev else [])
                lst.append(rec.origin())
                continue
            reg.impls[key] = rec
    return reg


def _check_record(rec: object) -> None:
    """Raise TypeError/ValueError if a registered record is not a well-formed :class:`StageImpl`."""
    if not isinstance(rec, StageImpl):
        raise TypeError(f"register() takes a StageImpl, got {type(rec).__name__}")
    if rec.kind not in KINDS:
        raise ValueError(f"stage kind {rec.kind!r} is not one of {', '.join(KINDS)}")
    if not rec.name or not isinstance(rec.name, str):
        raise ValueError("a StageImpl needs a non-empty name")
    if not (isinstance(rec.params, type) and issubclass(rec.params, hookspecs.BaseModel)):
        raise TypeError(f"{rec.kind}/{rec.name}: params must be a pydantic BaseModel subclass")
    if not callable(rec.run):
        raise TypeError(f"{rec.kind}/{rec.name}: run must be callable")


_REGISTRY: Optional[Registry] = None


def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = load_registry()
    return _REGISTRY


def set_registry(reg: Optional[Registry]) -> None:
    """Replace the process-wide registry (``None`` reloads on next use)."""
    global _REGISTRY
    _REGISTRY = reg
