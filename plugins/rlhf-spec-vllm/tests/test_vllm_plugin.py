"""The vLLM sample plugin, tested where vLLM is not installed (CPU only).

What runs for real: the installed entry point, the rlhf-spec command line in subprocesses, spec
validation, the runner up to the point where the stage needs vLLM, the plugin contract helper,
and the built-in sample stage whose output schema this plugin must match. Generating with vLLM
needs a CUDA GPU and is not exercised here.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROMPTS = [
    "How do I bake bread at home?",
    "What is the capital of France?",
    "Tell me a joke about chickens.",
    "Give me three tips for sleeping better.",
    "Explain what a hash function is in one paragraph.",
    "Write a haiku about autumn rain.",
]


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rlhf_spec", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny real Llama policy with a chat template, and a local prompts file."""
    from rlhf_spec.testing import make_tiny_policy

    d = tmp_path_factory.mktemp("vllm_tiny")
    policy = make_tiny_policy(d / "policy", texts=PROMPTS)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"dir": d, "policy": policy, "prompts": prompts}


def spec_dict(tiny: dict, uses: str = "vllm", **params) -> dict:
    p = {"policy": "policy", "prompts": "prompts", "n": 2, "max_new_tokens": 8, "num_shards": 2}
    p.update(params)
    return {
        "name": "vllm-tiny", "seed": 0, "requires": ["rlhf-spec-vllm>=0.1"],
        "models": {"policy": {"path": str(tiny["policy"])}},
        "datasets": {"prompts": {"path": str(tiny["prompts"])}},
        "stages": [{"id": "sample", "kind": "sample", "uses": uses, "params": p}],
    }


def write(tmp: Path, spec: dict) -> Path:
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def test_entry_point_and_plugins_listing(tmp_path):
    eps = [ep for ep in md.entry_points(group="rlhf_spec") if ep.value == "rlhf_spec_vllm.plugin"]
    assert len(eps) == 1, "install the plugin: pip install --no-deps -e plugins/rlhf-spec-vllm"
    assert eps[0].dist.metadata["Name"] == "rlhf-spec-vllm"
    r = cli("plugins", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    listing = json.loads(r.stdout)
    rows = [s for s in listing["stages"] if (s["kind"], s["name"]) == ("sample", "vllm")]
    assert len(rows) == 1
    assert rows[0]["distribution"] == "rlhf-spec-vllm" and rows[0]["version"] == md.version("rlhf-spec-vllm")
    assert rows[0]["output"] == "samples"
    assert not [f for f in listing["failures"] if f["distribution"] == "rlhf-spec-vllm"]
    assert "sample/vllm" not in listing["conflicts"]


def test_loading_the_plugin_does_not_import_vllm(tmp_path):
    code = ("import sys; from rlhf_spec.plugins import load_registry; reg = load_registry(); "
            "assert ('sample', 'vllm') in reg.impls, reg.failures; "
            "print('vllm' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_bad_params_are_reported_with_their_pointer(tiny, tmp_path):
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, temperature=-0.5))), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "/stages/0/params/temperature" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, tensor_parallel=2))), cwd=tmp_path)
    assert r.returncode == 2
    assert "/stages/0/params/tensor_parallel" in r.stderr and "tensor_parallel_size" in r.stderr
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, tensor_parallel_size=2))), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed; this checks the message without it")
def test_running_without_vllm_says_how_to_install_it(tiny, tmp_path):
    spec = write(tmp_path, spec_dict(tiny))
    r = cli("run", str(spec), "--cache-dir", str(tmp_path / "cache"), "--report", str(tmp_path / "report.json"), cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pip install rlhf-spec-vllm[vllm]" in r.stderr and "pip install vllm" in r.stderr
    assert "sample/vllm from rlhf-spec-vllm" in r.stderr
    assert "Traceback" not in r.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "failed"


def test_plan_shows_the_gpus_it_needs(tiny, tmp_path):
    r = cli("plan", str(write(tmp_path, spec_dict(tiny, tensor_parallel_size=4, n=5))), "--json",
            "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["resources"] == {"processes": 1, "gpus": 4, "samples_per_prompt": 5}
    assert row["status"] == "run" and len(row["key"]) == 64


def test_stage_contract(tiny):
    from rlhf_spec.plugins import load_registry
    from rlhf_spec.testing import check_stage_contract

    impl = load_registry().impls[("sample", "vllm")]
    check_stage_contract(impl, {"policy": "policy", "prompts": "prompts", "n": 5, "tensor_parallel_size": 8},
                         spec_for_key=spec_dict(tiny))


def test_output_columns_are_the_builtin_sample_columns(tiny, tmp_path):
    """The built-in sample stage, run for real on the tiny policy, writes exactly the columns this plugin writes."""
    import datasets

    from rlhf_spec_vllm.plugin import OUTPUT_COLUMNS

    spec = spec_dict(tiny, uses="transformers", batch_size=4)
    r = cli("run", str(write(tmp_path, spec)), "--cache-dir", str(tmp_path / "cache"), "--report", str(tmp_path / "r.json"),
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    out = json.loads((tmp_path / "r.json").read_text())["stages"][0]["output"]
    ds = datasets.load_from_disk(str(Path(out) / "data"))
    assert tuple(ds.column_names) == OUTPUT_COLUMNS
    assert len(ds) == 2 * len(PROMPTS)


def test_engine_arguments_follow_the_model_source(tmp_path):
    from rlhf_spec.models import ModelSource
    from rlhf_spec_vllm.plugin import VllmSampleParams, engine_kwargs

    p = VllmSampleParams(policy="policy", prompts="prompts", tensor_parallel_size=8, max_model_len=4096)
    hub = ModelSource(name="policy", origin="spec", hub="meta-llama/Meta-Llama-3-8B-Instruct", revision="a" * 40,
                      dtype="bfloat16")
    kw = engine_kwargs(hub, p, seed=3)
    assert kw == {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "revision": "a" * 40, "tensor_parallel_size": 8,
                  "gpu_memory_utilization": 0.9, "dtype": "bfloat16", "seed": 3, "trust_remote_code": False,
                  "max_model_len": 4096}
    gguf = ModelSource(name="policy", origin="spec", path=str(tmp_path / "smol"), gguf_file="m.Q4_1.gguf")
    kw = engine_kwargs(gguf, VllmSampleParams(policy="policy", prompts="prompts", dtype="float16"), seed=0)
    assert kw["model"] == str(tmp_path / "smol" / "m.Q4_1.gguf") and kw["tokenizer"] == str(tmp_path / "smol")
    assert kw["dtype"] == "float16" and kw["tensor_parallel_size"] == 1 and "max_model_len" not in kw
    trained = ModelSource(name="train_iter1", origin="stage", path=str(tmp_path / "entry" / "model"))
    kw = engine_kwargs(trained, p, seed=0)
    assert kw["model"] == str(tmp_path / "entry" / "model") and "revision" not in kw and kw["dtype"] == "auto"
