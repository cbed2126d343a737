"""Killed and interrupted runs resume, reuse the work done before the kill, and end with the same outputs
as a run that was never interrupted.

The kill points are deterministic, not timed: ``RLHF_SPEC_KILL_AT_COMMIT=2`` makes the run kill itself
with SIGKILL right after its second commit point (a cache entry, a sample or score shard, a training
checkpoint), and ``RLHF_SPEC_COMMIT_LOG`` records every commit point with its process. The test restarts
the run until one completes, so every second commit point of the whole pipeline is a kill. Every verdict
reads what the runs wrote: the commit logs, shard journals, checkpoints and manifests.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from conftest import (assert_same_weights, cli, data_rows, entry_dirs, manifests, mini_spec, plan_keys, stage_of,
                      stages_of, statuses, weights, write_spec)
from rlhf_spec.testing import run_spec


def _default_sigint() -> None:
    """Give the child Ctrl-C's default disposition. A job started in the background by a non-interactive
    shell (``make test &``, nohup) inherits SIGINT ignored, and Python then never installs its
    KeyboardInterrupt handler, so the run would not see the SIGINT it sends itself."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _commits(log: Path) -> list[tuple[str, str]]:
    """(kind, detail) of every commit point in a commit log, in order."""
    out = []
    for line in log.read_text().splitlines() if log.exists() else []:
        _pid, _n, kind, detail = (line.split(" ", 3) + [""])[:4]
        out.append((kind, detail))
    return out


def kill_test_spec(spec: dict) -> dict:
    """The tiny spec with many commit points: six shards in sample and score, a checkpoint after every update."""
    stage_of(spec, "sample")["params"]["num_shards"] = 6
    stage_of(spec, "score")["params"]["num_shards"] = 6
    stage_of(spec, "reward_model")["params"]["save_every"] = 1
    stage_of(spec, "rebel")["params"]["save_every"] = 1
    return spec


@pytest.mark.slow
def test_sigkill_at_every_second_commit_point_then_resume(tmp_path, tiny_spec):
    t_start = time.time()
    spec = kill_test_spec(tiny_spec)
    ref, fresh_report = run_spec(spec, tmp_path / "fresh", env={"RLHF_SPEC_COMMIT_LOG": str(tmp_path / "fresh.log")})
    assert ref.returncode == 0, ref.stderr[-4000:]
    total = len(_commits(tmp_path / "fresh.log"))
    cache, fresh = tmp_path / "killed" / "cache", tmp_path / "fresh" / "cache"
    keys = plan_keys(write_spec(tmp_path, spec), cache, timeout=120)
    stage_by_prefix = {v[:12]: k for k, v in keys.items()}

    attempts: list[list[tuple[str, str]]] = []
    final = None
    while final is None:
        assert len(attempts) < 40, "the run never completed"
        log = tmp_path / f"attempt{len(attempts) + 1}.log"
        r, report = run_spec(spec, tmp_path / "killed",
                             env={"RLHF_SPEC_KILL_AT_COMMIT": "2", "RLHF_SPEC_COMMIT_LOG": str(log)})
        attempts.append(_commits(log))
        if r.returncode == -9:
            assert len(attempts[-1]) == 2, attempts[-1]  # killed right after its second commit point, never sooner
            continue
        assert r.returncode == 0 and report is not None, r.stderr[-4000:]
        final = report
    kills = len(attempts) - 1
    done = [c for a in attempts for c in a]

    # --- every commit point of the pipeline was made exactly once: nothing committed before a kill was redone
    assert len(done) == len(set(done)) == total, (len(done), len(set(done)), total)
    assert kills == (total - 1) // 2, (kills, total)
    killed_at = {c[0] for a in attempts[:-1] for c in a[-1:]}
    assert {"entry", "shard", "checkpoint"} <= killed_at, killed_at
    killed_in = {stage_by_prefix.get(a[-1][1].split(":")[0][:12], "memo") for a in attempts[:-1]}
    assert {"reward_model", "sample", "score", "rebel"} <= killed_in, killed_in

    # --- the manifests say the same: shards reused, training resumed from the last checkpoint before the kill
    end = stages_of(final)
    assert kills >= 10, f"only {kills} kills"
    written = manifests(cache)
    for sid in ("sample", "score"):
        m = written[keys[sid]]["metrics"]
        i = _attempt_of(attempts, ("entry", keys[sid][:12]))
        shards = [[c for c in a if c[0] == "shard" and c[1].startswith(keys[sid][:12])] for a in attempts]
        assert m["shards_computed"] == len(shards[i]) and m["shards_reused"] == sum(len(x) for x in shards[:i]), (sid, m)
        assert sum(len(x) for x in shards[i + 1:]) == 0 and m["shards_computed"] + m["shards_reused"] >= 3
    for sid in ("reward_model", "rebel"):
        m = written[keys[sid]]["metrics"]
        i = _attempt_of(attempts, ("entry", keys[sid][:12]))
        before = [int(c[1].split(":")[1]) for a in attempts[:i] for c in a if c[0] == "checkpoint" and c[1].startswith(keys[sid][:12])]
        assert m.get("resumed_from_update") == (max(before) if before else None), (sid, m.get("resumed_from_update"), before)
        ckpts = [int(c[1].split(":")[1]) for c in done if c[0] == "checkpoint" and c[1].startswith(keys[sid][:12])]
        assert ckpts == list(range(1, m["updates"])), (sid, ckpts)  # one checkpoint per update, none repeated
    assert any(written[keys[s]]["metrics"].get("resumed_from_update") for s in ("reward_model", "rebel"))

    # --- the same result as the uninterrupted run
    want = stages_of(fresh_report)
    assert [end[s]["key"] for s in end] == [want[s]["key"] for s in end]
    for metric in ("win_rate", "reward_mean_policy", "reward_mean_reference", "kl_k1", "kl_k3"):
        assert written[keys["evaluate"]]["metrics"][metric] == want["evaluate"]["metrics"][metric], metric
    for sid in ("sample", "score", "filter", "pair"):
        assert data_rows(cache, keys[sid]) == data_rows(fresh, keys[sid]), sid
    for sid in ("reward_model", "rebel"):
        assert_same_weights(weights(cache, keys[sid]), weights(fresh, keys[sid]), atol=1e-6)
        for m in ("train_loss_last10", "eval_loss"):
            assert written[keys[sid]]["metrics"][m] == want[sid]["metrics"][m], (sid, m)

    # --- the cache is sound, and gc clears what the killed processes left behind
    v = cli("cache", "verify", "--cache-dir", str(cache))
    assert v.returncode == 0, v.stdout
    assert cli("cache", "gc", "--keep-last", "1", "--cache-dir", str(cache)).returncode == 0
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    assert not list((cache / "locks").glob("*.lease"))  # leases of killed processes
    assert not (cache / "partial").exists() or not any((cache / "partial").iterdir())
    assert set(keys.values()) <= {p.name for p in entry_dirs(cache)}
    shares = ", ".join(f"{100 * 2 * (i + 1) / total:.0f}%" for i in range(kills))
    print(f"\nkill test: {kills} SIGKILLs over {len(attempts)} attempts in {time.time() - t_start:.0f} s; {total} commit "
          f"points; committed and reused after each kill (share of the whole run): {shares}; nothing recomputed")


def _attempt_of(attempts: list, commit: tuple) -> int:
    return next(i for i, a in enumerate(attempts) if commit in a)


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_resumes(tmp_path, tiny_models, hh_file):
    """SIGINT right after the first sample shard is committed (deterministic: the run signals itself there)."""
    spec_dict = mini_spec(tiny_models, hh_file)
    spec_dict["stages"][0]["params"].update(num_shards=6, max_new_tokens=16)
    spec = write_spec(tmp_path, spec_dict)
    cache = tmp_path / "cache"
    keys = plan_keys(spec, cache, timeout=120)
    r = cli("run", str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "r1.json"),
            env={"RLHF_SPEC_KILL_AT_COMMIT": "1:INT"}, preexec_fn=_default_sigint)
    assert r.returncode == 130, r.stdout + r.stderr
    assert "interrupted" in r.stderr and "Traceback" not in r.stderr + r.stdout, r.stderr
    rep = json.loads((tmp_path / "r1.json").read_text())
    assert rep["status"] == "interrupted" and statuses(rep) == {"sample": "interrupted"}
    journal = cache / "partial" / keys["sample"] / "journal.jsonl"
    assert journal.read_text().count("\n") == 1
    # a clean stop: no lease held, no half-written output, every entry valid
    assert not list((cache / "locks").glob("*.lease"))
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    assert cli("cache", "verify", "--cache-dir", str(cache)).returncode == 0
    # resumable: the rerun keeps the committed shard and completes
    r = cli("run", str(spec), "--cache-dir", str(cache), "--report", str(tmp_path / "r2.json"),
            preexec_fn=_default_sigint)
    assert r.returncode == 0, r.stderr
    rep2 = json.loads((tmp_path / "r2.json").read_text())
    assert stages_of(rep2)["sample"]["metrics"]["shards_reused"] == 1
    assert set(statuses(rep2).values()) == {"ran"}
