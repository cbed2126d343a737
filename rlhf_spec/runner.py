"""Running a validated pipeline: cache keys, the plan, execution, and the run report."""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .cache import KEY_FORMAT, Cache, atomic_write_json
from .context import InputArtifact, Progress, StageContext
from .errors import CacheError, RLHFSpecError, StageFailed, UsageError
from .hashing import hash_json
from .hookspecs import DatasetRef, ModelRef, NotInKey, StageResult
from .models import ModelSource, resolve_revision
from .spec import Pipeline, Stage, field_markers

DEFAULT_CACHE = ".rlhf-cache"


def cache_dir_for(pipeline: Optional[Pipeline], override: Optional[str]) -> Path:
    """The cache folder: ``--cache-dir``, else ``RLHF_SPEC_CACHE``, else the spec's ``cache.dir``, else ``.rlhf-cache``."""
    if override:
        return Path(override)
    env = os.environ.get("RLHF_SPEC_CACHE")
    if env:
        return Path(env)
    if pipeline is not None and pipeline.spec.cache.dir:
        return Path(pipeline.spec.cache.dir)
    return Path(DEFAULT_CACHE)


def key_params(stage: Stage) -> dict:
    """The stage's params for its key: defaults applied, NotInKey and reference fields left out
    (references enter the key through the referenced identity instead)."""
    drop = set()
    for fname, marks in field_markers(type(stage.params)).items():
        if any(isinstance(m, (NotInKey, ModelRef, DatasetRef)) for m in marks):
            drop.add(fname)
    return stage.params.model_dump(mode="json", exclude=drop)


@dataclass
class StageOutcome:
    """One row of the run report."""

    id: str
    kind: str
    uses: str
    key: str
    status: str  # "ran" | "cached" | "reused" | "failed" | "skipped"
    seconds: float = 0.0
    output: str = ""
    output_type: str = ""
    metrics: dict = field(default_factory=dict)
    rows: Optional[int] = None
    reason: str = ""


class Runner:
    """Computes keys, plans, and runs a :class:`Pipeline` against a :class:`Cache`.

    Args:
        pipeline: the validated spec.
        cache: the cache to read and write.
        base_dir: folder that relative spec paths resolve against (default: cwd).
        console: a ``rich.console.Console`` for progress and tables (None: silent).
    """

    def __init__(self, pipeline: Pipeline, cache: Cache, base_dir: Optional[Path] = None, console=None):
        self.pipeline = pipeline
        self.cache = cache
        self.base_dir = Path(base_dir or os.getcwd())
        self.console = console
        self._keys: dict[str, str] = {}
        self._preimages: dict[str, dict] = {}
        self._key_errors: dict[str, str] = {}
        self._sources: dict[str, dict[str, ModelSource]] = {}
        self.outcomes: dict[str, StageOutcome] = {}
        self.used_keys: list[str] = []

    # ------------------------------------------------------------------ keys

    def _model_identity(self, name: str) -> tuple[dict, ModelSource]:
        m = self.pipeline.spec.models[name]
        ident: dict[str, Any] = {"dtype": m.dtype, "trust_remote_code": m.trust_remote_code}
        src = ModelSource(name=name, origin="spec", hub=m.hub, revision=m.revision, dtype=m.dtype,
                          trust_remote_code=m.trust_remote_code, gguf_file=m.gguf_file, tokenizer=m.tokenizer)
        if m.path:
            path = Path(m.path) if Path(m.path).is_absolute() else self.base_dir / m.path
            src.path = str(path)
            target = path / m.gguf_file if m.gguf_file else path
            digest = self.cache.hash_state.tree_digest(target)
            ident["content_sha256"] = digest
            ident["gguf_file"] = m.gguf_file
            if m.gguf_file:
                src.converted_dir = str(self.cache.converted_dir(digest))
        else:
            rev = resolve_revision(m.hub, m.revision)
            ident["hub"] = m.hub
            ident["revision"] = rev
            src.revision = rev
        if m.tokenizer:
            tp = self.base_dir / m.tokenizer
            ident["tokenizer"] = self.cache.hash_state.tree_digest(tp) if tp.exists() else m.tokenizer
        src.identity = ident
        return ident, src

    def compute_keys(self) -> None:
        """Compute every stage's key and preimage in topological order.

        A stage whose key cannot be computed (a hub revision that cannot be
        resolved offline, a missing file) gets an entry in ``_key_errors``, and so
        do the stages downstream of it.
        """
        from .data import dataset_identity
        from .spec import DatasetSpec

        spec = self.pipeline.spec
        for st in self.pipeline.stages:
            try:
                bad = [d for d in st.deps if d in self._key_errors]
                if bad:
                    raise RuntimeError(f"depends on '{bad[0]}', whose key is unknown")
                models: dict[str, Any] = {}
                sources: dict[str, ModelSource] = {}
                for fname, ref in sorted(st.model_refs.items()):
                    if ref in spec.models:
                        ident, src = self._model_identity(ref)
                    else:
                        ident = {"stage_key": self._keys[ref]}
                        src = ModelSource(name=ref, origin="stage", path=str(self.cache.entry_dir(self._keys[ref]) / "model"),
                                          identity=ident)
                    models[fname] = ident
                    sources[fname] = src
                dsets = {}
                for fname, ref in sorted(st.dataset_refs.items()):
                    dsets[fname] = dataset_identity(spec.datasets[ref], self.base_dir, self.cache.hash_state)
                pre = {
                    "format": KEY_FORMAT,
                    "kind": st.impl.kind,
                    "uses": st.impl.name,
                    "distribution": st.impl.distribution,
                    "impl_version": st.impl.impl_version,
                    "params": key_params(st),
                    "inputs": [self._keys[i] for i in st.spec.inputs],
                    "models": models,
                    "datasets": dsets,
                    "seed": spec.seed,
                    "salt": spec.salt,
                }
                self._preimages[st.id] = pre
                self._keys[st.id] = hash_json(pre)
                self._sources[st.id] = sources
            except Exception as exc:  # noqa: BLE001 - reported per stage
                self._key_errors[st.id] = f"{type(exc).__name__}: {exc}" if not isinstance(exc, RuntimeError) else str(exc)

    def key(self, sid: str) -> str:
        """The cache key of stage ``sid``.

        Raises:
            StageFailed: if the key could not be computed (the reason is in the message).
        """
        if not self._keys and not self._key_errors:
            self.compute_keys()
        if sid in self._key_errors:
            raise StageFailed(f"stage '{sid}': cannot compute its cache key: {self._key_errors[sid]}")
        return self._keys[sid]

    # ------------------------------------------------------------------ plan

    def selected(self, until: Optional[str]) -> list[Stage]:
        """Stages to consider: all, or ``until`` and its ancestors.

        Raises:
            UsageError: if ``until`` is not a stage id.
        """
        stages = self.pipeline.stages
        if not until:
            return stages
        ids = [s.id for s in stages]
        if until not in ids:
            import difflib

            close = difflib.get_close_matches(until, ids, n=1)
            raise UsageError(f"--until: unknown stage '{until}'" + (f"; did you mean '{close[0]}'?" if close else ""))
        need = {until}
        for s in reversed(stages):
            if s.id in need:
                need.update(s.deps)
        return [s for s in stages if s.id in need]

    def plan(self, until: Optional[str] = None, force: frozenset = frozenset(), explain: bool = False) -> list[dict]:
        """For each selected stage: cached or to run, and why.

        With ``explain``, a stage that will run is compared with the newest cached entry of the
        same stage id and spec (or kind and implementation), and the key ingredients that
        differ are listed (``params.temperature: 0.7 -> 0.8``).
        """
        self.compute_keys()
        rows = []
        for st in self.selected(until):
            row = {"id": st.id, "kind": st.impl.kind, "uses": st.impl.name, "distribution": st.impl.distribution}
            if st.id in self._key_errors:
                row.update(status="run", key=None, reason=f"key unknown: {self._key_errors[st.id]}")
            else:
                key = self._keys[st.id]
                row["key"] = key
                if st.id in force:
                    row.update(status="run", reason="--force")
                elif self.cache.has(key):
                    row.update(status="cached", reason="entry exists")
                else:
                    partial = self.cache.partial_dir(key)
                    row.update(status="run", reason="no cached entry" + (" (partial work will be resumed)" if partial.exists() else ""))
                    if explain:
                        row["changes"] = self.explain(st)
                        if row["changes"]:
                            row["reason"] = "changed: " + "; ".join(row["changes"][:6])
            if st.impl.resources:
                with contextlib.suppress(Exception):
                    row["resources"] = st.impl.resources(st.params)
            rows.append(row)
        return rows

    def explain(self, st: Stage) -> list[str]:
        """Diff this stage's key preimage against the nearest earlier entry of the same stage."""
        pre = self._preimages.get(st.id)
        if pre is None:
            return []
        best, best_time = None, ""
        for _key, man in self.cache.entries():
            s = man.get("stage", {})
            if s.get("memo"):
                continue
            same = (s.get("id") == st.id and s.get("spec") == self.pipeline.spec.name) or (
                s.get("kind") == st.impl.kind and s.get("uses") == st.impl.name and s.get("id") == st.id
            )
            if same and man.get("created", "") >= best_time:
                best, best_time = man, man.get("created", "")
        if best is None:
            return ["no earlier entry of this stage"]
        old = best.get("preimage", {})
        diffs = _diff(old, pre, "")
        # an input's key changing is explained by the upstream stage; name it
        out = []
        for d in diffs:
            if d.startswith("inputs"):
                out.append(d.split(":")[0] + ": upstream output changed")
            else:
                out.append(d)
        return out

    # ------------------------------------------------------------------ run

    def run(self, until: Optional[str] = None, force: frozenset = frozenset()) -> list[StageOutcome]:
        """Run the selected stages, skipping cached ones; return one outcome per stage.

        Raises:
            StageFailed: a stage raised (names the stage and its plugin distribution).
            CacheError: the cache could not be written.
            KeyboardInterrupt: after cleaning up; finished stages and committed shards stay cached.
        """
        self.compute_keys()
        for sid in force:
            try:
                self.pipeline.stage(sid)
            except KeyError:
                raise UsageError(f"--force: unknown stage '{sid}'") from None
        selected = self.selected(until)
        # The run needs every selected stage's entry, also those after a failure or an interrupt
        # (to resume into), so all known keys go into the run record that `cache gc` honours.
        self.used_keys.extend(self._keys[s.id] for s in selected if s.id in self._keys)
        for st in selected:
            key = self.key(st.id)
            self.used_keys.append(key)
            # verified read: a corrupt entry is set aside (with a warning) and recomputed
            if st.id not in force and self.cache.has(key) and self.cache.verify(key):
                man = self.cache.manifest(key) or {}
                self.outcomes[st.id] = StageOutcome(
                    st.id, st.impl.kind, st.impl.name, key, "cached", 0.0, str(self.cache.entry_dir(key)),
                    man.get("output_type", st.output_type), man.get("metrics", {}), man.get("rows"),
                )
                self.used_keys.extend(man.get("used_keys", []))
                continue
            self._run_stage(st, forced=st.id in force)
        for srcs in self._sources.values():
            for src in srcs.values():
                if src.converted_dir:
                    self.used_keys.append(Path(src.converted_dir).name)
        return [self.outcomes[s.id] for s in selected]

    def _ensure(self, sid: str) -> None:
        """Make sure stage ``sid``'s entry exists and verifies; recompute it if not."""
        key = self.key(sid)
        if self.cache.has(key) and self.cache.verify(key):
            return
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
                self.console.print(
                    f"[yellow]stage {st.id}: another run (pid {holder.get('pid')} on {holder.get('host')}) is computing it; waiting[/]"
                )
            waited = True
            if not forced and self.cache.has(key) and self.cache.verify(key):
                break  # the other run committed it; a corrupt commit is set aside and we keep waiting for the lease
            time.sleep(0.5)
        try:
            # Re-check under the lease: another run may have committed the key between our first look and now.
            if not forced and self.cache.has(key) and self.cache.verify(key):
                man = self.cache.manifest(key) or {}
                self.outcomes[st.id] = StageOutcome(
                    st.id, st.impl.kind, st.impl.name, key, "reused", 0.0, str(self.cache.entry_dir(key)),
                    man.get("output_type", st.output_type), man.get("metrics", {}), man.get("rows"),
                )
                self.used_keys.extend(man.get("used_keys", []))
                return
            self._execute(st, key, forced)
        finally:
            lease.release()

    def _context(self, st: Stage, key: str, tmp: Path, progress: Progress) -> StageContext:
        inputs = []
        for ref in st.spec.inputs:
            k = self.key(ref)
            up = self.pipeline.stage(ref)
            man = self.cache.manifest(k) or {}
            inputs.append(InputArtifact(ref, man.get("output_type", up.output_type), k, str(self.cache.entry_dir(k))))
        dsets = {f: self.pipeline.spec.datasets[name].model_dump(mode="json") for f, name in st.dataset_refs.items()}
        return StageContext(
            stage_id=st.id, kind=st.impl.kind, uses=st.impl.name, key=key, params=st.params,
            seed=self.pipeline.spec.seed, out_dir=tmp, partial_dir=self.cache.partial_dir(key),
            cache_root=self.cache.root, inputs=inputs, models=dict(self._sources.get(st.id, {})),
            datasets=dsets, base_dir=self.base_dir, progress=progress,
        )

    def _execute(self, st: Stage, key: str, forced: bool) -> None:
        quiet_libraries()
        tmp = self.cache.begin(key)
        if self.console is not None and not self.console.is_terminal:
            self.console.print(f"stage {st.id} ({st.impl.kind}/{st.impl.name}, key {key[:12]}): running")
        progress = _make_progress(self.console, st.id)
        ctx = self._context(st, key, tmp, progress)
        ctx.partial_dir.mkdir(parents=True, exist_ok=True)
        seed_everything(self.pipeline.spec.seed, key)
        t0 = time.perf_counter()
        try:
            with progress:
                result = st.impl.run(ctx)
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            self.outcomes[st.id] = StageOutcome(st.id, st.impl.kind, st.impl.name, key, "interrupted", time.perf_counter() - t0)
            raise
        except RLHFSpecError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException as exc:  # noqa: BLE001
            shutil.rmtree(tmp, ignore_errors=True)
            self.outcomes[st.id] = StageOutcome(st.id, st.impl.kind, st.impl.name, key, "failed",
                                                time.perf_counter() - t0, reason=f"{type(exc).__name__}: {exc}")
            raise _stage_error(st, exc) from exc
        seconds = time.perf_counter() - t0
        result = result or StageResult()
        metrics = dict(result.metrics)
        for name, secs in ctx.timings.items():
            metrics[f"seconds_{name}"] = round(secs, 3)
        metrics.update(ctx.counters)
        out_type = result.output_type or st.output_type
        manifest = {
            "stage": {"id": st.id, "kind": st.impl.kind, "uses": st.impl.name, "spec": self.pipeline.spec.name,
                      "distribution": st.impl.distribution, "dist_version": st.impl.dist_version},
            "preimage": self._preimages[st.id],
            "output_type": out_type,
            "metrics": metrics,
            "rows": result.rows,
            "seconds": round(seconds, 3),
            "used_keys": ctx.used_keys,
        }
        if forced and self.cache.has(key):
            self.cache.quarantine(key, "--force")
            self.cache.warnings.pop()
        path = self.cache.commit(key, tmp, manifest)
        shutil.rmtree(self.cache.partial_dir(key), ignore_errors=True)
        self.used_keys.extend(ctx.used_keys)
        self.outcomes[st.id] = StageOutcome(
            st.id, st.impl.kind, st.impl.name, key, "ran", seconds, str(path), out_type, metrics, result.rows
        )

    # ------------------------------------------------------------------ report

    def report(self, started: float, outcomes: list[StageOutcome], status: str = "ok", error: str = "") -> dict:
        """The JSON run report: per stage id, kind, uses, key, status, seconds, output, metrics."""
        return {
            "spec": self.pipeline.spec.name,
            "source": self.pipeline.source,
            "status": status,
            "error": error,
            "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.time() - started, 3),
            "host": socket.gethostname(),
            "cache_dir": str(self.cache.root),
            "warnings": list(self.cache.warnings),
            "summary": _summary(outcomes),
            "stages": [o.__dict__ for o in outcomes],
        }

    def record(self) -> None:
        """Record the keys this run used, for ``cache gc``."""
        with contextlib.suppress(CacheError):
            self.cache.record_run({"spec": self.pipeline.spec.name, "source": self.pipeline.source,
                                   "keys": sorted(set(self.used_keys))})


HEADLINE = ("eval_accuracy", "eval_pairs", "win_rate", "reward_mean_policy", "reward_mean_reference", "kl_k1", "kl_k3",
            "reward_mean", "pairs", "samples", "updates", "train_loss_last10")


def _summary(outcomes: list[StageOutcome]) -> dict:
    """Headline metrics (``stage.metric``) and where the time went (seconds per stage)."""
    out: dict[str, Any] = {}
    for o in outcomes:
        for k in HEADLINE:
            if k in o.metrics:
                out[f"{o.id}.{k}"] = o.metrics[k]
    out["seconds_by_stage"] = {o.id: round(o.seconds, 2) for o in outcomes}
    return out


def seed_everything(seed: int, key: str) -> int:
    """Seed Python, NumPy and torch from the spec seed and the stage key, so a stage's randomness
    (a fresh reward head, dropout, sampling) never depends on what ran before it in the process."""
    import random

    derived = (seed * 1_000_003 + int(key[:8], 16)) % (2**31 - 1)
    random.seed(derived)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(derived)
    with contextlib.suppress(ImportError):
        import torch

        torch.manual_seed(derived)
    return derived


def quiet_libraries() -> None:
    """Silence the per-call progress bars of datasets and transformers; rlhf-spec draws its own."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF dequantisation bar
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    with contextlib.suppress(Exception):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def _stage_error(st: Stage, exc: BaseException) -> StageFailed:
    origin = f"{st.impl.kind}/{st.impl.name} from {st.impl.distribution or 'unknown'} {st.impl.dist_version}".strip()
    where = f"stage '{st.id}' ({origin})"
    name = type(exc).__name__
    if name == "OutOfMemoryError" or isinstance(exc, MemoryError):
        hints = [f"params.{f}" for f in ("batch_size", "per_device_batch_size", "max_new_tokens", "max_length")
                 if f in type(st.params).model_fields]
        hint = f"; lower {' or '.join(hints)} at /stages/{st.index}/params" if hints else ""
        return StageFailed(f"{where} ran out of memory{hint}")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StageFailed(f"{where}: out of disk space; free space or use --cache-dir on a larger disk (cached entries are intact)")
    return StageFailed(f"{where} failed: {name}: {exc}")


def _diff(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            p = f"{path}.{k}" if path else k
            if k not in old:
                out.append(f"{p}: added ({_short(new[k])})")
            elif k not in new:
                out.append(f"{p}: removed")
            else:
                out.extend(_diff(old[k], new[k], p))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        out = []
        for i, (a, b) in enumerate(zip(old, new)):
            out.extend(_diff(a, b, f"{path}[{i}]"))
        return out
    if old != new or type(old) is not type(new):
        return [f"{path}: {_short(old)} -> {_short(new)}"]
    return []


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


class _RichProgress(Progress):
    def __init__(self, console, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RP, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self._label = label
        self._rp = RP(
            TextColumn("[bold]{task.fields[label]}[/] {task.fields[note]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task = self._rp.add_task(label, total=None, label=label, note="", rate="")
        self._t0 = time.perf_counter()
        self._done = 0
        self._unit = "rows"

    def __enter__(self):
        self._rp.start()
        return self

    def __exit__(self, *a):
        self._rp.stop()

    def start(self, total: int, unit: str = "rows") -> None:
        self._done = 0
        self._unit = unit
        self._t0 = time.perf_counter()
        self._rp.update(self._task, total=total, completed=0)

    def advance(self, n: int = 1) -> None:
        self._done += n
        dt = max(time.perf_counter() - self._t0, 1e-9)
        self._rp.update(self._task, advance=n, rate=f"{self._done / dt:.1f} {self._unit}/s")

    def note(self, text: str) -> None:
        self._rp.update(self._task, note=text)


class _Silent(Progress):
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return None


def _make_progress(console, label: str) -> Progress:
    if console is None:
        return _Silent()
    return _RichProgress(console, label)


def write_report(path: Path, report: dict) -> Path:
    """Write the run report atomically and return its path."""
    atomic_write_json(Path(path), report)
    return Path(path)
