"""Shared fixtures and helpers: real data files, tiny real models built in-process, spec builders,
running a spec (in this process or in a subprocess), reading run reports and cache entries, plugin
registries and plugin distributions."""

from __future__ import annotations

import copy
import datetime as _dt
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Iterable, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
HH = "hh-rlhf/harmless-base_test.jsonl.gz"

# `make test` runs one pytest-xdist worker per core. Each worker, and every subprocess a test starts,
# gets an equal share of the cores (set before torch is imported), so the workers do not oversubscribe
# them; a value the caller set wins.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1:
    for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))


def data_file(rel: str) -> Path:
    """A real data file: the project's data/ (placed by `make assets`), else ../shared/data."""
    for base in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if (base / rel).is_file():
            return base / rel
    pytest.fail(f"data file {rel} not found; run `make assets` (it needs ../shared/data or the network)")


@pytest.fixture(scope="session")
def hh_file() -> Path:
    return data_file(HH)


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """One cache folder for the tests that run the real small models, so SmolLM2's GGUF file is
    dequantised once per session (into its converted/ folder) rather than once per test."""
    return tmp_path_factory.mktemp("real_models_cache")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, hh_file) -> dict:
    """Tiny random-initialised policy (Llama) and reward backbone (BERT) with in-process tokenizers."""
    from rlhf_spec.testing import hh_rows, make_tiny_policy, make_tiny_reward_model

    texts = [r["chosen"] for r in hh_rows(hh_file, 200)]
    d = tmp_path_factory.mktemp("tiny_models")
    return {"policy": make_tiny_policy(d / "policy", texts=texts), "reward": make_tiny_reward_model(d / "reward", texts=texts)}


def tiny_spec_dict(models: dict, hh: Path) -> dict:
    """The whole pipeline (reward model, sample, score, filter, pair, REBEL, evaluate) on tiny models and real hh-rlhf rows."""
    return {
        "name": "tiny",
        "seed": 0,
        "models": {"policy": {"path": str(models["policy"])}, "backbone": {"path": str(models["reward"])}},
        "datasets": {
            "rm_pairs": {"path": str(hh), "adapter": "hh-rlhf", "hash_range": [0.0, 0.5], "limit": 48},
            "prompts": {"path": str(hh), "adapter": "hh-rlhf", "hash_range": [0.5, 0.75], "limit": 12},
            "eval_prompts": {"path": str(hh), "adapter": "hh-rlhf", "hash_range": [0.75, 1.0], "limit": 6},
        },
        "stages": [
            {"id": "reward_model", "kind": "train", "uses": "reward-model",
             "params": {"backbone": "backbone", "dataset": "rm_pairs", "eval_size": 16, "max_length": 64, "learning_rate": 1e-3,
                        "per_device_train_batch_size": 8, "save_every": 2}},
            {"id": "sample", "kind": "sample", "uses": "generate",
             "params": {"policy": "policy", "prompts": "prompts", "n": 3, "max_new_tokens": 8, "num_shards": 3,
                        "backend": {"uses": "transformers", "params": {"batch_size": 4}}}},
            {"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"],
             "params": {"reward": {"uses": "classifier", "params": {"model": "reward_model", "max_length": 64}}, "num_shards": 3}},
            {"id": "filter", "kind": "filter", "uses": "length", "inputs": ["score"],
             "params": {"tokenizer": "policy", "max_prompt_tokens": 4096, "max_response_tokens": 64}},
            {"id": "pair", "kind": "pair", "uses": "best-worst", "inputs": ["filter"], "params": {"test_size": 2}},
            {"id": "rebel", "kind": "train", "uses": "rebel", "inputs": ["pair"],
             "params": {"policy": "policy", "eta": 1.0, "learning_rate": 1e-3, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                        "epochs": 1.0, "max_prompt_tokens": 128, "max_response_tokens": 16, "save_every": 2,
                        "logprob_temperature": 0.8}},
            {"id": "evaluate", "kind": "evaluate", "uses": "reward-winrate",
             "params": {"policy": "rebel", "reference": "policy", "prompts": "eval_prompts", "max_new_tokens": 8,
                        "judges": {"rm": {"uses": "classifier", "params": {"model": "reward_model", "max_length": 64}}},
                        "backend": {"uses": "transformers", "params": {"batch_size": 4}}, "bootstrap_resamples": 200}},
        ],
    }


@pytest.fixture
def tiny_spec(tiny_models, hh_file):
    return copy.deepcopy(tiny_spec_dict(tiny_models, hh_file))


# ----------------------------------------------------------------------------- spec builders and validation


def stage_of(spec: dict, sid: str) -> dict:
    """The stage with id ``sid`` in ``spec["stages"]`` (the dict itself: editing it edits the spec).

    Raises:
        KeyError: if the spec has no such stage.
    """
    for st in spec["stages"]:
        if st.get("id") == sid:
            return st
    raise KeyError(f"no stage '{sid}' in the spec")


def keep_stages(spec: dict, *ids: str) -> dict:
    """Keep only the stages ``ids`` of ``spec``, in that order; changes ``spec`` in place and returns it.

    Raises:
        KeyError: if one of ``ids`` is not a stage of the spec.
    """
    spec["stages"] = [stage_of(spec, sid) for sid in ids]
    return spec


def mini_spec(models: dict, hh: Path) -> dict:
    """Sample -> score -> pair -> REBEL, small enough to run in a few seconds on CPU: the tiny spec with 6 prompts,
    2 completions each, the reward backbone (model ``rm``, untrained head) as the reward, one test pair, and
    REBEL on batches of one with a checkpoint after every update."""
    spec = keep_stages(tiny_spec_dict(models, hh), "sample", "score", "pair", "rebel")
    spec["name"] = "mini"
    spec["models"] = {"policy": spec["models"]["policy"], "rm": {"path": str(models["reward"])}}
    spec["datasets"] = {"prompts": {**spec["datasets"]["prompts"], "limit": 6}}
    stage_of(spec, "sample")["params"].update(n=2, max_new_tokens=6)
    score = stage_of(spec, "score")["params"]
    score["reward"]["params"]["model"] = "rm"
    score["num_shards"] = 2
    stage_of(spec, "pair").update(inputs=["score"], params={"test_size": 1})
    stage_of(spec, "rebel")["params"].update(per_device_train_batch_size=1, max_response_tokens=8, save_every=1)
    return spec


def spec_problems(spec: dict, registry=None, **validate_kwargs) -> list:
    """The problems validation finds in ``spec`` (a dict) against ``registry`` (default: the process-wide one);
    ``validate_kwargs`` go to ``rlhf_spec.spec.validate`` (``check_files=False``, ...).

    Returns:
        the :class:`~rlhf_spec.errors.Problem` list of the ``SpecError`` raised.

    Raises:
        pytest.fail.Exception: if the spec validates.
    """
    from rlhf_spec.errors import SpecError
    from rlhf_spec.plugins import registry as installed
    from rlhf_spec.spec import validate

    with pytest.raises(SpecError) as err:
        validate(spec, registry if registry is not None else installed(), **validate_kwargs)
    return err.value.problems


# ----------------------------------------------------------------------------- running a spec


def write_spec(folder: Path, spec: dict, name: str = "spec.json") -> Path:
    """Write ``spec`` as indented JSON to ``folder/name`` (creating ``folder``) and return the path."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(spec, indent=1))
    return path


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900,
        preexec_fn: Optional[Callable[[], None]] = None) -> subprocess.CompletedProcess:
    """Run ``python -m rlhf_spec ARGS`` in a real subprocess (``env`` added to this process's environment;
    ``preexec_fn`` runs in the child before it starts, as in :func:`subprocess.run`)."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, "-m", "rlhf_spec", *args], cwd=str(cwd) if cwd else None, env=e,
                          capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn)


def plan_keys(spec_path: Path, cache: Path, *args: str, env: dict | None = None,
              timeout: float = 900) -> dict[str, str]:
    """Stage id -> cache key, in plan order, from ``rlhf-spec plan --json`` in a subprocess (computes keys, runs
    nothing); ``args`` go to the command (``--set ...``).

    Raises:
        AssertionError: if the command fails (its stderr is the message).
    """
    r = cli("plan", str(spec_path), "--json", "--cache-dir", str(cache), *args, env=env, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return {row["id"]: row["key"] for row in json.loads(r.stdout)}


def run_inprocess(spec: Path, cache: Path, report: Path, *extra: str) -> tuple[int, dict]:
    """Run ``rlhf-spec run`` on the spec file ``spec`` in this process (through ``rlhf_spec.cli.main``), with
    its cache in ``cache`` and its report at ``report``; ``extra`` go to the command (``--set ...``).

    Returns:
        (the exit code, the run report as a dict, or ``{}`` if none was written).
    """
    from rlhf_spec.cli import main

    code = main(["run", str(spec), "--cache-dir", str(cache), "--report", str(report), *extra])
    return code, (json.loads(Path(report).read_text()) if Path(report).exists() else {})


# ----------------------------------------------------------------------------- run reports


def stages_of(report: dict) -> dict:
    """A run report's stages by id, in run order."""
    return {s["id"]: s for s in report["stages"]}


def statuses(report: dict) -> dict:
    """A run report's stage statuses (``ran``, ``cached``, ``failed``, ...) by stage id."""
    return {s["id"]: s["status"] for s in report["stages"]}


def stage_keys(report: dict) -> dict:
    """A run report's cache keys by stage id."""
    return {s["id"]: s["key"] for s in report["stages"]}


# ----------------------------------------------------------------------------- cache entries


def entry_dir(cache: Path, key: str) -> Path:
    """The folder of the cache entry ``key`` under the cache folder ``cache`` (``entries/<key[:2]>/<key>``)."""
    return Path(cache) / "entries" / key[:2] / key


def entry_dirs(cache: Path) -> list[Path]:
    """Every entry folder under the cache folder ``cache``, committed or not, sorted."""
    return sorted(Path(cache).glob("entries/*/*"))


def manifests(cache: Path) -> dict:
    """Every committed cache entry's manifest under ``cache``, by entry key (its folder's name)."""
    found = (d / "manifest.json" for d in entry_dirs(cache))
    return {m.parent.name: json.loads(m.read_text()) for m in found if m.exists()}


def data_rows(cache: Path, key: str) -> list[dict]:
    """The rows of the ``data`` dataset of the cache entry ``key``."""
    import datasets

    return datasets.load_from_disk(str(entry_dir(cache, key) / "data")).to_list()


def weights(cache: Path, key: str) -> dict:
    """The tensors (by name) of the model saved in the cache entry ``key``."""
    from safetensors.torch import load_file

    return load_file(str(entry_dir(cache, key) / "model" / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 1e-6) -> None:
    """Assert two state dicts have the same tensor names and values within ``atol`` (absolute, no relative part).

    Raises:
        AssertionError: naming the first tensor that differs.
    """
    import torch

    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=atol, rtol=0), f"tensor {name} differs"


def commit_dummy_entry(cache, key: str, age_days: float = 0.0) -> Path:
    """Commit a one-file entry ``key`` (``x.txt`` holding the key) into ``cache`` (a ``Cache`` or its folder);
    ``age_days`` back-dates the manifest's ``created`` time. No run record keeps the entry.

    Returns:
        the entry's folder.
    """
    from rlhf_spec.cache import Cache

    cache = cache if isinstance(cache, Cache) else Cache(cache)
    tmp = cache.begin(key)
    (tmp / "x.txt").write_text(key)
    cache.commit(key, tmp, {"stage": {"id": key[:4], "spec": "t"}, "preimage": {}})
    if age_days:
        man_path = cache.entry_dir(key) / "manifest.json"
        man = json.loads(man_path.read_text())
        when = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(days=age_days)
        man["created"] = when.isoformat(timespec="seconds")
        man_path.write_text(json.dumps(man))
    return entry_dir(cache.root, key)


# ----------------------------------------------------------------------------- plugins


def registry_fixture(*plugins, entry_points: bool = True, unless_installed: Iterable = (), install: bool = False,
                     require: Iterable[tuple[str, str]] = (), strict: bool = False, torch_threads: Optional[int] = None,
                     name: str = "registry", scope: str = "module"):
    """A pytest fixture giving a plugin registry; assign it to a name in a test module
    (``registry = registry_fixture(judge_mod, entry_points=False)``).

    Args:
        plugins: plugin modules (or objects with ``@hookimpl`` functions) registered in-process.
        entry_points: False leaves the installed plugins (the built-ins among them) out.
        unless_installed: plugin modules registered only where the installed plugins lack something they
            register (a stage, reward, backend or dataset adapter), so the fixture stays valid once their
            entry points are installed.
        install: make the registry the process-wide one for the fixture's lifetime (what the runner and
            ``rlhf_spec.cli.main`` use), and reload it afterwards.
        require: stage keys ``(kind, name)`` that must be registered.
        strict: require that every plugin loaded and no name is registered by two distributions.
        torch_threads: torch's intra-op thread count for the fixture's lifetime (restored afterwards).
        name, scope: the fixture's name and pytest scope.

    Raises (when the fixture is set up):
        AssertionError: if a ``require``d stage is missing, or with ``strict``, a plugin failed or conflicts.
    """

    @pytest.fixture(scope=scope, name=name)
    def _registry():
        from rlhf_spec.plugins import load_registry, set_registry

        extra = list(plugins)
        fallbacks = list(unless_installed)
        if fallbacks:
            installed = load_registry(entry_points=entry_points)
            surfaces = ("stages", "rewards", "backends", "datasets")
            extra = [p for p in fallbacks if any(set(getattr(load_registry(extra=[p], entry_points=False), s))
                                                 - set(getattr(installed, s)) for s in surfaces)] + extra
        reg = load_registry(extra=extra, entry_points=entry_points)
        missing = [key for key in require if key not in reg.stages]
        assert not missing, f"{missing} not registered: the plugins' entry points (pyproject.toml) should list them"
        if strict:
            assert not reg.failures and not reg.conflicts, (reg.failures, reg.conflicts)
        threads = None
        if torch_threads is not None:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(torch_threads)
        if install:
            set_registry(reg)
        try:
            yield reg
        finally:
            if install:
                set_registry(None)
            if threads is not None:
                import torch

                torch.set_num_threads(threads)

    return _registry


# A plugin distribution's source: sample/fixed-rows writes params.rows rows of samples, and filter/explode
# raises RuntimeError("the plugin's own bug").
RAISING_PLUGIN = """
import datasets
from pydantic import BaseModel, ConfigDict
from rlhf_spec import SAMPLES, StageImpl, StageResult, hookimpl


class RowsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = 3


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def make_rows(ctx):
    n = ctx.params.rows
    ctx.save_dataset(datasets.Dataset.from_dict({
        "prompt_id": [f"{i:016x}" for i in range(n)],
        "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "sample_index": [0] * n, "completion": [f"a{i}" for i in range(n)]}))
    return StageResult(rows=n)


def explode(ctx):
    raise RuntimeError("the plugin's own bug")


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="sample", name="fixed-rows", params=RowsParams, run=make_rows, output=SAMPLES, version="1"))
    register(StageImpl(kind="filter", name="explode", params=NoParams, run=explode, inputs=(SAMPLES,), min_inputs=1,
                       max_inputs=1, output="same", version="1"))
"""


def rows_spec(name: str = "rows", rows: Optional[int] = None, explode: bool = False) -> dict:
    """A spec of :data:`RAISING_PLUGIN`'s stages: ``rows`` (sample/fixed-rows, ``params.rows`` when given) and,
    with ``explode``, ``bad`` (filter/explode) reading it."""
    first = {"id": "rows", "kind": "sample", "uses": "fixed-rows"}
    if rows is not None:
        first["params"] = {"rows": rows}
    stages = [first] + ([{"id": "bad", "kind": "filter", "uses": "explode", "inputs": ["rows"]}] if explode else [])
    return {"name": name, "stages": stages}


def make_plugin_dist(root: Path, dist: str, version: str, package: str, source: str) -> Path:
    """Write an importable plugin distribution into ``root``: package ``package`` (one ``__init__.py``
    holding ``source``) and ``<dist>-<version>.dist-info`` with METADATA and an ``rlhf_spec`` entry point.

    Returns ``root``, the folder to put on ``PYTHONPATH``.
    """
    root = Path(root)
    pkg = root / package
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[rlhf_spec]\n{package} = {package}\n")
    (info / "RECORD").write_text("")
    return root


def assert_metrics_match_the_table(evaluate: dict) -> None:
    """evaluate's headline figures, recomputed from its saved per-answer table by a plain loop: the win rate
    over all k x k answer pairs of a prompt (ties count one half), both mean rewards, and the k1/k3 KL."""
    import math

    import datasets

    m = evaluate["metrics"]
    t = datasets.load_from_disk(str(Path(evaluate["output"]) / "data")).to_list()
    judge = m["primary_judge"]
    by_prompt: dict = {}
    for row in t:
        by_prompt.setdefault(row["prompt_id"], []).append(row)
    wins = []
    for rows in by_prompt.values():
        pairs = [(a[f"policy_reward/{judge}"], b[f"reference_reward/{judge}"]) for a in rows for b in rows]
        wins.append(sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in pairs) / len(pairs))
    assert m["prompts"] == len(by_prompt) and m["samples_per_prompt"] * len(by_prompt) == len(t)
    assert abs(m["win_rate"] - sum(wins) / len(wins)) < 1e-12
    assert m["win_rate_ci_low"] <= m["win_rate"] <= m["win_rate_ci_high"]
    for side in ("policy", "reference"):
        mean = sum(r[f"{side}_reward/{judge}"] for r in t) / len(t)
        assert abs(m[f"reward_mean_{side}"] - mean) < 1e-9, side
    lr = [r["log_ratio"] for r in t]
    assert abs(m["kl_k1"] - sum(lr) / len(lr)) < 1e-9
    assert abs(m["kl_k3"] - sum(max(0.0, math.exp(-x) - 1 + x) for x in lr) / len(lr)) < 1e-9
