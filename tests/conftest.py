"""Shared fixtures: real data files, tiny real models built in-process, and spec builders."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
                        "per_device_batch_size": 8, "save_every": 2}},
            {"id": "sample", "kind": "sample", "uses": "generate",
             "params": {"policy": "policy", "prompts": "prompts", "n": 3, "max_new_tokens": 8, "num_shards": 3,
                        "backend": {"uses": "transformers", "params": {"batch_size": 4}}}},
            {"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"],
             "params": {"reward": {"uses": "classifier", "params": {"model": "reward_model", "max_length": 64}}, "num_shards": 3}},
            {"id": "filter", "kind": "filter", "uses": "length", "inputs": ["score"],
             "params": {"tokenizer": "policy", "max_prompt_tokens": 4096, "max_response_tokens": 64}},
            {"id": "pair", "kind": "pair", "uses": "best-worst", "inputs": ["filter"], "params": {"test_size": 2}},
            {"id": "rebel", "kind": "train", "uses": "rebel", "inputs": ["pair"],
             "params": {"policy": "policy", "eta": 1.0, "learning_rate": 1e-3, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
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


def write_spec(folder: Path, spec: dict, name: str = "spec.json") -> Path:
    path = Path(folder) / name
    path.write_text(json.dumps(spec, indent=1))
    return path


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``python -m rlhf_spec ARGS`` in a real subprocess."""
    e = dict(os.environ)
    e.update(env or {})
    e.setdefault("PYTHONUNBUFFERED", "1")
    return subprocess.run([sys.executable, "-m", "rlhf_spec", *args], cwd=str(cwd) if cwd else None, env=e,
                          capture_output=True, text=True, timeout=timeout)


def manifests(cache: Path) -> dict:
    """Every committed cache entry's manifest under ``cache``, by entry key (its folder's name)."""
    return {m.parent.name: json.loads(m.read_text()) for m in Path(cache).glob("entries/*/*/manifest.json")}


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
