"""Validating a spec completely, before any compute, in phases that each add problems:

1. the document (top-level models, datasets, stage objects);
2. each stage's implementation and params, and every reward or backend spec inside them;
3. references: inputs, model and dataset names, duplicate ids, counts of inputs;
4. the graph: cycles and topological order;
5. artifact types of inputs and of stage outputs used as models;
6. ``requires``, local files and dataset columns;
7. each implementation's own ``check`` (run whatever else failed, so one round shows everything);
8. finiteness of every float in the params.

Every problem carries the JSON pointer of its place; :class:`~rlhf_spec.errors.SpecError` lists them all.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ValidationError

from ..errors import Problem, SpecError, did_you_mean
from ..graph import Pipeline, Stage, toposort
from ..paths import check_path, looks_local
from ..records import KINDS, ComponentSpec, DatasetRef, ModelRef, RewardBatch, call_check
from ..refs import pointer_of, walk_components, walk_refs
from .models import Spec
from .problems import problems_from_validation
from .repeat import expand, locate


def validate(data: dict, registry, source: str = "", base: Optional[Path] = None, check_files: bool = True,
             origins: Optional[list] = None) -> Pipeline:
    """Validate a raw spec dict completely, before any compute.

    ``repeat`` blocks are expanded first (:mod:`rlhf_spec.spec.repeat`); a problem in an expanded stage
    points into its block and names the round.

    Args:
        data: the parsed JSON document (after ``--set`` overrides).
        registry: the :class:`rlhf_spec.plugins.Registry` of installed implementations.
        source: the spec's path, for messages.
        base: folder that relative paths resolve against (default: the working directory).
        check_files: check that local files and folders exist.
        origins: for ``data`` already expanded, where each stage came from (see :func:`~rlhf_spec.spec.repeat.expand`).

    Returns:
        the :class:`~rlhf_spec.graph.Pipeline`, stages in topological order.

    Raises:
        SpecError: listing every problem found, each with its JSON pointer.
    """
    base = Path(base or os.getcwd())
    expanded = data
    if origins is None:
        try:
            expanded, origins = expand(data)
        except SpecError as exc:
            raise SpecError(exc.problems, source) from None
    try:
        return _validate(expanded, registry, source, base, check_files, data)
    except SpecError as exc:
        raise SpecError(locate(exc.problems, origins), source) from None


def _validate(data: dict, registry, source: str, base: Path, check_files: bool, raw: dict) -> Pipeline:
    problems: list[Problem] = []
    spec = _document(data, registry, problems)
    if spec is None:
        raise SpecError(problems, source)
    stages = _stages(spec, registry, problems)
    _references(spec, stages, problems)
    order = toposort(stages, problems)
    if not problems:
        _types(order, problems)
    problems.extend(check_requires(spec.requires))
    if check_files:
        _files(spec, base, problems)
    _plugin_checks(spec, order if len(order) == len(stages) else stages, problems)
    _reward_columns(spec, stages, problems)
    for s in stages:
        _finite(s.params, f"{s.ptr}/params", problems)
    if problems:
        raise SpecError(problems, source)
    return Pipeline(spec=spec, stages=order, source=source, raw=raw)


def _document(data: dict, registry, problems: list[Problem]):
    try:  # the registry's dataset adapters check each dataset's 'adapter'
        return Spec.model_validate(data, context={"registry": registry})
    except ValidationError as exc:
        problems.extend(problems_from_validation(exc, Spec))
    # still validate stage params whose stage objects look fine, to report everything at once
    stages_raw = data.get("stages")
    if isinstance(stages_raw, list):
        for i, st in enumerate(stages_raw):
            if isinstance(st, dict):
                stage_params(i, st, registry, problems)
    return None


def _stages(spec, registry, problems: list[Problem]) -> list[Stage]:
    stages: list[Stage] = []
    ids: dict[str, int] = {}
    for i, st in enumerate(spec.stages):
        if st.id in ids:
            problems.append(Problem(f"/stages/{i}/id", f"duplicate stage id '{st.id}' (also /stages/{ids[st.id]}/id)"))
            continue
        ids[st.id] = i
        if st.id in spec.models:
            problems.append(Problem(f"/stages/{i}/id",
                                    f"stage id '{st.id}' is also a model name in /models; rename one"))
        res = stage_params(i, st.model_dump(by_alias=True), registry, problems)
        if res is not None:
            stages.append(Stage(i, st, res[0], res[1]))
    return stages


def stage_params(i: int, st: dict, registry, problems: list[Problem]) -> Optional[tuple[Any, BaseModel]]:
    """Look up stage ``i``'s implementation and validate its params (and the reward and backend specs
    inside them); returns ``(impl, params)``, or None after adding problems."""
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
    n = len(problems)
    bind_components(params, registry, f"/stages/{i}/params", problems)
    return (impl, params) if len(problems) == n else None


def bind_components(params: BaseModel, registry, ptr: str, problems: list[Problem]) -> None:
    """Resolve every reward and backend spec below ``params`` (outermost first): look up its
    implementation and validate its params with the implementation's model."""
    for path, comp in walk_components(params):
        where = ptr + pointer_of(path)
        impl, reason = registry.lookup_component(comp.surface, comp.uses)
        if impl is None:
            problems.append(Problem(f"{where}/uses", reason))
            continue
        try:
            parsed = impl.params.model_validate(comp.params)
        except ValidationError as exc:
            prefix = tuple(p for p in where.split("/")[1:]) + ("params",)
            problems.extend(problems_from_validation(exc, impl.params, prefix))
            continue
        comp.bind(impl, parsed)


def _input_deps(s: Stage, ids: dict[str, int], problems: list[Problem]) -> list[str]:
    deps = []
    for j, ref in enumerate(s.spec.inputs):
        if ref == s.id:
            problems.append(Problem(f"{s.ptr}/inputs/{j}", f"stage '{s.id}' lists itself as an input"))
        elif ref not in ids:
            problems.append(Problem(f"{s.ptr}/inputs/{j}", f"unknown stage '{ref}'", did_you_mean(ref, ids)))
        else:
            deps.append(ref)
    impl, n = s.impl, len(s.spec.inputs)
    if n < impl.min_inputs or (impl.max_inputs is not None and n > impl.max_inputs):
        if impl.max_inputs == impl.min_inputs:
            want = f"{impl.min_inputs}"
        elif impl.max_inputs is not None:
            want = f"{impl.min_inputs} to {impl.max_inputs}"
        else:
            want = f"at least {impl.min_inputs}"
        problems.append(Problem(f"{s.ptr}/inputs", f"{impl.kind}/{impl.name} takes {want} input(s), got {n}"))
    return deps


def _references(spec, stages: list[Stage], problems: list[Problem]) -> None:
    ids = {st.id: i for i, st in enumerate(spec.stages)}
    for s in stages:
        deps = _input_deps(s, ids, problems)
        for path, mark, value in walk_refs(s.params):
            ptr = f"{s.ptr}/params{pointer_of(path)}"
            if isinstance(mark, ModelRef):
                s.model_refs[path] = value
                if value in spec.models:
                    continue
                if value == s.id:
                    problems.append(Problem(ptr, f"stage '{s.id}' cannot use its own output as a model"))
                elif value in ids:
                    deps.append(value)
                else:
                    problems.append(Problem(ptr, f"'{value}' is neither a model in /models nor a stage id",
                                            did_you_mean(value, list(spec.models) + list(ids))))
            elif isinstance(mark, DatasetRef):
                s.dataset_refs[path] = value
                _dataset_ref(spec, value, mark, ptr, problems)
        s.deps = list(dict.fromkeys(deps))


def _dataset_ref(spec, value: str, mark: DatasetRef, ptr: str, problems: list[Problem]) -> None:
    if value not in spec.datasets:
        problems.append(Problem(ptr, f"unknown dataset '{value}'",
                                did_you_mean(value, spec.datasets) or f"defined: {', '.join(spec.datasets) or 'none'}"))
        return
    have = spec.datasets[value].columns()
    missing = [c for c in mark.columns if c not in have]
    if missing:
        hint = "set chosen_column/rejected_column, or use adapter 'hh-rlhf'" if "chosen" in missing else ""
        problems.append(
            Problem(
                ptr, f"dataset '{value}' has no column(s) {', '.join(missing)} (it provides {', '.join(have)})", hint
            )
        )


def _types(order: list[Stage], problems: list[Problem]) -> None:
    by_id = {s.id: s for s in order}
    for s in order:
        in_types = []
        for j, ref in enumerate(s.spec.inputs):
            up = by_id[ref]
            in_types.append(up.output_type)
            if s.impl.inputs and up.output_type not in s.impl.inputs:
                problems.append(Problem(f"{s.ptr}/inputs/{j}",
                                        f"{s.impl.kind}/{s.impl.name} needs {' or '.join(s.impl.inputs)} "
                                        f"input, but stage '{ref}' ({up.impl.kind}) produces {up.output_type}"))
        s.output_type = in_types[0] if (s.impl.output == "same" and in_types) else s.impl.output
        for path, mark, value in walk_refs(s.params):
            if isinstance(mark, ModelRef) and value in by_id and by_id[value].output_type not in mark.artifacts:
                problems.append(
                    Problem(
                        f"{s.ptr}/params{pointer_of(path)}",
                        f"stage '{value}' produces "
                        f"{by_id[value].output_type}, but this param needs {' or '.join(mark.artifacts)}",
                    )
                )


def check_requires(reqs: list[str]) -> list[Problem]:
    """Problems for each PEP 508 requirement of ``requires`` that the installed distributions miss."""
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
            out.append(
                Problem(
                    ptr,
                    f"'{req.name}' {have} is installed, but the spec requires {req.specifier}",
                    f"pip install '{r}'",
                )
            )
    return out


def _files(spec, base: Path, problems: list[Problem]) -> None:
    n = len(problems)
    for name, m in spec.models.items():
        if m.path:
            check_path(m.path, f"/models/{name}/path", problems, base)
            if m.gguf_file and (base / m.path).is_dir() and not (base / m.path / m.gguf_file).exists():
                problems.append(Problem(f"/models/{name}/gguf_file", f"no file '{m.gguf_file}' in {m.path}"))
        if m.tokenizer and looks_local(m.tokenizer):
            check_path(m.tokenizer, f"/models/{name}/tokenizer", problems, base)
    for name, d in spec.datasets.items():
        if d.path:
            check_path(d.path, f"/datasets/{name}/path", problems, base)
    if len(problems) > n:
        return
    from ..data import local_column_problem

    for name, d in spec.datasets.items():
        if d.path:
            found = local_column_problem(d, base)
            if found:
                problems.append(Problem(f"/datasets/{name}/{found[0]}", found[1]))


def _plugin_checks(spec, stages: list[Stage], problems: list[Problem]) -> None:
    """Each stage's and each component's own ``check``; pointers relative to their params
    (or, starting with ``#``, relative to the stage)."""
    by_id = {s.id: s for s in stages}
    for s in stages:
        if s.impl.check is not None:
            in_types = tuple(by_id[r].output_type if r in by_id else "" for r in s.spec.inputs)
            for p in call_check(s.impl.check, s.params, spec, in_types):
                where = f"{s.ptr}{p.pointer[1:]}" if p.pointer.startswith("#") else f"{s.ptr}/params{p.pointer}"
                problems.append(Problem(where, p.message, p.hint))
        for path, comp in walk_components(s.params):
            impl = comp._impl
            if impl is not None and impl.check is not None and comp._parsed is not None:
                for p in impl.check(comp.parsed, spec) or []:
                    problems.append(Problem(f"{s.ptr}/params{pointer_of(path)}/params{p.pointer}", p.message, p.hint))


def _row_columns(spec, stages: list[Stage], st: Stage, seen: Optional[set] = None) -> Optional[set]:
    """The columns of the rows a stage's rewards see: its prompts dataset's, or those flowing from its
    first input back to a sample stage's prompts dataset. None when unknown (another kind of source)."""
    seen = seen or set()
    by_id = {s.id: s for s in stages}
    if st.id in seen:
        return None
    seen.add(st.id)
    for path, name in st.dataset_refs.items():
        if path.split(".")[-1] in ("prompts",) and name in spec.datasets:
            return set(RewardBatch.data_columns(spec.datasets[name].columns()))
    if st.spec.inputs and st.spec.inputs[0] in by_id and st.impl.kind in ("score", "filter", "pair", "evaluate"):
        return _row_columns(spec, stages, by_id[st.spec.inputs[0]], seen)
    return None


def _reward_columns(spec, stages: list[Stage], problems: list[Problem]) -> None:
    """A problem for every reward that reads a row column the rows reaching it do not have
    (``math-answer`` without a ``reference`` column, for example)."""
    for s in stages:
        rewards = [(p, c) for p, c in walk_components(s.params) if c.surface == "reward" and c._parsed is not None]
        if not rewards:
            continue
        have = _row_columns(spec, stages, s)
        if have is None:
            continue
        for path, comp in rewards:
            missing = [c for c in comp.impl.required_columns(comp.parsed) if c not in have]
            if missing:
                problems.append(Problem(f"{s.ptr}/params{pointer_of(path)}",
                                        f"reward '{comp.uses}' reads the row column(s) {', '.join(missing)}, which the "
                                        f"prompts "
                                        f"reaching this stage do not have (they have {', '.join(sorted(have))})",
                                        "give the prompts dataset a reference_column (or keep_columns)"))


def _finite(value: Any, ptr: str, problems: list[Problem]) -> None:
    """A problem for every NaN or infinite float below ``value`` (params models, lists, dicts)."""
    if isinstance(value, float):
        if not math.isfinite(value):
            problems.append(Problem(ptr, f"{value} is not a finite number"))
    elif isinstance(value, ComponentSpec):
        if value._parsed is not None:
            _finite(value.parsed, f"{ptr}/params", problems)
    elif isinstance(value, BaseModel):
        for fname in type(value).model_fields:
            _finite(getattr(value, fname), f"{ptr}/{fname}", problems)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _finite(v, f"{ptr}/{i}", problems)
    elif isinstance(value, dict):
        for k, v in value.items():
            _finite(v, f"{ptr}/{k}", problems)
