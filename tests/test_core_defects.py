"""Defects a review of the core found, one test each: the options of the command line, what workers report,
--force, hub revisions, failures in the run report, swallowed errors, seeds, declared dependencies, library
noise, and plugins that edit their code without a new version."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from conftest import (RAISING_PLUGIN, ROOT, cli, commit_dummy_entry, entry_dir, keep_stages, make_plugin_dist,
                      manifests, mini_spec, plan_keys, rows_spec, run_inprocess, stages_of, statuses, write_spec)
from rlhf_spec.testing import run_spec

# ----------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv", [["cache", "--cache-dir", "{X}", "gc"], ["--cache-dir", "{X}", "cache", "gc"],
                                  ["cache", "gc", "--cache-dir", "{X}"]])
def test_cache_dir_before_or_after_the_command_means_the_same(tmp_path, argv):
    key = "ab" * 32
    given = commit_dummy_entry(tmp_path / "X", key)  # one committed entry that no run record keeps
    default = commit_dummy_entry(tmp_path / ".rlhf-cache", key)  # the default cache of this working directory
    r = cli(*[a.replace("{X}", str(tmp_path / "X")) for a in argv], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert not given.exists(), "gc did not clean the cache it was given"
    assert default.exists(), "gc cleaned the default cache instead"


def test_debug_before_the_command_shows_the_traceback(tmp_path):
    """A stage that fails: the traceback shows with --debug before or after `run`, and not without it."""
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-explode-test", "0.4.2", "explode_plugin", RAISING_PLUGIN)
    path = write_spec(tmp_path, rows_spec("boom", explode=True))
    env = {"PYTHONPATH": str(site)}
    quiet = cli("run", str(path), "--cache-dir", str(tmp_path / "c"), cwd=tmp_path, env=env)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr and "the plugin's own bug" in quiet.stderr
    for argv in (["--debug", "run", str(path)], ["run", str(path), "--debug"]):
        r = cli(*argv, "--cache-dir", str(tmp_path / "c"), cwd=tmp_path, env=env)
        assert r.returncode == 1 and "Traceback" in r.stderr and "RuntimeError: the plugin's own bug" in r.stderr, argv


# ----------------------------------------------------------------------------- workers


@pytest.mark.slow
def test_workers_report_their_keys_timings_and_counters(tmp_path, tiny_models, hh_file):
    """With num_processes 2 the stage's manifest lists the shared reference-logprob entry it used, its timings
    and counters, so `cache gc` keeps the shared entry and a rerun finds everything cached."""
    spec = mini_spec(tiny_models, hh_file)
    spec["stages"][3]["params"].update(num_processes=2, per_device_train_batch_size=1, gradient_accumulation_steps=1)
    path = write_spec(tmp_path, spec)
    cache = tmp_path / "cache"
    code, rep = run_inprocess(path, cache, tmp_path / "r.json")
    assert code == 0, rep.get("error")
    rebel = stages_of(rep)["rebel"]
    man = json.loads((Path(rebel["output"]) / "manifest.json").read_text())
    memo = [k for k, m in manifests(cache).items() if m["stage"].get("memo") == "reference-logprobs"]
    assert len(memo) == 1 and man["used_keys"] == memo, man["used_keys"]
    assert man["metrics"]["processes"] == 2 and man["metrics"]["seconds_train"] > 0
    assert man["metrics"]["seconds_reference_logprobs"] > 0
    r = cli("cache", "gc", "--keep-last", "1", "--cache-dir", str(cache))
    assert r.returncode == 0 and memo[0] in manifests(cache), r.stdout
    code, rep2 = run_inprocess(path, cache, tmp_path / "r2.json")
    assert code == 0 and set(statuses(rep2).values()) == {"cached"}


# ----------------------------------------------------------------------------- --force and trash


def test_force_replaces_the_entry_without_calling_it_corrupt(tmp_path, tiny_models, hh_file):
    path = write_spec(tmp_path, mini_spec(tiny_models, hh_file))
    cache = tmp_path / "cache"
    code, rep = run_inprocess(path, cache, tmp_path / "a.json", "--until", "pair")
    assert code == 0
    code, rep = run_inprocess(path, cache, tmp_path / "b.json", "--until", "pair", "--force", "pair")
    assert code == 0 and statuses(rep)["pair"] == "ran"
    assert rep["warnings"] == [] and not (cache / "trash").exists(), "a forced rerun was treated as a corrupt entry"
    assert not list((cache / "entries").glob("*/.*")), "the replaced entry was left behind"


def test_gc_empties_the_trash(tmp_path, tiny_models, hh_file):
    path = write_spec(tmp_path, mini_spec(tiny_models, hh_file))
    cache = tmp_path / "cache"
    code, rep = run_inprocess(path, cache, tmp_path / "a.json", "--until", "pair")
    key = stages_of(rep)["pair"]["key"]
    (entry_dir(cache, key) / "manifest.json").write_text("{")
    assert cli("cache", "verify", "--cache-dir", str(cache)).returncode == 1
    assert len(list((cache / "trash").iterdir())) == 1
    r = cli("cache", "gc", "--older-than", "1h", "--cache-dir", str(cache))
    assert r.returncode == 0 and len(list((cache / "trash").iterdir())) == 1, "--older-than removed a fresh trash entry"
    r = cli("cache", "gc", "--cache-dir", str(cache))
    assert r.returncode == 0 and "trash/" in r.stdout and not list((cache / "trash").iterdir())


# ----------------------------------------------------------------------------- hub revisions


class _Hub(BaseHTTPRequestHandler):
    """A hub API on loopback: every repo's revisions resolve to one commit; 'missing' repos do not exist."""

    SHA = "1" * 40

    def do_GET(self):
        if "missing" in self.path:
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.end_headers()
            self.wfile.write(b'{"error": "Repository not found"}')
            return
        body = json.dumps({"id": self.path.split("/")[3], "sha": self.SHA, "private": False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    srv = HTTPServer(("127.0.0.1", 0), _Hub)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


PIN_CHECK = """
import json, sys
from rlhf_spec.cache import Cache
from rlhf_spec.plugins import registry
from rlhf_spec.runner import Runner
from rlhf_spec.spec import validate
runner = Runner(validate(json.load(open(sys.argv[1])), registry()), Cache(sys.argv[2]))
runner.compute_keys()
src = runner.sources["sample"]["policy"]
print(json.dumps({"errors": runner.key_errors, "dataset": runner.datasets["sample"]["prompts"]["revision"],
                  "dataset_key": runner.preimages["sample"]["datasets"]["prompts"]["revision"],
                  "tokenizer_key": runner.preimages["sample"]["models"]["policy"]["tokenizer"],
                  "tokenizer_load": list(src.tokenizer_location())}))
"""


def test_hub_dataset_and_tokenizer_load_the_commit_the_key_holds(tmp_path, tiny_models, hub):
    spec = {"name": "hub", "models": {"policy": {"path": str(tiny_models["policy"]), "tokenizer": "org/tokenizer"}},
            "datasets": {"prompts": {"hub": "org/prompts"}},
            "stages": [{"id": "sample", "kind": "sample", "uses": "generate", "params": {"policy": "policy", "prompts": "prompts"}}]}
    path = write_spec(tmp_path, spec)
    r = subprocess.run([sys.executable, "-c", PIN_CHECK, str(path), str(tmp_path / "c")], capture_output=True, text=True,
                       env=dict(os.environ, HF_ENDPOINT=hub), cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["errors"] == {}
    assert out["dataset"] == out["dataset_key"] == _Hub.SHA, "the dataset would load another revision than its key holds"
    assert out["tokenizer_key"] == {"hub": "org/tokenizer", "revision": _Hub.SHA}
    assert out["tokenizer_load"] == ["org/tokenizer", {"revision": _Hub.SHA}]


def test_a_repository_the_hub_does_not_have_is_named_not_blamed_on_the_network(tmp_path, hub):
    spec = {"name": "hub", "models": {"policy": {"hub": "org/missing-model"}},
            "datasets": {"prompts": {"path": "p.jsonl"}},
            "stages": [{"id": "sample", "kind": "sample", "uses": "generate", "params": {"policy": "policy", "prompts": "prompts"}}]}
    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    path = write_spec(tmp_path, spec)
    r = cli("plan", str(path), "--json", "--cache-dir", str(tmp_path / "c"), cwd=tmp_path, env={"HF_ENDPOINT": hub})
    assert r.returncode == 0, r.stderr
    reason = json.loads(r.stdout)[0]["reason"]
    assert "'org/missing-model' does not exist on the hub" in reason and "cannot be reached" not in reason, reason


# ----------------------------------------------------------------------------- failures and swallowed errors

FAILING_PLUGIN = """
from pydantic import BaseModel, ConfigDict
from rlhf_spec import SAMPLES, StageFailed, StageImpl, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


def run(ctx):
    raise StageFailed("the plugin gave up on purpose")


def resources(params):
    raise KeyError("gpus")


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="sample", name="gives-up", params=Params, run=run, output=SAMPLES, version="1"))
    register(StageImpl(kind="sample", name="bad-resources", params=Params, run=run, output=SAMPLES, version="1",
                       resources=resources))
"""


def test_a_stage_that_raises_an_rlhf_spec_error_is_in_the_report(tmp_path):
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-gives-up", "1.0.0", "gives_up_plugin", FAILING_PLUGIN)
    r, rep = run_spec({"name": "x", "stages": [{"id": "s", "kind": "sample", "uses": "gives-up"}]}, tmp_path,
                      env={"PYTHONPATH": str(site)})
    assert r.returncode == 1 and "gave up on purpose" in r.stderr
    assert [(s["id"], s["status"]) for s in rep["stages"]] == [("s", "failed")]
    assert "gave up on purpose" in rep["stages"][0]["reason"]


def test_a_broken_resources_function_is_reported_with_its_plugin(tmp_path):
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-gives-up", "1.0.0", "gives_up_plugin", FAILING_PLUGIN)
    path = write_spec(tmp_path, {"name": "x", "stages": [{"id": "s", "kind": "sample", "uses": "bad-resources"}]})
    r = cli("plan", str(path), "--cache-dir", str(tmp_path / "c"), env={"PYTHONPATH": str(site)})
    assert r.returncode == 1, r.stdout
    assert "resources() of sample/bad-resources (rlhf-spec-gives-up 1.0.0) failed: KeyError" in r.stderr


def test_loading_plugins_never_reads_the_process_arguments(monkeypatch, capfd):
    """A broken plugin's traceback goes to the rlhf_spec logger, not to stderr because sys.argv says --debug."""
    import types

    from rlhf_spec import hookimpl
    from rlhf_spec.plugins import load_registry

    broken = types.ModuleType("broken")

    @hookimpl
    def rlhf_spec_register_stages(register):
        raise RuntimeError("cannot register")

    broken.rlhf_spec_register_stages = rlhf_spec_register_stages
    monkeypatch.setattr(sys, "argv", ["rlhf-spec", "--debug", "plugins"])
    reg = load_registry(extra=[broken], entry_points=False)
    assert [f.error for f in reg.failures] == ["RuntimeError: cannot register"]
    assert "Traceback" not in capfd.readouterr().err


# ----------------------------------------------------------------------------- seeds


RECORDING_BACKEND = """
import json, os
from pydantic import BaseModel, ConfigDict
from rlhf_spec import BackendImpl, Completion, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Engine:
    def generate(self, prompt_token_ids, sampling, n, seed):
        with open(os.environ["SEED_LOG"], "a") as f:
            f.write(json.dumps({"prompts": len(prompt_token_ids), "n": n, "seed": seed}) + "\\n")
        return [[Completion([1, 2], f"reply {seed} {i}") for i in range(n)] for _ in prompt_token_ids]


@hookimpl
def rlhf_spec_register_backends(register):
    register(BackendImpl(name="recording", params=Params, load=lambda policy, params, ctx: Engine(), version="1"))
"""


def test_every_backend_gets_the_documented_pass_seeds(tmp_path, tiny_models, hh_file):
    """Pass p of every shard is sampled with seed spec.seed + p * seed_stride (REBEL: p * 50), whatever the backend."""
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-recording", "1.0.0", "recording_backend", RECORDING_BACKEND)
    spec = mini_spec(tiny_models, hh_file)
    spec["seed"] = 7
    keep_stages(spec, "sample")
    spec["stages"][0]["params"].update(n=3, seed_stride=50, backend={"uses": "recording"})
    log = tmp_path / "seeds.jsonl"
    r = cli("run", str(write_spec(tmp_path, spec)), "--cache-dir", str(tmp_path / "c"),
            env={"PYTHONPATH": str(site), "SEED_LOG": str(log)})
    assert r.returncode == 0, r.stderr
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    shards = len(calls) // 3
    assert shards >= 2 and [c["seed"] for c in calls] == [7, 57, 107] * shards and {c["n"] for c in calls} == {1}


# ----------------------------------------------------------------------------- dependencies


def _imported_modules(root: Path) -> set[str]:
    names = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names


def test_every_third_party_import_is_a_declared_dependency():
    import importlib.metadata as md
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    import re

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    declared = {norm(Requirement(r).name) for r in project["dependencies"]}
    declared |= {norm(Requirement(r).name) for reqs in project["optional-dependencies"].values() for r in reqs}
    dists = md.packages_distributions()
    optional_at_run_time = {"wandb", "mlflow", "bitsandbytes", "vllm", "tensorboardX", "yaml"}
    missing = {}
    for mod in sorted(_imported_modules(ROOT / "rlhf_spec")):
        if mod in sys.stdlib_module_names or mod in ("rlhf_spec", "__future__") or mod in optional_at_run_time:
            continue
        owners = {norm(d) for d in dists.get(mod, [])}
        if not owners & declared:
            missing[mod] = sorted(owners)
    assert missing == {}, f"imported but not declared in pyproject.toml: {missing}"


# ----------------------------------------------------------------------------- plugins that change their code

SOURCE_HASH_PLUGIN = """
from pydantic import BaseModel, ConfigDict
from rlhf_spec import RewardImpl, RewardOutput, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reward:
    def score(self, batch):
        return RewardOutput([float(len(c)) for c in batch.completions])  # VERSION-MARK


@hookimpl
def rlhf_spec_register_rewards(register):
    register(RewardImpl(name="chars", params=Params, load=lambda p, ctx: Reward(), version="1", source_hash=True))
"""


def test_a_plugin_that_hashes_its_source_gets_new_keys_when_its_code_changes(tmp_path, tiny_spec):
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-chars", "1.0.0", "chars_plugin", SOURCE_HASH_PLUGIN)
    tiny_spec["stages"][2]["params"]["reward"] = {"uses": "chars"}
    path = write_spec(tmp_path, tiny_spec)

    def keys():
        return plan_keys(path, tmp_path / "c", env={"PYTHONPATH": str(site)})

    before = keys()
    assert keys() == before
    src = site / "chars_plugin" / "__init__.py"
    src.write_text(src.read_text().replace("len(c)", "len(c.split())"))
    after = keys()
    assert after["score"] != before["score"] and after["sample"] == before["sample"]
    assert all(after[s] != before[s] for s in ("filter", "pair", "rebel"))


def test_a_reader_that_closes_the_pipe_is_no_error():
    """`rlhf-spec plugins --json | head -c 0`: the reader is gone before the command writes; the command
    stops quietly with exit code 0, with no internal error and no traceback."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "rlhf_spec", "plugins", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves at once, long before the command has written anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "internal error" not in err and "Traceback" not in err and "BrokenPipe" not in err, err
