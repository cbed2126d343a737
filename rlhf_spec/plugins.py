"""Discovering implementations of the plugin surfaces through the ``rlhf_spec`` entry-point group.

Every entry point, the built-ins included, is loaded on its own inside a try/except, so one broken
plugin is reported (with its distribution and version) instead of aborting the load for everyone,
and only the specs that use it fail. Two distributions registering the same name on one surface is
an error that names both.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import logging
from dataclasses import dataclass, field
from typing import Iterable, Optional

import pluggy
from pydantic import BaseModel

from . import hookspecs
from .data import FIT, DatasetAdapter
from .errors import PluginFailure, did_you_mean
from .hashing import package_digest
from .hookspecs import PROJECT
from .records import KINDS, BackendImpl, RewardImpl, StageImpl, call_check

GROUP = "rlhf_spec"
log = logging.getLogger(__name__)

#: surface -> (hook name, record type)
SURFACES = {
    "stage": ("rlhf_spec_register_stages", StageImpl),
    "reward": ("rlhf_spec_register_rewards", RewardImpl),
    "backend": ("rlhf_spec_register_backends", BackendImpl),
    "dataset": ("rlhf_spec_register_datasets", DatasetAdapter),
}


@dataclass
class Registry:
    """The implementations found, per surface.

    Attributes:
        stages: ``(kind, name) -> StageImpl``. rewards: ``name -> RewardImpl``. backends: ``name -> BackendImpl``.
        datasets: ``name -> DatasetAdapter`` (what a spec dataset's ``adapter`` names).
        failures: plugins that failed to import or register.
        conflicts: ``(surface, kind, name) -> [origins]`` when two distributions register the same name.
    """

    stages: dict[tuple[str, str], StageImpl] = field(default_factory=dict)
    rewards: dict[str, RewardImpl] = field(default_factory=dict)
    backends: dict[str, BackendImpl] = field(default_factory=dict)
    datasets: dict[str, DatasetAdapter] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    conflicts: dict[tuple[str, str, str], list[str]] = field(default_factory=dict)

    def _table(self, surface: str) -> dict:
        tables = {"stage": self.stages, "reward": self.rewards, "backend": self.backends, "dataset": self.datasets}
        return tables[surface]

    def _failures_note(self) -> str:
        return "".join(f"; note: plugin '{f.entry_point}' from {f.distribution} {f.version} failed to load: {f.error}"
                       for f in self.failures)

    def lookup(self, kind: str, name: str) -> tuple[Optional[StageImpl], str]:
        """Find a stage implementation; on failure return ``(None, reason)``.

        The reason lists what is installed for ``kind``, a "did you mean", the kinds that do have
        ``name``, two distributions that both claim it, and any plugins that failed to load.
        """
        if ("stage", kind, name) in self.conflicts:
            return None, (f"'{name}' is registered for kind '{kind}' by more than one distribution: "
                          + ", ".join(self.conflicts[("stage", kind, name)]) + "; uninstall one of them")
        impl = self.stages.get((kind, name))
        if impl is not None:
            return impl, ""
        installed = sorted(n for (k, n) in self.stages if k == kind)
        msg = f"no '{kind}' implementation named '{name}'; installed for '{kind}': " + (", ".join(installed) or "none")
        hint = did_you_mean(name, installed)
        msg += f"; {hint}" if hint else ""
        other = sorted(k for (k, n) in self.stages if n == name and k != kind)
        if other:
            msg += f"; '{name}' exists for kind {', '.join(repr(k) for k in other)}"
        return None, msg + self._failures_note()

    def lookup_component(self, surface: str, name: str):
        """Find a reward or backend by name; on failure return ``(None, reason)`` (installed names,
        "did you mean", conflicts and failed plugins, as :meth:`lookup`)."""
        if (surface, "", name) in self.conflicts:
            return None, (f"{surface} '{name}' is registered by more than one distribution: "
                          + ", ".join(self.conflicts[(surface, "", name)]) + "; uninstall one of them")
        table = self._table(surface)
        if name in table:
            return table[name], ""
        msg = f"no {surface} named '{name}'; installed {surface}s: " + (", ".join(sorted(table)) or "none")
        hint = did_you_mean(name, table)
        return None, msg + (f"; {hint}" if hint else "") + self._failures_note()

    def rows(self) -> list[dict]:
        """One dict per implementation (stages by kind, then rewards, backends and dataset adapters), for
        ``rlhf-spec plugins``."""
        order = {k: i for i, k in enumerate(KINDS)}
        items = [("stage", k, n, impl) for (k, n), impl in sorted(self.stages.items(),
                                                                  key=lambda kv: (order.get(kv[0][0], 99), kv[0][1]))]
        items += [("reward", "", n, impl) for n, impl in sorted(self.rewards.items())]
        items += [("backend", "", n, impl) for n, impl in sorted(self.backends.items())]
        items += [("dataset", "", n, impl) for n, impl in sorted(self.datasets.items())]
        out = []
        for surface, kind, name, impl in items:
            row = {"surface": surface, "kind": kind, "name": name, "distribution": impl.distribution,
                   "version": impl.dist_version, "impl_version": impl.impl_version, "entry_point": impl.entry_point,
                   "description": impl.description}
            if surface == "stage":
                row.update(inputs=list(impl.inputs), output=impl.output)
            out.append(row)
        return out

    def add(self, surface: str, rec) -> None:
        """Add a loaded record; a second distribution claiming the same name turns it into a conflict."""
        table = self._table(surface)
        key = (rec.kind, rec.name) if surface == "stage" else rec.name
        ckey = (surface, rec.kind if surface == "stage" else "", rec.name)
        if key in table or ckey in self.conflicts:
            prev = table.pop(key, None)
            lst = self.conflicts.setdefault(ckey, [prev.origin()] if prev else [])
            lst.append(rec.origin())
            return
        table[key] = rec


def _dist_of(ep: md.EntryPoint) -> tuple[str, str]:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return "unknown", ""
    return dist.metadata["Name"] or dist.name, dist.version


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 400 else text[:400] + "..."


def _entry_points() -> list[tuple[md.EntryPoint, str, str]]:
    out, seen = [], set()
    for ep in md.entry_points(group=GROUP):
        dist, ver = _dist_of(ep)
        ident = (dist, ep.name, ep.value)
        if ident not in seen:  # the same distribution visible twice on sys.path
            seen.add(ident)
            out.append((ep, dist, ver))
    return out


def _check_record(surface: str, rec: object) -> None:
    """Raise TypeError/ValueError unless ``rec`` is a well-formed record of ``surface``."""
    want = SURFACES[surface][1]
    if not isinstance(rec, want):
        raise TypeError(f"register() of the {surface} hook takes a {want.__name__}, got {type(rec).__name__}")
    if surface == "stage" and rec.kind not in KINDS:
        raise ValueError(f"stage kind {rec.kind!r} is not one of {', '.join(KINDS)}")
    if not rec.name or not isinstance(rec.name, str):
        raise ValueError(f"a {want.__name__} needs a non-empty name")
    if surface == "dataset":
        if not rec.fit_for or set(rec.fit_for) - set(FIT):
            raise ValueError(f"dataset adapter '{rec.name}': fit_for must name some of {', '.join(FIT)}, "
                             f"got {rec.fit_for!r}")
        return
    if not (isinstance(rec.params, type) and issubclass(rec.params, BaseModel)):
        raise TypeError(f"{surface} '{rec.name}': params must be a pydantic BaseModel subclass")
    fn = rec.run if surface == "stage" else rec.load
    if not callable(fn):
        raise TypeError(f"{surface} '{rec.name}': {'run' if surface == 'stage' else 'load'} must be callable")


def _records(hook_impl, surface: str) -> list:
    records: list = []
    hook_impl.function(register=records.append)
    for rec in records:
        _check_record(surface, rec)
    return records


def _finish(rec, dist: str, ver: str, ep_name: str):
    """The record as registered, with its origin, its source digest (``source_hash``) and, for a stage
    whose ``run`` carries a ``check`` (:func:`rlhf_spec.pair_trainer`'s), that check too."""
    code = type(rec) if isinstance(rec, DatasetAdapter) else rec.run if isinstance(rec, StageImpl) else rec.load
    digest = package_digest(code) if rec.source_hash else ""
    extra = {}
    run_check = getattr(rec.run, "check", None) if isinstance(rec, StageImpl) else None
    if callable(run_check) and rec.check is not run_check:
        extra["check"] = run_check if rec.check is None else _both_checks(run_check, rec.check)
    return dataclasses.replace(rec, distribution=dist, dist_version=ver, entry_point=ep_name, source_digest=digest,
                               **extra)


def _both_checks(first, second):
    """One stage ``check(params, spec, inputs)`` returning the problems of ``first`` then ``second``
    (each called as :func:`~rlhf_spec.records.call_check` calls a check)."""

    def check(params, spec, inputs) -> list:
        return call_check(first, params, spec, inputs) + call_check(second, params, spec, inputs)

    return check


def load_registry(extra: Iterable[object] = (), entry_points: bool = True) -> Registry:
    """Load every ``rlhf_spec`` entry point (and ``extra`` plugin modules) into a :class:`Registry`.

    Args:
        extra: plugin objects registered in addition to the entry points, reported as
            distribution ``"<in-process>"`` (for tests and notebooks).
        entry_points: set False to skip installed plugins.

    Returns:
        the registry; a broken plugin is recorded as a :class:`~rlhf_spec.errors.PluginFailure`
        (its traceback goes to this module's logger at DEBUG level), never raised.
    """
    reg = Registry()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    origin: dict[str, tuple[str, str, str]] = {}
    for ep, dist, ver in _entry_points() if entry_points else []:
        pname = f"{dist}:{ep.name}"
        try:
            pm.register(ep.load(), name=pname)
        except Exception as exc:  # noqa: BLE001 - any failure is reported, not raised
            log.debug("plugin %s failed to load", pname, exc_info=True)
            reg.failures.append(PluginFailure(ep.name, dist, ver, _short_error(exc)))
            continue
        origin[pname] = (dist, ver, ep.name)
    for i, plugin in enumerate(extra):
        pname = f"<in-process>:{getattr(plugin, '__name__', i)}"
        pm.register(plugin, name=pname)
        origin[pname] = ("<in-process>", "", pname.split(":", 1)[1])
    for surface, (hook, _) in SURFACES.items():
        for hook_impl in getattr(pm.hook, hook).get_hookimpls():
            dist, ver, ep_name = origin.get(hook_impl.plugin_name, ("unknown", "", hook_impl.plugin_name))
            try:
                records = [_finish(r, dist, ver, ep_name) for r in _records(hook_impl, surface)]
            except Exception as exc:  # noqa: BLE001
                log.debug("plugin %s failed to register", hook_impl.plugin_name, exc_info=True)
                reg.failures.append(PluginFailure(ep_name, dist, ver, _short_error(exc)))
                continue
            for rec in records:
                reg.add(surface, rec)
    return reg


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
