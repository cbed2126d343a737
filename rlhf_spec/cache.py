"""The content-addressed stage cache.

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

An entry is written into ``tmp/``, every file is hashed and fsynced, the manifest
is written last, and the folder is renamed into ``entries/`` in one atomic step.
A crash leaves either nothing or a complete entry. Reads verify every file's
sha256 once per process; a mismatch sets the entry aside and counts as a miss.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .errors import CacheError
from .hashing import HashState, list_files, sha256_file

KEY_FORMAT = 1
MANIFEST = "manifest.json"
LEASE_TTL = 60.0  # seconds without a heartbeat after which a lease is stale
HEARTBEAT = 5.0


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    """fsync a folder so a rename inside it survives a power cut (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same folder, fsync, then rename.

    Raises:
        CacheError: if the write fails (for example, the disk is full).
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CacheError(_oserror_text(exc, path)) from exc


def _oserror_text(exc: OSError, path: Path) -> str:
    if exc.errno == errno.ENOSPC:
        return f"out of disk space while writing {path}; free space or point --cache-dir at a larger disk (entries already cached are intact)"
    return f"cannot write {path}: {exc}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """A per-key lease file that says who is computing a key.

    Keys are content-addressed, so two runs computing the same key is only
    wasted time, never corruption; the lease lets the second run wait and reuse
    the first one's result. A lease whose holder died (same host, pid gone) or
    whose heartbeat is older than ``ttl`` seconds is broken automatically, so no
    manual unlock is ever needed.
    """

    def __init__(self, path: Path, ttl: float = LEASE_TTL, heartbeat: float = HEARTBEAT):
        self.path = Path(path)
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.held = False

    def _info(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _judge(self) -> tuple[bool, Optional[dict]]:
        """``(stale, what was read)`` for the current lease file."""
        info = self._info()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return False, None
        if info is None:
            return age > 5.0, None  # a half-written lease older than a few seconds
        try:
            pid = int(info.get("pid", -1))
        except (TypeError, ValueError):
            pid = -1
        if info.get("host") == socket.gethostname() and not _pid_alive(pid):
            return True, info
        return age > self.ttl, info

    def stale(self) -> bool:
        """True if the current lease file belongs to a dead process or has no recent heartbeat."""
        return self._judge()[0]

    def _break_stale(self, judged: Optional[dict]) -> bool:
        """Remove the lease file judged stale; return False if it was replaced since the judgement.

        The file is renamed aside first (atomic), then its content is compared with what was judged.
        If another waiter broke the stale lease and took a fresh one in between, we have moved *that*
        lease: it is put back (unless yet another lease appeared), so no holder ever loses its lease.
        """
        aside = self.path.with_name(self.path.name + f".stale.{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except OSError:
            return False  # gone already: someone else broke it
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        same = (moved is None) if judged is None else (moved is not None and moved.get("token") == judged.get("token"))
        if not same:
            with contextlib.suppress(OSError):
                os.link(aside, self.path)  # put the fresh lease back; fails if a newer one exists
        with contextlib.suppress(OSError):
            os.unlink(aside)
        return same

    def try_acquire(self) -> bool:
        """Take the lease if it is free or stale; return whether we hold it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                stale, judged = self._judge()
                if stale:
                    self._break_stale(judged)
                    continue
                return False
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "token": self.token, "since": _now()}, f)
            self.held = True
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()
            return True
        return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def holder(self) -> Optional[dict]:
        return self._info()

    def release(self) -> None:
        """Give the lease back (only if it is still ours)."""
        self._stop.set()
        if self.held:
            info = self._info()
            if info and info.get("token") == self.token:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            self.held = False


class Cache:
    """The stage cache under one folder.

    Args:
        root: the cache folder; created on first write.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
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

        Each key is verified at most once per process unless ``force``. A
        mismatch moves the entry to ``trash/``, records a warning and returns
        False, so the caller recomputes it.
        """
        if key in self._verified and not force:
            return self.has(key)
        man = self.manifest(key)
        if man is None:
            if self.entry_dir(key).exists():
                self.quarantine(key, "manifest missing or unreadable")
            return False
        d = self.entry_dir(key)
        for rec in man.get("files", []):
            p = d / rec["path"]
            try:
                if p.stat().st_size != rec["size"]:
                    self.quarantine(key, f"{rec['path']}: size {p.stat().st_size} != {rec['size']}")
                    return False
                if sha256_file(p) != rec["sha256"]:
                    self.quarantine(key, f"{rec['path']}: sha256 mismatch")
                    return False
            except FileNotFoundError:
                self.quarantine(key, f"{rec['path']}: missing")
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
        """Yield ``(key, manifest)`` for every committed entry."""
        base = self.root / "entries"
        if not base.is_dir():
            return
        for sub in sorted(base.iterdir()):
            if not sub.is_dir():
                continue
            for d in sorted(sub.iterdir()):
                try:
                    man = json.loads((d / MANIFEST).read_text())
                except (OSError, ValueError):
                    continue
                yield d.name, man

    # -- writing -------------------------------------------------------------------------

    def begin(self, key: str) -> Path:
        """A fresh temporary folder to write ``key``'s output into."""
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
        except OSError as exc:
            raise CacheError(_oserror_text(exc, tmp)) from exc
        return tmp

    def commit(self, key: str, tmp: Path, manifest: dict) -> Path:
        """Hash and fsync every file in ``tmp``, write the manifest last, and rename into place.

        If another process committed the same key first, ours is discarded (the
        content is the same by construction).

        Raises:
            CacheError: if writing fails (disk full, permissions); nothing is left half-committed.
        """
        tmp = Path(tmp)
        final = self.entry_dir(key)
        try:
            files = []
            for p in list_files(tmp):
                rel = p.relative_to(tmp).as_posix()
                if rel == MANIFEST:
                    continue
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files.append({"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size})
            man = dict(manifest)
            man.update({"format": KEY_FORMAT, "key": key, "files": files, "created": _now()})
            man["bytes"] = sum(f["size"] for f in files)
            atomic_write_json(tmp / MANIFEST, man)
            final.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, final)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and self.has(key):
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
            fsync_dir(final.parent)
        except CacheError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CacheError(_oserror_text(exc, final)) from exc
        self._verified.add(key)
        return final

    def memo(self, key: str, compute: Callable[[Path], dict], manifest: dict) -> Path:
        """Return the entry for ``key``, computing it with ``compute(tmp_dir) -> metrics`` if absent or corrupt.

        Used for intermediate results shared across stages, such as reference-policy
        logprobs, which several training stages can reuse.
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
            man = dict(manifest)
            man["metrics"] = metrics
            return self.commit(key, tmp, man)
        finally:
            lease.release()

    # -- runs and gc ---------------------------------------------------------------------

    def record_run(self, record: dict) -> Path:
        """Write a run record (which keys it used) under ``runs/``."""
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S%f")
        path = self.root / "runs" / f"{stamp}-{os.getpid()}.json"
        atomic_write_json(path, record)
        return path

    def runs(self) -> list[dict]:
        """All run records, oldest first."""
        out = []
        d = self.root / "runs"
        if d.is_dir():
            for p in sorted(d.glob("*.json")):
                try:
                    rec = json.loads(p.read_text())
                    rec["_file"] = str(p)
                    out.append(rec)
                except (OSError, ValueError):
                    continue
        return out

    def gc(self, keep_last: int = 1, older_than: Optional[float] = None, dry_run: bool = False) -> dict:
        """Remove entries no kept run needs.

        The last ``keep_last`` runs of each spec are kept, with every key they
        used. With ``older_than`` (seconds), an unkept entry is removed only if it
        was created longer ago than that. Stale ``tmp/`` folders of dead
        processes are removed too; ``partial/`` work is kept while its entry is
        still missing, unless older than ``older_than``.

        Returns:
            ``{"removed": [keys], "kept": n, "freed_bytes": n}``.
        """
        runs = self.runs()
        by_spec: dict[str, list[dict]] = {}
        for r in runs:
            by_spec.setdefault(r.get("spec", "?"), []).append(r)
        keep: set[str] = set()
        for recs in by_spec.values():
            for r in recs[-keep_last:] if keep_last > 0 else []:
                keep.update(r.get("keys", []))
        now = time.time()
        removed, freed = [], 0
        for key, man in list(self.entries()):
            if key in keep:
                continue
            if older_than is not None:
                created = _dt.datetime.fromisoformat(man.get("created", _now())).timestamp()
                if now - created < older_than:
                    continue
            removed.append(key)
            freed += int(man.get("bytes", 0))
            if not dry_run:
                shutil.rmtree(self.entry_dir(key), ignore_errors=True)
        for folder in ("converted",):
            base = self.root / folder
            if base.is_dir():
                for d in base.iterdir():
                    if d.name not in keep and (older_than is None or now - d.stat().st_mtime >= older_than):
                        removed.append(f"{folder}/{d.name}")
                        if not dry_run:
                            shutil.rmtree(d, ignore_errors=True)
        tmp = self.root / "tmp"
        if tmp.is_dir() and not dry_run:
            for d in tmp.iterdir():
                parts = d.name.split(".")
                if len(parts) >= 2 and parts[1].isdigit() and not _pid_alive(int(parts[1])):
                    shutil.rmtree(d, ignore_errors=True)
        locks = self.root / "locks"
        if locks.is_dir() and not dry_run:
            # leases left by killed processes (they are broken on demand anyway; this tidies them)
            for p in locks.glob("*.lease"):
                stale, judged = Lease(p)._judge()
                if stale:
                    Lease(p)._break_stale(judged)
        partial = self.root / "partial"
        if partial.is_dir():
            for d in partial.iterdir():
                live = self.lease(d.name)
                if not self.has(d.name) and live.path.exists() and not live.stale():
                    continue  # a running process is resuming into it
                if self.has(d.name) or (older_than is not None and now - d.stat().st_mtime >= older_than and d.name not in keep):
                    removed.append(f"partial/{d.name}")
                    if not dry_run:
                        shutil.rmtree(d, ignore_errors=True)
        # Records of runs that are not kept go too (with --older-than, only the old ones), so a later
        # gc cannot be steered by a run whose entries are gone.
        kept_runs = set()
        for recs in by_spec.values():
            kept_runs.update(r["_file"] for r in (recs[-keep_last:] if keep_last > 0 else []))
        for r in runs:
            path = Path(r["_file"])
            if r["_file"] in kept_runs:
                continue
            with contextlib.suppress(OSError):
                if older_than is not None and now - path.stat().st_mtime < older_than:
                    continue
                removed.append(f"runs/{path.name}")
                if not dry_run:
                    path.unlink()
        return {"removed": removed, "kept": len(keep), "freed_bytes": freed, "dry_run": dry_run}

    def scan(self) -> list[dict]:
        """Verify every entry (a full re-hash); returns ``[{key, ok, stage}]``.

        Entry folders whose manifest is missing or unreadable are included (and set aside), so a
        damaged manifest cannot hide an entry from the scan.
        """
        out = []
        base = self.root / "entries"
        folders = sorted(d for sub in base.iterdir() if sub.is_dir() for d in sub.iterdir() if d.is_dir()) if base.is_dir() else []
        for d in folders:
            key = d.name
            man = self.manifest(key) or {}
            ok = self.verify(key, force=True)
            out.append({"key": key, "ok": ok, "stage": man.get("stage", {}), "bytes": man.get("bytes", 0)})
        return out
