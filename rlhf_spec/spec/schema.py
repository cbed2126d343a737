"""The JSON Schema of a spec, with every installed implementation's params, for editor completion."""

from __future__ import annotations

import re

from .models import RepeatStage, Spec


def _variant(defs: dict, name: str, title: str, description: str, params_model, consts: dict) -> dict:
    ps = params_model.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    for k, v in ps.pop("$defs", {}).items():
        defs.setdefault(k, v)
    defs_name = re.sub(r"[^A-Za-z0-9_]", "_", name)
    defs[defs_name] = ps
    props = {k: {"const": v} for k, v in consts.items()}
    props["params"] = {"$ref": f"#/$defs/{defs_name}"}
    return {"title": title, "description": description, "type": "object", "properties": props, "required": list(consts)}


def json_schema(registry) -> dict:
    """The JSON Schema of a spec document.

    Each stage variant fixes ``kind`` and ``uses`` and embeds the implementation's params schema; each
    reward and backend spec (``{"uses", "params"}``) is likewise one variant per installed reward or
    backend, wherever it appears. Editors then complete and check params from ``"$schema"``.
    """
    base = Spec.model_json_schema(by_alias=True)
    defs = base.setdefault("$defs", {})
    stages = [_variant(defs, f"params_{k}_{n}", f"{k}.{n}", impl.description, impl.params, {"kind": k, "uses": n})
              for (k, n), impl in sorted(registry.stages.items())]
    defs["StageSpec"]["allOf"] = [{"oneOf": stages}] if stages else []
    for surface, table, model in (("reward", registry.rewards, "RewardSpec"), ("backend", registry.backends,
                                                                               "BackendSpec")):
        variants = [_variant(defs, f"{surface}_{n}", f"{surface}.{n}", impl.description, impl.params, {"uses": n})
                    for n, impl in sorted(table.items())]
        if model in defs:
            defs[model]["allOf"] = [{"oneOf": variants}] if variants else []
    repeat = RepeatStage.model_json_schema(by_alias=True, ref_template="#/$defs/{model}")
    for k, v in repeat.pop("$defs", {}).items():
        defs.setdefault(k, v)
    defs["RepeatStage"] = repeat
    base["properties"]["stages"]["items"] = {"anyOf": [{"$ref": "#/$defs/StageSpec"}, {"$ref": "#/$defs/RepeatStage"}]}
    base["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    base["title"] = "rlhf-spec pipeline"
    return base
