"""Hook specifications and the typed record a plugin registers.

A plugin is a module named by an entry point in group ``rlhf_spec``. It
implements one hook::

    from rlhf_spec.hookspecs import hookimpl, StageImpl

    @hookimpl
    def rlhf_spec_register_stages(register):
        register(StageImpl(kind="score", name="my-rm", params=MyParams, run=run,
                           inputs=("samples",), output="scored", version="1"))

The built-in stages of rlhf-spec register the same way, through the entry
points in rlhf-spec's own ``pyproject.toml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import pluggy
from pydantic import BaseModel

if TYPE_CHECKING:  # pragma: no cover
    from .context import StageContext
    from .errors import Problem

PROJECT = "rlhf_spec"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: The six stage kinds a spec may use.
KINDS = ("sample", "score", "filter", "pair", "train", "evaluate")

# Artifact types: what a stage's output holds. Graph validation checks that
# each input has a type its consumer accepts (``pair`` needs ``scored``).
SAMPLES = "samples"  #: rows of (prompt_id, prompt, sample_index, completion)
SCORED = "scored"  #: samples with a float ``reward`` column
PAIRS = "pairs"  #: rows of (prompt_id, prompt, chosen, rejected, chosen_reward, rejected_reward, split)
POLICY = "policy"  #: a ``save_pretrained`` causal-LM folder with its tokenizer
REWARD_MODEL = "reward_model"  #: a ``save_pretrained`` sequence-classification folder
METRICS = "metrics"  #: metrics.json plus tables
ARTIFACT_TYPES = (SAMPLES, SCORED, PAIRS, POLICY, REWARD_MODEL, METRICS)


@dataclass(frozen=True)
class ModelRef:
    """Marks a params field (``Annotated[str, ModelRef(...)]``) as a model reference.

    The value names an entry of the spec's ``models`` map, or the id of an
    earlier stage whose output type is one of ``artifacts``. The runner adds
    the referenced stage as a dependency and puts the model's identity (hub id
    and revision, or content hash, or the producing stage's key) in the cache key.
    """

    artifacts: tuple[str, ...] = (POLICY,)


@dataclass(frozen=True)
class DatasetRef:
    """Marks a params field (``Annotated[str, DatasetRef()]``) as the name of a spec ``datasets`` entry.

    ``columns`` lists the normalised columns the stage needs (``prompt`` for
    prompts; ``chosen`` and ``rejected`` for preference pairs); validation
    checks that the dataset provides them.
    """

    columns: tuple[str, ...] = ("prompt",)


@dataclass(frozen=True)
class NotInKey:
    """Marks a params field that cannot change a stage's output (batch size for scoring,
    logging intervals); it is left out of the cache key. Use as ``Annotated[int, NotInKey()]``."""


@dataclass
class StageResult:
    """What a stage's ``run`` returns (``None`` means an empty result).

    Attributes:
        metrics: JSON-able numbers for the run report and the manifest.
        rows: row count of a dataset output, if any.
        output_type: overrides the implementation's declared output type
            (a pass-through ``filter`` returns its input's type).
    """

    metrics: dict[str, Any] = field(default_factory=dict)
    rows: Optional[int] = None
    output_type: Optional[str] = None


@dataclass(frozen=True)
class StageImpl:
    """A stage implementation, as a plugin registers it.

    Attributes:
        kind: one of :data:`KINDS`.
        name: the value of a stage's ``uses``.
        params: the pydantic model of the stage's ``params`` (``extra="forbid"``).
        run: ``run(ctx: StageContext) -> StageResult | None``; writes into ``ctx.out_dir``.
            Import heavy libraries (vllm, deepspeed) inside it, not at module import.
        version: bump when the implementation's output changes meaning; part of the cache key.
            Empty means the distribution's version.
        inputs: artifact types accepted as data ``inputs`` (empty: none accepted).
        min_inputs, max_inputs: how many data inputs the stage takes.
        output: the artifact type of the output; ``"same"`` means the type of the first input.
        description: one line for ``rlhf-spec plugins``.
        check: optional static check ``check(params, spec) -> list[Problem]`` run by ``validate``
            (pointers relative to the stage's ``params``).
        resources: optional ``resources(params) -> dict`` (``processes``, ``gpus``) for ``plan``.
        distribution, dist_version, entry_point: filled in by the loader.
    """

    kind: str
    name: str
    params: type[BaseModel]
    run: Callable[["StageContext"], Union[StageResult, None]]
    version: str = ""
    inputs: tuple[str, ...] = ()
    min_inputs: int = 0
    max_inputs: Optional[int] = None
    output: str = SAMPLES
    description: str = ""
    check: Optional[Callable[[BaseModel, Any], list["Problem"]]] = None
    resources: Optional[Callable[[BaseModel], dict]] = None
    distribution: str = ""
    dist_version: str = ""
    entry_point: str = ""

    @property
    def impl_version(self) -> str:
        return self.version or self.dist_version

    def origin(self) -> str:
        """``"name (distribution version)"``, for error messages."""
        return f"{self.kind}/{self.name} ({self.distribution or 'unknown distribution'} {self.dist_version})".rstrip()


@hookspec
def rlhf_spec_register_stages(register: Callable[[StageImpl], None]) -> None:
    """Register stage implementations by calling ``register(StageImpl(...))`` once per implementation.

    Raises:
        Nothing should escape; an exception here marks the plugin as broken. ``rlhf-spec plugins``
        reports it with the plugin's distribution, and other plugins are unaffected.
    """
