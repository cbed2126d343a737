"""Turning pydantic validation errors into problems with JSON pointers and suggestions."""

from __future__ import annotations

import json
from typing import Any, Optional, get_args, get_origin

from pydantic import BaseModel, ValidationError

from ..errors import Problem, did_you_mean


def pointer(parts: tuple | list) -> str:
    """RFC 6901 JSON pointer for a pydantic ``loc`` tuple, e.g. ('stages', 2, 'params') -> '/stages/2/params'."""
    out = [str(p).replace("~", "~0").replace("/", "~1") for p in parts]
    return "/" + "/".join(out) if out else ""


def _model_fields(model: type[BaseModel]) -> list[str]:
    names = []
    for fname, f in model.model_fields.items():
        names.append(f.alias or fname)
    return names


def _unwrap_model(tp):
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    for arg in get_args(tp) or ():
        m = _unwrap_model(arg)
        if m is not None:
            return m
    return None


def problems_from_validation(exc: ValidationError, model: type[BaseModel], prefix: tuple = ()) -> list[Problem]:
    """Turn a pydantic ``ValidationError`` into :class:`Problem` s with JSON pointers and suggestions."""
    out = []
    for err in exc.errors(include_url=False):
        loc = tuple(err.get("loc", ()))
        # pydantic puts model_validator errors at the model's loc; drop the synthetic tail it may add
        typ = err.get("type", "")
        msg = err.get("msg", "invalid")
        hint = ""
        if typ == "extra_forbidden":
            parent_loc = loc[:-1]
            owner = _owner_model(model, parent_loc)
            if owner is not None:
                hint = did_you_mean(loc[-1], _model_fields(owner))
            msg = f"unknown key '{loc[-1]}'"
        elif typ == "missing":
            msg = f"missing required key '{loc[-1]}'"
        elif "input" in err and typ not in ("model_type", "dict_type") and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {json.dumps(err['input'])[:80]})"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        out.append(Problem(pointer(prefix + loc), msg, hint))
    return out


def _owner_model(model: type[BaseModel], loc: tuple) -> Optional[type[BaseModel]]:
    cur: Any = model
    i = 0
    loc = list(loc)
    while i < len(loc):
        part = loc[i]
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return None
        fld = None
        for fname, f in cur.model_fields.items():
            if part in (fname, f.alias):
                fld = f
                break
        if fld is None:
            return None
        ann = fld.annotation
        origin = get_origin(ann)
        args = get_args(ann)
        if origin in (list, dict) and args:
            # skip the index / key segment
            i += 1
            ann = args[-1]
        cur = _unwrap_model(ann) or ann
        i += 1
    return cur if isinstance(cur, type) and issubclass(cur, BaseModel) else None
