"""File-system primitives of the cache: atomic JSON writes, hashed file lists, and the one atomic
tree commit (write into a temporary folder, fsync, rename into place) every writer uses."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from ..errors import CacheError
from ..hashing import list_files, sha256_file


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


def oserror_text(exc: OSError, path: Path) -> str:
    """A one-line message for a failed write; a full disk gets a hint."""
    if exc.errno == errno.ENOSPC:
        return f"out of disk space while writing {path}; free space or point --cache-dir at a larger disk (entries already cached are intact)"
    return f"cannot write {path}: {exc}"


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
        raise CacheError(oserror_text(exc, path)) from exc


def file_records(folder: Path, skip: tuple[str, ...] = ()) -> list[dict]:
    """fsync every file under ``folder`` and list it as ``{"path", "sha256", "size"}`` (sorted by path).

    Raises:
        OSError: if a file cannot be read.
    """
    out = []
    for p in list_files(folder):
        rel = p.relative_to(folder).as_posix()
        if rel in skip:
            continue
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        out.append({"path": rel, "sha256": sha256_file(p), "size": p.stat().st_size})
    return out


def verify_files(folder: Path, records: list[dict]) -> Optional[str]:
    """The first way ``folder`` differs from ``records`` (``"x: missing"``, size, sha256), or None if it matches."""
    for rec in records:
        p = Path(folder) / rec["path"]
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            return f"{rec['path']}: missing"
        if size != rec["size"]:
            return f"{rec['path']}: size {size} != {rec['size']}"
        if sha256_file(p) != rec["sha256"]:
            return f"{rec['path']}: sha256 mismatch"
    return None


def commit_tree(tmp: Path, final: Path, replace: bool = False) -> bool:
    """Move the finished folder ``tmp`` to ``final`` in one rename.

    If ``final`` exists: with ``replace`` the old folder is renamed aside first and removed after the
    new one is in place (readers see the old or the new folder, never a mix); without it, ``tmp`` is
    discarded (another process committed the same content) and False is returned.

    Raises:
        OSError: if the rename fails for another reason.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if replace and final.exists():
        old = final.parent / f".{final.name}.old.{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError as exc:
        if old is not None:
            os.rename(old, final)  # put the old folder back: nothing is lost
            raise
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and final.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(final.parent)
    return True
