"""The vLLM backend plugin, tested where vLLM is not installed (CPU only).

What runs for real: the installed entry point, the rlhf-spec command line in subprocesses, spec
validation, the plugin contract helper, and the plugin's own code path (``load`` -> ``import_vllm``
-> ``LLM(**engine_kwargs)`` -> ``VllmEngine.generate``) against a stand-in ``vllm`` package put on
``PYTHONPATH``. The stand-in honours the parts of vLLM's contract the plugin relies on: ``LLM(model=...,
tokenizer=..., ...)``, ``generate([{"prompt_token_ids": ...}], SamplingParams(n, temperature, top_p,
max_tokens, seed), use_tqdm=False)`` returning one result per request, in order, each with ``n``
outputs carrying ``text``, ``token_ids`` (ending with EOS when it stopped) and ``finish_reason``, and a
result that depends only on the request and its seed. It generates with a real tiny transformers model.
Real vLLM needs a CUDA GPU and is not exercised here.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
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

STAND_IN = '''
"""A stand-in for vLLM's offline API, honouring its generate contract with a transformers model."""
import json
import os
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

CALLS = os.environ.get("VLLM_STAND_IN_LOG")


SAMPLING_DEFAULTS = {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": None}


class SamplingParams:
    """vLLM's defaults for the fields the plugin sets; ``given`` keeps the keywords actually passed."""

    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(SAMPLING_DEFAULTS))
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword arguments {unknown}")
        self.given = dict(kwargs)
        for k, v in dict(SAMPLING_DEFAULTS, **kwargs).items():
            setattr(self, k, v)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list
    finish_reason: str


@dataclass
class RequestOutput:
    prompt_token_ids: list
    outputs: list = field(default_factory=list)


class LLM:
    def __init__(self, model, tokenizer=None, **kwargs):
        self.kwargs = dict(kwargs, model=model, tokenizer=tokenizer)
        if CALLS:
            with open(CALLS, "a") as f:
                f.write(json.dumps({"init": {k: v for k, v in self.kwargs.items()}}) + "\\n")
        self.tok = AutoTokenizer.from_pretrained(tokenizer or model)
        self.model = AutoModelForCausalLM.from_pretrained(model).eval()

    def generate(self, prompts, sampling_params, use_tqdm=True):
        out = []
        for req in prompts:
            ids = torch.tensor([req["prompt_token_ids"]])
            res = RequestOutput(req["prompt_token_ids"])
            for i in range(sampling_params.n):
                torch.manual_seed((sampling_params.seed or 0) * 1000 + i)  # per request: seed and output index only
                gen = self.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                          temperature=sampling_params.temperature, top_p=sampling_params.top_p,
                                          max_new_tokens=sampling_params.max_tokens, pad_token_id=self.tok.pad_token_id)
                new = gen[0, ids.shape[1]:].tolist()
                stop = self.tok.eos_token_id in new
                new = new[: new.index(self.tok.eos_token_id) + 1] if stop else new
                text = self.tok.decode(new, skip_special_tokens=True)
                res.outputs.append(CompletionOutput(i, text, new, "stop" if stop else "length"))
            out.append(res)
        if CALLS:
            with open(CALLS, "a") as f:
                f.write(json.dumps({"generate": len(prompts), "sampling": sampling_params.given}) + "\\n")
        return out
'''


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "rlhf_spec", *args], cwd=str(cwd), env=e, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny real Llama policy with a chat template, a local prompts file, and the stand-in vllm package."""
    from rlhf_spec.testing import make_tiny_policy

    d = tmp_path_factory.mktemp("vllm_tiny")
    policy = make_tiny_policy(d / "policy", texts=PROMPTS)
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    (d / "stand_in" / "vllm").mkdir(parents=True)
    (d / "stand_in" / "vllm" / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    return {"dir": d, "policy": policy, "prompts": prompts, "stand_in": d / "stand_in"}


def spec_dict(tiny: dict, backend: str = "vllm", backend_params: dict | None = None, **params) -> dict:
    p = {"policy": "policy", "prompts": "prompts", "n": 2, "max_new_tokens": 8, "num_shards": 2,
         "backend": {"uses": backend, "params": backend_params or {}}}
    p.update(params)
    return {
        "name": "vllm-tiny", "seed": 0, "requires": ["rlhf-spec-vllm>=0.2"],
        "models": {"policy": {"path": str(tiny["policy"])}},
        "datasets": {"prompts": {"path": str(tiny["prompts"])}},
        "stages": [{"id": "sample", "kind": "sample", "uses": "generate", "params": p}],
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
    rows = [s for s in listing["implementations"] if (s["surface"], s["name"]) == ("backend", "vllm")]
    assert len(rows) == 1
    assert rows[0]["distribution"] == "rlhf-spec-vllm" and rows[0]["version"] == md.version("rlhf-spec-vllm")
    assert not [f for f in listing["failures"] if f["distribution"] == "rlhf-spec-vllm"]


def test_loading_the_plugin_does_not_import_vllm(tmp_path):
    code = ("import sys; from rlhf_spec.plugins import load_registry; reg = load_registry(); "
            "assert 'vllm' in reg.backends, reg.failures; print('vllm' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_bad_params_are_reported_with_their_pointer(tiny, tmp_path):
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, temperature=-0.5))), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "/stages/0/params/temperature" in r.stderr and "Traceback" not in r.stderr
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, backend_params={"tensor_parallel": 2}))), cwd=tmp_path)
    assert r.returncode == 2
    assert (
        "/stages/0/params/backend/params/tensor_parallel: unknown key" in r.stderr
        and "tensor_parallel_size" in r.stderr
    )
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, backend_params={"tensor_parallel_size": 2}))), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed; this checks the message "
                                                                         "without it")
def test_running_without_vllm_says_how_to_install_it(tiny, tmp_path):
    spec = write(tmp_path, spec_dict(tiny))
    r = cli("run", str(spec), "--cache-dir", str(tmp_path / "cache"), "--report", str(tmp_path / "report.json"),
            cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "pip install rlhf-spec-vllm[vllm]" in r.stderr and "pip install vllm" in r.stderr
    assert "stage 'sample' (sample/generate from rlhf-spec" in r.stderr and "Traceback" not in r.stderr
    assert json.loads((tmp_path / "report.json").read_text())["status"] == "failed"


def test_plan_shows_the_gpus_it_needs(tiny, tmp_path):
    r = cli("plan", str(write(tmp_path, spec_dict(tiny, backend_params={"tensor_parallel_size": 4}, n=5))), "--json",
            "--cache-dir", str(tmp_path / "cache"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)[0]
    assert row["resources"] == {"processes": 1, "gpus": 4, "samples_per_prompt": 5, "backend": "vllm"}
    assert row["status"] == "run" and len(row["key"]) == 64


def test_backend_contract(tiny):
    from rlhf_spec.plugins import load_registry
    from rlhf_spec.testing import check_contract

    impl = load_registry().backends["vllm"]
    check_contract(impl, {"tensor_parallel_size": 8, "max_model_len": 4096}, spec_for_key=spec_dict(tiny))


def test_sampling_through_the_plugin_matches_the_contract(tiny, tmp_path):
    """The sample stage runs the plugin's own load and generate against the stand-in engine: the output has the
    built-in backend's columns, every pass p is one call seeded spec.seed + 50 p that passes the spec's
    temperature, top_p and max_new_tokens (as max_tokens) by keyword, and a rerun gives the same rows."""
    import datasets

    log = tmp_path / "calls.jsonl"
    env = {"PYTHONPATH": str(tiny["stand_in"]), "VLLM_STAND_IN_LOG": str(log)}
    # values unlike the stand-in's defaults and unlike each other, so a dropped or swapped keyword shows
    sampling = {"temperature": 0.7, "top_p": 0.85, "max_new_tokens": 6}
    spec = spec_dict(tiny, n=3, num_shards=1, **sampling)
    r = cli("run", str(write(tmp_path, spec)), "--cache-dir", str(tmp_path / "cache"),
            "--report", str(tmp_path / "r.json"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    init = calls[0]["init"]
    assert (
        init["model"] == str(tiny["policy"])
        and init["tensor_parallel_size"] == 1
        and init["trust_remote_code"] is False
    )
    assert [c["generate"] for c in calls[1:]] == [len(PROMPTS)] * 3
    assert [c["sampling"] for c in calls[1:]] == [{"n": 1, "temperature": 0.7, "top_p": 0.85, "max_tokens": 6,
                                                   "seed": seed}
                                                  for seed in (0, 50, 100)]
    out = Path(json.loads((tmp_path / "r.json").read_text())["stages"][0]["output"])
    ds = datasets.load_from_disk(str(out / "data"))
    from rlhf_spec.stages.sample import SAMPLE_COLUMNS

    assert tuple(ds.column_names) == SAMPLE_COLUMNS and len(ds) == 3 * len(PROMPTS)
    assert all(1 <= n <= sampling["max_new_tokens"] for n in ds["completion_tokens"])
    by_prompt: dict = {}
    for pid, c in zip(ds["prompt_id"], ds["completion"]):
        by_prompt.setdefault(pid, set()).add(c)
    assert all(len(cs) > 1 for cs in by_prompt.values()), "passes with different seeds gave equal completions"
    # the stand-in's result depends only on the request and its seed: a fresh cache gives the same rows
    r2 = cli("run", str(write(tmp_path, spec)), "--cache-dir", str(tmp_path / "cache2"),
             "--report", str(tmp_path / "r2.json"), cwd=tmp_path, env=env)
    assert r2.returncode == 0, r2.stderr
    out2 = Path(json.loads((tmp_path / "r2.json").read_text())["stages"][0]["output"])
    assert datasets.load_from_disk(str(out2 / "data")).to_list() == ds.to_list()


def test_engine_arguments_follow_the_model_source(tmp_path):
    from rlhf_spec_vllm.plugin import VllmParams, engine_kwargs

    from rlhf_spec import ModelSource

    p = VllmParams(tensor_parallel_size=8, max_model_len=4096)
    hub = ModelSource(name="policy", origin="spec", hub="meta-llama/Meta-Llama-3-8B-Instruct", revision="a" * 40,
                      dtype="bfloat16")
    assert engine_kwargs(hub, p) == {"model": "meta-llama/Meta-Llama-3-8B-Instruct", "revision": "a" * 40,
                                     "tensor_parallel_size": 8,
                                     "gpu_memory_utilization": 0.9, "dtype": "bfloat16", "trust_remote_code": False,
                                     "max_model_len": 4096}
    gguf = ModelSource(name="policy", origin="spec", path=str(tmp_path / "smol"), gguf_file="m.Q4_1.gguf")
    kw = engine_kwargs(gguf, VllmParams(dtype="float16"))
    assert kw["model"] == str(tmp_path / "smol" / "m.Q4_1.gguf") and kw["tokenizer"] == str(tmp_path / "smol")
    assert kw["dtype"] == "float16" and kw["tensor_parallel_size"] == 1 and "max_model_len" not in kw
    hub_tok = ModelSource(name="policy", origin="spec", hub="org/m", tokenizer="org/tok", tokenizer_revision="b" * 40)
    kw = engine_kwargs(hub_tok, VllmParams())
    assert kw["tokenizer"] == "org/tok" and kw["tokenizer_revision"] == "b" * 40
