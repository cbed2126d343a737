"""Killed and interrupted runs resume, reuse the work done before the kill, and end with the same outputs
as a run that was never interrupted.

The kill test runs the tiny pipeline as a real subprocess and watches its cache folder. Every commit
point (a new entry manifest, a new shard line in a journal, a new training checkpoint) is a chance to
SIGKILL it; the test kills at every second one, restarts, and repeats until a run completes. It then
compares the result with an uninterrupted run in another cache folder (started at the same time) and
checks, from the journals, checkpoints and manifests, that nothing committed before a kill was redone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import cli, write_spec
from test_cache_integrity import assert_same_weights, data_rows, mini_spec, stages_of, statuses, weights

RUN = [sys.executable, "-m", "rlhf_spec", "run"]


def _env() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def _keys_by_stage(spec_path: Path, cache: Path) -> dict[str, str]:
    """Stage id -> cache key, from `rlhf-spec plan --json` (computes keys, runs nothing)."""
    r = cli("plan", str(spec_path), "--cache-dir", str(cache), "--json", timeout=120)
    assert r.returncode == 0, r.stderr
    return {row["id"]: row["key"] for row in json.loads(r.stdout)}


@dataclass
class Snapshot:
    """What is committed in a cache folder at one moment."""

    manifests: dict[str, bytes] = field(default_factory=dict)  # key -> manifest bytes
    shards: dict[str, list[int]] = field(default_factory=dict)  # key -> journalled shard ids, in order
    checkpoint: dict[str, int] = field(default_factory=dict)  # key -> update of the latest checkpoint

    def milestones(self) -> set[tuple]:
        out = {("entry", k) for k in self.manifests}
        out |= {("shard", k, s) for k, ids in self.shards.items() for s in ids}
        out |= {("ckpt", k, u) for k, u in self.checkpoint.items()}
        return out


def snapshot(cache: Path) -> Snapshot:
    snap = Snapshot()
    for man in cache.glob("entries/*/*/manifest.json"):
        try:
            snap.manifests[man.parent.name] = man.read_bytes()
        except OSError:
            pass
    for journal in cache.glob("partial/*/journal.jsonl"):
        ids = []
        try:
            text = journal.read_text()
        except OSError:
            continue
        for line in text.splitlines():
            try:
                ids.append(int(json.loads(line)["shard"]))
            except (ValueError, KeyError):
                pass  # a line being written
        snap.shards[journal.parent.name] = ids
    for latest in cache.glob("partial/*/checkpoints/latest.json"):
        try:
            snap.checkpoint[latest.parent.parent.name] = int(json.loads(latest.read_text())["update"])
        except (OSError, ValueError, KeyError):
            pass
    return snap


def kill_test_spec(spec: dict) -> dict:
    """The tiny spec with many commit points: six shards in sample and score, a checkpoint after every update."""
    by_id = {s["id"]: s for s in spec["stages"]}
    by_id["sample"]["params"]["num_shards"] = 6
    by_id["score"]["params"]["num_shards"] = 6
    by_id["reward_model"]["params"]["save_every"] = 1
    by_id["rebel"]["params"]["save_every"] = 1
    return spec


@pytest.mark.slow
def test_sigkill_at_commit_points_then_resume(tmp_path, tiny_spec):
    t_start = time.time()
    spec = write_spec(tmp_path, kill_test_spec(tiny_spec))
    cache, fresh = tmp_path / "cache", tmp_path / "fresh"
    # the uninterrupted run, in its own cache, alongside
    reference = subprocess.Popen([*RUN, str(spec), "--cache-dir", str(fresh), "--report", str(tmp_path / "fresh.json")],
                                 stdout=subprocess.DEVNULL, stderr=open(tmp_path / "fresh.err", "w"), env=_env())
    keys = _keys_by_stage(spec, cache)
    stage_of = {v: k for k, v in keys.items()}

    seen: set[tuple] = set()  # every commit point ever observed
    shard_history: dict[str, list[int]] = {}  # the longest journal observed per key
    ckpt_history: dict[str, list[int]] = {}  # checkpoint updates observed per key, in order
    kills: list[dict] = []
    attempt = 0
    final_report = None
    while True:
        attempt += 1
        assert attempt <= 40, "the run never completed"
        report = tmp_path / f"attempt{attempt}.json"
        log = open(tmp_path / f"attempt{attempt}.log", "w")
        proc = subprocess.Popen([*RUN, str(spec), "--cache-dir", str(cache), "--report", str(report)],
                                stdout=log, stderr=subprocess.STDOUT, env=_env())
        killed = False
        while proc.poll() is None:
            snap = snapshot(cache)
            for k, ids in snap.shards.items():
                before = shard_history.get(k, [])
                # append-only: a journal never loses or repeats a shard while its stage is unfinished
                assert ids[: len(before)] == before or k in snap.manifests, (stage_of.get(k), before, ids)
                assert len(set(ids)) == len(ids), f"a shard of {stage_of.get(k)} was computed twice: {ids}"
                if len(ids) > len(before):
                    shard_history[k] = ids
            for k, u in snap.checkpoint.items():
                hist = ckpt_history.setdefault(k, [])
                if not hist or hist[-1] != u:
                    assert not hist or u > hist[-1], f"{stage_of.get(k)} went back from update {hist[-1]} to {u}"
                    hist.append(u)
            new = snap.milestones() - seen
            if new:
                before_count = len(seen)
                seen |= new
                # kill at every second commit point (a batch of several counts as reaching it)
                if len(seen) // 2 > before_count // 2:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed = True
                    kills.append({"attempt": attempt, "at": sorted(new, key=str)[-1], "done": len(seen), "snapshot": snapshot(cache)})
                    break
            time.sleep(0.02)
        log.close()
        if not killed:
            out = (tmp_path / f"attempt{attempt}.log").read_text()
            assert proc.returncode == 0, out[-4000:]
            final_report = json.loads(report.read_text())
            break

    assert reference.wait(timeout=600) == 0, (tmp_path / "fresh.err").read_text()[-4000:]
    ref = json.loads((tmp_path / "fresh.json").read_text())
    got = stages_of(final_report)
    want = stages_of(ref)
    total = len(seen)

    # --- kills spread over the whole pipeline
    assert len(kills) >= 10, f"only {len(kills)} kills"
    kinds = {k["at"][0] for k in kills}
    assert {"entry", "shard", "ckpt"} <= kinds, kinds
    killed_in = {stage_of.get(k["at"][1], "memo") for k in kills}
    assert {"reward_model", "sample", "score", "rebel"} <= killed_in, killed_in

    # --- nothing committed before a kill was redone
    end = snapshot(cache)
    for k in kills:
        for key, man in k["snapshot"].manifests.items():
            assert end.manifests.get(key) == man, f"entry of {stage_of.get(key, 'memo')} was recomputed after a kill"
    for sid in ("sample", "score"):
        m = json.loads(end.manifests[keys[sid]])["metrics"]
        done_before = [len(k["snapshot"].shards.get(keys[sid], [])) for k in kills if keys[sid] not in k["snapshot"].manifests]
        assert m["shards_reused"] == (done_before[-1] if done_before else 0), (sid, m, done_before)
        assert m["shards_reused"] + m["shards_computed"] == len(shard_history[keys[sid]])
    for sid in ("reward_model", "rebel"):
        m = json.loads(end.manifests[keys[sid]])["metrics"]
        at_kill = [k["snapshot"].checkpoint.get(keys[sid]) for k in kills if keys[sid] not in k["snapshot"].manifests]
        at_kill = [u for u in at_kill if u is not None]
        assert m.get("resumed_from_update") == (at_kill[-1] if at_kill else None), (sid, m, at_kill)
        hist = ckpt_history[keys[sid]]  # strictly increasing, checked while polling
        assert hist[0] == 1 and hist[-1] == m["updates"] - 1, hist
    assert any(json.loads(end.manifests[keys[s]])["metrics"].get("resumed_from_update") for s in ("reward_model", "rebel"))
    # the run that finished found the earlier stages cached
    assert statuses(final_report)["reward_model"] == "cached"

    # --- the same result as the uninterrupted run
    assert [got[s]["key"] for s in got] == [want[s]["key"] for s in want]
    for metric in ("win_rate", "reward_mean_policy", "reward_mean_reference", "kl_k1", "kl_k3"):
        assert got["evaluate"]["metrics"][metric] == want["evaluate"]["metrics"][metric], metric
    for sid in ("sample", "score", "filter", "pair"):
        assert data_rows(cache, keys[sid]) == data_rows(fresh, keys[sid]), sid
    for sid in ("reward_model", "rebel"):
        assert_same_weights(weights(cache, keys[sid]), weights(fresh, keys[sid]), atol=1e-6)
        for m in ("train_loss_last10", "eval_loss"):
            assert json.loads(end.manifests[keys[sid]])["metrics"][m] == want[sid]["metrics"][m], (sid, m)

    # --- the cache is sound, and gc clears what the killed processes left behind
    v = cli("cache", "verify", "--cache-dir", str(cache))
    assert v.returncode == 0, v.stdout
    g = cli("cache", "gc", "--keep-last", "1", "--cache-dir", str(cache))
    assert g.returncode == 0, g.stderr
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    assert not list((cache / "locks").glob("*.lease"))  # leases of killed processes
    assert not (cache / "partial").exists() or not any((cache / "partial").iterdir())
    assert set(keys.values()) <= {p.name for p in cache.glob("entries/*/*")}

    shares = ", ".join(f"{100 * k['done'] / total:.0f}%" for k in kills)
    print(f"\nkill test: {len(kills)} kills survived over {attempt} attempts in {time.time() - t_start:.0f} s; "
          f"{total} commit points; work already committed and reused after each kill (share of the whole run): {shares}; "
          "nothing committed was recomputed")


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, tiny_models, hh_file):
    spec_dict = mini_spec(tiny_models, hh_file)
    spec_dict["stages"][0]["params"].update(num_shards=6, max_new_tokens=16)
    spec = write_spec(tmp_path, spec_dict)
    cache = tmp_path / "cache"
    keys = _keys_by_stage(spec, cache)
    journal = cache / "partial" / keys["sample"] / "journal.jsonl"
    proc = subprocess.Popen([*RUN, str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "r1.json")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    t0 = time.time()
    while not (journal.exists() and journal.read_text().count("\n") >= 1):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 240
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    assert "interrupted" in err and "Traceback" not in err + out, err
    rep = json.loads((tmp_path / "r1.json").read_text())
    assert rep["status"] == "interrupted" and statuses(rep)["sample"] == "interrupted"
    done = journal.read_text().count("\n")
    assert 1 <= done < 6
    # a clean stop: no lease held, no half-written output, every entry valid
    assert not list((cache / "locks").glob("*.lease"))
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    assert cli("cache", "verify", "--cache-dir", str(cache)).returncode == 0
    # resumable: the rerun keeps the committed shards and completes
    r = cli("run", str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "r2.json"))
    assert r.returncode == 0, r.stderr
    rep2 = json.loads((tmp_path / "r2.json").read_text())
    sample = stages_of(rep2)["sample"]
    assert sample["status"] == "ran" and sample["metrics"]["shards_reused"] == done, sample["metrics"]
    assert set(statuses(rep2).values()) == {"ran"}
