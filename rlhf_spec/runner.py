"""Running a validated pipeline: keys, then each selected stage from the cache or computed and committed.

Data flows one way: spec -> validated graph -> keys -> plan -> execute stage -> commit entry -> report.
A stage never reaches back into the runner: it gets a :class:`~rlhf_spec.context.StageContext` of
frozen inputs plus services, and returns a result.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .cache import Cache
from .cache.keys import dataset_identity, key_of, model_identity, stage_preimage
from .context import InputArtifact, Progress, StageContext, StageInputs, StageOutput
from .errors import RLHFSpecError, StageFailed, UsageError, did_you_mean
from .graph import Pipeline, Stage
from .launch import execute_stage
from .model_source import ModelSource
from .progress import make_progress
from .records import StageResult
from .runtime import quiet_libraries, seed_everything

DEFAULT_CACHE = ".rlhf-cache"


def cache_dir_for(pipeline: Optional[Pipeline], override: Optional[str]) -> Path:
    """The cache folder: ``--cache-dir``, else ``RLHF_SPEC_CACHE``, else the spec's ``cache.dir``, else
    ``.rlhf-cache``."""
    if override:
        return Path(override)
    env = os.environ.get("RLHF_SPEC_CACHE")
    if env:
        return Path(env)
    if pipeline is not None and pipeline.spec.cache.dir:
        return Path(pipeline.spec.cache.dir)
    return Path(DEFAULT_CACHE)


@dataclass
class StageOutcome:
    """One row of the run report."""

    id: str
    kind: str
    uses: str
    key: str
    status: str  # "ran" | "cached" | "reused" | "failed" | "interrupted"
    seconds: float = 0.0
    output: str = ""
    output_type: str = ""
    metrics: dict = field(default_factory=dict)
    rows: Optional[int] = None
    reason: str = ""
    computed_seconds: Optional[float] = None  # a stage served from the cache: the seconds its entry took


class Runner:
    """Computes keys and runs a :class:`~rlhf_spec.graph.Pipeline` against a :class:`~rlhf_spec.cache.Cache`.

    Args:
        pipeline: the validated spec.
        cache: the cache to read and write.
        base_dir: folder that relative spec paths resolve against (default: cwd).
        console: a ``rich.console.Console`` for progress (None: silent).
    """

    def __init__(self, pipeline: Pipeline, cache: Cache, base_dir: Optional[Path] = None, console=None):
        self.pipeline = pipeline
        self.cache = cache
        self.base_dir = Path(base_dir or os.getcwd())
        self.console = console
        self.preimages: dict[str, dict] = {}
        self.keys: dict[str, str] = {}
        self.key_errors: dict[str, str] = {}
        self.sources: dict[str, dict[str, ModelSource]] = {}
        self.datasets: dict[str, dict[str, dict]] = {}
        self.outcomes: dict[str, StageOutcome] = {}
        self.used_keys: list[str] = []

    # ------------------------------------------------------------------ keys

    def _stage_key(self, st: Stage) -> None:
        spec = self.pipeline.spec
        bad = [d for d in st.deps if d in self.key_errors]
        if bad:
            raise RuntimeError(f"depends on '{bad[0]}', whose key is unknown")
        models, sources, dsets, dicts = {}, {}, {}, {}
        for path, ref in sorted(st.model_refs.items()):
            if ref in spec.models:
                models[path], sources[path] = model_identity(ref, spec.models[ref], self.base_dir, self.cache)
            else:
                models[path] = {"stage_key": self.keys[ref]}
                sources[path] = ModelSource(name=ref, origin="stage", identity=models[path],
                                            path=str(self.cache.entry_dir(self.keys[ref]) / "model"))
        for path, ref in sorted(st.dataset_refs.items()):
            dsets[path] = dataset_identity(spec.datasets[ref], self.base_dir, self.cache.hash_state)
            dicts[path] = dict(spec.datasets[ref].model_dump(mode="json"), revision=dsets[path].get("revision"))
        pre = stage_preimage(st, [self.keys[i] for i in st.spec.inputs], models, dsets, spec.seed, spec.salt)
        self.preimages[st.id], self.keys[st.id] = pre, key_of(pre)
        self.sources[st.id], self.datasets[st.id] = sources, dicts

    def compute_keys(self) -> None:
        """Compute every stage's key and preimage in topological order.

        A stage whose key cannot be computed (a hub revision that cannot be resolved offline, a
        missing file) gets an entry in ``key_errors``, and so do the stages downstream of it.
        """
        if self.keys or self.key_errors:
            return
        for st in self.pipeline.stages:
            try:
                self._stage_key(st)
            except Exception as exc:  # noqa: BLE001 - reported per stage
                self.key_errors[st.id] = str(exc) if isinstance(exc, RuntimeError) else f"{type(exc).__name__}: {exc}"

    def key(self, sid: str) -> str:
        """The cache key of stage ``sid``.

        Raises:
            StageFailed: if the key could not be computed (the reason is in the message).
        """
        self.compute_keys()
        if sid in self.key_errors:
            raise StageFailed(f"stage '{sid}': cannot compute its cache key: {self.key_errors[sid]}")
        return self.keys[sid]

    def selected(self, until: Optional[str]) -> list[Stage]:
        """Stages to consider: all, or ``until`` and its ancestors.

        Raises:
            UsageError: if ``until`` is not a stage id.
        """
        if not until:
            return list(self.pipeline.stages)
        ids = [s.id for s in self.pipeline.stages]
        if until not in ids:
            hint = did_you_mean(until, ids)
            raise UsageError(f"--until: unknown stage '{until}'" + (f"; {hint}" if hint else ""))
        return self.pipeline.ancestors(until)

    def check_force(self, force) -> None:
        """Raise UsageError (exit 2) for a ``--force`` id that is not a stage, before anything is written."""
        ids = [s.id for s in self.pipeline.stages]
        for sid in force or []:
            if sid not in ids:
                hint = did_you_mean(sid, ids)
                raise UsageError(f"--force: unknown stage '{sid}'" + (f"; {hint}" if hint else ""))

    # ------------------------------------------------------------------ run

    def run(self, until: Optional[str] = None, force: frozenset = frozenset()) -> list[StageOutcome]:
        """Run the selected stages, skipping cached ones; return one outcome per stage.

        Raises:
            StageFailed: a stage raised (names the stage and its plugin distribution).
            CacheError: the cache could not be written.
            KeyboardInterrupt: after cleaning up; finished stages and committed shards stay cached.
        """
        self.compute_keys()
        self.check_force(force)
        selected = self.selected(until)
        # Every selected stage's entry is needed, also after a failure or an interrupt (to resume
        # into), so all known keys go into the run record that `cache gc` honours.
        self.used_keys.extend(self.keys[s.id] for s in selected if s.id in self.keys)
        for st in selected:
            key = self.key(st.id)
            if st.id not in force and self.cache.has(key) and self.cache.verify(key):
                self._from_cache(st, key, "cached")
                continue
            self._run_stage(st, forced=st.id in force)
        for srcs in self.sources.values():
            self.used_keys.extend(Path(s.converted_dir).name for s in srcs.values() if s.converted_dir)
        return [self.outcomes[s.id] for s in selected]

    def _from_cache(self, st: Stage, key: str, status: str) -> None:
        man = self.cache.manifest(key) or {}
        secs = man.get("seconds")
        computed = float(secs) if isinstance(secs, (int, float)) and not isinstance(secs, bool) else None
        self.outcomes[st.id] = StageOutcome(st.id, st.impl.kind, st.impl.name, key, status, 0.0,
                                            str(self.cache.entry_dir(key)),
                                            man.get("output_type", st.output_type), man.get("metrics", {}),
                                            man.get("rows"), computed_seconds=computed)
        self.used_keys.extend(man.get("used_keys", []))

    def _ensure(self, sid: str) -> None:
        """Make sure stage ``sid``'s entry exists and verifies; recompute it if not."""
        key = self.key(sid)
        if not (self.cache.has(key) and self.cache.verify(key)):
            self._run_stage(self.pipeline.stage(sid), forced=False)

    def _run_stage(self, st: Stage, forced: bool) -> None:
        key = self.key(st.id)
        for dep in st.deps:
            self._ensure(dep)
        lease = self.cache.lease(key)
        waited = False
        while not lease.try_acquire():
            if not waited and self.console is not None:
                holder = lease.holder() or {}
                self.console.print(f"[yellow]stage {st.id}: another run (pid {holder.get('pid')} on "
                                   f"{holder.get('host')}) is computing it; waiting[/]")
            waited = True
            if not forced and self.cache.has(key) and self.cache.verify(key):
                break  # the other run committed it; a corrupt commit is set aside and we keep waiting
            time.sleep(0.5)
        try:
            # Re-check under the lease: another run may have committed the key in the meantime.
            if not forced and self.cache.has(key) and self.cache.verify(key):
                self._from_cache(st, key, "reused")
                return
            self._execute(st, key, forced)
        finally:
            lease.release()

    def _context(self, st: Stage, key: str, tmp: Path, progress: Progress) -> StageContext:
        inputs = []
        for ref in st.spec.inputs:
            k = self.key(ref)
            man = self.cache.manifest(k) or {}
            inputs.append(InputArtifact(ref, man.get("output_type", self.pipeline.stage(ref).output_type), k,
                                        str(self.cache.entry_dir(k))))
        spec_inputs = StageInputs(stage_id=st.id, kind=st.impl.kind, uses=st.impl.name, key=key, params=st.params,
                                  seed=self.pipeline.spec.seed, inputs=tuple(inputs),
                                  models=dict(self.sources.get(st.id, {})),
                                  datasets=dict(self.datasets.get(st.id, {})), base_dir=self.base_dir, pointer=st.ptr)
        return StageContext(spec_inputs, StageOutput(out_dir=tmp), self.cache.partial_dir(key), self.cache.root,
                            progress)

    def _execute(self, st: Stage, key: str, forced: bool) -> None:
        quiet_libraries()
        tmp = self.cache.begin(key)
        if self.console is not None and not self.console.is_terminal:
            self.console.print(f"stage {st.id} ({st.impl.kind}/{st.impl.name}, key {key[:12]}): running")
        progress = make_progress(self.console, st.id)
        ctx = self._context(st, key, tmp, progress)
        ctx.partial_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(self.pipeline.spec.seed, key)
        t0 = time.perf_counter()
        try:
            with progress:
                result = execute_stage(ctx, st.impl) or StageResult()
        except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised with a place
            shutil.rmtree(tmp, ignore_errors=True)
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            self.outcomes[st.id] = StageOutcome(st.id, st.impl.kind, st.impl.name, key, status,
                                                time.perf_counter() - t0,
                                                reason=f"{type(exc).__name__}: {exc}")
            if isinstance(exc, (KeyboardInterrupt, RLHFSpecError)):
                raise
            raise stage_error(st, exc) from exc
        self._commit(st, key, ctx, result, time.perf_counter() - t0, forced)

    def _commit(self, st: Stage, key: str, ctx: StageContext, result: StageResult, seconds: float,
                forced: bool) -> None:
        metrics = dict(result.metrics)
        metrics.update({f"seconds_{name}": round(secs, 3) for name, secs in ctx.output.timings.items()})
        metrics.update(ctx.output.counters)
        out_type = result.output_type or st.output_type
        manifest = {
            "stage": {"id": st.id, "kind": st.impl.kind, "uses": st.impl.name, "spec": self.pipeline.spec.name,
                      "distribution": st.impl.distribution, "dist_version": st.impl.dist_version},
            "preimage": self.preimages[st.id], "output_type": out_type, "metrics": metrics, "rows": result.rows,
            "seconds": round(seconds, 3), "used_keys": ctx.output.used_keys,
        }
        path = self.cache.commit(key, ctx.out_dir, manifest, replace=forced)
        shutil.rmtree(self.cache.partial_dir(key), ignore_errors=True)
        self.used_keys.extend(ctx.output.used_keys)
        self.outcomes[st.id] = StageOutcome(st.id, st.impl.kind, st.impl.name, key, "ran", seconds, str(path), out_type,
                                            metrics, result.rows)

    def record(self) -> None:
        """Record the keys this run used, for ``cache gc``.

        Raises:
            CacheError: if the record cannot be written.
        """
        self.cache.record_run({"spec": self.pipeline.spec.name, "source": self.pipeline.source,
                               "keys": sorted(set(self.used_keys))})


def stage_error(st: Stage, exc: BaseException) -> StageFailed:
    """A :class:`~rlhf_spec.errors.StageFailed` naming the stage, its implementation and distribution,
    with a hint for running out of memory (which params to lower) or disk space."""
    import errno

    where = (
        f"stage '{st.id}' ({st.impl.kind}/{st.impl.name} from {st.impl.distribution or 'unknown'} "
        f"{st.impl.dist_version}".rstrip()
        + ")"
    )
    name = type(exc).__name__
    if name == "OutOfMemoryError" or isinstance(exc, MemoryError):
        from .refs import find_fields

        fields = [f"params.{f}" for f in find_fields(st.params, ("batch_size", "per_device_train_batch_size",
                                                                 "max_new_tokens", "max_length"))]
        hint = f"; lower {' or '.join(fields)} at {st.ptr}/params" if fields else ""
        return StageFailed(f"{where} ran out of memory{hint}")
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or any(
            t in str(exc) for t in ("No space left on device", "StorageFull",
                                    "code: 28")):  # also when a library wraps it
        return StageFailed(f"{where}: out of disk space; free space or use --cache-dir on a larger disk (cached "
                           f"entries are intact)")
    return StageFailed(f"{where} failed: {name}: {exc}")
