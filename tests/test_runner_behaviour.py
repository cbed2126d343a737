"""Runner behaviour that needs real files, processes and faults: where the cache is, what gc removes,
a worker that fails, a full disk, and the training loss checked against an independent computation."""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import (RAISING_PLUGIN, cli, commit_dummy_entry, entry_dirs, make_plugin_dist, mini_spec, rows_spec,
                      write_spec)
from rlhf_spec.testing import run_spec

# ----------------------------------------------------------------------------- where the cache is


@pytest.mark.parametrize("given,want", [
    (("flag", "env", "spec"), "from-flag"), (("env", "spec"), "from-env"), (("spec",), "from-spec"), ((), ".rlhf-cache"),
])
def test_cache_folder_precedence(tmp_path, given, want):
    """--cache-dir, then RLHF_SPEC_CACHE, then the spec's cache.dir, then .rlhf-cache."""
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-rows", "1.0.0", "rows_plugin", RAISING_PLUGIN)
    spec = rows_spec(rows=2)
    if "spec" in given:
        spec["cache"] = {"dir": "from-spec"}
    path = write_spec(tmp_path, spec)
    env = {"PYTHONPATH": str(site)}
    if "env" in given:
        env["RLHF_SPEC_CACHE"] = "from-env"
    args = ["--cache-dir", "from-flag"] if "flag" in given else []
    r = cli("run", str(path), *args, cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    used = {d.name for d in tmp_path.iterdir() if (d / "entries").is_dir()}
    assert used == {want}, used


# ----------------------------------------------------------------------------- gc


def _age(path: Path, days: float) -> None:
    t = (_dt.datetime.now() - _dt.timedelta(days=days)).timestamp()
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def test_gc_older_than_removes_old_unkept_things_only(tmp_path):
    from rlhf_spec.cache import Cache

    cache = Cache(tmp_path / "c")
    old, new, kept = "aa" * 32, "bb" * 32, "cc" * 32
    commit_dummy_entry(cache, old, age_days=30)
    commit_dummy_entry(cache, new)
    commit_dummy_entry(cache, kept, age_days=30)
    cache.record_run({"spec": "t", "keys": [kept]})
    for name, days in (("old", 30), ("new", 0)):
        d = cache.converted_dir(name)
        d.mkdir(parents=True)
        (d / "config.json").write_text("{}")
        _age(d, days)
    stale, fresh = cache.partial_dir("dd" * 32), cache.partial_dir("ee" * 32)
    for d, days in ((stale, 30), (fresh, 0)):
        (d / "shards").mkdir(parents=True)
        (d / "journal.jsonl").write_text("")
        _age(d, days)
    r = cli("cache", "gc", "--keep-last", "1", "--older-than", "7d", "--cache-dir", str(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert not cache.has(old) and cache.has(new) and cache.has(kept)
    assert not cache.converted_dir("old").exists() and cache.converted_dir("new").exists()
    assert not stale.exists() and fresh.exists(), "gc removed a fresh partial folder or kept an abandoned one"
    assert f"removed {old}" in r.stdout and "removed converted/old" in r.stdout and f"removed partial/{'dd' * 32}" in r.stdout


# ----------------------------------------------------------------------------- a failing worker

FAILING_WORKER = """
import os
from rlhf_spec import POLICY, OptimParams, StageImpl, hookimpl


class Params(OptimParams):
    pass


def run(ctx):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("worker 1 failed on purpose")
    raise SystemExit(0)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="train", name="fails-in-a-worker", params=Params, run=run, output=POLICY, version="1"))
"""


@pytest.mark.slow
def test_a_failing_worker_fails_the_stage_with_its_own_words(tmp_path):
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-fails", "1.0.0", "fails_plugin", FAILING_WORKER)
    r, rep = run_spec({"name": "w", "stages": [
        {"id": "t", "kind": "train", "uses": "fails-in-a-worker", "params": {"num_processes": 2}}]}, tmp_path,
        env={"PYTHONPATH": str(site)})
    cache = tmp_path / "cache"
    assert r.returncode == 1, r.stdout + r.stderr
    assert "2-process run of stage 't' exited with code 1" in r.stderr and "worker 1 failed on purpose" in r.stderr
    assert [(s["id"], s["status"]) for s in rep["stages"]] == [("t", "failed")]
    assert not entry_dirs(cache) and cli("cache", "verify", "--cache-dir", str(cache)).returncode == 0


# ----------------------------------------------------------------------------- a full disk


def _namespace_prefix(probe: Path) -> list[str] | None:
    """A command prefix under which ``mount -t tmpfs`` works: a user and mount namespace of its own
    (unprivileged), else a mount namespace (as root); None where neither works."""
    probe.mkdir(parents=True, exist_ok=True)
    for prefix in (["unshare", "--user", "--map-root-user", "--mount"], ["unshare", "--mount"]):
        if shutil.which(prefix[0]) and subprocess.run([*prefix, "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs '{probe}'"],
                                                      capture_output=True).returncode == 0:
            return prefix
    return None


FULL_DISK = """
set -u
mount -t tmpfs -o size=400k tmpfs "$CACHE"
"$PY" -m rlhf_spec run "$SPEC" --cache-dir "$CACHE" > "$OUT/run1.out" 2> "$OUT/run1.err"; echo $? > "$OUT/run1.code"
"$PY" -m rlhf_spec cache verify --cache-dir "$CACHE" > "$OUT/verify.out" 2>&1; echo $? > "$OUT/verify.code"
ls "$CACHE"/entries/*/ > "$OUT/entries1" 2>/dev/null
mount -o remount,size=16m "$CACHE"
"$PY" -m rlhf_spec run "$SPEC" --cache-dir "$CACHE" --report "$OUT/run2.json" > "$OUT/run2.out" 2> "$OUT/run2.err"
echo $? > "$OUT/run2.code"
"""


@pytest.mark.slow
def test_a_full_disk_is_a_clear_error_and_loses_nothing(tmp_path, tiny_models, hh_file):
    """A real ENOSPC: the cache is a 400 KiB tmpfs, room for the data stages but not for REBEL's checkpoints.
    The run stops with a hint, every entry already cached verifies, and with room again it resumes."""
    prefix = _namespace_prefix(tmp_path / "probe")
    if prefix is None:
        pytest.skip("no small file system can be mounted here (no user namespaces and no mount privilege), so a real "
                    "ENOSPC cannot be made; the message is then only checked on a constructed error in test_cache_integrity")
    path = write_spec(tmp_path, mini_spec(tiny_models, hh_file))
    cache, out = tmp_path / "cache", tmp_path / "out"
    cache.mkdir()
    out.mkdir()
    env = dict(os.environ, PYTHONUNBUFFERED="1", CACHE=str(cache), SPEC=str(path), OUT=str(out), PY=sys.executable)
    r = subprocess.run([*prefix, "sh", "-c", FULL_DISK], capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr

    def read(name):
        return (out / name).read_text()

    assert read("run1.code").strip() == "1", read("run1.err")
    err = read("run1.err")
    assert "out of disk space" in err and "--cache-dir" in err and "Traceback" not in err, err
    assert read("verify.code").strip() == "0", read("verify.out")
    before = set(read("entries1").split())
    assert len(before) >= 3, before  # sample, score and pair were committed before the disk filled
    assert read("run2.code").strip() == "0", read("run2.err")
    rep = json.loads(read("run2.json"))
    st = {s["id"]: s["status"] for s in rep["stages"]}
    assert st["sample"] == st["score"] == st["pair"] == "cached" and st["rebel"] == "ran", st


# ----------------------------------------------------------------------------- the training loss, independently


def _pairs(folder: Path, hh_file: Path, n: int) -> Path:
    import datasets

    from rlhf_spec.data import prompt_id, split_hh_pair
    from rlhf_spec.testing import hh_rows

    cols = {k: [] for k in ("prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "split")}
    for i, row in enumerate(hh_rows(hh_file, n)):
        prompt, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
        for k, v in (("prompt_id", prompt_id(prompt)), ("prompt", prompt), ("chosen", chosen[:80]), ("rejected", rejected[:80]),
                     ("chosen_reward", 0.3 * i), ("rejected_reward", -0.2 * i), ("split", "train")):
            cols[k].append(v)
    datasets.Dataset.from_dict(cols).save_to_disk(str(folder / "data"))
    return folder


def _sequence_logprob(model, tok, messages, reply, temperature: float) -> float:
    """log pi(reply | prompt) by the textbook loop: one unpadded forward pass, then a sum over reply tokens."""
    import torch

    prompt = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False), add_special_tokens=False)["input_ids"]
    ids = prompt + tok(reply, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double() / (temperature + 1e-7)
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, ids[t]] for t in range(len(prompt), len(ids))))


def test_rebel_step_loss_matches_an_independent_computation(tmp_path, tiny_models, hh_file):
    """The first logged loss of train/rebel (its first update sees every pair at the starting weights) equals
    the REBEL loss computed pair by pair from the models directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_spec import InputArtifact, ModelSource
    from rlhf_spec.stages.train.preference import RebelParams, run_rebel
    from rlhf_spec.testing import execute, make_context, make_tiny_policy

    n, eta, temp = 5, 2.0, 0.8
    pairs = _pairs(tmp_path / "pairs", hh_file, n)
    reference = make_tiny_policy(tmp_path / "reference", seed=1, texts=[r for r in _texts(hh_file)])
    params = RebelParams(policy="policy", reference="reference", eta=eta, learning_rate=1e-3, per_device_train_batch_size=1,
                         gradient_accumulation_steps=n, total_episodes=n, logprob_temperature=temp,
                         max_prompt_tokens=4096, max_response_tokens=4096, save_every=100)
    models = {name: ModelSource(name=name, origin="spec", path=str(p), identity={"path": str(p)})
              for name, p in (("policy", tiny_models["policy"]), ("reference", reference))}
    ctx = make_context(params, tmp_path / "run", uses="rebel", inputs=[InputArtifact("pair", "pairs", "0" * 64, str(pairs))],
                       models=models)
    execute(ctx, run_rebel)
    logged = json.loads((ctx.out_dir / "history.json").read_text())[0]["loss"]

    import datasets

    rows = datasets.load_from_disk(str(pairs / "data")).to_list()
    tok = AutoTokenizer.from_pretrained(tiny_models["policy"])
    pol = AutoModelForCausalLM.from_pretrained(tiny_models["policy"]).eval()
    ref = AutoModelForCausalLM.from_pretrained(reference).eval()
    losses = []
    for r in rows:
        lp = {(m, y): _sequence_logprob(model, tok, r["prompt"], r[y], temp) for m, model in (("pol", pol), ("ref", ref))
              for y in ("chosen", "rejected")}
        h = (lp["pol", "chosen"] - lp["ref", "chosen"]) - (lp["pol", "rejected"] - lp["ref", "rejected"])
        losses.append((h - eta * (r["chosen_reward"] - r["rejected_reward"])) ** 2)
    assert abs(logged - sum(losses) / n) <= 1e-4 * max(1.0, abs(logged)), (logged, sum(losses) / n)


def _texts(hh_file: Path) -> list[str]:
    from rlhf_spec.testing import hh_rows

    return [r["chosen"] for r in hh_rows(hh_file, 200)]
