"""The spec document as pydantic models: the top level, models, datasets, stages and cache settings.

Each stage's ``params`` are validated later by its implementation's own params model (see
:mod:`rlhf_spec.spec.validate`); here they are a plain object.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..paths import HUB_ID_PATTERN
from ..records import KINDS

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


def _check_hub_id(v: Optional[str]) -> Optional[str]:
    """A hub id is 'name' or 'owner/name'; anything with '..' or a leading '/' or '.' is a local path in disguise
    (transformers and datasets would read it from disk), so it is refused."""
    if v is not None and (not re.match(HUB_ID_PATTERN, v) or ".." in v):
        raise ValueError(f"'{v}' is not a hub id ('owner/name'); for a local folder use 'path'")
    return v


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)


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
    kind: Literal[KINDS] = Field(..., description="Stage kind.")
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


class RepeatBlock(_Strict):
    """A list of stages run for several rounds (see :mod:`rlhf_spec.spec.repeat`); used for the JSON Schema."""

    rounds: int = Field(..., ge=1, le=1000, description="How many rounds.")
    id: str = Field("{id}_iter{round}", description="Expanded stage ids; must contain '{id}' and '{round}'.")
    initial: dict[str, str] = Field(default_factory=dict, description="What '{prev:NAME}' means in round 1: a model name or a stage outside the block.")
    stages: list[StageSpec] = Field(..., min_length=1, description="The stages of one round. In params, '{round}', '{id:NAME}' and '{prev:NAME}' name the round and the block's stages.")
    description: str = Field("", description="Free text.")


class RepeatStage(_Strict):
    """An entry of ``stages`` that stands for a repeat block."""

    repeat: RepeatBlock
