"""What a running stage sees: its params, inputs, models, datasets, output folder and helpers.

A stage implementation receives one :class:`StageContext` and writes its output
under ``ctx.out_dir``: a dataset with :meth:`StageContext.save_dataset`, a model
with ``save_pretrained(ctx.out_dir / "model")``. The runner commits that folder
to the cache when ``run`` returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import BaseModel

from .hashing import hash_json, list_files, sha256_file
from .models import ModelSource

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


@dataclass
class InputArtifact:
    """The committed output of an upstream stage.

    Attributes:
        stage_id: the producing stage's id.
        output_type: its artifact type (see :mod:`rlhf_spec.hookspecs`).
        key: its cache key.
        path: its entry folder.
    """

    stage_id: str
    output_type: str
    key: str
    path: str

    def load_dataset(self):
        """The upstream ``datasets.Dataset`` (for samples, scored, pairs).

        Cache entries are immutable. ``datasets`` writes the results of transforms (``select`` then
        ``save_to_disk``, ``map``, ``filter``) as ``cache-*.arrow`` files next to the source's own
        files, that is into the entry; with transform caching off they go to a temporary folder.
        """
        import datasets

        datasets.disable_caching()
        return datasets.load_from_disk(str(Path(self.path) / DATA_DIR))

    @property
    def model_dir(self) -> Path:
        return Path(self.path) / MODEL_DIR


@dataclass
class StageContext:
    """Everything a stage needs at run time.

    Attributes:
        stage_id, kind, uses: the stage's spec entry.
        key: the stage's cache key (64 hex characters).
        params: the validated params model instance.
        seed: the spec's global seed.
        out_dir: where to write the output (a temporary folder the runner commits).
        partial_dir: persists across interrupted attempts of this key (shards, checkpoints).
        cache_root: the cache folder (for :meth:`memo`).
        inputs: upstream artifacts, in ``inputs`` order.
        models: ``param name -> ModelSource`` for every model-reference param.
        datasets: ``param name -> (DatasetSpec dict)`` for every dataset-reference param.
        base_dir: folder that relative spec paths resolve against.
        timings: seconds spent per named phase (see :meth:`timer`), reported per stage.
    """

    stage_id: str
    kind: str
    uses: str
    key: str
    params: BaseModel
    seed: int
    out_dir: Path
    partial_dir: Path
    cache_root: Path
    inputs: list[InputArtifact] = field(default_factory=list)
    models: dict[str, ModelSource] = field(default_factory=dict)
    datasets: dict[str, dict] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path.cwd)
    progress: Progress = field(default_factory=Progress)
    timings: dict[str, float] = field(default_factory=dict)
    used_keys: list[str] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)

    # -- inputs ----------------------------------------------------------------------

    def model(self, param: str) -> ModelSource:
        """The :class:`ModelSource` named by model-reference param ``param``.

        Raises:
            KeyError: if the param is unset or is not a model reference.
        """
        return self.models[param]

    def dataset(self, param: str):
        """Load the spec dataset named by dataset-reference param ``param``, normalised (see :mod:`rlhf_spec.data`)."""
        from .data import load_spec_dataset
        from .spec import DatasetSpec

        return load_spec_dataset(DatasetSpec.model_validate(self.datasets[param]), self.base_dir)

    def input_dataset(self, index: int = 0):
        """The ``datasets.Dataset`` of data input ``index``.

        Raises:
            IndexError: if the stage has fewer inputs.
        """
        return self.inputs[index].load_dataset()

    # -- outputs ---------------------------------------------------------------------

    def save_dataset(self, ds) -> Path:
        """Write the stage's dataset output (``save_to_disk`` under ``out_dir/data``)."""
        path = self.out_dir / DATA_DIR
        ds.save_to_disk(str(path))
        return path

    @property
    def model_out_dir(self) -> Path:
        return self.out_dir / MODEL_DIR

    @contextlib.contextmanager
    def timer(self, name: str):
        """Add the seconds spent in the block to ``timings[name]`` (reported as ``seconds_<name>``)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    # -- resumable work --------------------------------------------------------------

    def run_shards(self, rows, process: Callable[[Any, int], Any], num_shards: int):
        """Process ``rows`` in content-defined shards, committing each shard as it finishes.

        Rows go to shard ``int(prompt_id[:8], 16) % num_shards``, so a shard's
        content never depends on the number of workers or GPUs. Each finished
        shard is saved under ``partial_dir/shards`` by temporary folder and
        rename, then appended (with file hashes) to an append-only journal.
        A rerun after a crash skips every journalled shard whose files still
        verify, and recomputes only the rest.

        Args:
            rows: a ``datasets.Dataset`` with a ``prompt_id`` column.
            process: ``process(shard_rows, shard_index) -> datasets.Dataset``.
            num_shards: number of shards (part of the cache key, since it fixes batch composition).

        Returns:
            the concatenation of all shard outputs, in shard order.
        """
        import datasets

        sdir = self.partial_dir / "shards"
        sdir.mkdir(parents=True, exist_ok=True)
        journal = self.partial_dir / "journal.jsonl"
        done: dict[int, dict] = {}
        if journal.exists():
            for line in journal.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line from a crash
                done[int(rec["shard"])] = rec
        assign = [int(pid[:8], 16) % num_shards for pid in list(rows["prompt_id"])]
        members: dict[int, list[int]] = {}
        for i, s in enumerate(assign):
            members.setdefault(s, []).append(i)
        self.progress.start(len(rows))
        outs = []
        reused = computed = 0
        for s in sorted(members):
            final = sdir / f"{s:05d}"
            rec = done.get(s)
            if rec is not None and _verify_files(final, rec["files"]):
                reused += 1
                self.progress.advance(len(members[s]))
                outs.append(final)
                continue
            out = process(rows.select(members[s]), s)
            tmp = sdir / f".{s:05d}.{os.getpid()}.tmp"
            if tmp.exists():
                import shutil

                shutil.rmtree(tmp)
            out.save_to_disk(str(tmp))
            files = []
            for p in list_files(tmp):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
                files.append({"path": p.relative_to(tmp).as_posix(), "sha256": sha256_file(p), "size": p.stat().st_size})
            if final.exists():
                import shutil

                shutil.rmtree(final)
            os.rename(tmp, final)
            with open(journal, "a", encoding="utf-8") as f:
                f.write(json.dumps({"shard": s, "rows": len(out), "files": files}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            computed += 1
            outs.append(final)
        self.counters["shards_reused"] = reused
        self.counters["shards_computed"] = computed
        parts = [datasets.load_from_disk(str(p)) for p in outs]
        if not parts:
            return rows.select([])
        return datasets.concatenate_datasets(parts)

    def memo(self, name: str, preimage: dict, compute: Callable[[Path], Optional[dict]]) -> Path:
        """A cache entry derived inside this stage and shareable with other stages.

        The entry's key hashes ``name`` and ``preimage`` only (not this stage's
        key), so two training stages with the same pairs and reference policy
        share, for example, the reference-policy logprobs.

        Args:
            name: what is computed, e.g. ``"reference-logprobs"``.
            preimage: JSON-able dict of everything that determines the result.
            compute: ``compute(tmp_dir) -> metrics`` writes the result into ``tmp_dir``.

        Returns:
            the committed entry folder.
        """
        from .cache import Cache

        key = hash_json({"memo": name, "preimage": preimage})
        cache = Cache(self.cache_root)
        path = cache.memo(key, compute, {"stage": {"id": self.stage_id, "memo": name}, "preimage": {"memo": name, **preimage}})
        self.used_keys.append(key)
        return path


def _verify_files(folder: Path, files: list[dict]) -> bool:
    try:
        for rec in files:
            p = folder / rec["path"]
            if p.stat().st_size != rec["size"] or sha256_file(p) != rec["sha256"]:
                return False
    except OSError:
        return False
    return True
