"""What a running stage gets: frozen inputs, a mutable output record, and services.

A stage implementation receives one :class:`StageContext` and writes its output under
``ctx.out_dir``: a dataset with :meth:`StageContext.save_dataset`, a model with
:func:`rlhf_spec.save_policy` (or ``save_pretrained(ctx.model_out_dir)``). The runner commits that
folder to the cache when ``run`` returns. The context holds three parts:

* :class:`StageInputs` (frozen): the stage's id, key, validated params, seed, upstream artifacts and
  the resolved models and datasets;
* :class:`StageOutput` (mutable): the output folder, timings, counters and the cache keys used;
* services: progress, resumable shards, shared memo entries, and loading rewards and backends.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from pydantic import BaseModel

from .errors import RewardError
from .model_source import ModelSource
from .records import Completion, ComponentSpec, Engine, Reward, RewardBatch, RewardOutput
from .refs import get_path
from .runtime import local_device

DATA_DIR = "data"
MODEL_DIR = "model"


class Progress:
    """Progress of one stage, in rows. The runner's subclass draws a rich bar; this one is silent."""

    def start(self, total: int, unit: str = "rows") -> None:
        """Set the total amount of work (resets the count)."""

    def advance(self, n: int = 1) -> None:
        """Report ``n`` more units done."""

    def note(self, text: str) -> None:
        """Show a short status text (e.g. ``"loading policy"``)."""


@dataclass(frozen=True)
class InputArtifact:
    """The committed output of an upstream stage.

    Attributes:
        stage_id: the producing stage's id.
        output_type: its artifact type (see :mod:`rlhf_spec.records`).
        key: its cache key.
        path: its entry folder.
    """

    stage_id: str
    output_type: str
    key: str
    path: str

    def load_dataset(self):
        """The upstream ``datasets.Dataset`` (samples, scored, pairs, tables); empty ones included.

        Transform caching is switched off, so ``select``/``map`` never write into the immutable entry.
        """
        from .data import load_rows

        return load_rows(Path(self.path) / DATA_DIR)

    @property
    def model_dir(self) -> Path:
        return Path(self.path) / MODEL_DIR


@dataclass(frozen=True)
class StageInputs:
    """Everything that determines the stage's output (frozen).

    Attributes:
        stage_id, kind, uses: the stage's spec entry. pointer: its JSON pointer (``/stages/2``).
        key: the stage's cache key (64 hex characters).
        params: the validated params model instance.
        seed: the spec's global seed.
        inputs: upstream artifacts, in ``inputs`` order.
        models: ``param path -> ModelSource`` for every model reference, nested ones included
            (``"policy"``, ``"reward.params.model"``).
        datasets: ``param path -> DatasetSpec dict`` for every dataset reference (hub revisions resolved).
        base_dir: folder that relative spec paths resolve against.
    """

    stage_id: str
    kind: str
    uses: str
    key: str
    params: BaseModel
    seed: int
    inputs: tuple[InputArtifact, ...] = ()
    models: Mapping[str, ModelSource] = field(default_factory=dict)
    datasets: Mapping[str, dict] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    pointer: str = ""


@dataclass
class StageOutput:
    """What the stage writes and records (mutable).

    Attributes:
        out_dir: where to write the output (a temporary folder the runner commits).
        timings: seconds per named phase (see :meth:`StageContext.timer`), reported as ``seconds_<name>``.
        counters: integer counts reported in the metrics (``shards_reused``, ...).
        used_keys: cache keys of shared entries the stage read or wrote (kept by ``cache gc``).
    """

    out_dir: Path
    timings: dict[str, float] = field(default_factory=dict)
    counters: dict[str, int] = field(default_factory=dict)
    used_keys: list[str] = field(default_factory=list)


class StageContext:
    """Everything a stage needs at run time: ``inputs`` (frozen), ``output`` (mutable) and services.

    Args:
        inputs: the :class:`StageInputs`.
        output: the :class:`StageOutput`.
        partial_dir: persists across interrupted attempts of this key (shards, checkpoints).
        cache_root: the cache folder (for :meth:`memo`).
        progress: a :class:`Progress`.
    """

    def __init__(self, inputs: StageInputs, output: StageOutput, partial_dir: Path, cache_root: Path,
                 progress: Optional[Progress] = None):
        self.spec = inputs
        self.output = output
        self.partial_dir = Path(partial_dir)
        self.cache_root = Path(cache_root)
        self.progress = progress or Progress()

    # -- reading ---------------------------------------------------------------------

    @property
    def params(self) -> BaseModel:
        return self.spec.params

    @property
    def seed(self) -> int:
        return self.spec.seed

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def stage_id(self) -> str:
        return self.spec.stage_id

    @property
    def inputs(self) -> tuple[InputArtifact, ...]:
        return self.spec.inputs

    @property
    def base_dir(self) -> Path:
        return self.spec.base_dir

    @property
    def device(self):
        """This process's device: ``cuda:LOCAL_RANK`` when a GPU is present, else CPU."""
        return local_device()

    def model(self, path: str) -> ModelSource:
        """The :class:`ModelSource` named by the model-reference param at ``path`` (``"policy"``).

        Raises:
            KeyError: if the param is unset or is not a model reference.
        """
        return self.spec.models[path]

    def dataset(self, path: str):
        """Load the spec dataset named by the dataset-reference param at ``path``, normalised
        (see :mod:`rlhf_spec.data`).

        Raises:
            KeyError: if the param is unset. Errors of :func:`rlhf_spec.data.load_spec_dataset`.
        """
        from .data import load_spec_dataset
        from .spec.models import DatasetSpec

        return load_spec_dataset(DatasetSpec.model_validate(self.spec.datasets[path]), self.base_dir)

    def input_dataset(self, index: int = 0):
        """The ``datasets.Dataset`` of data input ``index``.

        Raises:
            IndexError: if the stage has fewer inputs.
        """
        return self.inputs[index].load_dataset()

    def component(self, path: str) -> ComponentSpec:
        """The validated reward or backend spec at params ``path`` (``"reward"``, ``"judges.1"``).

        Raises:
            KeyError: if nothing is there. TypeError: if it is not a reward or backend spec.
        """
        node = get_path(self.params, path)
        if not isinstance(node, ComponentSpec):
            raise TypeError(f"params.{path} of stage '{self.stage_id}' is not a reward or backend spec")
        return node

    def reward(self, path: str) -> "CheckedReward":
        """Load the reward named at params ``path`` (a :class:`~rlhf_spec.RewardSpec`) once.

        Returns:
            a :class:`CheckedReward`: its ``score`` checks every output (count, finiteness).

        Raises:
            Errors of the reward's ``load`` (missing model files, for example).
        """
        spec = self.component(path)
        cctx = ComponentContext(self, path)
        return CheckedReward(spec.impl.load(spec.parsed, cctx), spec.impl.origin(), cctx.pointer,
                             pairwise=spec.impl.is_pairwise(spec.parsed))

    def backend(self, path: str, policy: ModelSource) -> Engine:
        """Load the generation backend named at params ``path`` (a :class:`~rlhf_spec.BackendSpec`) for ``policy``."""
        spec = self.component(path)
        return spec.impl.load(policy, spec.parsed, ComponentContext(self, path))

    # -- writing ---------------------------------------------------------------------

    @property
    def out_dir(self) -> Path:
        return self.output.out_dir

    @property
    def model_out_dir(self) -> Path:
        return self.output.out_dir / MODEL_DIR

    def save_dataset(self, ds) -> Path:
        """Write the stage's dataset output (``save_to_disk`` under ``out_dir/data``; an empty one too)."""
        from .data import save_rows

        return save_rows(ds, self.out_dir / DATA_DIR)

    @contextlib.contextmanager
    def timer(self, name: str):
        """Add the seconds spent in the block to ``timings[name]`` (reported as ``seconds_<name>``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.output.timings[name] = self.output.timings.get(name, 0.0) + time.perf_counter() - t0

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` (reported in the metrics)."""
        self.output.counters[name] = self.output.counters.get(name, 0) + int(n)

    # -- services --------------------------------------------------------------------

    def run_shards(self, rows, process: Callable[[Any, int], Any], num_shards: int):
        """Process ``rows`` in content-defined shards, committing each as it finishes; see
        :func:`rlhf_spec.cache.shards.run_shards`. Counts a shard returns (``(dataset, counts)``) are
        added to the stage's counters, for resumed shards too.

        Returns:
            the concatenation of all shard outputs, in shard order.
        """
        from .cache.shards import run_shards

        out, reused, computed, counts = run_shards(self.partial_dir, rows, process, num_shards, self.progress)
        self.output.counters["shards_reused"] = reused
        self.output.counters["shards_computed"] = computed
        for k, v in counts.items():
            self.count(k, v)
        return out

    def memo(self, name: str, preimage: dict, compute: Callable[[Path], Optional[dict]]) -> Path:
        """A cache entry derived inside this stage and shareable with other stages.

        The entry's key hashes ``name`` and ``preimage`` only (not this stage's key), so two
        training stages with the same pairs and reference policy share, for example, the
        reference-policy logprobs.

        Args:
            name: what is computed, e.g. ``"reference-logprobs"``.
            preimage: JSON-able dict of everything that determines the result.
            compute: ``compute(tmp_dir) -> metrics`` writes the result into ``tmp_dir``.

        Returns:
            the committed entry folder.

        Raises:
            CacheError: if the entry cannot be written.
        """
        from .cache import Cache
        from .hashing import hash_json

        key = hash_json({"memo": name, "preimage": preimage})
        manifest = {"stage": {"id": self.stage_id, "memo": name}, "preimage": {"memo": name, **preimage}}
        path = Cache(self.cache_root).memo(key, compute, manifest)
        self.output.used_keys.append(key)
        return path


class ComponentContext:
    """What a reward's or a backend's ``load`` gets: its own model references, its JSON pointer,
    nested rewards (for combinations), the device, and the stage's progress and timer.

    Args:
        stage: the :class:`StageContext` of the stage that uses the component.
        path: the component's params path in the stage (``"reward"``, ``"judges.0"``).
    """

    def __init__(self, stage: StageContext, path: str):
        self.stage = stage
        self.path = path
        self.pointer = f"{stage.spec.pointer}/params/" + path.replace(".", "/")

    @property
    def device(self):
        return self.stage.device

    @property
    def progress(self) -> Progress:
        return self.stage.progress

    def timer(self, name: str):
        return self.stage.timer(name)

    def model(self, field_name: str) -> ModelSource:
        """The :class:`ModelSource` of this component's model-reference param ``field_name``.

        Raises:
            KeyError: if the param is unset or not a model reference.
        """
        return self.stage.model(f"{self.path}.params.{field_name}")

    def reward(self, subpath: str) -> "CheckedReward":
        """Load a reward nested in this component's params (``"components.helpful.reward"``)."""
        return self.stage.reward(f"{self.path}.params.{subpath}")


class CheckedReward:
    """A loaded reward whose outputs are checked: one finite score per completion, components alike, and
    for a pairwise reward one finite preference per pair.

    Args:
        reward: the loaded :class:`~rlhf_spec.Reward`.
        origin: ``"reward 'name' (distribution version)"``, for messages.
        pointer: the reward spec's JSON pointer.
        pairwise: whether its record declares, for its params, that it compares two completions
            (:meth:`~rlhf_spec.records.RewardImpl.is_pairwise`); only then is :meth:`compare` allowed.
    """

    def __init__(self, reward: Reward, origin: str, pointer: str, pairwise: bool = False):
        self.reward, self.origin, self.pointer, self.pairwise = reward, origin, pointer, pairwise

    def score(self, batch: RewardBatch) -> RewardOutput:
        """Score a batch; see :meth:`rlhf_spec.Reward.score`.

        Raises:
            RewardError: if the output has another length than the batch, or a non-finite value.
        """
        out = self.reward.score(batch)
        for name, values in [("scores", out.scores)] + [(f"component '{k}'", v) for k, v in out.components.items()]:
            self._check(values, len(batch), name, f"a non-finite {name} value", "completion")
        return out

    def _check(self, values: list, n: int, name: str, finite_name: Optional[str], unit: str) -> None:
        """RewardError unless ``values`` holds ``n`` values (and, with ``finite_name``, finite ones)."""
        import math

        if len(values) != n:
            raise RewardError(f"{self.pointer}: {self.origin} returned {len(values)} {name} for {n} {unit}s")
        bad = [i for i, v in enumerate(values) if finite_name and not math.isfinite(float(v))]
        if bad:
            raise RewardError(f"{self.pointer}: {self.origin} returned {finite_name} ({values[bad[0]]}) "
                              f"for {unit} {bad[0]} of {n}")

    def compare(self, prompts: list, completions_a: list, completions_b: list) -> tuple[list[float], list[bool]]:
        """Compare completion a with completion b for each of N prompts, through the reward's own
        ``compare`` (:attr:`~rlhf_spec.records.RewardImpl.pairwise`).

        Returns:
            ``(p_a, disagreement)``: N probabilities that a is preferred, and N bools (the two
            presentation orders picked different completions).

        Raises:
            RewardError: if the reward does not declare the capability for its params, or returns another
                number of values than N, or a non-finite preference.
        """
        if not self.pairwise:
            raise RewardError(f"{self.pointer}: {self.origin} does not compare two completions with these params "
                              "(its record declares no pairwise capability for them)")
        p_a, disagreement = self.reward.compare(prompts, completions_a, completions_b)
        self._check(p_a, len(prompts), "preferences", "a non-finite preference", "pair")
        self._check(disagreement, len(prompts), "disagreement flags", None, "pair")
        return p_a, disagreement

    def __getattr__(self, name):  # the loaded reward's own attributes (a judge's tokenizer, for example)
        return getattr(self.reward, name)


__all__ = ["ComponentContext", "CheckedReward", "Completion", "InputArtifact", "Progress", "RewardError",
           "StageContext",
           "StageInputs", "StageOutput"]
