"""The score stage through ``python -m rlhf_spec run`` in a subprocess, on a tiny policy's real samples.

- A combination keeps each component as its own column; the stage's metrics and its TensorBoard events
  hold each column's mean, std, min and max, and a histogram of it.
- A reward that returns the wrong number of scores, or a NaN, stops the stage with an error that names
  the reward's JSON pointer and its plugin distribution, exits non-zero, and keeps what is cached. The
  faulty rewards are a real plugin distribution (a package and its ``*.dist-info`` with an
  ``rlhf_spec`` entry point) on ``PYTHONPATH``, as a user's would be. TRL #6533 broadcast such scores
  silently.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli, entry_dir, keep_stages, make_plugin_dist, manifests, stage_of, tiny_spec_dict, write_spec

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


def _spec(tiny_models, hh_file, reward: dict) -> dict:
    """The tiny spec's sample and score stages: 4 prompts x 2 completions in one shard, scored by ``reward``."""
    spec = keep_stages(tiny_spec_dict(tiny_models, hh_file), "sample", "score")
    spec["datasets"]["prompts"]["limit"] = 4
    stage_of(spec, "sample")["params"].update(n=2, max_new_tokens=4, num_shards=1)
    stage_of(spec, "score")["params"].update(reward=reward, num_shards=1)
    return spec


def _entries(cache: Path, stage: str) -> dict:
    """A stage's committed outputs: entry key -> (folder, manifest)."""
    return {k: (entry_dir(cache, k), m) for k, m in manifests(cache).items() if m["stage"].get("id") == stage}


def _sample_entry(cache: Path) -> dict:
    """The sample stage's committed output: its manifest key and the bytes of its files."""
    found = {k: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}
             for k, (d, _) in _entries(cache, "sample").items()}
    assert len(found) == 1, sorted(cache.rglob("manifest.json"))
    return found


def test_components_reach_the_columns_the_metrics_and_tensorboard(tmp_path, tiny_models, hh_file):
    from datasets import load_from_disk
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    reward = {"uses": "combine", "params": {"components": {
        "words": {"uses": "length", "params": {"unit": "words", "per_unit": 0.5}},
        "vowel": {"uses": "format", "params": {"pattern": "[aeiou]", "match_score": 2.0, "miss_score": -1.0}}},
        "weights": {"words": 1.0, "vowel": 0.25}}}
    r = cli("run", str(write_spec(tmp_path, _spec(tiny_models, hh_file, reward))), "--cache-dir", str(tmp_path / "cache"),
            cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    [(folder, manifest)] = _entries(tmp_path / "cache", "score").values()
    rows = load_from_disk(str(folder / "data"))
    assert len(rows) == 8
    for row in rows:  # each component by its own rule, and the weighted sum of them
        assert row["reward/words"] == 0.5 * len(row["completion"].split())
        assert row["reward/vowel"] == (2.0 if any(c in "aeiou" for c in row["completion"]) else -1.0)
        assert row["reward"] == pytest.approx(row["reward/words"] + 0.25 * row["reward/vowel"])
    m = manifest["metrics"]
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    for col in ("reward", "reward/words", "reward/vowel"):
        values = list(rows[col])
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        assert m[f"{col}_mean"] == pytest.approx(mean) and m[f"{col}_std"] == pytest.approx(std), (col, m)
        assert m[f"{col}_min"] == min(values) and m[f"{col}_max"] == max(values)
        for stat in ("mean", "std", "min", "max"):
            [ev] = events.Scalars(f"{col}_{stat}")
            assert ev.value == pytest.approx(m[f"{col}_{stat}"], rel=1e-6), (col, stat)
        [hist] = events.Histograms(col)
        assert hist.histogram_value.num == 8 and hist.histogram_value.sum == pytest.approx(sum(values))
        assert (hist.histogram_value.min, hist.histogram_value.max) == pytest.approx((min(values), max(values)))


@pytest.mark.parametrize("fault,message", [
    ("short", "returned 7 scores for 8 completions"),
    ("nan", "returned a non-finite scores value (nan) for completion 7 of 8"),
    ("component", "returned 9 component 'part' for 8 completions"),
])
def test_a_reward_with_a_wrong_output_stops_the_stage_naming_it(tmp_path, tiny_models, hh_file, fault, message):
    env = {"PYTHONPATH": str(make_plugin_dist(tmp_path / "site", "rlhf-spec-faulty", "0.1.0", "faulty_reward", FAULTY))}
    spec = write_spec(tmp_path, _spec(tiny_models, hh_file, {"uses": "faulty", "params": {"fault": fault}}))
    cache = tmp_path / "cache"
    r = cli("run", str(spec), "--cache-dir", str(cache), cwd=tmp_path, env=env, timeout=300)
    assert r.returncode != 0, r.stdout + r.stderr
    for part in ("/stages/1/params/reward", "reward 'faulty'", "rlhf-spec-faulty 0.1.0", message):
        assert part in r.stderr, (part, r.stderr)
    assert "Traceback" not in r.stderr
    sample = _sample_entry(cache)
    assert not _entries(cache, "score")
    # the same run again with the fault still there: the sample stage is reused, byte for byte
    again = cli("run", str(spec), "--cache-dir", str(cache), cwd=tmp_path, env=env, timeout=300)
    assert again.returncode == r.returncode and message in again.stderr
    assert _sample_entry(cache) == sample
