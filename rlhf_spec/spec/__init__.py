"""The spec: pydantic models, strict loading and ``--set``, validation before compute, and the JSON Schema.

A spec is one JSON document::

    {"$schema": "../schemas/rlhf-spec.schema.json",
     "name": "quickstart-cpu", "seed": 0,
     "models":   {"policy": {"path": "models/SmolLM2-135M-Instruct", "gguf_file": "..."}},
     "datasets": {"prompts": {"path": "data/hh-rlhf/harmless-base_test.jsonl.gz", "adapter": "hh-rlhf"}},
     "stages": [{"id": "sample", "kind": "sample", "uses": "generate",
                 "params": {"policy": "policy", "prompts": "prompts", "n": 4,
                            "backend": {"uses": "transformers", "params": {"batch_size": 16}}}}, ...]}

Every problem is reported with its JSON pointer (``/stages/2/params/temperature``), and unknown
keys and names come with a "did you mean".
"""

from __future__ import annotations

import os
from typing import Optional

from ..errors import SpecError
from ..graph import Pipeline, Stage  # noqa: F401
from ..refs import field_markers  # noqa: F401
from .load import apply_overrides, load_json, strict_loads  # noqa: F401
from .models import CacheSpec, DatasetSpec, ModelSpec, Spec, StageSpec  # noqa: F401
from .problems import pointer, problems_from_validation  # noqa: F401
from .repeat import expand
from .schema import json_schema  # noqa: F401
from .validate import validate  # noqa: F401


def load_pipeline(path: str | os.PathLike, registry, overrides: Optional[list[str]] = None,
                  check_files: bool = True) -> Pipeline:
    """Read, override and validate a spec file.

    Raises:
        SpecError: on any problem (exit code 2).
        UsageError: on a malformed ``--set``.
    """
    data = load_json(path)
    before, after = split_overrides(data, overrides or [])
    try:
        expanded, origins = expand(apply_overrides(data, before))
    except SpecError as exc:
        raise SpecError(exc.problems, str(path)) from None
    return validate(apply_overrides(expanded, after), registry, source=str(path), check_files=check_files,
                    origins=origins)


def split_overrides(data: dict, overrides: list[str]) -> tuple[list[str], list[str]]:
    """``--set`` items for the spec as written, and those that name a stage only a ``repeat`` block
    creates (``stages.sample_iter2.params.n=2``), applied after expansion."""
    ids = {s.get("id") for s in data.get("stages", []) if isinstance(s, dict)}
    before, after = [], []
    for item in overrides:
        parts = item.split("=", 1)[0].strip().split(".")
        late = len(parts) > 1 and parts[0] == "stages" and not parts[1].isdigit() and parts[1] not in ids
        (after if late else before).append(item)
    return before, after
