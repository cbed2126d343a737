"""Resumable work inside a stage: rows split into content-defined shards, each committed as it finishes.

Rows go to shard ``int(prompt_id[:8], 16) % num_shards``, so a shard's content never depends on the
number of workers or GPUs. Each finished shard is written to a temporary folder, its files hashed and
fsynced, renamed into ``partial_dir/shards``, then appended (with the file hashes) to an append-only
journal. A rerun after a crash skips every journalled shard whose files still verify.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..data import load_rows, save_rows
from ..files import commit_tree, file_records, verify_files
from ..runtime import commit_hook


def _journal(path: Path) -> dict[int, dict]:
    done: dict[int, dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line from a crash
            done[int(rec["shard"])] = rec
    return done


def _commit_shard(sdir: Path, journal: Path, s: int, out, counts: dict) -> Path:
    final = sdir / f"{s:05d}"
    tmp = sdir / f".{s:05d}.{os.getpid()}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_rows(out, tmp)
    files = file_records(tmp)
    commit_tree(tmp, final, replace=True)
    with open(journal, "a", encoding="utf-8") as f:
        f.write(json.dumps({"shard": s, "rows": len(out), "files": files, "counts": counts}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    commit_hook("shard", f"{partial_dir_name(sdir)}:{s}")
    return final


def partial_dir_name(sdir: Path) -> str:
    return sdir.parent.name[:12]


def run_shards(partial_dir: Path, rows, process: Callable[[Any, int], Any], num_shards: int, progress=None):
    """Process ``rows`` in content-defined shards, committing each shard as it finishes.

    Args:
        partial_dir: the stage's folder for work in progress.
        rows: a ``datasets.Dataset`` with a ``prompt_id`` column.
        process: ``process(shard_rows, shard_index) -> datasets.Dataset``, or ``(dataset, counts)`` with
            ``counts`` a dict of integers journalled with the shard (so resumed shards keep theirs).
        num_shards: number of shards (part of the cache key, since it fixes batch composition).
        progress: optional :class:`~rlhf_spec.context.Progress`, advanced past reused shards.

    Returns:
        ``(dataset, reused, computed, counts)``: the concatenation of all shard outputs in shard order,
        how many shards were reused from the journal or computed now, and the shards' counts summed.
    """
    import datasets

    sdir = Path(partial_dir) / "shards"
    sdir.mkdir(parents=True, exist_ok=True)
    journal = Path(partial_dir) / "journal.jsonl"
    done = _journal(journal)
    members: dict[int, list[int]] = {}
    for i, pid in enumerate(rows["prompt_id"]):
        members.setdefault(int(pid[:8], 16) % num_shards, []).append(i)
    if progress is not None:
        progress.start(len(rows))
    outs, reused, computed, counts = [], 0, 0, {}
    for s in sorted(members):
        final = sdir / f"{s:05d}"
        rec = done.get(s)
        if rec is not None and verify_files(final, rec["files"]) is None:
            reused += 1
            if progress is not None:
                progress.advance(len(members[s]))
        else:
            res = process(rows.select(members[s]), s)
            ds, shard_counts = res if isinstance(res, tuple) else (res, {})
            _commit_shard(sdir, journal, s, ds, shard_counts)
            rec, computed = {"counts": shard_counts}, computed + 1
        for k, v in (rec.get("counts") or {}).items():
            counts[k] = counts.get(k, 0) + int(v)
        outs.append(final)
    parts = [load_rows(p) for p in outs]
    full = [p for p in parts if len(p)]
    if full:
        return datasets.concatenate_datasets(full), reused, computed, counts
    return (parts[0] if parts else rows.select([])), reused, computed, counts
