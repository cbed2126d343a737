"""A reward that returns the wrong number of scores, or a NaN, stops the score stage with an error that
names the reward's JSON pointer and its plugin distribution, exits non-zero, and keeps what is cached.

The faulty rewards are a real plugin distribution (a package and its ``*.dist-info`` with an ``rlhf_spec``
entry point) on ``PYTHONPATH``, run by ``python -m rlhf_spec`` in a subprocess, as a user's would be.
TRL #6533 broadcast such scores silently.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli, write_spec
from test_malformed_specs import make_plugin_dist

FAULTY = """
from pydantic import BaseModel, ConfigDict
from rlhf_spec import RewardImpl, RewardOutput, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fault: str


class Faulty:
    def __init__(self, fault):
        self.fault = fault

    def score(self, batch):
        n = len(batch)
        if self.fault == "short":
            return RewardOutput(scores=[1.0] * (n - 1))
        if self.fault == "nan":
            return RewardOutput(scores=[1.0] * (n - 1) + [float("nan")])
        return RewardOutput(scores=[1.0] * n, components={"part": [0.5] * (n + 1)})


@hookimpl
def rlhf_spec_register_rewards(register):
    register(RewardImpl(name="faulty", params=Params, load=lambda p, ctx: Faulty(p.fault), version="1"))
"""


def _spec(tiny_models, hh_file, fault: str) -> dict:
    return {"name": "faulty-reward", "seed": 0, "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"prompts": {"path": str(hh_file), "adapter": "hh-rlhf", "hash_range": [0.5, 0.75], "limit": 4}},
            "stages": [
                {"id": "sample", "kind": "sample", "uses": "generate",
                 "params": {"policy": "policy", "prompts": "prompts", "n": 2, "max_new_tokens": 4, "num_shards": 1,
                            "backend": {"uses": "transformers", "params": {"batch_size": 8}}}},
                {"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"],
                 "params": {"reward": {"uses": "faulty", "params": {"fault": fault}}, "num_shards": 1}}]}


def _sample_entry(cache: Path) -> dict:
    """The sample stage's committed output: its manifest key and the bytes of its data files."""
    found = {}
    for m in cache.glob("entries/*/*/manifest.json"):
        data = json.loads(m.read_text())
        if data["stage"].get("id") == "sample":
            found[data["key"]] = {p.name: p.read_bytes() for p in sorted(m.parent.rglob("*")) if p.is_file()}
    assert len(found) == 1, sorted(cache.rglob("manifest.json"))
    return found


@pytest.mark.parametrize("fault,message", [
    ("short", "returned 7 scores for 8 completions"),
    ("nan", "returned a non-finite scores value (nan) for completion 7 of 8"),
    ("component", "returned 9 component 'part' for 8 completions"),
])
def test_a_reward_with_a_wrong_output_stops_the_stage_naming_it(tmp_path, tiny_models, hh_file, fault, message):
    env = {"PYTHONPATH": str(make_plugin_dist(tmp_path / "site", "rlhf-spec-faulty", "0.1.0", "faulty_reward", FAULTY))}
    spec = write_spec(tmp_path, _spec(tiny_models, hh_file, fault))
    cache = tmp_path / "cache"
    r = cli("run", str(spec), "--cache-dir", str(cache), cwd=tmp_path, env=env, timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    for part in ("/stages/1/params/reward", "reward 'faulty'", "rlhf-spec-faulty 0.1.0", message):
        assert part in r.stderr, (part, r.stderr)
    assert "Traceback" not in r.stderr
    sample = _sample_entry(cache)
    assert not any(json.loads(m.read_text())["stage"].get("id") == "score" for m in cache.glob("entries/*/*/manifest.json"))
    # the same run again with the fault still there: the sample stage is reused, byte for byte
    again = cli("run", str(spec), "--cache-dir", str(cache), cwd=tmp_path, env=env, timeout=300)
    assert again.returncode == r.returncode and message in again.stderr
    assert _sample_entry(cache) == sample
