"""The content-addressed store of stage outputs: entries, verified reads, commits, and memo entries.

Layout under the cache folder (default ``.rlhf-cache``)::

    entries/ab/<key>/manifest.json   the commit point: key preimage, files with sha256 and size
    entries/ab/<key>/...             the stage output (datasets save_to_disk folder, model folder)
    partial/<key>/                   in-progress work of a stage: committed shards, checkpoints, journal
    locks/<key>.lease                who is computing a key (pid, host, heartbeat); expires by itself
    converted/<digest>/              dequantised copies of GGUF models
    runs/<time>-<pid>.json           which keys each run used (for gc)
    trash/                           entries set aside after a failed verification
    state/                           stat-keyed file digests of external inputs
    tmp/                             outputs being written

An entry is written into ``tmp/``, every file is hashed and fsynced, the manifest is written last, and
the folder is renamed into ``entries/`` in one atomic step. A crash leaves either nothing or a complete
entry. Reads verify every file's sha256 once per process; a mismatch sets the entry aside and counts as
a miss.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

from ..errors import CacheError
from ..files import atomic_write_json, commit_tree, file_records, oserror_text, verify_files
from ..hashing import HashState
from ..runtime import commit_hook
from .lease import Lease

KEY_FORMAT = 1
MANIFEST = "manifest.json"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Cache:
    """The stage cache under one folder.

    Args:
        root: the cache folder; created on first write.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()  # reports and run records name entries from any folder
        self.hash_state = HashState(self.root / "state")
        self._verified: set[str] = set()
        self.warnings: list[str] = []

    # -- paths ---------------------------------------------------------------------------

    def entry_dir(self, key: str) -> Path:
        return self.root / "entries" / key[:2] / key

    def partial_dir(self, key: str) -> Path:
        return self.root / "partial" / key

    def converted_dir(self, digest: str) -> Path:
        return self.root / "converted" / digest

    def lease(self, key: str) -> Lease:
        return Lease(self.root / "locks" / f"{key}.lease")

    # -- reading -------------------------------------------------------------------------

    def has(self, key: str) -> bool:
        """True if a committed entry exists for ``key`` (not verified)."""
        return (self.entry_dir(key) / MANIFEST).is_file()

    def manifest(self, key: str) -> Optional[dict]:
        """The entry's manifest, or None if absent or unreadable."""
        try:
            return json.loads((self.entry_dir(key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def verify(self, key: str, force: bool = False) -> bool:
        """Check every file of an entry against its manifest (size and sha256).

        Each key is verified at most once per process unless ``force``. A mismatch moves the entry
        to ``trash/``, records a warning and returns False, so the caller recomputes it.
        """
        if key in self._verified and not force:
            return self.has(key)
        man = self.manifest(key)
        if man is None:
            if self.entry_dir(key).exists():
                self.quarantine(key, "manifest missing or unreadable")
            return False
        bad = verify_files(self.entry_dir(key), man.get("files", []))
        if bad:
            self.quarantine(key, bad)
            return False
        self._verified.add(key)
        return True

    def quarantine(self, key: str, reason: str) -> Optional[Path]:
        """Move a bad entry aside into ``trash/`` and warn; returns its new place."""
        src = self.entry_dir(key)
        dst = self.root / "trash" / f"{key}.{int(time.time())}.{uuid.uuid4().hex[:6]}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        msg = f"cache entry {key[:12]} failed verification ({reason}); set aside in {dst} and recomputing"
        self.warnings.append(msg)
        warnings.warn(msg, stacklevel=2)
        try:
            os.rename(src, dst)
        except OSError:
            shutil.rmtree(src, ignore_errors=True)
            return None
        return dst

    def entries(self) -> Iterator[tuple[str, dict]]:
        """Yield ``(key, manifest)`` for every committed entry with a readable manifest."""
        for d in self.entry_folders():
            try:
                yield d.name, json.loads((d / MANIFEST).read_text())
            except (OSError, ValueError):
                continue

    def entry_folders(self) -> list[Path]:
        """Every folder under ``entries/``, whether or not its manifest is readable."""
        base = self.root / "entries"
        if not base.is_dir():
            return []
        return sorted(d for sub in base.iterdir() if sub.is_dir() for d in sub.iterdir() if d.is_dir())

    # -- writing -------------------------------------------------------------------------

    def begin(self, key: str) -> Path:
        """A fresh temporary folder to write ``key``'s output into.

        Raises:
            CacheError: if it cannot be created.
        """
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise CacheError(oserror_text(exc, tmp)) from exc
        return tmp

    def commit(self, key: str, tmp: Path, manifest: dict, replace: bool = False) -> Path:
        """Hash and fsync every file in ``tmp``, write the manifest last, and rename into place.

        If another process committed the same key first, ours is discarded (the content is the
        same by construction). With ``replace`` (``--force``), an existing entry is replaced in one
        step instead, without being treated as corrupt.

        Raises:
            CacheError: if writing fails (disk full, permissions); nothing is left half-committed.
        """
        tmp, final = Path(tmp), self.entry_dir(key)
        try:
            files = file_records(tmp, skip=(MANIFEST,))
            man = dict(manifest, format=KEY_FORMAT, key=key, files=files, created=_now(),
                       bytes=sum(f["size"] for f in files))
            atomic_write_json(tmp / MANIFEST, man)
            commit_tree(tmp, final, replace=replace)
        except CacheError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(oserror_text(exc, final)) from exc
        self._verified.add(key)
        commit_hook("entry", key[:12])
        return final

    def memo(self, key: str, compute: Callable[[Path], dict], manifest: dict) -> Path:
        """Return the entry for ``key``, computing it with ``compute(tmp_dir) -> metrics`` if absent or corrupt.

        Used for intermediate results shared across stages, such as reference-policy logprobs.

        Raises:
            CacheError: if the entry cannot be written.
        """
        if self.has(key) and self.verify(key):
            return self.entry_dir(key)
        lease = self.lease(key)
        while not lease.try_acquire():
            if self.has(key) and self.verify(key):
                return self.entry_dir(key)
            time.sleep(0.5)
        try:
            if self.has(key) and self.verify(key):
                return self.entry_dir(key)
            tmp = self.begin(key)
            metrics = compute(tmp) or {}
            return self.commit(key, tmp, dict(manifest, metrics=metrics))
        finally:
            lease.release()

    # -- runs ----------------------------------------------------------------------------

    def record_run(self, record: dict) -> Path:
        """Write a run record (which keys it used) under ``runs/``."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.root / "runs" / f"{stamp}-{os.getpid()}.json"
        atomic_write_json(path, record)
        return path

    def runs(self) -> list[dict]:
        """All run records, oldest first (each with its file under ``_file``)."""
        out = []
        d = self.root / "runs"
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                try:
                    rec = json.loads(p.read_text())
                except (OSError, ValueError):
                    continue
                rec["_file"] = str(p)
                out.append(rec)
        return out

    def scan(self) -> list[dict]:
        """Verify every entry (a full re-hash); returns ``[{key, ok, stage, bytes}]``.

        Entry folders whose manifest is missing or unreadable are included (and set aside), so a
        damaged manifest cannot hide an entry from the scan.
        """
        out = []
        for d in self.entry_folders():
            man = self.manifest(d.name) or {}
            ok = self.verify(d.name, force=True)
            out.append({"key": d.name, "ok": ok, "stage": man.get("stage", {}), "bytes": man.get("bytes", 0)})
        return out

    def gc(self, keep_last: int = 1, older_than: Optional[float] = None, dry_run: bool = False) -> dict:
        """Remove what no kept run needs; see :func:`rlhf_spec.cache.gc.collect`."""
        from .gc import collect

        return collect(self, keep_last=keep_last, older_than=older_than, dry_run=dry_run)
