"""The spec document as pydantic models: the top level, models, datasets, stages and cache settings.

Each stage's ``params`` are validated later by its implementation's own params model (see
:mod:`rlhf_spec.spec.validate`); here they are a plain object.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from ..data import DatasetAdapter
from ..errors import did_you_mean
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
        description="Hub revision (branch, tag or commit). Resolved to a commit for the cache key; pin a commit for "
                    "reproducible keys offline.",
    )
    path: Optional[str] = Field(
        None, description="Local folder (save_pretrained layout or a folder holding a GGUF file). Relative paths are "
                          "resolved against the working directory and may not leave it."
    )
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside the folder; weights are dequantised on "
                                                       "load.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype on load. 'auto' is bfloat16 on a CUDA GPU and float32 on CPU."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow this model's repository code to run (needed by e.g. ArmoRM). Off unless set here, for this "
                    "model only.",
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


#: Fields added after the first release. Left out of a dump while unset, so the dataset identities (and
#: cache keys) of specs written before they existed stay the same.
_LATER_FIELDS = ("completion_column", "messages_column", "input_column", "system_column", "label_column",
                 "reference_column", "prompt_template", "negative_path", "encoding", "rows", "prompt_words",
                 "completion_template")


def _plugin_registry(context: Any):
    """The registry adapter names are looked up in: the one validation was given (``context={"registry": ...}``),
    else the process-wide one."""
    reg = context.get("registry") if isinstance(context, dict) else None
    if reg is None:
        from ..plugins import registry

        reg = registry()
    return reg


def find_adapter(name: str, registry=None) -> DatasetAdapter:
    """The dataset adapter registered as ``name`` (:class:`rlhf_spec.data.DatasetAdapter`).

    Args:
        registry: a :class:`rlhf_spec.plugins.Registry`; default the process-wide one.

    Raises:
        ValueError: for a name no installed adapter has (the message lists the installed ones, a "did you
            mean" and plugins that failed to load), or one that two distributions register.
    """
    reg = registry if registry is not None else _plugin_registry(None)
    if ("dataset", "", name) in reg.conflicts:
        raise ValueError(f"dataset adapter '{name}' is registered by more than one distribution: "
                         + ", ".join(reg.conflicts[("dataset", "", name)]) + "; uninstall one of them")
    if name in reg.datasets:
        return reg.datasets[name]
    hint = did_you_mean(name, reg.datasets)
    failed = "".join(f"; note: plugin '{f.entry_point}' from {f.distribution} {f.version} failed to load: {f.error}"
                     for f in reg.failures)
    raise ValueError(f"unknown dataset adapter '{name}'; installed: {', '.join(reg.datasets) or 'none'}"
                     + (f"; {hint}" if hint else "") + failed)


def _adapter_schema(schema: dict) -> None:
    """The ``adapter`` field's JSON Schema: the installed adapters' names as an enum, their descriptions as help."""
    table = _plugin_registry(None).datasets
    schema["enum"] = list(table)
    helps = " ".join(f"'{n}': {a.description}" for n, a in table.items())
    schema["description"] = f"How rows become normalised columns. {helps}"


class DatasetSpec(_Strict):
    """A dataset the spec reads, normalised to columns ``prompt_id``, ``prompt`` (chat messages before the
    reply) and, by adapter: ``chosen`` and ``rejected`` (preference data: the final assistant reply);
    ``completion`` (the final assistant reply) and ``messages`` (the whole conversation, every assistant turn
    included) for SFT and unpaired data; ``label`` (bool, desirable) for KTO data. :meth:`columns` lists them."""

    hub: Optional[str] = Field(
        None, description="Hub dataset id, e.g. 'allenai/ultrafeedback_binarized_cleaned_train'."
    )
    revision: Optional[str] = Field(None, description="Hub revision; resolved to a commit for the cache key.")
    config: Optional[str] = Field(None, description="Hub dataset configuration name.")
    split: str = Field("train", description="Split to read.")
    path: Optional[str] = Field(None, description="Local file or folder (json, jsonl, jsonl.gz, parquet, csv, or "
                                                  "save_to_disk folder).")
    adapter: str = Field("generic", description="How rows become normalised columns: a registered dataset adapter.",
                         json_schema_extra=_adapter_schema)
    prompt_column: str = Field("prompt", description="Column holding the prompt (string or chat messages); for "
                                                     "'alpaca' the instruction.")
    chosen_column: Optional[str] = Field(None, description="Column with the preferred response, for preference data "
                                                           "('generic', 'sharegpt').")
    rejected_column: Optional[str] = Field(None, description="Column with the dispreferred response, for preference "
                                                             "data ('generic', 'sharegpt').")
    completion_column: Optional[str] = Field(
        None, description="Column with the reply: 'prompt-completion' (default 'completion') and 'alpaca' (default "
                          "'output').")
    messages_column: Optional[str] = Field(
        None, description="Column with the conversation: 'messages' and 'kto' (default 'messages'), 'sharegpt' "
                          "(default 'conversations').")
    input_column: Optional[str] = Field(None, description="'alpaca': the optional input column (default 'input').")
    system_column: Optional[str] = Field(None, description="'sharegpt': the optional system-prompt column (default "
                                                           "'system').")
    label_column: Optional[str] = Field(
        None, description="Boolean 'desirable' column: 'kto' (default 'label'); set it on 'messages' or "
                          "'prompt-completion' data to add a label.")
    reference_column: Optional[str] = Field(
        None, description="Column copied verbatim into a 'reference' column, e.g. GSM8K's 'answer' for the math-answer "
                          "reward.")
    prompt_template: Optional[str] = Field(
        None, description="Rewrites the last user turn: '{prompt}' is replaced by its text, e.g. '{prompt}\\nPut the "
                          "final number inside <answer> </answer>.'")
    negative_path: Optional[str] = Field(None, description="'rt-polarity': the file of negative sentences ('path' "
                                                           "holds the positive ones).")
    encoding: Optional[str] = Field(None, description="'rt-polarity': the text files' encoding (default 'utf-8'; some "
                                                      "copies of the original files are 'latin-1').")
    rows: Optional[Literal["prompts", "pairs"]] = Field(
        None, description="'rt-polarity': 'prompts' (default; one row per sentence, its first prompt_words words) or "
                          "'pairs' (a positive "
                          "sentence's rest chosen over a negative one's, the prompt taken from either sentence in "
                          "turn).")
    prompt_words: Optional[int] = Field(None, ge=1, le=64, description="'rt-polarity': words of each sentence that "
                                                                       "form the prompt (default 4).")
    completion_template: Optional[str] = Field(
        None, description="'gsm8k': the reply made from a worked solution: '{reasoning}' is the text before '####' "
                          "with the "
                          "calculator annotations '<<48/2=24>>' removed, '{answer}' the number after it. Default "
                          "'{reasoning}\n#### {answer}'; DeepSeek-R1's format is "
                          "'<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>'.")
    hash_range: tuple[float, float] = Field(
        (0.0, 1.0),
        description="Keep rows whose prompt hash falls in [lo, hi) of [0, 1). Disjoint ranges give disjoint prompt "
                    "sets (by content, independent of row order).",
    )
    limit: Optional[int] = Field(None, ge=1, description="Keep at most this many rows (after hash_range), in file "
                                                         "order.")
    dedupe_prompts: bool = Field(
        True, description="Keep one row per distinct prompt; for completion data (SFT, KTO) one row per distinct "
                          "(prompt, completion, label).")

    _adapter: Optional[DatasetAdapter] = PrivateAttr(None)

    @field_validator("adapter")
    @classmethod
    def _known_adapter(cls, v: str, info: ValidationInfo):
        find_adapter(v, _plugin_registry(info.context))
        return v

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo):
        if bool(self.hub) == bool(self.path):
            raise ValueError("give exactly one of 'hub' or 'path'")
        self._adapter = impl = find_adapter(self.adapter, _plugin_registry(info.context))
        unused = [f for f in _LATER_FIELDS + ("chosen_column", "rejected_column")
                  if getattr(self, f) is not None and f not in impl.fields]
        if unused:
            raise ValueError(f"adapter '{self.adapter}' does not read {', '.join(unused)}")
        problem = impl.check(self)
        if problem:
            raise ValueError(problem)
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{prompt}', where the prompt's text goes")
        if self.completion_template is not None and "{answer}" not in self.completion_template:
            raise ValueError("completion_template must contain '{answer}', where the final number goes")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        for f in _LATER_FIELDS:
            if out.get(f, "") is None:
                del out[f]
        return out

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

    @property
    def adapter_impl(self) -> DatasetAdapter:
        """The registered :class:`~rlhf_spec.data.DatasetAdapter` that ``adapter`` names."""
        if self._adapter is None:  # built without validation (model_construct)
            self._adapter = find_adapter(self.adapter)
        return self._adapter

    def is_preference(self) -> bool:
        """True when rows are read as (prompt, chosen, rejected)."""
        return self.adapter_impl.produces(self) == "pairs"

    def source_columns(self) -> list[tuple[str, str, str, bool]]:
        """The raw columns this adapter reads: ``(role, column, spec field that names it, required)``.

        ``role`` is ``prompt``, ``completion``, ``messages``, ``input``, ``system``, ``label``, ``reference``,
        ``chosen``, ``rejected``, or for ``alpaca-eval`` ``output_1``, ``output_2`` and ``preference``; the
        field is ``adapter`` where the column is the adapter's default.
        """
        return self.adapter_impl.source_columns(self)

    def columns(self) -> tuple[str, ...]:
        """Normalised columns this dataset provides: ``prompt_id`` and ``prompt`` always; ``chosen`` and
        ``rejected`` for preference data; ``completion`` and ``messages`` for SFT/unpaired data; ``label``
        for KTO data (or a ``label_column``); ``reference`` when a source column feeds it (a ``reference_column``,
        or ``gsm8k``'s solution)."""
        return self.adapter_impl.columns(self)


class StageSpec(_Strict):
    """One stage: an implementation (``uses``) of a ``kind``, its data ``inputs`` and ``params``."""

    id: str = Field(..., pattern=ID_PATTERN, description="Unique stage id (letters, digits, '_', '.', '-').")
    kind: Literal[KINDS] = Field(..., description="Stage kind.")
    uses: str = Field(..., min_length=1, description="Implementation name, as listed by 'rlhf-spec plugins'.")
    inputs: list[str] = Field(default_factory=list, description="Ids of earlier stages whose outputs this stage reads.")
    params: dict[str, Any] = Field(default_factory=dict, description="Implementation params; see the implementation's "
                                                                     "schema.")
    description: str = Field("", description="Free text.")


class CacheSpec(_Strict):
    """Cache settings."""

    dir: Optional[str] = Field(None, description="Cache folder. Overridden by --cache-dir and RLHF_SPEC_CACHE; default "
                                                 "'.rlhf-cache'.")


class Spec(_Strict):
    """A whole pipeline."""

    schema_: Optional[str] = Field(None, alias="$schema", description="Path or URL of the JSON Schema, for editors.")
    name: str = Field(..., pattern=NAME_PATTERN, description="Pipeline name.")
    description: str = Field("", description="Free text.")
    seed: int = Field(0, ge=0, description="Global seed; part of every stage's cache key.")
    salt: str = Field("", description="Changing it disowns every cached entry of this spec (for poisoned caches).")
    requires: list[str] = Field(
        default_factory=list, description="Distributions the spec needs, as PEP 508 requirements, e.g. "
                                          "'rlhf-spec-armorm>=0.1'."
    )
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="Models by name; params refer to them by "
                                                                           "name.")
    datasets: dict[str, DatasetSpec] = Field(default_factory=dict, description="Datasets by name.")
    cache: CacheSpec = Field(default_factory=CacheSpec, description="Cache settings.")
    stages: list[StageSpec] = Field(..., min_length=1, description="The stages, in any order consistent with their "
                                                                   "inputs.")

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
    initial: dict[str, str] = Field(default_factory=dict, description="What '{prev:NAME}' means in round 1: a model "
                                                                      "name or a stage outside the block.")
    values: dict[str, list[Any]] = Field(
        default_factory=dict, description="Per-round values, one entry per round: '{value:NAME}' in a param is round "
                                          "r's entry (a string that is exactly '{value:NAME}' takes the entry's JSON "
                                          "type).")
    stages: list[StageSpec] = Field(..., min_length=1, description="The stages of one round. In params, '{round}', "
                                                                   "'{id:NAME}', '{prev:NAME}' and '{value:NAME}' name "
                                                                   "the round, the block's stages and the round's "
                                                                   "values.")
    description: str = Field("", description="Free text.")


class RepeatStage(_Strict):
    """An entry of ``stages`` that stands for a repeat block."""

    repeat: RepeatBlock
