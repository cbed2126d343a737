"""Where a relative spec path points: the one resolver every module uses, and its validation."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import Problem

#: A hub id: ``name`` or ``owner/name``.
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$"


def resolve(value: str | os.PathLike, base: str | os.PathLike) -> Path:
    """``value`` as an absolute path: itself if absolute, else ``base / value``."""
    p = Path(value)
    return p if p.is_absolute() else Path(base) / p


def escapes(value: str) -> bool:
    """True if relative path ``value`` climbs out of its base folder with ``..`` (lexically)."""
    if Path(value).is_absolute():
        return False
    norm = os.path.normpath(str(value))
    return norm == ".." or norm.startswith(".." + os.sep)


def check_path(value: str, ptr: str, problems: list[Problem], base: Path, must_exist: bool = True) -> None:
    """Add a problem at ``ptr`` if ``value`` leaves the working directory or (with ``must_exist``) is missing.

    The check is lexical: ``..`` may not climb out; a symlink inside the folder is the user's choice.
    """
    if escapes(value):
        problems.append(Problem(ptr, f"path '{value}' leaves the working directory",
                                "use a path inside it, or an absolute path"))
    elif must_exist and not resolve(value, base).exists():
        problems.append(Problem(ptr, f"file or folder not found: {value}"))


def looks_local(value: str) -> bool:
    """True for a model or tokenizer source that is a local path rather than a hub id (``owner/name``)."""
    if os.path.isabs(value) or value.startswith(".") or ".." in value.replace("\\", "/").split("/"):
        return True
    return not re.match(HUB_ID_PATTERN, value)
