"""Walking validated params: field markers, model/dataset references and reward/backend specs at any
depth, values by dotted path, and the params' view for cache keys.

Paths are dotted: ``"policy"``, ``"reward.params.model"`` (a reward spec's params are reached through
``params``), ``"judges.0.params.model"`` (list items by index), ``"reward.params.components.helpful.reward"``.
"""

from __future__ import annotations

from typing import Any, Iterator, get_args

from pydantic import BaseModel, TypeAdapter

from .records import ComponentSpec, DatasetRef, ModelRef, NotInKey

MARKERS = (ModelRef, DatasetRef, NotInKey)


def _annotated_metadata(tp) -> list:
    """Metadata of ``Annotated`` types nested in ``tp`` (e.g. inside ``Optional[...]``)."""
    out = list(getattr(tp, "__metadata__", ()))
    for arg in get_args(tp) or ():
        if arg is not tp:
            out += _annotated_metadata(arg)
    return out


def field_markers(model: type[BaseModel]) -> dict[str, list]:
    """``field name -> [ModelRef | DatasetRef | NotInKey ...]`` from ``Annotated`` metadata."""
    out = {}
    for fname, f in model.model_fields.items():
        found = list(f.metadata) + _annotated_metadata(f.annotation)
        marks = [m for m in found if isinstance(m, MARKERS)]
        if marks:
            out[fname] = marks
    return out


def alias(model: type[BaseModel], fname: str) -> str:
    """The JSON name of field ``fname`` (its alias, if any)."""
    return model.model_fields[fname].alias or fname


def _children(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(path, child) for the containers and models below ``value``."""
    if isinstance(value, ComponentSpec):
        if value._parsed is not None:
            yield f"{path}.params", value.parsed
    elif isinstance(value, BaseModel):
        for fname in type(value).model_fields:
            yield f"{path}.{fname}" if path else fname, getattr(value, fname)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield f"{path}.{i}", v
    elif isinstance(value, dict):
        for k, v in value.items():
            yield f"{path}.{k}", v


def walk_refs(params: BaseModel, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Yield ``(path, marker, value)`` for every set ModelRef or DatasetRef field, nested ones included
    (inside reward and backend specs, lists, dicts and sub-models), in a stable order."""
    marks = field_markers(type(params))
    for fname in type(params).model_fields:
        value = getattr(params, fname)
        fpath = f"{path}.{fname}" if path else fname
        for m in marks.get(fname, ()):
            if isinstance(m, (ModelRef, DatasetRef)) and value is not None:
                yield fpath, m, value
        yield from _walk_value(value, fpath)


def _walk_value(value: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    if isinstance(value, ComponentSpec):
        if value._parsed is not None:
            yield from walk_refs(value.parsed, f"{path}.params")
    elif isinstance(value, BaseModel):
        yield from walk_refs(value, path)
    else:
        for cpath, child in _children(value, path):
            yield from _walk_value(child, cpath)


def walk_components(value: Any, path: str = "") -> Iterator[tuple[str, ComponentSpec]]:
    """Yield ``(path, spec)`` for every reward or backend spec below ``value``, outermost first."""
    if isinstance(value, ComponentSpec):
        yield path, value
    for cpath, child in _children(value, path):
        yield from walk_components(child, cpath)


def get_path(params: Any, path: str) -> Any:
    """The value at dotted ``path`` below ``params`` (``params`` of a spec reaches its parsed params).

    Raises:
        KeyError: if the path does not exist.
    """
    node = params
    for part in path.split("."):
        try:
            if isinstance(node, ComponentSpec):
                if part != "params":
                    raise KeyError(part)
                node = node.parsed
            elif isinstance(node, (list, tuple)):
                node = node[int(part)]
            elif isinstance(node, dict):
                node = node[part]
            else:
                if part not in type(node).model_fields:
                    raise KeyError(part)
                node = getattr(node, part)
        except (IndexError, ValueError, AttributeError):
            raise KeyError(path) from None
    return node


def pointer_of(path: str) -> str:
    """JSON pointer suffix of a dotted params path: ``"reward.params.model"`` -> ``"/reward/params/model"``."""
    return "/" + path.replace(".", "/") if path else ""


def key_view(params: BaseModel) -> dict:
    """The params as they enter a cache key: defaults applied, NotInKey and reference fields left out
    (references enter through the referenced identity), reward and backend specs as their
    implementation's distribution, version and key view.

    A field is named as a spec writes it: by its alias when it has one (``Field(alias="rows-count")``),
    else by its name; a field renamed after its keys were first written is named by the name it had
    then (:func:`key_name`), so a rename keeps the cache entries and, since a stage's seed derives from
    its key, every computed figure. For params without nested specs and renames this equals
    ``params.model_dump(mode="json", by_alias=True)`` minus those fields.

    Raises:
        RuntimeError: if a reward or backend spec inside ``params`` was not resolved (validate first).
        TypeError: if a value has no JSON form.
    """
    model = type(params)
    drop = {f for f, marks in field_markers(model).items() if marks}
    return {key_name(model, fname): _key_value(getattr(params, fname))
            for fname in model.model_fields if fname not in drop}


def key_name(model: type[BaseModel], fname: str) -> str:
    """The name field ``fname`` of ``model`` has in cache keys: the name the params model lists for it in
    its ``key_names`` class variable (``{field name: name in keys}``, for a field renamed after its keys
    were first written), else its alias, else its name."""
    return getattr(model, "key_names", {}).get(fname) or alias(model, fname)


def _key_value(value: Any) -> Any:
    if isinstance(value, ComponentSpec):
        impl = value.impl
        return {"uses": value.uses, "distribution": impl.distribution, "impl_version": impl.impl_version,
                "params": key_view(value.parsed)}
    if isinstance(value, BaseModel):
        return key_view(value)
    if isinstance(value, (list, tuple)):
        return [_key_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _key_value(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return _JSON.dump_python(value, mode="json")


_JSON = TypeAdapter(Any)


def find_fields(params: BaseModel, names: tuple[str, ...], path: str = "") -> list[str]:
    """Dotted paths of every field named one of ``names`` below ``params`` (reward and backend specs included)."""
    out = []
    for fname in type(params).model_fields:
        fpath = f"{path}.{fname}" if path else fname
        value = getattr(params, fname)
        if fname in names:
            out.append(fpath)
        for cpath, child in _children(value, fpath) if isinstance(value, (ComponentSpec, list, tuple,
                                                                          dict)) else [(fpath, value)]:
            if isinstance(child, BaseModel) and not isinstance(child, ComponentSpec):
                out += find_fields(child, names, cpath)
    return out
