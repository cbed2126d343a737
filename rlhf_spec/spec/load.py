"""Reading a spec file strictly, and ``--set KEY=VALUE`` overrides.

JSON allows neither ``NaN``/``Infinity`` nor, in practice, duplicated keys (RFC 8259 says names
SHOULD be unique; a duplicate silently keeps the last value in most parsers). Both are rejected with
the line, the column and the JSON pointer of the offending token.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional

from ..errors import Problem, SpecError, UsageError, did_you_mean


class _Strictness(ValueError):
    """A duplicated key or a non-finite number found by the strict parser."""


def _pairs(pairs: list) -> dict:
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise _Strictness(f"duplicate key '{k}'")
        seen.add(k)
    return dict(pairs)


def _constant(name: str):
    raise _Strictness(f"{name} is not valid JSON (numbers must be finite)")


def strict_loads(text: str) -> Any:
    """Parse JSON, rejecting duplicated keys and NaN/Infinity.

    Raises:
        json.JSONDecodeError: for ordinary syntax errors.
        ValueError: for a duplicate key or non-finite number, with ``(line, column, pointer)`` in
            its ``args[1:]``.
    """
    try:
        return json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except _Strictness as exc:
        line, col, ptr = _locate(text)
        raise ValueError(str(exc), line, col, ptr) from None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    return line, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _locate(text: str) -> tuple[int, int, str]:
    """Line, column and JSON pointer of the first duplicated key or NaN/Infinity token in ``text``.

    A small walk over the document that tracks the path; strings are read with the standard
    library's own scanner.
    """
    from json.decoder import scanstring

    stack: list[dict] = []  # per open container: {"keys": set | None, "path": [...], "index": int, "key": str}
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        top = stack[-1] if stack else None
        if ch == '"':
            value, end = scanstring(text, pos + 1)
            after = text[end:].lstrip()
            if top is not None and top["keys"] is not None and after.startswith(":"):
                if value in top["keys"]:
                    return (*_line_col(text, pos), _ptr(top["path"] + [value]))
                top["keys"].add(value)
                top["key"] = value
            pos = end
            continue
        if ch in "{[":
            path = list(top["path"]) + [top["key"] if top["keys"] is not None else top["index"]] if top else []
            stack.append({"keys": set() if ch == "{" else None, "path": path, "index": 0, "key": ""})
        elif ch in "}]":
            stack.pop()
        elif ch == "," and top is not None and top["keys"] is None:
            top["index"] += 1
        elif text.startswith(("NaN", "Infinity", "-Infinity"), pos):
            here = list(top["path"]) + [top["key"] if top["keys"] is not None else top["index"]] if top else []
            return (*_line_col(text, pos), _ptr(here))
        pos += 1
    return 1, 1, ""


def _ptr(parts: list) -> str:
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def load_json(path: str | os.PathLike) -> dict:
    """Read a spec file as strict JSON.

    Raises:
        SpecError: if the file is missing or unreadable, is not valid JSON (line and column), has a
            duplicated key or a NaN/Infinity (line, column and JSON pointer), or is not an object.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem("", f"spec file not found: {path}")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem("", f"cannot read spec file: {exc}")], str(path)) from None
    try:
        data = strict_loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([Problem("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")],
                        str(path)) from None
    except ValueError as exc:
        msg, line, col, ptr = exc.args
        raise SpecError([Problem(ptr, f"invalid JSON at line {line}, column {col}: {msg}")], str(path)) from None
    if not isinstance(data, dict):
        raise SpecError([Problem("", "the spec must be a JSON object")], str(path))
    return data


def _parse_value(key: str, raw: str) -> Any:
    """A ``--set`` value: strict JSON, else the text as a string (NaN/Infinity and duplicate keys are errors)."""
    try:
        return strict_loads(raw)
    except json.JSONDecodeError:
        return raw
    except ValueError as exc:
        raise UsageError(f"--set {key}: {exc.args[0]}") from None


def _index(node: list, part: str, key: str, trail: list) -> int:
    """The list index a ``--set`` path segment names: a number or a stage id."""
    if part.isdigit() and int(part) < len(node):
        return int(part)
    for j, el in enumerate(node):
        if isinstance(el, dict) and el.get("id") == part:
            return j
    hint = did_you_mean(part, [str(el.get("id")) for el in node if isinstance(el, dict)])
    raise UsageError(f"--set {key}: no element '{part}' under /{'/'.join(trail)}" + (f"; {hint}" if hint else ""))


def _assign(data: dict, key: str, value: Any) -> None:
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UsageError(f"--set has an empty key: {key!r}")
    node: Any = data
    trail: list[str] = []
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            part = str(_index(node, part, key, trail))
            idx: Any = int(part)
        elif isinstance(node, dict):
            idx = part
            if not last and part not in node:
                node[part] = {}
        else:
            raise UsageError(f"--set {key}: /{'/'.join(trail)} is not an object or list")
        trail.append(part)
        if last:
            node[idx] = value
        else:
            node = node[idx]


def apply_overrides(data: dict, overrides: Optional[list[str]]) -> dict:
    """Apply ``--set KEY=VALUE`` overrides to a raw spec dict and return a new dict.

    ``KEY`` is a dotted path; a segment under a list may be an index or a stage id
    (``stages.sample.params.n=2``). ``VALUE`` is parsed as strict JSON, else kept as a string.

    Raises:
        UsageError: for a malformed override, a path that does not exist, or a NaN/Infinity value.
    """
    data = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        _assign(data, key, _parse_value(key, raw))
    return data
