"""Garbage collection: remove entries, converted models, partial work, trash and run records that no
kept run needs."""

from __future__ import annotations

import contextlib
import datetime as _dt
import shutil
import time
from pathlib import Path
from typing import Optional

from .lease import Lease, pid_alive


def _kept(runs: list[dict], keep_last: int) -> tuple[set[str], set[str]]:
    """(keys the last ``keep_last`` runs of each spec used, the files of those run records)."""
    by_spec: dict[str, list[dict]] = {}
    for r in runs:
        by_spec.setdefault(r.get("spec", "?"), []).append(r)
    keys, files = set(), set()
    for recs in by_spec.values():
        for r in recs[-keep_last:] if keep_last > 0 else []:
            keys.update(r.get("keys", []))
            files.add(r["_file"])
    return keys, files


def _old(mtime: float, older_than: Optional[float], now: float) -> bool:
    return older_than is None or now - mtime >= older_than


def _entries(cache, keep: set[str], older_than, now, dry_run, removed: list) -> int:
    freed = 0
    for key, man in list(cache.entries()):
        if key in keep:
            continue
        created = _dt.datetime.fromisoformat(man.get("created", "1970-01-01T00:00:00+00:00")).timestamp()
        if not _old(created, older_than, now):
            continue
        removed.append(key)
        freed += int(man.get("bytes", 0))
        if not dry_run:
            shutil.rmtree(cache.entry_dir(key), ignore_errors=True)
    return freed


def _folders(base: Path, label: str, keep_names: set[str], older_than, now, dry_run, removed: list) -> None:
    """Remove sub-folders (or files) of ``base`` not named in ``keep_names`` and old enough."""
    if not base.is_dir():
        return
    for d in sorted(base.iterdir()):
        name = d.name.split(".")[0]
        if name in keep_names or not _old(d.stat().st_mtime, older_than, now):
            continue
        removed.append(f"{label}/{d.name}")
        if not dry_run:
            shutil.rmtree(d, ignore_errors=True) if d.is_dir() else d.unlink(missing_ok=True)


def _tidy(cache, dry_run: bool) -> None:
    """Remove temporary folders of dead processes and leases whose holder is gone."""
    if dry_run:
        return
    tmp = cache.root / "tmp"
    if tmp.is_dir():
        for d in tmp.iterdir():
            parts = d.name.split(".")
            if len(parts) >= 2 and parts[1].isdigit() and not pid_alive(int(parts[1])):
                shutil.rmtree(d, ignore_errors=True)
    locks = cache.root / "locks"
    if locks.is_dir():
        for p in locks.glob("*.lease"):
            stale, judged = Lease(p)._judge()
            if stale:
                Lease(p)._break_stale(judged)


def _partial(cache, keep: set[str], older_than, now, dry_run, removed: list) -> None:
    """Partial work goes when its entry exists, or when it is old and no kept run needs it; a
    folder a live process is resuming into (a fresh lease) always stays."""
    base = cache.root / "partial"
    if not base.is_dir():
        return
    for d in sorted(base.iterdir()):
        live = cache.lease(d.name)
        if not cache.has(d.name) and live.path.exists() and not live.stale():
            continue
        if cache.has(d.name) or (older_than is not None and _old(d.stat().st_mtime, older_than,
                                                                 now) and d.name not in keep):
            removed.append(f"partial/{d.name}")
            if not dry_run:
                shutil.rmtree(d, ignore_errors=True)


def collect(cache, keep_last: int = 1, older_than: Optional[float] = None, dry_run: bool = False) -> dict:
    """Remove what no kept run needs.

    The last ``keep_last`` runs of each spec are kept, with every key they used. With ``older_than``
    (seconds), anything is removed only if it is older than that. Removed: unkept entries and
    ``converted/`` models; ``trash/`` (entries set aside after failed verification); ``partial/``
    work whose entry exists, or that is old and unkept; temporary folders of dead processes; stale
    leases; and the records of unkept runs (so a later gc cannot be steered by a run whose entries
    are gone).

    Returns:
        ``{"removed": [keys and folder names], "kept": n, "freed_bytes": n, "dry_run": bool}``.
    """
    runs = cache.runs()
    keep, kept_files = _kept(runs, keep_last)
    now = time.time()
    removed: list[str] = []
    freed = _entries(cache, keep, older_than, now, dry_run, removed)
    _folders(cache.root / "converted", "converted", keep, older_than, now, dry_run, removed)
    _folders(cache.root / "trash", "trash", set(), older_than, now, dry_run, removed)
    _tidy(cache, dry_run)
    _partial(cache, keep, older_than, now, dry_run, removed)
    for r in runs:
        path = Path(r["_file"])
        with contextlib.suppress(OSError):
            if r["_file"] in kept_files or not _old(path.stat().st_mtime, older_than, now):
                continue
            removed.append(f"runs/{path.name}")
            if not dry_run:
                path.unlink()
    return {"removed": removed, "kept": len(keep), "freed_bytes": freed, "dry_run": dry_run}
