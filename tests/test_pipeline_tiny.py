"""End to end on tiny real models: a full run, a cache hit, invalidation, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import cli, write_spec


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _status(report: dict) -> dict:
    return {s["id"]: s["status"] for s in report["stages"]}


def test_full_run_rerun_and_invalidation(tmp_path, tiny_spec):
    spec = write_spec(tmp_path, tiny_spec)
    cache = tmp_path / "cache"
    r1 = cli("run", str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "r1.json"))
    assert r1.returncode == 0, r1.stderr + r1.stdout
    rep1 = _report(tmp_path / "r1.json")
    assert set(_status(rep1).values()) == {"ran"}
    assert "report:" in r1.stdout
    ev = {s["id"]: s for s in rep1["stages"]}["evaluate"]["metrics"]
    for k in ("win_rate", "reward_mean_policy", "reward_mean_reference", "kl_k1"):
        assert k in ev
    assert 0.0 <= ev["win_rate"] <= 1.0
    rm = {s["id"]: s for s in rep1["stages"]}["reward_model"]["metrics"]
    assert rm["eval_pairs"] == 16 and 0.0 <= rm["eval_accuracy"] <= 1.0

    # unchanged rerun: everything cached, nothing computed
    r2 = cli("run", str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "r2.json"))
    assert r2.returncode == 0, r2.stderr
    rep2 = _report(tmp_path / "r2.json")
    assert set(_status(rep2).values()) == {"cached"}
    assert [s["key"] for s in rep2["stages"]] == [s["key"] for s in rep1["stages"]]

    # change one param of 'filter': filter and everything downstream rerun, upstream stays cached
    r3 = cli("run", str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "r3.json"),
             "--set", "stages.filter.params.drop_duplicates=false")
    assert r3.returncode == 0, r3.stderr
    st = _status(_report(tmp_path / "r3.json"))
    assert st == {"reward_model": "cached", "sample": "cached", "score": "cached", "filter": "ran",
                  "pair": "ran", "rebel": "ran", "evaluate": "ran"}

    # plan --explain names the changed ingredient
    r4 = cli("plan", str(spec), "--cache-dir", str(cache), "--explain", "--json", "--set", "stages.sample.params.temperature=0.5")
    assert r4.returncode == 0, r4.stderr
    rows = {r["id"]: r for r in json.loads(r4.stdout)}
    assert rows["reward_model"]["status"] == "cached"
    assert any("params.temperature" in c for c in rows["sample"]["changes"])
    assert rows["score"]["status"] == "run"


def _wait_for_entry(cache: Path, stage_id: str, proc, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        for man in cache.glob("entries/*/*/manifest.json"):
            try:
                if json.loads(man.read_text())["stage"].get("id") == stage_id:
                    return
            except (OSError, ValueError, KeyError):
                pass
        if proc.poll() is not None:
            raise AssertionError(f"run ended before stage {stage_id} was cached: {proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.05)
    raise AssertionError(f"stage {stage_id} not cached within {timeout}s")


def test_resume_after_sigkill(tmp_path, tiny_spec):
    spec = write_spec(tmp_path, tiny_spec)
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_spec", "run", str(spec), "--cache-dir", str(cache)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_entry(cache, "score", proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    r = cli("run", str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "resumed.json"))
    assert r.returncode == 0, r.stderr
    st = _status(_report(tmp_path / "resumed.json"))
    for done in ("reward_model", "sample", "score"):
        assert st[done] == "cached", st
    # the resumed run's outputs equal an uninterrupted run's, in a separate cache
    r2 = cli("run", str(spec), "--cache-dir", str(tmp_path / "fresh"), "--report", str(tmp_path / "fresh.json"))
    assert r2.returncode == 0, r2.stderr
    a = {s["id"]: s for s in _report(tmp_path / "resumed.json")["stages"]}
    b = {s["id"]: s for s in _report(tmp_path / "fresh.json")["stages"]}
    assert [a[k]["key"] for k in a] == [b[k]["key"] for k in a]
    assert a["evaluate"]["metrics"]["win_rate"] == b["evaluate"]["metrics"]["win_rate"]
    assert a["evaluate"]["metrics"]["reward_mean_policy"] == b["evaluate"]["metrics"]["reward_mean_policy"]
