"""Bad input is rejected before any compute: exit code 2, a message that names the place, no traceback,
and nothing written to the cache folder.

Most cases run in-process through ``rlhf_spec.cli.main`` (it returns the exit code); a handful run in
real subprocesses to prove that no traceback reaches stderr, and the plugin cases (an ambiguous ``uses``,
a check that wants ``trust_remote_code``, a plugin that cannot be imported) build real plugin
distributions (a package plus a ``*.dist-info`` folder) in a temporary folder on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest

from conftest import cli, keep_stages, make_plugin_dist, run_inprocess, write_spec
from rlhf_spec.cli import main

# Stage indexes of the tiny spec (see conftest.tiny_spec_dict).
RM, SAMPLE, SCORE, FILTER, PAIR, REBEL, EVALUATE = range(7)


# ----------------------------------------------------------------------------- real plugin distributions


DUP_PLUGIN = """
from pydantic import BaseModel, ConfigDict
from rlhf_spec import SAMPLES, StageImpl, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows: int = 1


def run(ctx):
    raise RuntimeError("never runs: the spec is rejected first")


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="sample", name="twin-sampler", params=Params, run=run, output=SAMPLES, version="1"))
"""

REMOTE_CODE_PLUGIN = """
from typing import Annotated

from pydantic import BaseModel, ConfigDict
from rlhf_spec.errors import Problem
from rlhf_spec import REWARD_MODEL, SAMPLES, SCORED, ModelRef, StageImpl, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward_model: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))]


def check(params, spec):
    m = spec.models.get(params.reward_model)
    if m is not None and not m.trust_remote_code:
        return [Problem("/reward_model",
                        f"model '{params.reward_model}' needs its repository's own code to load",
                        f"set /models/{params.reward_model}/trust_remote_code to true if you trust it")]
    return []


def run(ctx):
    raise RuntimeError("never runs in these tests")


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="score", name="remote-rm", params=Params, run=run, inputs=(SAMPLES,), min_inputs=1,
                       max_inputs=1, output=SCORED, version="1", check=check))
"""

BROKEN_PLUGIN = """
import a_module_that_is_not_installed_anywhere  # noqa: F401
"""


# ----------------------------------------------------------------------------- the cases


@dataclass
class Env:
    tmp: Path
    hh: Path
    models: dict


@dataclass
class Case:
    """One malformed input.

    ``edit(spec, env)`` changes the valid tiny spec in place; ``text`` replaces the whole file instead;
    ``raw(text)`` rewrites the spec's JSON text (for what a dict cannot hold: duplicate keys, NaN);
    ``args`` are extra command-line arguments. Every string in ``expect`` must appear on stderr.
    """

    id: str
    expect: list[str]
    edit: Optional[Callable[[dict, Env], None]] = None
    text: Optional[str] = None
    args: list[str] = field(default_factory=list)
    raw: Optional[Callable[[str], str]] = None


def _walk(spec: dict, path: str):
    """Follow a dotted path; under a list, a segment is a stage id or an index."""
    node = spec
    for part in path.split("."):
        if isinstance(node, list):
            node = node[int(part)] if part.isdigit() else next(s for s in node if s.get("id") == part)
        else:
            node = node[part]
    return node


def _set(path: str, value):
    def edit(spec, env):
        head, _, last = path.rpartition(".")
        node = _walk(spec, head) if head else spec
        node[last] = value

    return edit


def _drop(path: str):
    def edit(spec, env):
        head, _, last = path.rpartition(".")
        del _walk(spec, head)[last]

    return edit


CASES: list[Case] = [
    # --- JSON syntax and the shape of the document
    Case("json-trailing-comma", ["invalid JSON at line 3, column 1"], text='{\n "name": "x",\n}\n'),
    Case("json-unclosed", ["invalid JSON at line 4"], text='{\n "name": "x",\n "stages": [\n'),
    Case("json-empty-file", ["invalid JSON at line 1, column 1"], text=""),
    Case("json-single-quotes", ["invalid JSON at line 1, column 2"], text="{'name': 'x'}"),
    Case("json-top-level-array", ["the spec must be a JSON object"], text="[1, 2, 3]"),
    Case("spec-file-missing", ["spec file not found", "no-such-spec.json"], args=["--spec-path", "no-such-spec.json"]),
    Case("json-duplicate-key", ["/seed: invalid JSON at line 4, column 2: duplicate key 'seed'"],
         raw=lambda t: t.replace('\n "seed": 0,', '\n "seed": 0,\n "seed": 1,', 1)),
    Case("json-duplicate-nested-key", ["/stages/1/params/n:", "duplicate key 'n'"],
         raw=lambda t: t.replace('"n": 3,', '"n": 3, "n": 4,', 1)),
    Case("json-nan", ["/stages/5/params/eta:", "NaN is not valid JSON"], raw=lambda t: t.replace('"eta": 1.0', '"eta": NaN', 1)),
    Case("json-infinity", ["/stages/0/params/learning_rate: invalid JSON at line", "Infinity is not valid JSON"],
         raw=lambda t: t.replace('"learning_rate": 0.001', '"learning_rate": Infinity', 1)),
    Case("json-negative-infinity-in-list", ["/datasets/prompts/hash_range/0:", "-Infinity is not valid JSON"],
         raw=lambda t: t.replace('"hash_range": [\n    0.5,', '"hash_range": [\n    -Infinity,', 1)),
    Case("set-infinity", ["--set stages.rebel.params.eta:", "Infinity is not valid JSON"],
         args=["--set", "stages.rebel.params.eta=Infinity"]),
    # --- rules across fields and inputs, checked before compute
    Case("test-size-share-above-one", ["/stages/4/params/test_size:", "below 1"], _set("stages.pair.params.test_size", 2.5)),
    Case("reward-model-without-pairs", ["/stages/0/params/dataset:", "needs pairs"], _drop("stages.reward_model.params.dataset")),
    Case("evaluate-without-prompts", ["/stages/6/params/prompts:", "needs held-out prompts"], _drop("stages.evaluate.params.prompts")),
    Case("evaluate-unknown-primary", ["/stages/6/params/primary:", "no judge named 'rmm'", "did you mean 'rm'?"],
         _set("stages.evaluate.params.primary", "rmm")),
    # --- wrong types
    Case("seed-is-a-string", ["/seed:", "valid integer"], _set("seed", "zero")),
    Case("stages-is-an-object", ["/stages:", "valid list"], _set("stages", {"sample": {}})),
    Case("stage-is-a-number", ["/stages/7:"], lambda s, e: s["stages"].append(5)),
    Case("params-is-a-list", ["/stages/1/params:", "valid dictionary"], _set("stages.sample.params", [1, 2])),
    Case("inputs-is-a-string", ["/stages/2/inputs:", "valid list"], _set("stages.score.inputs", "sample")),
    Case("uses-is-a-number", ["/stages/1/uses:", "valid string"], _set("stages.sample.uses", 5)),
    Case("n-is-a-word", ["/stages/1/params/n:", "valid integer", '"four"'], _set("stages.sample.params.n", "four")),
    Case("trust-remote-code-not-bool", ["/models/policy/trust_remote_code:", "valid boolean"],
         _set("models.policy.trust_remote_code", "perhaps")),
    Case("models-is-a-list", ["/models:", "valid dictionary"], _set("models", [])),
    Case("dtype-unknown", ["/models/policy/dtype:"], _set("models.policy.dtype", "float8")),
    # --- out of range
    Case("temperature-negative", ["/stages/1/params/temperature:", "greater than or equal to 0"],
         _set("stages.sample.params.temperature", -0.5)),
    Case("top-p-over-one", ["/stages/1/params/top_p:", "less than or equal to 1"], _set("stages.sample.params.top_p", 1.5)),
    Case("n-zero", ["/stages/1/params/n:", "greater than or equal to 1"], _set("stages.sample.params.n", 0)),
    Case("max-new-tokens-zero", ["/stages/1/params/max_new_tokens:"], _set("stages.sample.params.max_new_tokens", 0)),
    Case("stages-empty", ["/stages:", "at least 1"], _set("stages", [])),
    Case("seed-negative", ["/seed:", "greater than or equal to 0"], _set("seed", -1)),
    Case("lr-zero", ["/stages/5/params/learning_rate:", "greater than 0"], _set("stages.rebel.params.learning_rate", 0)),
    Case("warmup-ratio-one", ["/stages/5/params/warmup_ratio:"], _set("stages.rebel.params.warmup_ratio", 1.0)),
    Case("num-shards-zero", ["/stages/2/params/num_shards:"], _set("stages.score.params.num_shards", 0)),
    Case("dataset-limit-zero", ["/datasets/prompts/limit:"], _set("datasets.prompts.limit", 0)),
    Case("hash-range-reversed", ["/datasets/prompts/hash_range:", "0 <= lo < hi <= 1"],
         _set("datasets.prompts.hash_range", [0.75, 0.5])),
    Case("save-every-zero", ["/stages/0/params/save_every:"], _set("stages.reward_model.params.save_every", 0)),
    # --- unknown keys, with "did you mean"
    Case("unknown-top-level-key", ["/seeds:", "unknown key 'seeds'", "did you mean 'seed'?"], _set("seeds", 3)),
    Case("unknown-stage-key", ["/stages/2/input:", "did you mean 'inputs'?"], _set("stages.score.input", ["sample"])),
    Case("unknown-param", ["/stages/1/params/temprature:", "did you mean 'temperature'?"],
         _set("stages.sample.params.temprature", 0.7)),
    Case("unknown-model-key", ["/models/policy/revison:", "did you mean 'revision'?"], _set("models.policy.revison", "main")),
    Case("unknown-dataset-key", ["/datasets/prompts/adaptor:", "did you mean 'adapter'?"],
         _set("datasets.prompts.adaptor", "hh-rlhf")),
    Case("unknown-cache-key", ["/cache/dirr:", "did you mean 'dir'?"], _set("cache", {"dirr": "x"})),
    Case("unknown-nested-param", ["/stages/5/params/lora/alpah:", "did you mean 'alpha'?"],
         _set("stages.rebel.params.lora", {"r": 4, "alpah": 8})),
    # --- the stage graph
    Case("duplicate-stage-id", ["/stages/3/id:", "duplicate stage id 'score'"], _set("stages.filter.id", "score")),
    Case("undefined-input", ["/stages/2/inputs/0:", "unknown stage 'sampel'", "did you mean 'sample'?"],
         _set("stages.score.inputs", ["sampel"])),
    Case("input-is-itself", ["/stages/3/inputs/0:", "lists itself"], _set("stages.filter.inputs", ["filter"])),
    Case("cycle", ["cycle:", "filter -> pair -> filter"], _set("stages.filter.inputs", ["pair"])),
    Case("unknown-uses", ["/stages/1/uses:", "did you mean 'generate'?"], _set("stages.sample.uses", "generat")),
    Case("unknown-backend", ["/stages/1/params/backend/uses:", "no backend named 'transformer'", "did you mean 'transformers'?"],
         _set("stages.sample.params.backend.uses", "transformer")),
    Case("backend-param-typo", ["/stages/1/params/backend/params/batch_sise:", "did you mean 'batch_size'?"],
         _set("stages.sample.params.backend.params.batch_sise", 4)),
    Case("unknown-reward", ["/stages/2/params/reward/uses:", "no reward named 'clasifier'", "did you mean 'classifier'?"],
         _set("stages.score.params.reward.uses", "clasifier")),
    Case("reward-param-typo", ["/stages/2/params/reward/params/max_lenght:", "did you mean 'max_length'?"],
         _set("stages.score.params.reward.params.max_lenght", 64)),
    Case("reward-model-ref-unknown", ["/stages/2/params/reward/params/model:", "did you mean 'reward_model'?"],
         _set("stages.score.params.reward.params.model", "reward_modle")),
    Case("math-answer-without-reference", ["/stages/2/params/reward:", "reward 'math-answer' reads the row column(s) reference",
                                           "reference_column"],
         _set("stages.score.params.reward", {"uses": "math-answer"})),
    Case("combine-weight-on-a-missing-component",
         ["/stages/2/params/reward/params/weights/safty:", "no component named 'safty'", "did you mean 'safety'?"],
         _set("stages.score.params.reward", {"uses": "combine", "params": {
             "components": {"safety": {"uses": "classifier", "params": {"model": "reward_model", "max_length": 64}},
                            "short": {"uses": "length", "params": {"unit": "words", "per_unit": -0.1}}},
             "weights": {"safty": 1.0, "short": 1.0}}})),
    Case("judge-typo", ["/stages/6/params/judges/rm/params/max_lenght:", "did you mean 'max_length'?"],
         _set("stages.evaluate.params.judges.rm.params.max_lenght", 64)),
    Case("judge-ref-wrong-artifact", ["/stages/6/params/judges/rm/params/model:", "produces policy"],
         _set("stages.evaluate.params.judges.rm.params.model", "rebel")),
    Case("unknown-kind", ["/stages/1/kind:"], _set("stages.sample.kind", "sampler")),
    Case("pair-fed-unscored-samples", ["/stages/4/inputs/0:", "needs scored input", "produces samples"],
         _set("stages.pair.inputs", ["sample"])),
    Case("score-without-input", ["/stages/2/inputs:", "takes 1 input(s), got 0"], _set("stages.score.inputs", [])),
    Case("too-many-inputs", ["/stages/2/inputs:", "takes 1 input(s), got 2"], _set("stages.score.inputs", ["sample", "sample"])),
    Case("stage-id-is-a-model-name", ["/stages/3/id:", "stage id 'policy' is also a model name in /models"],
         _set("stages.filter.id", "policy")),
    Case("stage-uses-its-own-output", ["/stages/5/params/policy:", "stage 'rebel' cannot use its own output as a model"],
         _set("stages.rebel.params.policy", "rebel")),
    Case("spec-file-unreadable", ["cannot read spec file"], args=["--spec-path", "."]),
    Case("unknown-model-ref", ["/stages/1/params/policy:", "did you mean 'policy'?"], _set("stages.sample.params.policy", "polcy")),
    Case("model-ref-wrong-artifact", ["/stages/1/params/policy:", "produces reward_model"],
         _set("stages.sample.params.policy", "reward_model")),
    Case("unknown-dataset-ref", ["/stages/1/params/prompts:", "did you mean 'prompts'?"],
         _set("stages.sample.params.prompts", "prompt")),
    Case("dataset-lacks-preference-columns", ["/stages/0/params/dataset:", "no column(s) chosen, rejected"],
         _set("datasets.rm_pairs.adapter", "generic")),
    Case("missing-required-param", ["/stages/1/params/policy:", "missing required key 'policy'"], _drop("stages.sample.params.policy")),
    Case("missing-stage-id", ["/stages/3/id:", "missing required key 'id'"], _drop("stages.filter.id")),
    Case("stage-id-with-slashes", ["/stages/3/id:", "should match pattern"], _set("stages.filter.id", "../../outside")),
    Case("spec-name-with-slash", ["/name:", "should match pattern"], _set("name", "a/b")),
    Case("model-hub-and-path", ["/models/policy:", "exactly one of 'hub' or 'path'"], _set("models.policy.hub", "org/model")),
    Case("model-neither-hub-nor-path", ["/models/policy:", "exactly one of 'hub' or 'path'"], _set("models.policy", {})),
    # --- files, folders and paths
    Case("model-folder-missing", ["/models/policy/path:", "not found"],
         lambda s, e: s["models"]["policy"].update(path=str(e.tmp / "no-such-model"))),
    Case("dataset-file-missing", ["/datasets/prompts/path:", "not found"],
         lambda s, e: s["datasets"]["prompts"].update(path=str(e.tmp / "missing.jsonl"))),
    Case("dataset-without-named-column", ["/datasets/prompts/prompt_column:", "'question'"],
         lambda s, e: s["datasets"]["prompts"].update(adapter="generic", prompt_column="question")),
    Case("model-path-escapes", ["/models/policy/path:", "leaves the working directory"], _set("models.policy.path", "../x")),
    Case("dataset-path-escapes", ["/datasets/prompts/path:", "leaves the working directory"],
         _set("datasets.prompts.path", "data/../../hh.jsonl.gz")),
    Case("gguf-file-escapes", ["/models/policy/gguf_file:"], _set("models.policy.gguf_file", "../../weights.gguf")),
    Case("tokenizer-path-escapes", ["/models/policy/tokenizer:", "leaves the working directory"],
         _set("models.policy.tokenizer", "../tok")),
    Case("hub-id-is-a-path", ["/models/policy/hub:"], lambda s, e: s["models"]["policy"].update(path=None, hub="../../models/x")),
    Case("dataset-hub-id-is-a-path", ["/datasets/prompts/hub:"],
         lambda s, e: s["datasets"]["prompts"].update(path=None, hub="../prompts")),
    # --- requires
    Case("requires-missing-distribution", ["/requires/0:", "'rlhf-spec-no-such-plugin' is not installed"],
         _set("requires", ["rlhf-spec-no-such-plugin>=0.1"])),
    Case("requires-newer-version", ["/requires/0:", "requires >=99"], _set("requires", ["rlhf-spec>=99"])),
    Case("requires-not-a-requirement", ["/requires/1:", "not a valid requirement"], _set("requires", ["rlhf-spec", "rlhf spec ==="])),
    # --- command-line overrides and options
    Case("set-without-equals", ["--set expects KEY=VALUE"], args=["--set", "stages.sample.params.n"]),
    Case("set-unknown-stage", ["no element 'sampel' under /stages", "did you mean 'sample'?"],
         args=["--set", "stages.sampel.params.n=2"]),
    Case("set-index-out-of-range", ["no element '9' under /stages"], args=["--set", "stages.9.params.n=2"]),
    Case("set-into-a-string", ["/name is not an object or list"], args=["--set", "name.first=1"]),
    Case("set-bad-value", ["/stages/1/params/n:", "greater than or equal to 1"], args=["--set", "stages.sample.params.n=-3"]),
    Case("set-wrong-type", ["/stages/1/params/temperature:", '"hot"'], args=["--set", "stages.sample.params.temperature=hot"]),
    Case("set-unknown-param", ["/stages/1/params/tempreature:", "did you mean 'temperature'?"],
         args=["--set", "stages.sample.params.tempreature=0.5"]),
    Case("until-unknown-stage", ["--until: unknown stage 'evaluat'", "did you mean 'evaluate'?"], args=["--until", "evaluat"]),
    Case("force-unknown-stage", ["--force: unknown stage 'sampel'"], args=["--force", "sampel"]),
]


def _prepare(case: Case, env: Env, spec: dict) -> list[str]:
    """Write the case's spec file into ``env.tmp``; return the ``run`` argv (cache and report inside ``env.tmp``)."""
    path = env.tmp / "spec.json"
    if case.text is not None:
        path.write_text(case.text)
    else:
        if case.edit is not None:
            case.edit(spec, env)
        write_spec(env.tmp, spec)
        if case.raw is not None:
            path.write_text(case.raw(path.read_text()))
    args = list(case.args)
    if "--spec-path" in args:
        i = args.index("--spec-path")
        path = Path(args[i + 1])
        del args[i : i + 2]
    return ["run", str(path), "--cache-dir", str(env.tmp / "cache"), "--report", str(env.tmp / "report.json"), *args]


def _assert_rejected(code: int, out: str, err: str, case: Case, tmp: Path) -> None:
    assert code == 2, f"{case.id}: exit {code}\nstdout:\n{out}\nstderr:\n{err}"
    for want in case.expect:
        assert want in err, f"{case.id}: {want!r} not in stderr:\n{err}"
    assert "Traceback" not in out + err, f"{case.id}: a traceback leaked:\n{err}"
    assert "internal error" not in err
    cache = tmp / "cache"
    assert not cache.exists() or not any(cache.iterdir()), f"{case.id}: wrote into the cache: {list(cache.rglob('*'))}"
    assert not (tmp / "report.json").exists(), f"{case.id}: wrote a run report"


@pytest.fixture
def env(tmp_path, hh_file, tiny_models, monkeypatch) -> Env:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RLHF_SPEC_CACHE", raising=False)
    return Env(tmp_path, hh_file, tiny_models)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_malformed_spec_rejected(case, env, tiny_spec, capsys):
    argv = _prepare(case, env, tiny_spec)
    code = main(argv)
    out, err = capsys.readouterr()
    _assert_rejected(code, out, err, case, env.tmp)


def test_the_valid_base_spec_passes(env, tiny_spec, capsys):
    """The cases differ from a spec that validates, so each rejection is due to its own edit."""
    path = write_spec(env.tmp, tiny_spec)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    # relative paths inside the working folder are fine
    local = env.tmp / "models" / "policy"
    local.parent.mkdir()
    local.symlink_to(env.models["policy"])
    tiny_spec["models"]["policy"]["path"] = "models/./policy"
    path = write_spec(env.tmp, tiny_spec)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_every_problem_is_reported_at_once(env, tiny_spec, capsys):
    """Three independent mistakes give three problems in one message, not one per attempt."""
    tiny_spec["stages"][SAMPLE]["params"]["temperature"] = -1
    tiny_spec["stages"][PAIR]["params"]["test_sise"] = 2
    tiny_spec["seed"] = "x"
    path = write_spec(env.tmp, tiny_spec)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "3 problems" in err
    for ptr in ("/stages/1/params/temperature", "/stages/4/params/test_sise", "/seed"):
        assert ptr in err


# ----------------------------------------------------------------------------- real subprocesses

SUBPROCESS_IDS = ["json-trailing-comma", "temperature-negative", "cycle", "dataset-without-named-column",
                  "model-path-escapes", "set-unknown-stage"]


@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS_IDS], ids=lambda c: c.id)
def test_malformed_spec_rejected_in_subprocess(case, env, tiny_spec):
    argv = _prepare(case, env, tiny_spec)
    r = cli(*argv, cwd=env.tmp, timeout=120)
    _assert_rejected(r.returncode, r.stdout, r.stderr, case, env.tmp)


def _plugin_path(tmp: Path, *dists) -> dict:
    root = tmp / "site"
    for d in dists:
        make_plugin_dist(root, *d)
    return {"PYTHONPATH": str(root)}


PLUGIN_CASES = ["ambiguous-uses", "remote-code-not-allowed", "plugin-fails-to-import"]


@pytest.mark.parametrize("which", PLUGIN_CASES)
def test_plugin_problems_rejected(which, env, tiny_spec):
    if which == "ambiguous-uses":
        e = _plugin_path(env.tmp, ("rlhf-spec-twin-a", "0.1.0", "twin_a", DUP_PLUGIN),
                         ("rlhf-spec-twin-b", "2.0.0", "twin_b", DUP_PLUGIN))
        tiny_spec["stages"][SAMPLE]["uses"] = "twin-sampler"
        tiny_spec["stages"][SAMPLE]["params"] = {"rows": 2}
        expect = ["/stages/1/uses:", "more than one distribution", "rlhf-spec-twin-a 0.1.0", "rlhf-spec-twin-b 2.0.0"]
    elif which == "remote-code-not-allowed":
        e = _plugin_path(env.tmp, ("rlhf-spec-remote-rm", "0.3.0", "remote_rm_plugin", REMOTE_CODE_PLUGIN))
        tiny_spec["stages"][SCORE]["uses"] = "remote-rm"
        tiny_spec["stages"][SCORE]["params"] = {"reward_model": "backbone"}
        expect = ["/stages/2/params/reward_model:", "/models/backbone/trust_remote_code"]
    else:
        e = _plugin_path(env.tmp, ("rlhf-spec-broken", "0.0.1", "broken_plugin", BROKEN_PLUGIN))
        tiny_spec["stages"][SAMPLE]["uses"] = "broken"
        expect = ["/stages/1/uses:", "rlhf-spec-broken 0.0.1 failed to load", "a_module_that_is_not_installed_anywhere"]
    case = Case(which, expect)
    argv = _prepare(case, env, tiny_spec)
    r = cli(*argv, cwd=env.tmp, env=e, timeout=120)
    _assert_rejected(r.returncode, r.stdout, r.stderr, case, env.tmp)
    if which == "remote-code-not-allowed":
        # allowing remote code for exactly that model makes the same spec valid
        tiny_spec["models"]["backbone"]["trust_remote_code"] = True
        write_spec(env.tmp, tiny_spec)
        ok = cli("validate", str(env.tmp / "spec.json"), cwd=env.tmp, env=e, timeout=120)
        assert ok.returncode == 0, ok.stderr


def test_plugin_checks_run_alongside_other_problems(env, tiny_spec):
    """A plugin's own check reports in the same round as an unrelated mistake elsewhere in the spec."""
    e = _plugin_path(env.tmp, ("rlhf-spec-remote-rm", "0.3.0", "remote_rm_plugin", REMOTE_CODE_PLUGIN))
    tiny_spec["stages"][SCORE]["uses"] = "remote-rm"
    tiny_spec["stages"][SCORE]["params"] = {"reward_model": "backbone"}
    tiny_spec["stages"][SAMPLE]["params"]["temprature"] = 0.5
    r = cli(*_prepare(Case("both", []), env, tiny_spec), cwd=env.tmp, env=e, timeout=120)
    assert r.returncode == 2 and "2 problems" in r.stderr, r.stderr
    assert "/stages/1/params/temprature" in r.stderr and "/stages/2/params/reward_model:" in r.stderr


def _armorm_installed() -> bool:
    from rlhf_spec.plugins import load_registry

    return "armorm" in load_registry().rewards


@pytest.mark.skipif(not _armorm_installed(), reason="the rlhf-spec-armorm plugin is not installed")
def test_armorm_without_trust_remote_code_rejected(env, tiny_spec, capsys):
    """The ArmoRM reward needs the model's repository code; a spec must allow it for that model."""
    tiny_spec["models"]["armo"] = {"hub": "RLHFlow/ArmoRM-Llama3-8B-v0.1", "revision": "0" * 40}
    tiny_spec["stages"][SCORE]["params"]["reward"] = {"uses": "armorm", "params": {"model": "armo"}}
    case = Case("armorm", ["/stages/2/params/reward/params/model:", "/models/armo/trust_remote_code"])
    code = main(_prepare(case, env, tiny_spec))
    out, err = capsys.readouterr()
    _assert_rejected(code, out, err, case, env.tmp)
    # allowed for that one model, the same spec validates
    tiny_spec["models"]["armo"]["trust_remote_code"] = True
    assert main(["validate", str(write_spec(env.tmp, tiny_spec))]) == 0, capsys.readouterr().err


def test_case_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)


# ----------------------------------------------------------------------------- security


def _model_with_custom_code(folder: Path) -> Path:
    """A model folder whose config asks for its own Python code; importing that code leaves a marker file."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "marker-net",
        "auto_map": {"AutoConfig": "configuration_marker.MarkerConfig", "AutoModelForCausalLM": "modeling_marker.MarkerModel"},
    }))
    code = textwrap.dedent("""
        import pathlib
        pathlib.Path(__file__).resolve().parent.joinpath("CODE_RAN").touch()
        pathlib.Path(%r).joinpath("CODE_RAN").touch()
        from transformers import PretrainedConfig

        class MarkerConfig(PretrainedConfig):
            model_type = "marker-net"
    """) % str(folder)
    for name in ("configuration_marker.py", "modeling_marker.py"):
        (folder / name).write_text(code)
    return folder


def test_remote_code_runs_only_when_the_spec_allows_it_for_that_model(env, tiny_spec, capsys):
    evil = _model_with_custom_code(env.tmp / "custom-model")
    spec = keep_stages(tiny_spec, "sample")
    spec["models"]["policy"].update(path=str(evil), tokenizer=str(env.models["policy"]))
    spec["models"]["backbone"]["trust_remote_code"] = True  # allowing another model does not allow this one
    path = write_spec(env.tmp, spec)
    code, _ = run_inprocess(path, env.tmp / "cache", env.tmp / "r.json")
    err = capsys.readouterr().err
    assert code == 1 and "stage 'sample'" in err and "trust_remote_code=True" in err, err
    assert not (evil / "CODE_RAN").exists()
    from rlhf_spec.cache import Cache
    from rlhf_spec.plugins import registry
    from rlhf_spec.runner import Runner
    from rlhf_spec.spec import validate

    runner = Runner(validate(spec, registry()), Cache(env.tmp / "cache"))
    runner.compute_keys()
    assert runner.sources["sample"]["policy"].trust_remote_code is False
    # the switch is the model's own entry: turned on there (in a fresh process with its own module cache), the code runs
    spec["models"]["policy"]["trust_remote_code"] = True
    path = write_spec(env.tmp, spec)
    r = cli("run", str(path), "--cache-dir", str(env.tmp / "cache2"), cwd=env.tmp,
            env={"HF_HOME": str(env.tmp / "hf"), "HF_MODULES_CACHE": str(env.tmp / "hf" / "modules")}, timeout=300)
    assert r.returncode == 1  # the marker "model" is not a real one
    assert (evil / "CODE_RAN").exists()


def test_nothing_in_a_spec_is_evaluated_as_code(env, tiny_spec, capsys):
    marker = env.tmp / "EVALUATED"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    tiny_spec["description"] = payload
    tiny_spec["stages"][SAMPLE]["description"] = payload
    tiny_spec["salt"] = payload
    path = write_spec(env.tmp, tiny_spec)
    assert main(["validate", str(path)]) == 0
    code = main(["plan", str(path), "--cache-dir", str(env.tmp / "cache"), "--json",
                 "--set", f"stages.sample.params.max_prompt_tokens={payload}"])
    assert code == 2 and "/stages/1/params/max_prompt_tokens" in capsys.readouterr().err
    assert not marker.exists()


def test_the_package_has_no_eval_exec_or_unsafe_loaders():
    """Specs are read with json only; nothing in the package evaluates strings or unpickles spec data."""
    import ast

    import rlhf_spec

    banned_calls = {"eval", "exec", "compile", "__import__"}
    banned_modules = {"pickle", "marshal", "yaml", "shelve", "dill", "cloudpickle"}
    found = []
    for f in Path(rlhf_spec.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in banned_calls:
                found.append(f"{f.name}:{node.lineno} {node.func.id}()")
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                found += [f"{f.name}:{node.lineno} import {n}" for n in names if n.split(".")[0] in banned_modules]
    assert not found, found
