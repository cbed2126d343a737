"""File primitives: the one atomic file write (temporary file in the same folder, fsync, rename into
place) behind every JSON, text or bytes write; a file's sha256 and the sorted file list of a folder;
hashed file records; and the one atomic tree commit (write into a temporary folder, fsync, rename into
place) every writer uses.

A bottom module: of the package it imports only :class:`rlhf_spec.errors.CacheError`, so every layer
uses it (the cache's store and shards, checkpoints, the hashing memo, the GGUF conversion).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Optional

from .errors import CacheError

CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Return the sha256 hex digest of a file's bytes, read in 1 MiB chunks.

    Raises:
        OSError: if the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])
    return h.hexdigest()


def list_files(root: Path) -> list[Path]:
    """All regular files under ``root`` (following symlinks), sorted by relative POSIX path."""
    root = Path(root)
    if root.is_file():
        return [root]
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            out.append(Path(dirpath) / name)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


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
        return (f"out of disk space while writing {path}; free space or point --cache-dir at a larger disk "
                "(entries already cached are intact)")
    return f"cannot write {path}: {exc}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: into a temporary file in the same folder (created if
    missing), fsync, rename over ``path``, fsync the folder. Readers see the old file or the new one,
    never a part; the temporary file is removed when the write fails.

    Raises:
        CacheError: if the write fails (for example, the disk is full); its ``__cause__`` is the OSError.
    """
    path = Path(path)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CacheError(oserror_text(exc, path)) from exc


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`atomic_write_bytes`.

    Raises:
        CacheError: if the write fails.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON (indent 1, sorted keys) to ``path`` atomically, as :func:`atomic_write_bytes`.

    Raises:
        CacheError: if the write fails (for example, the disk is full). TypeError: if ``obj`` is not JSON-able.
    """
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True))


def fsync_file(path: Path) -> None:
    """fsync one file's data to disk.

    Raises:
        OSError: if the file cannot be opened.
    """
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder: Path) -> None:
    """fsync every file under ``folder`` (before renaming the folder into place with :func:`commit_tree`).

    Raises:
        OSError: if a file cannot be opened.
    """
    for p in list_files(folder):
        fsync_file(p)


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
        fsync_file(p)
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
