"""What plugins register: stage, reward and backend records, the artifact types, and the params markers.

Three plugin surfaces share one pattern: a frozen record names an implementation, its pydantic params
model (``extra="forbid"``), a ``version`` that enters cache keys, and the callable that does the work.

* :class:`StageImpl`: a stage a spec's ``kind``/``uses`` names; ``run(ctx) -> StageResult``.
* :class:`RewardImpl`: a reward; ``load(params, ctx) -> Reward``, whose ``score(RewardBatch)`` returns
  one float per (prompt, completion) and optional named components.
* :class:`BackendImpl`: a generation engine; ``load(policy, params, ctx) -> Engine``, whose
  ``generate(prompt_token_ids, sampling, n, seed)`` returns n completions per prompt.

A spec names a reward or a backend the same way everywhere, with a :class:`RewardSpec` or
:class:`BackendSpec` object: ``{"uses": "<name>", "params": {...}}``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Optional, Protocol, Union, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .errors import Problem

if TYPE_CHECKING:  # names used in annotations only
    from .model_source import ModelSource

# The context a stage, reward or backend receives (rlhf_spec.context, a layer above this one) is typed
# ``Any`` here; the docstrings name it.

#: The six stage kinds a spec may use.
KINDS = ("sample", "score", "filter", "pair", "train", "evaluate")

# Artifact types: what a stage's output holds (docs/plugins.md gives each one's contract).
# Validation checks that each input has a type its consumer accepts (``pair`` needs ``scored``).
SAMPLES = "samples"  #: rows of (prompt_id, prompt, sample_index, completion, completion_tokens, prompt_tokens)
SCORED = "scored"  #: samples plus a float ``reward`` column (and one ``reward/<component>`` column per component)
PAIRS = "pairs"  #: rows of (prompt_id, prompt, chosen, rejected, chosen_reward, rejected_reward, split)
POLICY = "policy"  #: ``model/``: a ``save_pretrained`` causal-LM folder with its tokenizer
REWARD_MODEL = "reward_model"  #: ``model/``: a ``save_pretrained`` sequence-classification folder
METRICS = "metrics"  #: metrics.json plus tables
ARTIFACT_TYPES = (SAMPLES, SCORED, PAIRS, POLICY, REWARD_MODEL, METRICS)


# ----------------------------------------------------------------------------- params markers


@dataclass(frozen=True)
class ModelRef:
    """Marks a params field (``Annotated[str, ModelRef(...)]``) as a model reference.

    The value names an entry of the spec's ``models`` map, or the id of an earlier stage whose
    output type is one of ``artifacts``. The runner adds the referenced stage as a dependency and
    puts the model's identity (hub id and commit, content hash, or the producing stage's key) in
    the cache key instead of the name.
    """

    artifacts: tuple[str, ...] = (POLICY,)


@dataclass(frozen=True)
class DatasetRef:
    """Marks a params field (``Annotated[str, DatasetRef()]``) as the name of a spec ``datasets`` entry.

    ``columns`` lists the normalised columns the stage needs (``prompt`` for prompts; ``chosen`` and
    ``rejected`` for preference pairs); validation checks that the dataset provides them.
    """

    columns: tuple[str, ...] = ("prompt",)


@dataclass(frozen=True)
class NotInKey:
    """Marks a params field that cannot change a stage's output (batch size for scoring, logging
    intervals); it is left out of the cache key. Use as ``Annotated[int, NotInKey()]``."""


# ----------------------------------------------------------------------------- the shared syntax


class ComponentSpec(BaseModel):
    """``{"uses": name, "params": {...}}``: a reward or a backend named inside a stage's params.

    Validation looks ``uses`` up among the installed implementations of the surface and validates
    ``params`` with that implementation's own model; errors point into the object
    (``/stages/2/params/reward/params/max_length``). The validated params are :attr:`parsed`.
    """

    model_config = ConfigDict(extra="forbid")
    surface: ClassVar[str] = ""

    uses: str = Field(..., min_length=1, description="Implementation name, as listed by 'rlhf-spec plugins'.")
    params: dict[str, Any] = Field(default_factory=dict, description="Its params; see the implementation's schema.")

    _impl: Any = PrivateAttr(None)
    _parsed: Optional[BaseModel] = PrivateAttr(None)

    @property
    def impl(self):
        """The registered :class:`RewardImpl` or :class:`BackendImpl` (set by validation).

        Raises:
            RuntimeError: if the spec was not validated against a registry.
        """
        if self._impl is None:
            raise RuntimeError(f"{self.surface} '{self.uses}' was not resolved; validate the spec first")
        return self._impl

    @property
    def parsed(self) -> BaseModel:
        """The params validated by the implementation's params model (set by validation)."""
        if self._parsed is None:
            raise RuntimeError(f"{self.surface} '{self.uses}' was not resolved; validate the spec first")
        return self._parsed

    def bind(self, impl, parsed: BaseModel) -> None:
        """Attach the implementation and its validated params (done by validation)."""
        self._impl, self._parsed = impl, parsed


class RewardSpec(ComponentSpec):
    """A reward, by name: ``{"uses": "classifier", "params": {"model": "reward_model"}}``."""

    surface: ClassVar[str] = "reward"


class BackendSpec(ComponentSpec):
    """A generation backend, by name: ``{"uses": "transformers", "params": {"batch_size": 16}}``."""

    surface: ClassVar[str] = "backend"


# ----------------------------------------------------------------------------- stages


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


@dataclass(frozen=True, kw_only=True)
class _Record:
    """Fields every record shares; ``distribution``, ``dist_version`` and ``entry_point`` are filled by the loader."""

    version: str = ""
    description: str = ""
    source_hash: bool = False
    resources: Optional[Callable[[BaseModel], dict]] = None
    distribution: str = ""
    dist_version: str = ""
    entry_point: str = ""
    source_digest: str = ""

    @property
    def impl_version(self) -> str:
        """The version that enters cache keys: ``version`` (else the distribution's), plus the
        digest of the plugin's source files when the record opts in with ``source_hash=True``."""
        base = self.version or self.dist_version
        return f"{base}+src.{self.source_digest[:16]}" if self.source_digest else base


@dataclass(frozen=True, kw_only=True)
class StageImpl(_Record):
    """A stage implementation, as a plugin registers it.

    Attributes:
        kind: one of :data:`KINDS`.
        name: the value of a stage's ``uses``.
        params: the pydantic model of the stage's ``params`` (``extra="forbid"``).
        run: ``run(ctx: StageContext) -> StageResult | None``; writes into ``ctx.out_dir``.
            Import heavy libraries (vllm, deepspeed) inside it, not at module import. A stage whose
            params have ``num_processes > 1`` runs in that many worker processes (see
            :mod:`rlhf_spec.launch`); ``run`` is then called in each.
        version: bump when the implementation's output changes meaning; part of the cache key.
            Empty means the distribution's version.
        source_hash: also key on a digest of the plugin package's ``.py`` files, so an edited plugin
            never reuses outputs of its earlier code (docs/plugins.md).
        inputs: artifact types accepted as data ``inputs`` (empty: none accepted).
        min_inputs, max_inputs: how many data inputs the stage takes.
        output: the artifact type of the output; ``"same"`` means the type of the first input.
        description: one line for ``rlhf-spec plugins``.
        check: optional static check ``check(params, spec, inputs) -> list[Problem]`` run by
            ``validate``; ``inputs`` are the upstream output types; pointers are relative to the
            stage's ``params`` (``"/dataset"``) or, starting with ``"#"``, to the stage (``"#/inputs"``).
        resources: optional ``resources(params) -> dict`` (``processes``, ``gpus``) for ``plan``; a
            stage merges in those of the rewards and backends it names.
    """

    kind: str
    name: str
    params: type[BaseModel]
    run: Callable[[Any], Union[StageResult, None]]  # run(ctx: StageContext)
    inputs: tuple[str, ...] = ()
    min_inputs: int = 0
    max_inputs: Optional[int] = None
    output: str = SAMPLES
    check: Optional[Callable[..., list["Problem"]]] = None

    def origin(self) -> str:
        """``"kind/name (distribution version)"``, for error messages."""
        return f"{self.kind}/{self.name} ({self.distribution or 'unknown distribution'} {self.dist_version})".replace(
            " )", ")"
        )


# ----------------------------------------------------------------------------- rewards


@dataclass
class RewardBatch:
    """Inputs of one reward call: N (prompt, completion) pairs and their rows' extra columns.

    Attributes:
        prompts: N chat prompts, each a list of ``{"role", "content"}`` messages.
        completions: N completion texts (the policy's reply, without special tokens).
        columns: other row columns by name, each a list of N values (``reference`` answers for
            ``math-answer``, for example). A reward declares the columns it needs in
            :attr:`RewardImpl.columns`; validation checks the data provides them. Which row columns
            go here is one rule, :meth:`data_columns`; build a batch from rows with :meth:`from_rows`.
    """

    #: Row columns the pipeline writes itself and never passes under ``columns``: the prompt and its id
    #: (the prompt comes as ``prompts``), its chat-template tokens, the sampled completion and its metadata
    #: (the completion being scored comes as ``completions``), a preference pair's texts and split. A
    #: ``scored`` row's ``reward`` and ``reward/<component>`` columns are left out too.
    OWN_COLUMNS: ClassVar[frozenset] = frozenset({
        "prompt_id", "prompt", "token_ids", "prompt_tokens", "sample_index", "completion", "completion_tokens",
        "chosen", "rejected", "split"})

    prompts: list
    completions: list[str]
    columns: dict[str, list] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.completions)

    @classmethod
    def data_columns(cls, names) -> list[str]:
        """The row columns a reward receives, in the order of ``names``: every column except
        :attr:`OWN_COLUMNS`, ``reward`` and ``reward/<component>`` (a ``reference`` answer, ``messages``,
        a KTO ``label``, a pair's ``chosen_reward``). The ``sample`` stage carries the same columns of the
        prompts into its samples, so the rows reaching ``score`` keep them.

        Args:
            names: column names (``rows.column_names``).

        Returns:
            a list of column names.
        """
        return [c for c in names if c not in cls.OWN_COLUMNS and c != "reward" and not c.startswith("reward/")]

    @classmethod
    def from_rows(cls, rows, completions: list[str], prompts: Optional[list] = None) -> "RewardBatch":
        """The batch of N completions written for R rows, k = N / R consecutive completions per row
        (completion j answers row j // k): k = 1 for a ``samples`` row and its own completion, k = G for
        a group of G rollouts per prompt, k = samples_per_prompt for evaluate's answers.

        Args:
            rows: R rows, a ``datasets.Dataset`` (or anything with ``column_names``, ``len()`` as the row
                count and ``rows[name]`` -> R values); its :meth:`data_columns` become ``columns``, each
                row's value repeated k times in place.
            completions: N completion texts, grouped by row.
            prompts: N chat prompts; default: each row's ``prompt`` repeated k times in place.

        Returns:
            a :class:`RewardBatch` of N entries.

        Raises:
            ValueError: if N is not a whole multiple of R (or R = 0 < N), or ``prompts`` does not hold N entries.
        """
        n, r = len(completions), len(rows)
        if (r == 0 and n) or (r and n % r):
            raise ValueError(f"a reward batch needs the same number of completions for every row: got {n} "
                             f"completions for {r} rows")
        k = n // r if r else 0

        def spread(values) -> list:
            return list(values) if k == 1 else [v for v in values for _ in range(k)]

        if prompts is None:
            prompts = spread(rows["prompt"])
        elif len(prompts) != n:
            raise ValueError(f"a reward batch needs one prompt per completion: got {len(prompts)} prompts for "
                             f"{n} completions")
        columns = {c: spread(rows[c]) for c in cls.data_columns(rows.column_names)}
        return cls(prompts=list(prompts), completions=list(completions), columns=columns)


@dataclass
class RewardOutput:
    """What a reward returns.

    Attributes:
        scores: N floats, one per completion, in input order (the reward's own units).
        components: optional named parts, each N floats (ArmoRM's objectives, a combination's inputs).
        counts: optional event counts for the metrics (``unparseable`` completions, for example).
    """

    scores: list[float]
    components: dict[str, list[float]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


@runtime_checkable
class Reward(Protocol):
    """A loaded reward: ``score(batch) -> RewardOutput`` (N floats for N completions)."""

    def score(self, batch: RewardBatch) -> RewardOutput:  # pragma: no cover - protocol
        ...


@dataclass(frozen=True, kw_only=True)
class RewardImpl(_Record):
    """A reward, as a plugin registers it.

    Attributes:
        name: the value of a reward spec's ``uses``.
        params: its pydantic params model (``extra="forbid"``); model references inside it are
            marked with :class:`ModelRef` and resolved like a stage's.
        load: ``load(params, ctx: ComponentContext) -> Reward``; loads models once per stage.
        columns: row columns the reward reads, or ``columns(params) -> list[str]`` when they follow the
            params; validation checks that the rows reaching the reward have them (the prompts dataset's
            columns flow through ``sample``, ``score`` and ``filter``).
        components: names of the components it reports, if fixed (documentation and schema).
        check: optional ``check(params, spec) -> list[Problem]``, pointers relative to its ``params``.
        pairwise: the capability to compare two completions instead of scoring one: True, or
            ``pairwise(params) -> bool`` when the params decide (``llm-judge``'s ``mode``). A pairwise
            reward's loaded object has ``compare(prompts, completions_a, completions_b) -> (p_a,
            disagreement)``: N probabilities P(completion a preferred) in [0, 1] and N bools (the two
            presentation orders picked different completions); its ``score`` may refuse. Stages that compare
            (``ai-feedback``, the judges of ``evaluate`` and ``reward-accuracy``) call ``compare`` on it; stages
            that need one score per completion refuse it at validation.
    """

    name: str
    params: type[BaseModel]
    load: Callable[[BaseModel, Any], Reward]  # load(params, ctx: ComponentContext)
    columns: Union[tuple[str, ...], Callable[[BaseModel], Any]] = ()
    components: tuple[str, ...] = ()
    check: Optional[Callable[..., list["Problem"]]] = None
    pairwise: Union[bool, Callable[[BaseModel], bool]] = False

    def required_columns(self, params: BaseModel) -> list[str]:
        """The row columns this reward reads with ``params``."""
        return list(self.columns(params) if callable(self.columns) else self.columns)

    def is_pairwise(self, params: BaseModel) -> bool:
        """Whether this reward, with ``params`` (its validated params), compares two completions
        (see :attr:`pairwise`) rather than scoring each one."""
        return bool(self.pairwise(params) if callable(self.pairwise) else self.pairwise)

    def origin(self) -> str:
        return f"reward '{self.name}' ({self.distribution or 'unknown distribution'} {self.dist_version})".replace(
            " )", ")"
        )


# ----------------------------------------------------------------------------- backends


@dataclass
class Completion:
    """One generated completion.

    Attributes:
        token_ids: the generated token ids, ending with the end-of-turn token when one was produced.
        text: the decoded reply, special tokens removed, whitespace stripped.
        logprobs: optional per-token logprobs (nats) of ``token_ids`` under the sampling distribution.
        finish_reason: ``"stop"`` (end-of-turn token) or ``"length"`` (hit ``max_new_tokens``).
    """

    token_ids: list[int]
    text: str
    logprobs: Optional[list[float]] = None
    finish_reason: str = "stop"


@runtime_checkable
class Engine(Protocol):
    """A loaded generation backend.

    ``generate(prompt_token_ids, sampling, n, seed)`` takes P prompts as token-id lists (chat
    template applied, no padding) and returns P lists of ``n`` :class:`Completion`. The result
    depends only on the prompts, their order, ``sampling``, ``n``, ``seed`` and the backend's
    params (docs/spec.md, "Seeds").
    """

    def generate(self, prompt_token_ids: list[list[int]], sampling: Any, n: int,
                 seed: int) -> list[list[Completion]]:  # pragma: no cover
        ...


@dataclass(frozen=True, kw_only=True)
class BackendImpl(_Record):
    """A generation backend, as a plugin registers it.

    Attributes:
        name: the value of a backend spec's ``uses``.
        params: its pydantic params model (``extra="forbid"``).
        load: ``load(policy: ModelSource, params, ctx: ComponentContext) -> Engine``. Import heavy
            libraries (vllm) inside it.
        check: optional ``check(params, spec) -> list[Problem]``, pointers relative to its ``params``.
    """

    name: str
    params: type[BaseModel]
    load: Callable[["ModelSource", BaseModel, Any], Engine]  # load(policy, params, ctx: ComponentContext)
    check: Optional[Callable[..., list["Problem"]]] = None

    def origin(self) -> str:
        return f"backend '{self.name}' ({self.distribution or 'unknown distribution'} {self.dist_version})".replace(
            " )", ")"
        )


def component_resources(spec: ComponentSpec) -> dict:
    """The ``resources`` a validated reward or backend spec declares for its params (``{}`` when its record
    declares none), for a stage to merge into its own ``resources(params)`` (``plan`` shows them).

    Raises:
        RuntimeError: if ``spec`` was not validated against a registry.
    """
    impl = spec.impl
    return dict(impl.resources(spec.parsed)) if impl.resources else {}


def call_check(check: Callable, params: BaseModel, spec: Any, inputs: tuple) -> list:
    """Call a record's static ``check``: ``check(params, spec, inputs)``, or ``check(params, spec)`` for a
    check written for releases before 0.2 (two parameters).

    Returns:
        the :class:`~rlhf_spec.Problem` list it returned (``None`` counts as none).
    """
    try:
        n = len(inspect.signature(check).parameters)
    except (TypeError, ValueError):
        n = 3
    return list((check(params, spec, inputs) if n >= 3 else check(params, spec)) or [])


def pairwise_reward_problems(reward: "ComponentSpec", pointer: str = "/reward") -> list:
    """A :class:`~rlhf_spec.Problem` at ``pointer`` when the bound reward ``reward`` is pairwise with its
    params (:meth:`RewardImpl.is_pairwise`): it compares two replies and has no score for one, so it cannot
    serve where each completion needs a score (``score``, online training). An unbound spec gives none.
    """
    if reward._impl is None or reward._parsed is None or not reward._impl.is_pairwise(reward._parsed):
        return []
    return [Problem(pointer, f"{reward._impl.origin()} is pairwise with these params: it compares two replies "
                             "and gives no score to one",
                    "use it among evaluate's judges or in the pair stage 'ai-feedback'; where each reply needs a "
                    "score use a reward that rates it (llm-judge: mode 'pointwise')")]
