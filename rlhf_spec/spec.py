"""The spec: pydantic models, loading, ``--set`` overrides and validation before compute.

A spec is one JSON document::

    {"$schema": "../schemas/rlhf-spec.schema.json",
     "name": "quickstart-cpu", "seed": 0,
     "models":   {"policy": {"path": "models/SmolLM2-135M-Instruct", "gguf_file": "..."}},
     "datasets": {"prompts": {"path": "data/hh-rlhf/harmless-base_test.jsonl.gz", "adapter": "hh-rlhf"}},
     "stages": [{"id": "sample", "kind": "sample", "uses": "transformers",
                 "inputs": [], "params": {"policy": "policy", "prompts": "prompts", "n": 4}}, ...]}

Every problem is reported with its JSON pointer (``/stages/2/params/temperature``),
and unknown keys and names come with a "did you mean".
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Problem, SpecError, UsageError
from .hookspecs import KINDS, DatasetRef, ModelRef, NotInKey, StageImpl

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SCHEMA_FILE = "rlhf-spec.schema.json"


HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$"


def _check_hub_id(v: Optional[str]) -> Optional[str]:
    """A hub id is 'name' or 'owner/name'; anything with '..' or a leading '/' or '.' is a local path in disguise
    (transformers and datasets would read it from disk), so it is refused."""
    if v is not None and (not re.match(HUB_ID_PATTERN, v) or ".." in v):
        raise ValueError(f"'{v}' is not a hub id ('owner/name'); for a local folder use 'path'")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(_Strict):
    """A model the spec reads: a Hugging Face Hub repo or a local folder/file."""

    hub: Optional[str] = Field(
        None, description="Hub repo id, e.g. 'meta-llama/Meta-Llama-3-8B-Instruct'. Exactly one of hub/path."
    )
    revision: Optional[str] = Field(
        None,
        description="Hub revision (branch, tag or commit). Resolved to a commit for the cache key; pin a commit for reproducible keys offline.",
    )
    path: Optional[str] = Field(
        None, description="Local folder (save_pretrained layout or a folder holding a GGUF file). Relative paths are resolved against the working directory and may not leave it."
    )
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside the folder; weights are dequantised on load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype on load. 'auto' is bfloat16 on a CUDA GPU and float32 on CPU."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow this model's repository code to run (needed by e.g. ArmoRM). Off unless set here, for this model only.",
    )
    tokenizer: Optional[str] = Field(None, description="Another hub id or folder to load the tokenizer from.")

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.hub) == bool(self.path):
            raise ValueError("give exactly one of 'hub' or 'path'")
        if self.gguf_file and not self.path:
            raise ValueError("'gguf_file' needs 'path'")
        return self

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, v):
        return _check_hub_id(v)

    @field_validator("gguf_file")
    @classmethod
    def _plain_file_name(cls, v):
        # a file name inside 'path', never a path of its own that could climb out of it
        if v is not None and (v in ("", ".", "..") or "/" in v or "\\" in v):
            raise ValueError(f"'{v}' must be a file name inside the model folder, without '/' or '..'")
        return v


class DatasetSpec(_Strict):
    """A dataset the spec reads, normalised to columns ``prompt_id``, ``prompt`` (chat messages)
    and, for preference data, ``chosen`` and ``rejected`` (the final assistant reply)."""

    hub: Optional[str] = Field(None, description="Hub dataset id, e.g. 'allenai/ultrafeedback_binarized_cleaned_train'.")
    revision: Optional[str] = Field(None, description="Hub revision; resolved to a commit for the cache key.")
    config: Optional[str] = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read.")
    path: Optional[str] = Field(None, description="Local file or folder (json, jsonl, jsonl.gz, parquet, csv, or save_to_disk folder).")
    adapter: Literal["generic", "hh-rlhf"] = Field(
        "generic",
        description="'hh-rlhf': parse '\\n\\nHuman:'/'\\n\\nAssistant:' transcripts in chosen/rejected; the prompt is the transcript up to the last assistant turn. 'generic': read the named columns (a string is one user turn; a list of {role, content} or {from, value} messages is kept).",
    )
    prompt_column: str = Field("prompt", description="Column holding the prompt (string or chat messages).")
    chosen_column: Optional[str] = Field(None, description="Column with the preferred response, for preference data.")
    rejected_column: Optional[str] = Field(None, description="Column with the dispreferred response, for preference data.")
    hash_range: tuple[float, float] = Field(
        (0.0, 1.0),
        description="Keep rows whose prompt hash falls in [lo, hi) of [0, 1). Disjoint ranges give disjoint prompt sets (by content, independent of row order).",
    )
    limit: Optional[int] = Field(None, ge=1, description="Keep at most this many rows (after hash_range), in file order.")
    dedupe_prompts: bool = Field(True, description="Keep one row per distinct prompt.")

    @model_validator(mode="after")
    def _check(self):
        if bool(self.hub) == bool(self.path):
            raise ValueError("give exactly one of 'hub' or 'path'")
        return self

    @field_validator("hash_range")
    @classmethod
    def _range(cls, v):
        lo, hi = v
        if not (0.0 <= lo < hi <= 1.0):
            raise ValueError("hash_range must satisfy 0 <= lo < hi <= 1")
        return v

    @field_validator("hub")
    @classmethod
    def _hub_id(cls, v):
        return _check_hub_id(v)

    def columns(self) -> tuple[str, ...]:
        """Normalised columns this dataset provides."""
        if self.adapter == "hh-rlhf":
            return ("prompt_id", "prompt", "chosen", "rejected")
        cols = ["prompt_id", "prompt"]
        if self.chosen_column and self.rejected_column:
            cols += ["chosen", "rejected"]
        return tuple(cols)


class StageSpec(_Strict):
    """One stage: an implementation (``uses``) of a ``kind``, its data ``inputs`` and ``params``."""

    id: str = Field(..., pattern=ID_PATTERN, description="Unique stage id (letters, digits, '_', '.', '-').")
    kind: Literal["sample", "score", "filter", "pair", "train", "evaluate"] = Field(..., description="Stage kind.")
    uses: str = Field(..., min_length=1, description="Implementation name, as listed by 'rlhf-spec plugins'.")
    inputs: list[str] = Field(default_factory=list, description="Ids of earlier stages whose outputs this stage reads.")
    params: dict[str, Any] = Field(default_factory=dict, description="Implementation params; see the implementation's schema.")
    description: str = Field("", description="Free text.")


class CacheSpec(_Strict):
    """Cache settings."""

    dir: Optional[str] = Field(None, description="Cache folder. Overridden by --cache-dir and RLHF_SPEC_CACHE; default '.rlhf-cache'.")


class Spec(_Strict):
    """A whole pipeline."""

    schema_: Optional[str] = Field(None, alias="$schema", description="Path or URL of the JSON Schema, for editors.")
    name: str = Field(..., pattern=NAME_PATTERN, description="Pipeline name.")
    description: str = Field("", description="Free text.")
    seed: int = Field(0, ge=0, description="Global seed; part of every stage's cache key.")
    salt: str = Field("", description="Changing it disowns every cached entry of this spec (for poisoned caches).")
    requires: list[str] = Field(
        default_factory=list, description="Distributions the spec needs, as PEP 508 requirements, e.g. 'rlhf-spec-armorm>=0.1'."
    )
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Models by name; params refer to them by name.")
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict, description="Datasets by name.")
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Cache settings.")
    stages: list[StageSpec] = Field(..., min_length=1, description="The stages, in any order consistent with their inputs.")

    @field_validator("models", "datasets")
    @classmethod
    def _names(cls, v: dict):
        for k in v:
            if not re.match(NAME_PATTERN, k):
                raise ValueError(f"name {k!r} must match {NAME_PATTERN}")
        return v


# --------------------------------------------------------------------------- loading


def pointer(parts: tuple | list) -> str:
    """RFC 6901 JSON pointer for a pydantic ``loc`` tuple, e.g. ('stages', 2, 'params') -> '/stages/2/params'."""
    out = []
    for p in parts:
        s = str(p).replace("~", "~0").replace("/", "~1")
        out.append(s)
    return "/" + "/".join(out) if out else ""


def load_json(path: str | os.PathLike) -> dict:
    """Read a spec file as JSON.

    Raises:
        SpecError: if the file is missing or is not valid JSON (the message gives line and column).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError([Problem("", f"spec file not found: {path}")], str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError([Problem("", f"cannot read spec file: {exc}")], str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError([Problem("", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")], str(path)) from None
    if not isinstance(data, dict):
        raise SpecError([Problem("", "the spec must be a JSON object")], str(path))
    return data


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set KEY=VALUE`` overrides to a raw spec dict and return a new dict.

    ``KEY`` is a dotted path; a segment after ``stages`` may be a stage id or an index
    (``stages.sample.params.n=2``). ``VALUE`` is parsed as JSON, else kept as a string.

    Raises:
        UsageError: for a malformed override or a path that does not exist.
    """
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise UsageError(f"--set has an empty key: {item!r}")
        node: Any = data
        trail = []
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):
                idx = None
                if part.isdigit():
                    idx = int(part)
                else:
                    for j, el in enumerate(node):
                        if isinstance(el, dict) and el.get("id") == part:
                            idx = j
                            break
                if idx is None or idx >= len(node):
                    ids = [el.get("id") for el in node if isinstance(el, dict)]
                    close = difflib.get_close_matches(part, [str(x) for x in ids], n=1)
                    hint = f"; did you mean '{close[0]}'?" if close else ""
                    raise UsageError(f"--set {key}: no element '{part}' under /{'/'.join(trail)}{hint}")
                trail.append(str(idx))
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                trail.append(part)
                if last:
                    node[part] = value
                else:
                    if part not in node:
                        node[part] = {}
                    node = node[part]
            else:
                raise UsageError(f"--set {key}: /{'/'.join(trail)} is not an object or list")
    return data


# --------------------------------------------------------------------------- validation


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(str(name), [str(o) for o in options], n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'?" if close else ""


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
                hint = _suggest(loc[-1], _model_fields(owner))
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


def field_markers(model: type[BaseModel]) -> dict[str, list]:
    """``field name -> [ModelRef | DatasetRef | NotInKey ...]`` from ``Annotated`` metadata."""
    out = {}
    for fname, f in model.model_fields.items():
        found = list(f.metadata) + _annotated_metadata(f.annotation)
        marks = [m for m in found if isinstance(m, (ModelRef, DatasetRef, NotInKey))]
        if marks:
            out[fname] = marks
    return out


def _annotated_metadata(tp) -> list:
    """Metadata of ``Annotated`` types nested in ``tp`` (e.g. inside ``Optional[...]``)."""
    out = list(getattr(tp, "__metadata__", ()))
    for arg in get_args(tp) or ():
        if arg is not tp:
            out += _annotated_metadata(arg)
    return out


@dataclass
class Stage:
    """A validated stage: the spec entry, its implementation and its parsed params.

    Attributes:
        deps: stage ids it depends on (data ``inputs`` plus stages named by model-ref params).
        model_refs: ``param name -> name`` for every ModelRef param that is set.
        dataset_refs: ``param name -> dataset name`` for every DatasetRef param that is set.
    """

    index: int
    spec: StageSpec
    impl: StageImpl
    params: BaseModel
    deps: list[str] = field(default_factory=list)
    model_refs: dict[str, str] = field(default_factory=dict)
    dataset_refs: dict[str, str] = field(default_factory=dict)
    output_type: str = ""

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def ptr(self) -> str:
        return f"/stages/{self.index}"


@dataclass
class Pipeline:
    """A validated spec: the parsed document, stages in topological order, and where it came from."""

    spec: Spec
    stages: list[Stage]
    source: str
    raw: dict

    def stage(self, sid: str) -> Stage:
        for s in self.stages:
            if s.id == sid:
                return s
        raise KeyError(sid)


def _check_path(value: str, ptr: str, problems: list[Problem], base: Path, must_exist: bool = True) -> None:
    p = Path(value)
    if not p.is_absolute():
        # lexical check: '..' may not climb out; a symlink inside the folder is the user's choice
        norm = os.path.normpath(str(p))
        if norm == ".." or norm.startswith(".." + os.sep):
            problems.append(Problem(ptr, f"path '{value}' leaves the working directory", "use a path inside it, or an absolute path"))
            return
        p = base / p
    if must_exist and not p.exists():
        problems.append(Problem(ptr, f"file or folder not found: {value}"))


def _looks_local(value: str) -> bool:
    """True for a tokenizer source that is a local path rather than a hub id ('owner/name')."""
    if os.path.isabs(value) or value.startswith(".") or ".." in value.replace("\\", "/").split("/"):
        return True
    return not re.match(HUB_ID_PATTERN, value)


def validate(data: dict, registry, source: str = "", base: Optional[Path] = None, check_files: bool = True) -> Pipeline:
    """Validate a raw spec dict completely, before any compute.

    Checks, in order: the top-level schema; each stage's implementation (kind and ``uses``)
    and its params model; references (inputs, model and dataset names); duplicate ids;
    cycles; input artifact types; ``requires``; local files; plugin-specific checks.

    Args:
        data: the parsed JSON document (after ``--set`` overrides).
        registry: the :class:`rlhf_spec.plugins.Registry` of installed implementations.
        source: the spec's path, for messages.
        base: folder that relative paths resolve against (default: the working directory).
        check_files: check that local files and folders exist.

    Returns:
        the :class:`Pipeline`, stages in topological order.

    Raises:
        SpecError: listing every problem found, each with its JSON pointer.
    """
    base = Path(base or os.getcwd())
    problems: list[Problem] = []
    stages_raw = data.get("stages")
    # Validate everything but stage params first.
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, Spec))
        spec = None
    if spec is None:
        # still validate stage params when the stage objects themselves look fine, to report all at once
        if isinstance(stages_raw, list):
            for i, st in enumerate(stages_raw):
                if isinstance(st, dict):
                    _validate_params(i, st, registry, problems)
        raise SpecError(problems, source)

    stages: list[Stage] = []
    ids: dict[str, int] = {}
    for i, st in enumerate(spec.stages):
        if st.id in ids:
            problems.append(Problem(f"/stages/{i}/id", f"duplicate stage id '{st.id}' (also /stages/{ids[st.id]}/id)"))
            continue
        ids[st.id] = i
        if st.id in spec.models:
            problems.append(Problem(f"/stages/{i}/id", f"stage id '{st.id}' is also a model name in /models; rename one"))
        res = _validate_params(i, st.model_dump(by_alias=True), registry, problems)
        if res is not None:
            impl, params = res
            stages.append(Stage(i, st, impl, params))

    by_id = {s.id: s for s in stages}
    for s in stages:
        deps: list[str] = []
        for j, ref in enumerate(s.spec.inputs):
            if ref == s.id:
                problems.append(Problem(f"{s.ptr}/inputs/{j}", f"stage '{s.id}' lists itself as an input"))
            elif ref not in ids:
                problems.append(Problem(f"{s.ptr}/inputs/{j}", f"unknown stage '{ref}'", _suggest(ref, ids)))
            else:
                deps.append(ref)
        impl = s.impl
        n = len(s.spec.inputs)
        if n < impl.min_inputs or (impl.max_inputs is not None and n > impl.max_inputs):
            want = f"{impl.min_inputs}" if impl.max_inputs == impl.min_inputs else (
                f"{impl.min_inputs} to {impl.max_inputs}" if impl.max_inputs is not None else f"at least {impl.min_inputs}"
            )
            problems.append(Problem(f"{s.ptr}/inputs", f"{impl.kind}/{impl.name} takes {want} input(s), got {n}"))
        for fname, marks in field_markers(type(s.params)).items():
            value = getattr(s.params, fname)
            if value is None:
                continue
            alias = type(s.params).model_fields[fname].alias or fname
            ptr = f"{s.ptr}/params/{alias}"
            for m in marks:
                if isinstance(m, ModelRef):
                    s.model_refs[fname] = value
                    if value in spec.models:
                        continue
                    if value in ids:
                        if value == s.id:
                            problems.append(Problem(ptr, f"stage '{s.id}' cannot use its own output as a model"))
                        else:
                            deps.append(value)
                        continue
                    problems.append(
                        Problem(ptr, f"'{value}' is neither a model in /models nor a stage id", _suggest(value, list(spec.models) + list(ids)))
                    )
                elif isinstance(m, DatasetRef):
                    s.dataset_refs[fname] = value
                    if value not in spec.datasets:
                        problems.append(Problem(ptr, f"unknown dataset '{value}'", _suggest(value, spec.datasets) or f"defined: {', '.join(spec.datasets) or 'none'}"))
                        continue
                    have = spec.datasets[value].columns()
                    missing = [c for c in m.columns if c not in have]
                    if missing:
                        problems.append(
                            Problem(ptr, f"dataset '{value}' has no column(s) {', '.join(missing)} (it provides {', '.join(have)})",
                                    "set chosen_column/rejected_column, or use adapter 'hh-rlhf'" if "chosen" in missing else "")
                        )
        s.deps = list(dict.fromkeys(deps))

    # cycles and topological order
    order = _toposort(stages, problems)

    # artifact types
    if not problems:
        for s in order:
            in_types = []
            for j, ref in enumerate(s.spec.inputs):
                up = by_id[ref]
                in_types.append(up.output_type)
                if s.impl.inputs and up.output_type not in s.impl.inputs:
                    problems.append(
                        Problem(
                            f"{s.ptr}/inputs/{j}",
                            f"{s.impl.kind}/{s.impl.name} needs {' or '.join(s.impl.inputs)} input, but stage '{ref}' ({up.impl.kind}) produces {up.output_type}",
                        )
                    )
            s.output_type = in_types[0] if (s.impl.output == "same" and in_types) else s.impl.output
            for fname, ref in s.model_refs.items():
                if ref in by_id:
                    marks = [m for m in field_markers(type(s.params))[fname] if isinstance(m, ModelRef)]
                    want = marks[0].artifacts
                    got = by_id[ref].output_type
                    if got not in want:
                        alias = type(s.params).model_fields[fname].alias or fname
                        problems.append(
                            Problem(f"{s.ptr}/params/{alias}", f"stage '{ref}' produces {got}, but this param needs {' or '.join(want)}")
                        )

    # requires
    problems.extend(_check_requires(spec.requires))

    # local files
    if check_files:
        for name, m in spec.models.items():
            if m.path:
                _check_path(m.path, f"/models/{name}/path", problems, base)
                if m.gguf_file and (base / m.path).is_dir() and not (base / m.path / m.gguf_file).exists():
                    problems.append(Problem(f"/models/{name}/gguf_file", f"no file '{m.gguf_file}' in {m.path}"))
            if m.tokenizer and _looks_local(m.tokenizer):
                _check_path(m.tokenizer, f"/models/{name}/tokenizer", problems, base)
        for name, d in spec.datasets.items():
            if d.path:
                _check_path(d.path, f"/datasets/{name}/path", problems, base)
        if not problems:
            from .data import local_column_problem

            for name, d in spec.datasets.items():
                if d.path:
                    found = local_column_problem(d, base)
                    if found:
                        problems.append(Problem(f"/datasets/{name}/{found[0]}", found[1]))

    # implementation-specific static checks
    if not problems:
        for s in order:
            if s.impl.check is not None:
                for p in s.impl.check(s.params, spec) or []:
                    problems.append(Problem(f"{s.ptr}/params{p.pointer}", p.message, p.hint))

    if problems:
        raise SpecError(problems, source)
    return Pipeline(spec=spec, stages=order, source=source, raw=data)


def _validate_params(i: int, st: dict, registry, problems: list[Problem]):
    kind, uses = st.get("kind"), st.get("uses")
    if kind not in KINDS or not isinstance(uses, str) or not uses:
        return None
    impl, reason = registry.lookup(kind, uses)
    if impl is None:
        problems.append(Problem(f"/stages/{i}/uses", reason))
        return None
    params_raw = st.get("params", {})
    if not isinstance(params_raw, dict):
        return None
    try:
        params = impl.params.model_validate(params_raw)
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, impl.params, ("stages", i, "params")))
        return None
    return impl, params


def _toposort(stages: list[Stage], problems: list[Problem]) -> list[Stage]:
    by_id = {s.id: s for s in stages}
    state: dict[str, int] = {}
    order: list[Stage] = []

    def visit(s: Stage, path: list[str]) -> bool:
        st = state.get(s.id, 0)
        if st == 2:
            return True
        if st == 1:
            cyc = path[path.index(s.id):] + [s.id]
            problems.append(Problem(f"{s.ptr}/inputs", "cycle: " + " -> ".join(cyc)))
            return False
        state[s.id] = 1
        for d in s.deps:
            if d in by_id and not visit(by_id[d], path + [s.id]):
                state[s.id] = 2
                return False
        state[s.id] = 2
        order.append(s)
        return True

    for s in stages:
        if state.get(s.id, 0) == 0:
            visit(s, [])
    return order


def _check_requires(reqs: list[str]) -> list[Problem]:
    import importlib.metadata as md

    from packaging.requirements import InvalidRequirement, Requirement

    out = []
    for i, r in enumerate(reqs):
        ptr = f"/requires/{i}"
        try:
            req = Requirement(r)
        except InvalidRequirement as exc:
            out.append(Problem(ptr, f"not a valid requirement: {exc}"))
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            out.append(Problem(ptr, f"distribution '{req.name}' is not installed", f"pip install '{r}'"))
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            out.append(Problem(ptr, f"'{req.name}' {have} is installed, but the spec requires {req.specifier}", f"pip install '{r}'"))
    return out


def load_pipeline(path: str | os.PathLike, registry, overrides: Optional[list[str]] = None, check_files: bool = True) -> Pipeline:
    """Read, override and validate a spec file.

    Raises:
        SpecError: on any problem (exit code 2).
        UsageError: on a malformed ``--set``.
    """
    data = load_json(path)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(data, registry, source=str(path), check_files=check_files)


# --------------------------------------------------------------------------- JSON Schema


def json_schema(registry) -> dict:
    """The JSON Schema of a spec, with one ``stages`` variant per installed implementation.

    Each variant fixes ``kind`` and ``uses`` and embeds the implementation's params schema,
    so editors complete and check params from ``"$schema"``.
    """
    base = Spec.model_json_schema(by_alias=True)
    defs = base.setdefault("$defs", {})
    variants = []
    for (kind, name), impl in sorted(registry.impls.items()):
        ps = impl.params.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
        for k, v in ps.pop("$defs", {}).items():
            defs.setdefault(k, v)
        title = f"{kind}.{name}"
        defs_name = re.sub(r"[^A-Za-z0-9_]", "_", f"params_{kind}_{name}")
        defs[defs_name] = ps
        variants.append(
            {
                "title": title,
                "description": impl.description,
                "type": "object",
                "properties": {
                    "kind": {"const": kind},
                    "uses": {"const": name},
                    "params": {"$ref": f"#/$defs/{defs_name}"},
                },
                "required": ["kind", "uses"],
            }
        )
    stage_def = defs["StageSpec"]
    stage_def["allOf"] = [{"oneOf": variants}] if variants else []
    base["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    base["title"] = "rlhf-spec pipeline"
    return base
