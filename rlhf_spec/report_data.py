"""The data of ``rlhf-spec report``: a run report or cache run record read into one shape, and the pieces
of its stages' cache entries that the page shows (training history, evaluation table and metrics).

Nothing here draws or writes HTML, and nothing fails on a missing piece: a gone entry, a missing
``history.json`` or per-answer table gives ``None`` and a note saying why.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import UsageError

#: Statuses of a stage whose output came from the cache in that run (its ``seconds`` are about 0).
CACHED = ("cached", "reused")


def num(v: Any) -> float | None:
    """``v`` as a finite float, else ``None`` (booleans, strings, NaN and infinities are not numbers here)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def computed_seconds(stage: dict) -> float | None:
    """The seconds a cached stage's entry took when it was computed (``computed_seconds``), else ``None``.

    Only stages served from the cache (``cached``, ``reused``) carry it; for the others ``seconds`` already
    is the computing time.
    """
    return num(stage.get("computed_seconds")) if stage.get("status") in CACHED else None


def _read_json(path: Path, what: str) -> Any:
    """The JSON document at ``path``; :class:`UsageError` naming ``what`` if it is missing or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"{what} {path} is not valid JSON: {exc}") from None


def load_run(source: Path) -> dict:
    """Read a run report or a cache run record and return it in the run report's shape.

    Args:
        source: a run report (``rlhf-spec run --report PATH``: keys ``spec``, ``status``, ``stages``, ...) or
            a cache run record (``<cache>/runs/<time>-<pid>.json``: keys ``spec``, ``source``, ``keys``).

    Returns:
        The report dict (``spec``, ``status``, ``seconds``, ``warnings``, ``stages``, ...). For a run record the
        stages are rebuilt from each key's manifest, ``status`` is ``"recorded"`` and ``kind_of_source`` says so;
        keys whose entry is gone are listed under ``missing``.

    Raises:
        UsageError: if ``source`` does not exist, is not JSON, or is neither a run report nor a run record.
    """
    source = Path(source)
    doc = _read_json(source, "run report or run record")
    if isinstance(doc, dict) and isinstance(doc.get("stages"), list) and "spec" in doc:
        run = dict(doc)
        run["stages"] = [s for s in doc["stages"] if isinstance(s, dict)]
        run.setdefault("kind_of_source", "run report")
        run.setdefault("missing", [])
        return run
    if isinstance(doc, dict) and isinstance(doc.get("keys"), list) and "spec" in doc:
        return _run_from_record(doc, source)
    raise UsageError(f"{source} is neither a run report (written by `rlhf-spec run --report PATH`, with 'spec' and "
                     "'stages') nor a cache run record (<cache>/runs/*.json, with 'spec' and 'keys')")


def _spec_order(spec_source: str) -> list[str]:
    """Stage ids in the order of the spec file, or ``[]`` if it cannot be read."""
    try:
        spec = json.loads(Path(spec_source).read_text(encoding="utf-8"))
        return [s["id"] for s in spec.get("stages", []) if isinstance(s, dict) and "id" in s]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def _run_from_record(record: dict, source: Path) -> dict:
    """A run report rebuilt from a cache run record: one stage per key whose manifest names a stage."""
    root = source.resolve().parent.parent
    stages, missing = [], []
    for key in record["keys"]:
        if not isinstance(key, str) or len(key) < 3:
            continue
        folder = root / "entries" / key[:2] / key
        try:
            man = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            missing.append(f"cache entry {key[:12]} is gone (removed by `cache gc`?) or unreadable; "
                           "its stage is not shown")
            continue
        st = man.get("stage") or {}
        if not st.get("id") or "memo" in st or "kind" not in st:
            continue  # memo entries (reference logprobs) and converted models are not stages
        stages.append({"id": st["id"], "kind": st.get("kind", ""), "uses": st.get("uses", ""), "key": key,
                       "status": "recorded", "seconds": float(man.get("seconds") or 0.0), "output": str(folder),
                       "output_type": man.get("output_type", ""), "metrics": man.get("metrics") or {},
                       "rows": man.get("rows"), "reason": "", "_created": man.get("created", "")})
    order = _spec_order(record.get("source", ""))
    stages.sort(key=lambda s: (order.index(s["id"]) if s["id"] in order else len(order), s["_created"]))
    seconds = sum(s["seconds"] for s in stages)
    return {"spec": record.get("spec", ""), "source": record.get("source", ""), "status": "recorded", "error": "",
            "started": "", "seconds": seconds, "warnings": [], "summary": {}, "stages": stages, "missing": missing,
            "cache_dir": str(root), "kind_of_source": f"cache run record {source.name} (times are those of the run "
                                                       "that computed each entry)"}


def _entry(stage: dict) -> Path | None:
    """The stage's output folder if it still exists, else ``None``."""
    out = stage.get("output") or ""
    return Path(out) if out and Path(out).is_dir() else None


def _gone(stage: dict) -> str:
    """Why a stage has no output folder to read, in words."""
    if not stage.get("output"):
        return f"stage '{stage.get('id')}' ({stage.get('status', '?')}) has no output folder"
    return f"stage '{stage.get('id')}': its output folder {stage['output']} is gone (removed by `cache gc`?)"


def read_history(stage: dict, notes: list[str] | None = None) -> list[dict] | None:
    """A train stage's ``history.json`` (one dict per update), or ``None`` if it is missing.

    Args:
        stage: one stage of the run report (uses its ``id`` and ``output`` folder).
        notes: a list to append the reason to when the history is missing (optional).

    Returns:
        The list of per-update dicts, or ``None``.

    Raises:
        Nothing: a missing, unreadable or malformed file gives ``None`` and a note.
    """
    folder = _entry(stage)
    why = ""
    if folder is None:
        why = f"{_gone(stage)}; no training curves"
    elif not (folder / "history.json").is_file():
        why = f"stage '{stage.get('id')}': no history.json in {folder}; no training curves"
    else:
        try:
            hist = json.loads((folder / "history.json").read_text(encoding="utf-8"))
            if isinstance(hist, list):
                return [h for h in hist if isinstance(h, dict)]
            why = f"stage '{stage.get('id')}': history.json is not a list; no training curves"
        except (OSError, ValueError) as exc:
            why = f"stage '{stage.get('id')}': history.json cannot be read ({exc}); no training curves"
    if notes is not None:
        notes.append(why)
    return None


def read_eval_table(stage: dict, notes: list[str] | None = None) -> dict[str, list] | None:
    """An evaluate stage's per-answer table (``data/``, one row per prompt and sample) as columns.

    Args:
        stage: one evaluate stage of the run report (uses its ``id`` and ``output`` folder).
        notes: a list to append the reason to when the table is missing (optional).

    Returns:
        ``{column: values}`` (``prompt``, ``policy``, ``reference``, ``policy_reward/<judge>``, ...), or ``None``
        if the folder is gone or cannot be loaded.

    Raises:
        Nothing: a missing or unloadable table gives ``None`` and a note.
    """
    folder = _entry(stage)
    why = ""
    if folder is None:
        why = _gone(stage)
    elif not (folder / "data").is_dir():
        why = f"stage '{stage.get('id')}': no per-answer table (data/) in {folder}"
    else:
        try:
            import datasets

            return datasets.load_from_disk(str(folder / "data")).to_dict()
        except Exception as exc:  # noqa: BLE001 - any load failure is reported on the page
            why = f"stage '{stage.get('id')}': the per-answer table cannot be loaded ({type(exc).__name__}: {exc})"
    if notes is not None:
        notes.append(why + "; no reward distributions or examples")
    return None


def eval_metrics(stage: dict) -> dict:
    """An evaluate stage's metrics.

    Args:
        stage: one evaluate stage of the run report.

    Returns:
        The stage's ``metrics`` from the report, or its entry's ``metrics.json`` when those are empty; ``{}``
        when neither is available.

    Raises:
        Nothing: an unreadable ``metrics.json`` gives ``{}``.
    """
    metrics = stage.get("metrics") or {}
    folder = _entry(stage)
    if not metrics and folder is not None and (folder / "metrics.json").is_file():
        try:
            metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            metrics = {}
    return metrics if isinstance(metrics, dict) else {}


def judges_of(metrics: dict, table: dict | None = None) -> list[str]:
    """The judge names of an evaluate stage.

    Args:
        metrics: the evaluate metrics (``<judge>.win_rate`` keys, ``primary_judge``).
        table: the per-answer table's columns (``policy_reward/<judge>``), if loaded.

    Returns:
        Judge names without duplicates, the primary judge first.

    Raises:
        Nothing.
    """
    names = [k[: -len(".win_rate")] for k in metrics if k.endswith(".win_rate")]
    names += [c.split("/", 1)[1] for c in (table or {}) if c.startswith("policy_reward/")]
    out = list(dict.fromkeys(names))
    primary = metrics.get("primary_judge")
    if primary in out:
        out.remove(primary)
        out.insert(0, primary)
    return out


def judge_value(metrics: dict, judge: str, name: str, primary: bool) -> float | None:
    """``<judge>.<name>``, or the unprefixed ``<name>`` for the primary judge of a single-judge evaluation."""
    v = metrics.get(f"{judge}.{name}")
    if v is None and primary:
        v = metrics.get(name)
    return num(v)
