"""Spec validation messages, --set overrides, the committed schema, and plugin discovery."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, cli, write_spec
from rlhf_spec.cli import main
from rlhf_spec.errors import SpecError, UsageError
from rlhf_spec.plugins import registry
from rlhf_spec.spec import apply_overrides, validate


def _errors(spec: dict) -> list[str]:
    with pytest.raises(SpecError) as ei:
        validate(spec, registry())
    return [p.render() for p in ei.value.problems]


def test_tiny_spec_is_valid_and_topologically_ordered(tiny_spec):
    tiny_spec["stages"].reverse()  # any order consistent with inputs is fine
    pipe = validate(tiny_spec, registry())
    order = [s.id for s in pipe.stages]
    assert order.index("sample") < order.index("score") < order.index("pair") < order.index("rebel") < order.index("evaluate")
    assert order.index("reward_model") < order.index("score")  # a model reference is a dependency too


def test_misspelt_param_names_pointer_and_suggestion(tiny_spec):
    tiny_spec["stages"][1]["params"]["temprature"] = 0.7
    errs = _errors(tiny_spec)
    assert errs == ["/stages/1/params/temprature: unknown key 'temprature' (did you mean 'temperature'?)"]


def test_unknown_uses_lists_installed(tiny_spec):
    tiny_spec["stages"][2]["uses"] = "rewards"
    (err,) = _errors(tiny_spec)
    assert err.startswith("/stages/2/uses: no 'score' implementation named 'rewards'; installed for 'score':")
    assert "did you mean 'reward'" in err


def test_range_type_reference_cycle_and_kind_checks(tiny_spec):
    s = tiny_spec["stages"]
    s[1]["params"]["top_p"] = 1.5
    s[1]["params"]["n"] = "many"
    s[4]["inputs"] = ["sample"]  # pair fed unscored samples
    s[3]["inputs"] = ["scroe"]
    errs = "\n".join(_errors(tiny_spec))
    assert "/stages/1/params/top_p" in errs and "/stages/1/params/n" in errs
    assert "/stages/3/inputs/0: unknown stage 'scroe' (did you mean 'score'?)" in errs
    s[1]["params"] = {"policy": "policy", "prompts": "prompts"}
    s[3]["inputs"] = ["score"]
    errs = "\n".join(_errors(tiny_spec))
    assert "/stages/4/inputs/0: pair/best-worst needs scored input, but stage 'sample' (sample) produces samples" in errs
    s[4]["inputs"] = ["filter"]
    s[2]["inputs"] = ["pair"]
    assert any("cycle" in e for e in _errors(tiny_spec))


def test_json_syntax_error_has_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "name": "x",\n  "stages": [,]\n}\n')
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "line 3, column 14" in err and "Traceback" not in err


def test_cli_validate_exit_code_and_no_traceback(tmp_path, tiny_spec):
    tiny_spec["stages"][0]["params"]["learning_rat"] = 1
    spec = write_spec(tmp_path, tiny_spec)
    r = cli("validate", str(spec))
    assert r.returncode == 2
    assert "/stages/0/params/learning_rat: unknown key 'learning_rat' (did you mean 'learning_rate'?)" in r.stderr
    assert "Traceback" not in r.stderr
    r = cli("validate", str(spec), "--set", "stages.reward_model.params.learning_rat=null")
    assert r.returncode == 2  # still there, now null


def test_set_overrides(tiny_spec):
    out = apply_overrides(tiny_spec, ["stages.sample.params.n=7", "stages.0.params.learning_rate=0.5", "seed=3", "models.policy.dtype=float32"])
    assert out["stages"][1]["params"]["n"] == 7 and out["stages"][0]["params"]["learning_rate"] == 0.5
    assert out["seed"] == 3 and out["models"]["policy"]["dtype"] == "float32"
    assert tiny_spec["seed"] == 0  # the input is not modified
    with pytest.raises(UsageError, match="did you mean 'sample'"):
        apply_overrides(tiny_spec, ["stages.sampel.params.n=2"])
    with pytest.raises(UsageError):
        apply_overrides(tiny_spec, ["no-equals-sign"])


def test_committed_schema_is_current():
    r = cli("schema")
    assert r.returncode == 0
    committed = (ROOT / "schemas" / "rlhf-spec.schema.json").read_text()
    assert json.loads(r.stdout) == json.loads(committed), "schemas/ is stale: run `make schema`"


def test_specs_in_repo_reference_the_schema():
    for p in (ROOT / "specs").glob("*.json"):
        assert json.loads(p.read_text()).get("$schema") == "../schemas/rlhf-spec.schema.json", p.name


def test_every_cpu_spec_validates_on_the_real_files():
    """Each specs/*_cpu.json validates against the project's models/ and data/ (placed by `make assets`):
    datasets and their columns, every stage's and reward's params, references and checks. A spec whose
    data lacks a column it names is refused at that dataset's JSON path."""
    from rlhf_spec.plugins import load_registry
    from rlhf_spec.spec import validate

    for sub in ("models", "data"):
        if not (ROOT / sub).is_dir():
            pytest.fail(f"{sub}/ missing: run `make assets`")
    reg = load_registry()
    names = sorted(p.name for p in (ROOT / "specs").glob("*_cpu.json"))
    assert {"quickstart_cpu.json", "rlaif_cpu.json", "helpful_safety_cpu.json", "gsm8k_rule_cpu.json", "rest_cpu.json"} <= set(names)
    for name in names:
        validate(json.loads((ROOT / "specs" / name).read_text()), reg, base=ROOT)
    spec = json.loads((ROOT / "specs" / "rlaif_cpu.json").read_text())
    spec["datasets"]["alpaca_eval"]["path"] = "data/alpaca_eval/gpt4__model_outputs.json"  # outputs, not annotations
    with pytest.raises(SpecError, match="/datasets/alpaca_eval/adapter: .* has no column"):
        validate(spec, reg, base=ROOT)


def test_plugins_json_lists_builtins_for_all_kinds():
    r = cli("plugins", "--json")
    assert r.returncode == 0
    rows = json.loads(r.stdout)["stages"]
    builtin = {row["kind"] for row in rows if row["distribution"] == "rlhf-spec"}
    assert builtin == {"sample", "score", "filter", "pair", "train", "evaluate"}


def _fake_dist(site: Path, dist: str, module: str, body: str, version: str = "0.3.1") -> None:
    """A real installed distribution: a module plus a dist-info with entry points in group rlhf_spec."""
    (site / f"{module}.py").write_text(textwrap.dedent(body))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[rlhf_spec]\n{module} = {module}\n")
    (info / "RECORD").write_text("")


def test_broken_plugin_is_reported_and_breaks_only_its_specs(tmp_path, tiny_spec):
    site = tmp_path / "site"
    site.mkdir()
    _fake_dist(site, "rlhf-spec-broken", "rlhf_spec_broken", "import a_module_that_does_not_exist\n")
    env = {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = cli("plugins", "--json", env=env)
    assert r.returncode == 0
    fails = json.loads(r.stdout)["failures"]
    assert fails and fails[0]["distribution"] == "rlhf-spec-broken" and fails[0]["version"] == "0.3.1"
    assert "a_module_that_does_not_exist" in fails[0]["error"]
    spec = write_spec(tmp_path, tiny_spec)
    assert cli("validate", str(spec), env=env).returncode == 0  # specs not using it still work
    tiny_spec["stages"][2]["uses"] = "broken-rm"
    spec = write_spec(tmp_path, tiny_spec)
    r = cli("validate", str(spec), env=env)
    assert r.returncode == 2
    assert "plugin 'rlhf_spec_broken' from rlhf-spec-broken 0.3.1 failed to load" in r.stderr


def test_third_party_plugin_registers_and_conflict_is_named(tmp_path, tiny_spec):
    site = tmp_path / "site"
    site.mkdir()
    body = '''
    from pydantic import BaseModel, ConfigDict
    from rlhf_spec import StageImpl, hookimpl

    class P(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def run(ctx):
        return None

    @hookimpl
    def rlhf_spec_register_stages(register):
        register(StageImpl(kind="filter", name="{name}", params=P, run=run, inputs=("samples", "scored"),
                           min_inputs=1, max_inputs=1, output="same"))
    '''
    _fake_dist(site, "rlhf-spec-one", "rlhf_spec_one", body.replace("{name}", "noop"))
    _fake_dist(site, "rlhf-spec-two", "rlhf_spec_two", body.replace("{name}", "noop"), version="1.0")
    env = {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    tiny_spec["stages"][3] = {"id": "filter", "kind": "filter", "uses": "noop", "inputs": ["score"], "params": {}}
    spec = write_spec(tmp_path, tiny_spec)
    r = cli("validate", str(spec), env=env)
    assert r.returncode == 2
    assert "registered for kind 'filter' by more than one distribution" in r.stderr
    assert "rlhf-spec-one" in r.stderr and "rlhf-spec-two" in r.stderr
    env1 = {"PYTHONPATH": str(site) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    (site / "rlhf_spec_two-1.0.dist-info" / "entry_points.txt").write_text("")
    r = cli("validate", str(spec), env=env1)
    assert r.returncode == 0, r.stderr
    r = cli("plugins", "--json", env=env1)
    row = [x for x in json.loads(r.stdout)["stages"] if x["name"] == "noop"][0]
    assert row["distribution"] == "rlhf-spec-one" and row["version"] == "0.3.1"


@pytest.mark.parametrize("old,new", [("lr", "learning_rate"),
                                     ("per_device_batch_size", "per_device_train_batch_size")])
def test_old_param_names_are_accepted_with_the_same_key(tmp_path, tiny_spec, old, new):
    """Old train param names ('lr' up to 0.1, 'per_device_batch_size' up to 0.2) still validate, warn, and
    key the stage exactly as the new names do; giving both is an error at the params' pointer."""
    from rlhf_spec.cache import Cache
    from rlhf_spec.runner import Runner
    from rlhf_spec.spec import load_pipeline

    keys = []
    for name in (new, old):
        spec = json.loads(json.dumps(tiny_spec))
        params = spec["stages"][0]["params"]
        params[name] = params.pop(new, 2)
        with pytest.warns(FutureWarning, match=f"'{old}' is now called '{new}'") if name == old else _no_warning():
            (tmp_path / name).mkdir()
            runner = Runner(load_pipeline(write_spec(tmp_path / name, spec), registry()), Cache(tmp_path / "cache"))
            keys.append(runner.key(spec["stages"][0]["id"]))
    assert keys[0] == keys[1]
    spec["stages"][0]["params"][new] = spec["stages"][0]["params"][old]
    (tmp_path / "both").mkdir()
    r = cli("validate", str(write_spec(tmp_path / "both", spec)))
    assert r.returncode == 2 and f"/stages/0/params: give '{new}' only" in r.stderr, r.stderr


def test_a_renamed_param_keeps_the_key_name_it_was_written_with():
    """per_device_train_batch_size (per_device_batch_size up to 0.2) enters keys under its old name, so
    the rename reuses every cache entry and, the stage seed deriving from the key, every figure; a field
    that was never renamed enters under its own name."""
    from rlhf_spec import key_view
    from rlhf_spec.stages.train.preference import DPOParams
    from rlhf_spec.stages.train.reward_model import RewardModelParams

    for params in (DPOParams(policy="p", per_device_train_batch_size=4),
                   RewardModelParams(backbone="b", per_device_train_batch_size=4)):
        view = key_view(params)
        assert view["per_device_batch_size"] == 4 and "per_device_train_batch_size" not in view
        assert "gradient_accumulation_steps" in view and "learning_rate" in view


def _no_warning():
    import contextlib

    return contextlib.nullcontext()
