"""End to end on tiny real models: a full run, a cache hit, invalidation, and resume after SIGKILL."""

from __future__ import annotations

import json

import pytest

from conftest import assert_metrics_match_the_table, cli, entry_dir, plan_keys, stages_of, statuses, write_spec
from rlhf_spec.testing import run_spec


@pytest.mark.slow
def test_full_run_rerun_and_invalidation(tmp_path, tiny_spec):
    cache = tmp_path / "cache"
    r1, rep1 = run_spec(tiny_spec, tmp_path)
    assert r1.returncode == 0, r1.stderr + r1.stdout
    assert set(statuses(rep1).values()) == {"ran"}
    assert "report:" in r1.stdout
    evaluate = stages_of(rep1)["evaluate"]
    assert_metrics_match_the_table(evaluate)
    rm = stages_of(rep1)["reward_model"]["metrics"]
    assert rm["eval_pairs"] == 16 and (rm["eval_accuracy"] * 32).is_integer()  # pairs of 16, ties count one half

    # unchanged rerun: everything cached, nothing computed
    r2, rep2 = run_spec(tiny_spec, tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert set(statuses(rep2).values()) == {"cached"}
    assert [s["key"] for s in rep2["stages"]] == [s["key"] for s in rep1["stages"]]

    # change one param of 'filter': filter and everything downstream rerun, upstream stays cached
    r3, rep3 = run_spec(tiny_spec, tmp_path, "--set", "stages.filter.params.drop_duplicates=false")
    assert r3.returncode == 0, r3.stderr
    st = statuses(rep3)
    assert st == {"reward_model": "cached", "sample": "cached", "score": "cached", "filter": "ran",
                  "pair": "ran", "rebel": "ran", "evaluate": "ran"}

    # plan --explain names the changed ingredient
    r4 = cli("plan", str(tmp_path / "spec.json"), "--cache-dir", str(cache), "--explain", "--json",
             "--set", "stages.sample.params.temperature=0.5")
    assert r4.returncode == 0, r4.stderr
    rows = {r["id"]: r for r in json.loads(r4.stdout)}
    assert rows["reward_model"]["status"] == "cached"
    assert any("params.temperature" in c for c in rows["sample"]["changes"])
    assert rows["score"]["status"] == "run"


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path, tiny_spec):
    """Killed (SIGKILL) right after the score stage's entry is committed, the rerun starts from there."""
    spec = write_spec(tmp_path, tiny_spec)
    cache = tmp_path / "cache"
    keys = plan_keys(spec, cache)
    killed = cli("run", str(spec), "--cache-dir", str(cache), env={"RLHF_SPEC_KILL_AT_COMMIT": f"after:entry:{keys['score'][:12]}"})
    assert killed.returncode == -9, killed.stderr  # the run was really killed, and before it finished
    assert not entry_dir(cache, keys["filter"]).exists()
    r, resumed = run_spec(tiny_spec, tmp_path)
    assert r.returncode == 0, r.stderr
    st = statuses(resumed)
    assert st == {"reward_model": "cached", "sample": "cached", "score": "cached", "filter": "ran", "pair": "ran",
                  "rebel": "ran", "evaluate": "ran"}
    # the resumed run's outputs equal an uninterrupted run's, in a separate cache
    r2, fresh = run_spec(tiny_spec, tmp_path / "fresh")
    assert r2.returncode == 0, r2.stderr
    a, b = stages_of(resumed), stages_of(fresh)
    assert [a[k]["key"] for k in a] == [b[k]["key"] for k in a]
    assert a["evaluate"]["metrics"]["win_rate"] == b["evaluate"]["metrics"]["win_rate"]
    assert a["evaluate"]["metrics"]["reward_mean_policy"] == b["evaluate"]["metrics"]["reward_mean_policy"]
