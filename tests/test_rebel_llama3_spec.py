"""specs/rebel_llama3.json: valid, planned without network, documented value by value, and runnable
shrunk to this machine's real small models (SmolLM2-135M-Instruct, MiniLM) with ``--set``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import ROOT, cli
from conftest import assert_metrics_match_the_table

SPEC = "specs/rebel_llama3.json"
DOC = ROOT / "docs" / "rebel_llama3.md"
ZERO3 = ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml"
OFFLINE = {"HF_HUB_OFFLINE": "1"}
ITER1 = ["sample_iter1", "score_iter1", "filter_iter1", "pair_iter1", "train_iter1"]

# Iteration 1 and its evaluation on this machine: the same spec, every change made with --set.
# vLLM and ArmoRM need GPUs, so sampling switches to the built-in transformers backend and scoring and
# judging to the classifier reward on MiniLM; everything else is the spec's own.
SMOKE_SET = [
    'models.policy={"path": "models/SmolLM2-135M-Instruct", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}',
    'models.minilm={"path": "models/all-MiniLM-L6-v2"}',
    'datasets.prompts={"path": "data/alpaca_eval/gpt4__model_outputs.json", "prompt_column": "instruction", '
    '"hash_range": [0.0, 0.5], "limit": 4}',
    'datasets.alpaca_eval={"path": "data/alpaca_eval/gpt4__model_outputs.json", "prompt_column": "instruction", '
    '"hash_range": [0.5, 1.0], "limit": 2}',
    'stages.sample_iter1.params.backend={"uses": "transformers", "params": {"batch_size": 4}}',
    "stages.sample_iter1.params.n=2",
    "stages.sample_iter1.params.max_new_tokens=8",
    "stages.sample_iter1.params.num_shards=2",
    'stages.score_iter1.params.reward={"uses": "classifier", "params": {"model": "minilm", "format": "pair", "max_length": 128}}',
    "stages.score_iter1.params.num_shards=2",
    "stages.pair_iter1.params.test_size=1",
    "stages.train_iter1.params.num_processes=1",
    "stages.train_iter1.params.accelerate_config=null",
    "stages.train_iter1.params.mixed_precision=no",
    "stages.train_iter1.params.gradient_accumulation_steps=2",
    "stages.train_iter1.params.total_episodes=4",
    'stages.evaluate_iter1.params.judges={"minilm": {"uses": "classifier", "params": {"model": "minilm", "format": "pair", '
    '"max_length": 128}}}',
    "stages.evaluate_iter1.params.max_new_tokens=8",
    "stages.evaluate_iter1.params.backend.params.batch_size=2",
    "stages.evaluate_iter1.params.bootstrap_resamples=200",
]
# The same for iteration 2's sampling, to plan it on top of a finished iteration 1.
SMOKE_SET_ITER2 = [
    'stages.sample_iter2.params.backend={"uses": "transformers", "params": {"batch_size": 4}}',
    "stages.sample_iter2.params.n=2",
    "stages.sample_iter2.params.max_new_tokens=8",
    "stages.sample_iter2.params.num_shards=2",
]


def _sets(items: list[str]) -> list[str]:
    out = []
    for s in items:
        out += ["--set", s]
    return out


def _spec() -> dict:
    """The spec with its repeat block expanded into the 18 stages it stands for."""
    from rlhf_spec.spec.repeat import expand

    return expand(json.loads((ROOT / SPEC).read_text()))[0]


def test_validates_with_both_plugins():
    r = cli("validate", SPEC, cwd=ROOT, env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert "valid (18 stages" in r.stdout
    spec = _spec()
    assert spec["$schema"] == "../schemas/rlhf-spec.schema.json"
    text = (ROOT / SPEC).read_text()
    assert '"repeat"' in text and len(text.splitlines()) < 409 / 2  # the hand-written 3 x 6 stages took 409 lines
    assert {r.split(">")[0] for r in spec["requires"]} == {"rlhf-spec-vllm", "rlhf-spec-armorm"}


def test_plan_offline_shows_resources_and_exits_0(tmp_path):
    r = cli("plan", SPEC, "--json", "--cache-dir", str(tmp_path / "cache"), cwd=ROOT, env=OFFLINE)
    assert r.returncode == 0, r.stderr
    rows = {row["id"]: row for row in json.loads(r.stdout)}
    assert len(rows) == 18
    for it in (1, 2, 3):
        assert rows[f"sample_iter{it}"]["resources"] == {"processes": 1, "gpus": 8, "samples_per_prompt": 5, "backend": "vllm"}
        assert rows[f"score_iter{it}"]["resources"] == {"processes": 1, "gpus": 1, "reward": "armorm"}
        assert rows[f"train_iter{it}"]["resources"] == {"processes": 8, "gpus": 8, "global_batch": 128, "episodes": 60000,
                                                        "updates": 468}
    # hub revisions cannot be resolved offline: the keys are reported unknown, with the reason
    assert rows["sample_iter1"]["key"] is None and "key unknown" in rows["sample_iter1"]["reason"]
    assert "depends on 'train_iter1'" in rows["sample_iter2"]["reason"]
    # the human-readable table renders the same rows
    t = cli("plan", SPEC, "--cache-dir", str(tmp_path / "cache"), cwd=ROOT, env=OFFLINE)
    assert t.returncode == 0, t.stderr
    assert "gpus=8" in t.stdout and "episodes=60000" in t.stdout and "samples_per_prompt=5" in t.stdout


def test_until_train_iter1_stops_after_iteration_1(tmp_path):
    r = cli("plan", SPEC, "--json", "--until", "train_iter1", "--cache-dir", str(tmp_path / "cache"), cwd=ROOT, env=OFFLINE)
    assert r.returncode == 0, r.stderr
    assert [row["id"] for row in json.loads(r.stdout)] == ITER1


def test_iterations_chain_and_keep_the_recipe():
    spec = _spec()
    st = {s["id"]: s for s in spec["stages"]}
    for it in (1, 2, 3):
        start = "policy" if it == 1 else f"train_iter{it - 1}"
        assert st[f"sample_iter{it}"]["params"]["policy"] == start
        assert st[f"train_iter{it}"]["params"]["policy"] == start
        assert "reference" not in st[f"train_iter{it}"]["params"]  # REBEL's pi_t: the iteration's starting policy
        assert st[f"score_iter{it}"]["inputs"] == [f"sample_iter{it}"]
        assert st[f"train_iter{it}"]["inputs"] == [f"pair_iter{it}"]
        assert st[f"evaluate_iter{it}"]["params"]["policy"] == f"train_iter{it}"
        for kind in ("sample", "score", "filter", "pair", "train", "evaluate"):
            a = {k: v for k, v in st[f"{kind}_iter{it}"]["params"].items() if k not in ("policy", "generator_name")}
            b = {k: v for k, v in st[f"{kind}_iter1"]["params"].items() if k not in ("policy", "generator_name")}
            assert a == b, (kind, it)
    models = spec["models"]
    assert models["armorm"]["trust_remote_code"] is True
    assert [n for n, m in models.items() if m.get("trust_remote_code")] == ["armorm"]
    assert (ROOT / st["train_iter1"]["params"]["accelerate_config"]).resolve() == ZERO3.resolve()


def test_zero3_accelerate_config_parses():
    """accelerate reads the file as a DeepSpeed ZeRO-3 launch; DeepSpeed 0.19 validates the ZeRO section it yields."""
    pytest.importorskip("deepspeed")
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DeepSpeedPlugin, DistributedType
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    cfg = load_config_from_file(str(ZERO3))
    assert cfg.distributed_type == DistributedType.DEEPSPEED
    assert cfg.mixed_precision == "bf16" and cfg.num_processes == 8 and cfg.num_machines == 1 and not cfg.use_cpu
    ds = dict(cfg.deepspeed_config)
    assert ds.pop("deepspeed_multinode_launcher") == "standard"
    assert "gradient_accumulation_steps" not in ds  # comes from the stage's params
    plugin = DeepSpeedPlugin(**ds)
    zero = DeepSpeedZeroConfig(**plugin.deepspeed_config["zero_optimization"])
    assert zero.stage == 3
    assert zero.gather_16bit_weights_on_model_save is True
    assert zero.offload_param is None or zero.offload_param.device == "none"
    assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"


def _leaves(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _leaves(v, f"{path}.{k}" if path else k)
    else:
        yield path, node


def test_every_spec_value_is_in_the_doc_table_with_the_same_value():
    """docs/rebel_llama3.md lists each value with its source; '*' in a path stands for iterations 1, 2 and 3."""
    rows = re.findall(r"^\| `((?:models|datasets|stages|seed)[^`]*)` \| `([^`]*)` \|", DOC.read_text(), flags=re.M)
    assert len(rows) > 40
    documented = {}
    for path, value in rows:
        for concrete in ([path.replace("*", str(i)) for i in (1, 2, 3)] if "*" in path else [path]):
            documented[concrete] = json.loads(value)
    spec = _spec()
    spec_leaves = {}
    for p, v in _leaves({k: spec[k] for k in ("seed", "models", "datasets")}):
        spec_leaves[p] = v
    for s in spec["stages"]:
        spec_leaves[f"stages.{s['id']}.uses"] = s["uses"]
        for p, v in _leaves(s["params"]):
            spec_leaves[f"stages.{s['id']}.params.{p}"] = v
    assert set(documented) - set(spec_leaves) == set(), "documented but not in the spec"
    assert set(spec_leaves) - set(documented) == set(), "in the spec but not documented"
    for p, v in spec_leaves.items():
        assert documented[p] == v, (p, documented[p], v)


@pytest.mark.slow
def test_shrunk_iteration_1_runs_here(tmp_path, real_cache):
    for p in ("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", "models/all-MiniLM-L6-v2/model.safetensors",
              "data/alpaca_eval/gpt4__model_outputs.json"):
        if not (ROOT / p).exists():
            pytest.fail(f"{p} missing: run `make assets` (scripts/fetch_assets.py)")
    cache, report = real_cache, tmp_path / "iter1.json"
    r = cli("run", SPEC, "--until", "evaluate_iter1", "--cache-dir", str(cache), "--report", str(report),
            *_sets(SMOKE_SET), cwd=ROOT, env=OFFLINE)
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    rep = json.loads(report.read_text())
    stages = {s["id"]: s for s in rep["stages"]}
    assert list(stages) == ITER1 + ["evaluate_iter1"]
    assert all(s["status"] == "ran" for s in stages.values())
    assert stages["sample_iter1"]["metrics"]["samples"] == 2 * stages["sample_iter1"]["metrics"]["prompts"] == 8
    assert stages["pair_iter1"]["metrics"]["test"] == 1
    train = stages["train_iter1"]["metrics"]
    assert train["updates"] == 2 and train["processes"] == 1 and train["train_pairs"] >= 1
    ev = stages["evaluate_iter1"]["metrics"]
    assert ev["prompts"] == 2 and ev["primary_judge"] == "minilm"
    assert_metrics_match_the_table(stages["evaluate_iter1"])
    outputs = json.loads((Path(stages["evaluate_iter1"]["output"]) / "alpaca_eval" / "model_outputs.json").read_text())
    assert len(outputs) == 2 and {o["generator"] for o in outputs} == {"rebel-llama3-armo-iter1"}

    # iteration 2 builds on iteration 1: its sampling waits on train_iter1's key; iteration 1 is cached
    p = cli("plan", SPEC, "--json", "--until", "sample_iter2", "--cache-dir", str(cache), *_sets(SMOKE_SET + SMOKE_SET_ITER2),
            cwd=ROOT, env=OFFLINE)
    assert p.returncode == 0, p.stderr
    plan = {row["id"]: row for row in json.loads(p.stdout)}
    assert [plan[s]["status"] for s in ITER1] == ["cached"] * 5
    assert [plan[s]["key"] for s in ITER1] == [stages[s]["key"] for s in ITER1]
    assert plan["sample_iter2"]["status"] == "run" and len(plan["sample_iter2"]["key"]) == 64
