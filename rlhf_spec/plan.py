"""The plan: which stages are cached and which would run, and why (``rlhf-spec plan --explain``)."""

from __future__ import annotations

import json
from typing import Any, Optional


def plan(runner, until: Optional[str] = None, force: frozenset = frozenset(), explain: bool = False) -> list[dict]:
    """For each selected stage: ``{"id", "kind", "uses", "distribution", "key", "status", "reason"}``.

    ``status`` is ``"cached"`` or ``"run"``. With ``explain``, a stage that will run is compared with the
    newest cached entry of the same stage, and the key ingredients that differ are listed under
    ``"changes"`` (``params.temperature: 0.7 -> 0.8``, ``inputs[0]: upstream stage 'score' changed``).

    Raises:
        UsageError: for an unknown ``until`` or ``force`` id.
        Errors of a plugin's ``resources`` function, named with the plugin's distribution.
    """
    runner.compute_keys()
    runner.check_force(force)
    rows = []
    for st in runner.selected(until):
        row: dict[str, Any] = {"id": st.id, "kind": st.impl.kind, "uses": st.impl.name,
                               "distribution": st.impl.distribution}
        if st.id in runner.key_errors:
            row.update(status="run", key=None, reason=f"key unknown: {runner.key_errors[st.id]}")
        else:
            row.update(_status(runner, st, force, explain))
        if st.impl.resources:
            row["resources"] = _resources(st)
        rows.append(row)
    return rows


def _status(runner, st, force, explain: bool) -> dict:
    key = runner.keys[st.id]
    if st.id in force:
        return {"key": key, "status": "run", "reason": "--force"}
    if runner.cache.has(key):
        return {"key": key, "status": "cached", "reason": "entry exists"}
    partial = runner.cache.partial_dir(key).exists()
    row = {"key": key, "status": "run",
           "reason": "no cached entry" + (" (partial work will be resumed)" if partial else "")}
    if explain:
        row["changes"] = explain_stage(runner, st)
        if row["changes"]:
            row["reason"] = "changed: " + "; ".join(row["changes"][:6])
    return row


def _resources(st) -> dict:
    from .errors import StageFailed

    try:
        return st.impl.resources(st.params)
    except Exception as exc:  # noqa: BLE001 - a plugin bug, named with its origin
        raise StageFailed(
            f"stage '{st.id}': resources() of {st.impl.origin()} failed: {type(exc).__name__}: {exc}"
        ) from exc


def explain_stage(runner, st) -> list[str]:
    """Diff this stage's key preimage against the newest earlier entry of the same stage id and spec
    (or kind and implementation); a changed input names its upstream stage."""
    pre = runner.preimages.get(st.id)
    if pre is None:
        return []
    best, best_time = None, ""
    for _key, man in runner.cache.entries():
        s = man.get("stage", {})
        if s.get("memo") or s.get("id") != st.id:
            continue
        same = s.get("spec") == runner.pipeline.spec.name or (
            s.get("kind") == st.impl.kind and s.get("uses") == st.impl.name
        )
        if same and man.get("created", "") >= best_time:
            best, best_time = man, man.get("created", "")
    if best is None:
        return ["no earlier entry of this stage"]
    out = []
    for d in diff(best.get("preimage", {}), pre, ""):
        if d.startswith("inputs["):
            idx = int(d[len("inputs["):d.index("]")])
            up = st.spec.inputs[idx] if idx < len(st.spec.inputs) else "?"
            out.append(f"{d.split(':')[0]}: upstream stage '{up}' changed")
        elif d.startswith("models.") and ".stage_key" in d:
            path = d[len("models."):d.index(".stage_key")]
            out.append(f"{d.split(':')[0]}: model from stage '{st.model_refs.get(path, '?')}' changed")
        else:
            out.append(d)
    return out


def diff(old: Any, new: Any, path: str) -> list[str]:
    """Differences between two JSON values as ``path: old -> new`` lines (``added``/``removed`` for keys)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            p = f"{path}.{k}" if path else k
            if k not in old:
                out.append(f"{p}: added ({_short(new[k])})")
            elif k not in new:
                out.append(f"{p}: removed")
            else:
                out.extend(diff(old[k], new[k], p))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in diff(a, b, f"{path}[{i}]")]
    if old != new or type(old) is not type(new):
        return [f"{path}: {_short(old)} -> {_short(new)}"]
    return []


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."
