"""The cache under stress: verified reads, ``cache ls/verify/gc``, two runs on one cache, stale leases,
``plan --explain``, and faults while running (a diverging loss, a plugin that raises, a full disk, no memory).

Most runs happen in-process through ``rlhf_spec.cli.main`` on a small real pipeline (``mini_spec``: sample,
score, pair, REBEL on the tiny random models and real hh-rlhf prompts), computed once per module and copied
into each test's own cache folder. Two concurrent runs and plugin failures use real subprocesses.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import (RAISING_PLUGIN, assert_same_weights, cli, data_rows, entry_dir, entry_dirs, make_plugin_dist,
                      mini_spec, rows_spec, run_inprocess, stage_keys, stages_of, statuses, weights, write_spec)
from rlhf_spec.cache import Cache, Lease
from rlhf_spec.cli import main


def verify_exit(cache: Path) -> int:
    return main(["cache", "verify", "--cache-dir", str(cache)])


@dataclass
class MiniRun:
    spec: dict
    spec_path: Path
    cache: Path
    report: dict


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, tiny_models, hh_file) -> MiniRun:
    """The mini pipeline computed once, in a module-wide cache that tests copy and never change."""
    d = tmp_path_factory.mktemp("mini")
    spec = mini_spec(tiny_models, hh_file)
    path = write_spec(d, spec)
    code, rep = run_inprocess(path, d / "cache", d / "report.json")
    assert code == 0, rep
    assert set(statuses(rep).values()) == {"ran"}
    return MiniRun(spec, path, d / "cache", rep)


@pytest.fixture
def own_cache(mini_run, tmp_path) -> Path:
    """A private copy of the mini run's cache."""
    dst = tmp_path / "cache"
    shutil.copytree(mini_run.cache, dst, symlinks=True)
    return dst


# ----------------------------------------------------------------------------- verified reads


def _flip_byte(entry: Path, pattern: str) -> str:
    f = sorted(entry.glob(pattern))[0]
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return f.relative_to(entry).as_posix()


def _truncate(entry: Path, pattern: str) -> str:
    f = sorted(entry.glob(pattern))[0]
    f.write_bytes(f.read_bytes()[:-7])
    return f.relative_to(entry).as_posix()


def _delete(entry: Path, pattern: str) -> str:
    f = sorted(entry.glob(pattern))[0]
    f.unlink()
    return f.relative_to(entry).as_posix()


def _garble_manifest(entry: Path, pattern: str) -> str:
    (entry / "manifest.json").write_text('{"files": [')
    return "manifest.json"


CORRUPTIONS = [
    ("sample", "data/*.arrow", _flip_byte, "sha256 mismatch"),
    ("score", "data/*.arrow", _truncate, "size"),
    ("rebel", "model/*.safetensors", _delete, "missing"),
    ("pair", "", _garble_manifest, "manifest missing or unreadable"),
]


@pytest.mark.parametrize("stage,pattern,damage,reason", CORRUPTIONS, ids=[f"{c[0]}-{c[2].__name__.strip('_')}" for c in CORRUPTIONS])
def test_corrupt_entry_is_set_aside_and_recomputed(mini_run, own_cache, tmp_path, stage, pattern, damage, reason):
    before = stages_of(mini_run.report)
    key = before[stage]["key"]
    entry = entry_dir(own_cache, key)
    rows_before = {s: data_rows(own_cache, before[s]["key"]) for s in ("sample", "score", "pair")}
    rebel_before = weights(own_cache, before["rebel"]["key"])
    damaged = damage(entry, pattern)

    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r.json")
    assert code == 0, rep.get("error")
    # reported in the run report's warnings, naming the entry and what was wrong
    assert len(rep["warnings"]) == 1, rep["warnings"]
    assert key[:12] in rep["warnings"][0] and reason in rep["warnings"][0], rep["warnings"]
    # set aside into trash/ (not deleted), with the damaged file inside
    aside = list((own_cache / "trash").glob(f"{key}.*"))
    assert len(aside) == 1
    if damaged != "manifest.json" and damage is not _delete:
        assert (aside[0] / damaged).is_file()
    # only the damaged stage was recomputed; the rest came from the cache
    st = statuses(rep)
    assert st[stage] == "ran" and all(v == "cached" for k, v in st.items() if k != stage), st
    # the final outputs are unchanged
    after = stages_of(rep)
    assert [after[s]["key"] for s in after] == [before[s]["key"] for s in before]
    for s, rows in rows_before.items():
        assert data_rows(own_cache, after[s]["key"]) == rows, s
    assert_same_weights(weights(own_cache, after["rebel"]["key"]), rebel_before)
    assert verify_exit(own_cache) == 0


def test_every_stored_file_is_in_the_manifest(mini_run):
    """Each entry lists every file it holds, with size and sha256, and the manifest is the last word."""
    from rlhf_spec.files import sha256_file

    cache = Cache(mini_run.cache)
    n = 0
    for key, man in cache.entries():
        d = cache.entry_dir(key)
        on_disk = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file() and p.name != "manifest.json")
        assert sorted(f["path"] for f in man["files"]) == on_disk
        for f in man["files"]:
            assert sha256_file(d / f["path"]) == f["sha256"] and (d / f["path"]).stat().st_size == f["size"]
        assert man["key"] == key and "preimage" in man
        n += 1
    assert n == 5  # four stages and the shared reference-logprobs entry


def test_cache_verify_scans_everything_and_exits_1_on_corruption(mini_run, own_cache, tmp_path, capsys):
    keys = stage_keys(mini_run.report)
    assert verify_exit(own_cache) == 0
    capsys.readouterr()
    _flip_byte(entry_dir(own_cache, keys["score"]), "data/*.arrow")
    _truncate(entry_dir(own_cache, keys["rebel"]), "model/config.json")
    assert verify_exit(own_cache) == 1
    out = capsys.readouterr().out
    assert "2 corrupt" in out and keys["score"][:12] in out and keys["rebel"][:12] in out
    assert len(list((own_cache / "trash").iterdir())) == 2
    # the bad entries are gone from entries/, so the next scan is clean
    assert verify_exit(own_cache) == 0
    # and the next run recomputes exactly those two, to the same result
    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r.json")
    assert code == 0
    assert statuses(rep) == {"sample": "cached", "score": "ran", "pair": "cached", "rebel": "ran"}
    assert_same_weights(weights(own_cache, keys["rebel"]), weights(mini_run.cache, keys["rebel"]))


# ----------------------------------------------------------------------------- ls and gc


def _ls(cache: Path, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["cache", "ls", "--json", "--cache-dir", str(cache)]) == 0
    return json.loads(capsys.readouterr().out)


def _run_records(cache: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((cache / "runs").glob("*.json"))]


def test_cache_ls_and_gc_keep_last(mini_run, own_cache, tmp_path, capsys):
    listed = _ls(own_cache, capsys)
    assert sorted(r["stage"] for r in listed) == ["pair", "rebel", "rebel", "sample", "score"]  # rebel's memo entry too
    assert main(["cache", "ls", "--cache-dir", str(own_cache)]) == 0
    table = capsys.readouterr().out
    assert "5 entries" in table and all(r["key"][:12] in table for r in listed)
    first = {r["key"] for r in listed}

    # a second run with a different score param: score, pair, rebel (and its memo) get new keys
    code, rep2 = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r2.json", "--set", "stages.score.params.reward.params.max_length=48")
    assert code == 0
    assert statuses(rep2) == {"sample": "cached", "score": "ran", "pair": "ran", "rebel": "ran"}
    last_run_keys = set(_run_records(own_cache)[-1]["keys"])
    assert {s["key"] for s in rep2["stages"]} <= last_run_keys
    all_keys = {r["key"] for r in _ls(own_cache, capsys)}
    assert last_run_keys <= all_keys and len(all_keys) == 9
    only_first = first - last_run_keys
    assert len(only_first) == 4  # score, pair, rebel, memo of the first run; sample is shared

    # --dry-run reports but removes nothing
    capsys.readouterr()
    assert main(["cache", "gc", "--keep-last", "1", "--dry-run", "--cache-dir", str(own_cache)]) == 0
    out = capsys.readouterr().out
    assert all(f"would remove {k}" in out for k in only_first)
    assert {r["key"] for r in _ls(own_cache, capsys)} == all_keys
    assert len(_run_records(own_cache)) == 2

    # --older-than spares everything younger than the age
    assert main(["cache", "gc", "--keep-last", "1", "--older-than", "7d", "--cache-dir", str(own_cache)]) == 0
    assert {r["key"] for r in _ls(own_cache, capsys)} == all_keys

    # keep the last run: every key it used stays (and verifies), the first run's own keys go
    assert main(["cache", "gc", "--keep-last", "1", "--cache-dir", str(own_cache)]) == 0
    remaining = {r["key"] for r in _ls(own_cache, capsys)}
    assert remaining == last_run_keys
    assert len(_run_records(own_cache)) == 1
    assert verify_exit(own_cache) == 0

    # the kept run still has all it needs: rerunning it computes nothing
    code, rep3 = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r3.json", "--set", "stages.score.params.reward.params.max_length=48")
    assert code == 0 and set(statuses(rep3).values()) == {"cached"}


def test_gc_keeps_what_a_failed_run_needs_to_resume(mini_run, own_cache, tmp_path, capsys):
    """A run that fails early still needs the entries of its later stages: gc keeping only that run keeps them."""
    keys = stage_keys(mini_run.report)
    shutil.rmtree(entry_dir(own_cache, keys["score"]))
    shutil.rmtree(own_cache / "tmp", ignore_errors=True)
    (own_cache / "tmp").write_text("a file where the cache's tmp/ folder should be")  # every new write fails
    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "bad.json")
    err = capsys.readouterr().err
    assert code == 1 and rep["status"] == "failed" and "cannot write" in err, err
    assert statuses(rep) == {"sample": "cached"}
    (own_cache / "tmp").unlink()
    assert set(keys.values()) - {keys["score"]} <= set(_run_records(own_cache)[-1]["keys"])
    assert main(["cache", "gc", "--keep-last", "1", "--cache-dir", str(own_cache)]) == 0
    remaining = {r["key"] for r in _ls(own_cache, capsys)}
    assert {keys["sample"], keys["pair"], keys["rebel"]} <= remaining
    # so the resumed run only recomputes the stage that failed
    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "ok.json")
    assert code == 0 and statuses(rep) == {"sample": "cached", "score": "ran", "pair": "cached", "rebel": "cached"}


def test_cache_verify_sees_an_entry_with_a_damaged_manifest(mini_run, own_cache, capsys):
    key = stages_of(mini_run.report)["pair"]["key"]
    (entry_dir(own_cache, key) / "manifest.json").write_text("{")
    assert verify_exit(own_cache) == 1
    assert key[:12] in capsys.readouterr().out
    assert not entry_dir(own_cache, key).exists() and list((own_cache / "trash").glob(f"{key}.*"))


# ----------------------------------------------------------------------------- plan --explain


def _explain(spec: Path, cache: Path, capsys, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["plan", str(spec), "--cache-dir", str(cache), "--explain", "--json", *extra]) == 0
    return {r["id"]: r for r in json.loads(capsys.readouterr().out)}


def test_plan_explain_names_the_changed_ingredient(mini_run, own_cache, tmp_path, tiny_models, hh_file, capsys):
    spec = mini_run.spec_path
    plan = _explain(spec, own_cache, capsys)
    assert {r["status"] for r in plan.values()} == {"cached"}

    # a param, through --set
    plan = _explain(spec, own_cache, capsys, "--set", "stages.sample.params.temperature=0.5")
    assert plan["sample"]["status"] == "run"
    assert any(c.startswith("params.temperature: 0.8 -> 0.5") for c in plan["sample"]["changes"]), plan["sample"]
    # an input: the downstream stages name the upstream stage that changed, not a param
    assert plan["score"]["changes"] == ["inputs[0]: upstream stage 'sample' changed"]
    assert plan["pair"]["changes"] == ["inputs[0]: upstream stage 'score' changed"]

    # model identity: a copy of the policy with the same bytes changes nothing; a changed file does
    policy = tmp_path / "policy-copy"
    shutil.copytree(tiny_models["policy"], policy)
    plan = _explain(spec, own_cache, capsys, "--set", f"models.policy.path={policy}")
    assert {r["status"] for r in plan.values()} == {"cached"}
    cfg = json.loads((policy / "generation_config.json").read_text())
    cfg["note"] = "edited"
    (policy / "generation_config.json").write_text(json.dumps(cfg))
    plan = _explain(spec, own_cache, capsys, "--set", f"models.policy.path={policy}")
    for sid in ("sample", "rebel"):
        assert plan[sid]["status"] == "run"
        assert any(c.startswith("models.policy.content_sha256") for c in plan[sid]["changes"]), plan[sid]
    assert plan["score"]["changes"] == ["inputs[0]: upstream stage 'sample' changed"]

    # dataset identity: an identical copy elsewhere is the same data; a changed copy is not
    same = tmp_path / "same.jsonl.gz"
    shutil.copy(hh_file, same)
    plan = _explain(spec, own_cache, capsys, "--set", f"datasets.prompts.path={same}")
    assert {r["status"] for r in plan.values()} == {"cached"}
    changed = tmp_path / "changed.jsonl.gz"
    with gzip.open(hh_file, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    with gzip.open(changed, "wt", encoding="utf-8") as f:
        f.writelines(lines[1:])
    plan = _explain(spec, own_cache, capsys, "--set", f"datasets.prompts.path={changed}")
    assert any(c.startswith("datasets.prompts.content_sha256") for c in plan["sample"]["changes"]), plan["sample"]
    assert plan["rebel"]["changes"] == ["inputs[0]: upstream stage 'pair' changed"]

    # the human-readable plan prints the same reasons
    capsys.readouterr()
    assert main(["plan", str(spec), "--cache-dir", str(own_cache), "--explain", "--set", "stages.pair.params.test_size=2"]) == 0
    out = capsys.readouterr().out
    assert "pair: params.test_size: 1 -> 2" in out and "rebel: inputs[0]: upstream stage 'pair' changed" in out


def test_plan_explain_names_an_implementation_version_change(mini_run, own_cache, capsys):
    """Bumping an implementation's version (what a plugin does when its output changes meaning) reruns it."""
    from rlhf_spec.plugins import load_registry, set_registry

    reg = load_registry()
    impl = reg.stages[("pair", "best-worst")]
    reg.stages[("pair", "best-worst")] = dataclasses.replace(impl, version=impl.version + ".1")
    set_registry(reg)
    try:
        plan = _explain(mini_run.spec_path, own_cache, capsys)
    finally:
        set_registry(None)
    assert plan["score"]["status"] == "cached"
    assert plan["pair"]["changes"] == [f'impl_version: "{impl.version}" -> "{impl.version}.1"']
    assert plan["rebel"]["changes"] == ["inputs[0]: upstream stage 'pair' changed"]


# ----------------------------------------------------------------------------- concurrency and leases


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_lease_of_a_dead_process_is_broken(tmp_path):
    path = tmp_path / "locks" / "k.lease"
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "token": "old", "since": "x"}))
    lease = Lease(path)
    assert lease.stale()
    assert lease.try_acquire()
    assert json.loads(path.read_text())["pid"] == os.getpid()
    lease.release()
    assert not path.exists()


def test_live_lease_is_respected_until_its_heartbeat_stops(tmp_path):
    path = tmp_path / "k.lease"
    holder = Lease(path, heartbeat=3600)
    assert holder.try_acquire()
    other = Lease(path, ttl=30)
    assert not other.stale() and not other.try_acquire()
    # a holder on another machine whose heartbeat stopped long ago is presumed dead
    info = json.loads(path.read_text())
    info["host"] = "some-other-host"
    path.write_text(json.dumps(info))
    old = time.time() - 120
    os.utime(path, (old, old))
    assert other.stale() and other.try_acquire()
    holder.release()  # not ours any more: must not delete the new holder's lease
    assert path.exists() and json.loads(path.read_text())["token"] == other.token
    other.release()
    assert not path.exists()


def test_breaking_a_stale_lease_never_steals_a_fresh_one(tmp_path):
    """Two waiters that both judged the old lease stale: the second must not remove the first one's new lease."""
    path = tmp_path / "k.lease"
    path.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "token": "old", "since": "x"}))
    first, second = Lease(path), Lease(path)
    stale, judged = second._judge()  # second looks at the old lease, then is slow
    assert stale and judged["token"] == "old"
    assert first.try_acquire()  # first breaks the stale lease and takes a new one
    # second now acts on its outdated judgement: it must put first's lease back
    assert not second._break_stale(judged)
    assert path.exists() and json.loads(path.read_text())["token"] == first.token
    assert not second.try_acquire()
    first.release()


def test_run_breaks_a_stale_lease_by_itself(mini_run, own_cache, tmp_path, capsys):
    """A lease left by a killed run (dead pid) on the stage to compute is recovered without waiting for its TTL."""
    keys = stage_keys(mini_run.report)
    shutil.rmtree(entry_dir(own_cache, keys["pair"]))
    lock = own_cache / "locks" / f"{keys['pair']}.lease"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "token": "dead", "since": "x"}))
    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r.json")
    assert code == 0 and statuses(rep)["pair"] == "ran"
    # the runner says when it waits for another run's lease; it broke this one at once instead
    assert "is computing it; waiting" not in capsys.readouterr().out
    assert not lock.exists()


@pytest.mark.slow
def test_two_runs_on_one_cache(tmp_path, tiny_spec):
    """Two `rlhf-spec run` of the tiny spec at once on one cache: both succeed with equal results, no stage is
    computed twice, and the cache verifies."""
    spec = write_spec(tmp_path, tiny_spec)
    cache = tmp_path / "cache"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    procs = [
        subprocess.Popen([sys.executable, "-m", "rlhf_spec", "run", str(spec), "--cache-dir", str(cache), "--report",
                          str(tmp_path / f"r{i}.json")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    reps = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    a, b = stages_of(reps[0]), stages_of(reps[1])
    assert [a[s]["key"] for s in a] == [b[s]["key"] for s in b]
    for sid in a:
        # each stage was computed by exactly one of the two; the other waited and reused it (or found it cached)
        assert sorted([a[sid]["status"], b[sid]["status"]]) in (["cached", "ran"], ["ran", "reused"]), (sid, a[sid]["status"], b[sid]["status"])
        assert a[sid]["metrics"] == b[sid]["metrics"], sid
    assert a["evaluate"]["metrics"]["win_rate"] == b["evaluate"]["metrics"]["win_rate"]
    r = cli("cache", "verify", "--cache-dir", str(cache))
    assert r.returncode == 0, r.stdout + r.stderr
    assert not list((cache / "locks").glob("*.lease"))
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    # seven stages, the reference-logprobs entry and both policies' evaluation answers
    assert len(entry_dirs(cache)) == 10


# ----------------------------------------------------------------------------- faults while running


def test_diverging_loss_names_the_update(mini_run, own_cache, tmp_path, capsys):
    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r.json", "--set", "stages.rebel.params.eta=1e30")
    err = capsys.readouterr().err
    assert code == 1
    assert "stage 'rebel'" in err and "at update 1" in err and "lower params.learning_rate" in err, err
    assert "Traceback" not in err
    assert statuses(rep)["rebel"] == "failed"
    assert verify_exit(own_cache) == 0
    # nothing of the failed stage was committed, and the earlier entries were reused
    assert {s: v for s, v in statuses(rep).items() if s != "rebel"} == {"sample": "cached", "score": "cached", "pair": "cached"}


def test_max_kl_stops_training_and_keeps_the_cache(mini_run, own_cache, tmp_path, capsys):
    """The KL guard: an update whose KL to the reference exceeds max_kl stops the stage with the update and the
    value; nothing of it is committed, and max_kl is not part of the key (it never changes a finished model)."""
    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r.json", "--set", "stages.rebel.params.learning_rate=0.5",
                              "--set", "stages.rebel.params.max_kl=1e-9")
    err = capsys.readouterr().err
    assert code == 1 and "stage 'rebel'" in err and "at update 2, above max_kl 1e-09" in err and "Traceback" not in err, err
    assert statuses(rep)["rebel"] == "failed" and verify_exit(own_cache) == 0
    code, rep = run_inprocess(mini_run.spec_path, own_cache, tmp_path / "r2.json", "--set", "stages.rebel.params.max_kl=1e9")
    assert code == 0 and statuses(rep)["rebel"] == "cached"  # the entry computed without the guard is the same key


def test_plugin_that_raises_is_named_with_its_distribution(tmp_path):
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-explode-test", "0.4.2", "explode_plugin", RAISING_PLUGIN)
    spec = write_spec(tmp_path, rows_spec("boom", rows=4, explode=True))
    cache = tmp_path / "cache"
    r = cli("run", str(spec), "--cache-dir", str(cache), env={"PYTHONPATH": str(site)}, timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "stage 'bad' (filter/explode from rlhf-spec-explode-test 0.4.2) failed: RuntimeError: the plugin's own bug" in r.stderr
    assert "Traceback" not in r.stderr
    # the stage before it is cached and valid, and the failed one left nothing behind
    v = cli("cache", "verify", "--cache-dir", str(cache))
    assert v.returncode == 0 and "1 ok" in v.stdout, v.stdout
    assert not (cache / "tmp").exists() or not any((cache / "tmp").iterdir())
    assert not list((cache / "locks").glob("*.lease"))


def _stage(tiny_spec, sid: str):
    from rlhf_spec.plugins import registry
    from rlhf_spec.spec import validate

    return validate(tiny_spec, registry()).stage(sid)


def test_out_of_disk_space_message_has_a_hint(tiny_spec):
    from rlhf_spec.cache import oserror_text as _oserror_text
    from rlhf_spec.runner import stage_error as _stage_error

    exc = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/some/cache/tmp/x.arrow")
    msg = str(_stage_error(_stage(tiny_spec, "sample"), exc))
    assert msg.startswith("stage 'sample' (sample/generate from rlhf-spec")
    assert "out of disk space" in msg and "--cache-dir" in msg and "intact" in msg
    # the cache's own writes say the same when the disk fills while committing
    assert "out of disk space" in _oserror_text(exc, Path("entries/ab/abc")) and "--cache-dir" in _oserror_text(exc, Path("x"))
    other = str(_stage_error(_stage(tiny_spec, "sample"), OSError(errno.EACCES, "Permission denied")))
    assert "out of disk space" not in other and "Permission denied" in other


def test_out_of_memory_message_has_a_hint(tiny_spec):
    import torch

    from rlhf_spec.runner import stage_error as _stage_error

    msg = str(_stage_error(_stage(tiny_spec, "sample"), MemoryError()))
    assert "stage 'sample'" in msg and "ran out of memory" in msg
    assert "params.backend.params.batch_size" in msg and "params.max_new_tokens" in msg and "/stages/1/params" in msg
    msg = str(_stage_error(_stage(tiny_spec, "rebel"), torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert "ran out of memory" in msg and "params.per_device_train_batch_size" in msg and "/stages/5/params" in msg


def test_a_write_error_during_commit_fails_loudly_and_leaves_no_entry(tmp_path):
    """A real write error during commit (the manifest cannot be written) raises CacheError and commits nothing."""
    from rlhf_spec.errors import CacheError

    cache = Cache(tmp_path / "c")
    tmp = cache.begin("ab" * 32)
    (tmp / "data.bin").write_bytes(b"x" * 100)
    (tmp / "manifest.json").mkdir()  # the manifest's place is taken: writing it fails with a real OSError
    with pytest.raises(CacheError):
        cache.commit("ab" * 32, tmp, {"stage": {}})
    assert not cache.has("ab" * 32) and not tmp.exists()
