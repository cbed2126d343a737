"""Content hashing: canonical JSON with type tags, files and folders (a file's bytes are read by
:func:`rlhf_spec.files.sha256_file`, the one file primitive of that kind).

Cache keys are sha256 digests of a *preimage*: a JSON-able dict that names
everything that determines a stage's output. ``canonical_json`` encodes it so
that equal values always give equal bytes and values of different types never
collide (``1``, ``1.0``, ``"1"`` and ``True`` all hash differently).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from .files import atomic_write_text, list_files, sha256_file


def _tag(value: Any) -> Any:
    """Return ``value`` rewritten so that every scalar carries its type.

    Raises:
        TypeError: for values that have no canonical JSON form (sets, objects).
    """
    if value is None:
        return ["null"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", str(value)]
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ["float", repr(value)]
        return ["float", value.hex()]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, (list, tuple)):
        return ["list", [_tag(v) for v in value]]
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"cache preimage keys must be strings, got {type(k).__name__}: {k!r}")
        return ["dict", {k: _tag(value[k]) for k in sorted(value)}]
    raise TypeError(f"cannot hash a value of type {type(value).__name__} in a cache preimage: {value!r}")


def canonical_json(value: Any) -> bytes:
    """Encode ``value`` as canonical, type-tagged JSON bytes (sorted keys, no spaces).

    Raises:
        TypeError: if ``value`` holds something other than None, bool, int, float, str, list, dict.
    """
    return json.dumps(_tag(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def hash_json(value: Any) -> str:
    """Return the sha256 hex digest (64 characters) of ``canonical_json(value)``."""
    return hashlib.sha256(canonical_json(value)).hexdigest()


class HashState:
    """A stat-keyed memo of file digests, like DVC's state database.

    A digest is reused while a file's (size, mtime_ns, inode) are unchanged, so a
    rerun does not read multi-gigabyte model weights again to learn their
    identity. Entries are small JSON files written atomically, so concurrent
    runs can share the folder. Verification of cached *outputs* never uses this
    memo: it always reads the bytes.
    """

    def __init__(self, folder: Path | None):
        self.folder = Path(folder) if folder else None
        self._mem: dict[str, tuple[tuple, str]] = {}

    def _slot(self, path: Path) -> Path:
        assert self.folder is not None
        return self.folder / (hashlib.sha1(str(path).encode()).hexdigest() + ".json")

    def file_digest(self, path: str | os.PathLike) -> str:
        """sha256 of ``path``, served from the memo when its stat is unchanged.

        Raises:
            OSError: if the file cannot be read.
        """
        path = Path(path).resolve()
        st = path.stat()
        sig = (st.st_size, st.st_mtime_ns, st.st_ino)
        key = str(path)
        hit = self._mem.get(key)
        if hit and hit[0] == sig:
            return hit[1]
        if self.folder is not None:
            slot = self._slot(path)
            try:
                rec = json.loads(slot.read_text())
                if tuple(rec["sig"]) == sig and rec["path"] == key:
                    self._mem[key] = (sig, rec["sha256"])
                    return rec["sha256"]
            except (OSError, ValueError, KeyError):
                pass
        from .errors import CacheError

        digest = sha256_file(path)
        self._mem[key] = (sig, digest)
        if self.folder is not None:
            try:
                atomic_write_text(slot, json.dumps({"path": key, "sig": list(sig), "sha256": digest}))
            except CacheError:
                pass  # the memo is an optimisation; a read-only cache still works
        return digest

    def tree_digest(self, root: str | os.PathLike) -> str:
        """Digest of a file, or of a folder as the sorted list of (relative path, sha256).

        Raises:
            FileNotFoundError: if ``root`` does not exist.
        """

        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(str(root))
        if root.is_file():
            return self.file_digest(root)
        listing = [[p.relative_to(root).as_posix(), self.file_digest(p)] for p in list_files(root)]
        return hash_json(listing)


def package_digest(obj) -> str:
    """sha256 over the ``.py`` files of the top-level package that defines ``obj`` (a function or class).

    Plugins that opt into ``source_hash`` key their outputs on it, so editing the plugin's code
    (without bumping its version) cannot silently reuse outputs of the old code.

    Raises:
        OSError: if a source file cannot be read.
    """
    import importlib


    top = importlib.import_module(obj.__module__.split(".")[0])
    if hasattr(top, "__path__"):
        root = Path(list(top.__path__)[0])
        files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
    else:
        root = Path(top.__file__).parent
        files = [Path(top.__file__)]
    return hash_json([[p.relative_to(root).as_posix(), sha256_file(p)] for p in files])
