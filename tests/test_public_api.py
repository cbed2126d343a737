"""The public API (``rlhf_spec.__all__``) a plugin written against ``rlhf_spec`` alone needs, and the
plugin defects it exposed: ``source_hash`` with ``pair_trainer``, params with a pydantic alias (worker
jobs, keys, ``plan --explain``) and the testing helpers that give an installed record. Which layers the
built-in stages, rewards and backends import is checked by the import-linter contracts."""

from __future__ import annotations

import json
import types

import pytest
from pydantic import BaseModel, ConfigDict, Field

from conftest import ROOT, cli, make_plugin_dist, write_spec

NEEDED = {"generate_passes", "sampling_seed", "prompt_token_ids", "prepare_prompts", "compare", "compare_preferences",
          "win_rate", "reward_difference", "bootstrap_mean_ci", "wilson_interval", "length_controlled_win_rate",
          "key_view", "Spec"}


def test_every_public_name_resolves_and_the_new_ones_are_there():
    import rlhf_spec

    missing = []
    for name in rlhf_spec.__all__:
        try:
            getattr(rlhf_spec, name)
        except (AttributeError, ImportError) as exc:
            missing.append(f"{name}: {exc}")
    assert not missing, missing
    assert NEEDED <= set(rlhf_spec.__all__), NEEDED - set(rlhf_spec.__all__)
    assert rlhf_spec.__version__ == "0.3.0"
    assert rlhf_spec.prepare_prompts.__module__ == "rlhf_spec.backends"  # a surface helper, not a stage's internals


def test_docs_table_lists_every_public_name():
    import rlhf_spec

    text = (ROOT / "docs" / "plugins.md").read_text()
    table = text[text.index("## The public API"):text.index("## Three surfaces")]
    cells = [row.split("|")[2] for row in table.splitlines() if row.startswith("|")]
    listed = {n.strip().strip("`") for cell in cells for n in cell.split(",")}
    assert set(rlhf_spec.__all__) - {"__version__"} <= listed, set(rlhf_spec.__all__) - listed - {"__version__"}
    assert NEEDED <= listed
    assert "## What moved in 0.3.0" in text


def test_sampling_seed_is_the_rule_sample_uses():
    from rlhf_spec import sampling_seed

    assert [sampling_seed(0, p, 50) for p in range(3)] == [0, 50, 100]  # REBEL's seed=p*50
    assert sampling_seed(7, 2, 3) == 13


# ----------------------------------------------------------------------------- source_hash and pair_trainer

LOSS_PLUGIN = """
from rlhf_spec import PAIRS, POLICY, PolicyTrainParams, StageImpl, hookimpl, pair_trainer

from .loss import make_loss


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="train", name="margin-loss", params=PolicyTrainParams, version="1", source_hash=True,
                       run=pair_trainer(make_loss, reference_free=True), inputs=(PAIRS,), max_inputs=1,
                       output=POLICY))
"""

LOSS = """
def make_loss(params):
    def loss(b):
        value = (MARGIN - b.policy_chosen_logps + b.policy_rejected_logps).clamp_min(0.0).mean()
        return value, {"loss": float(value.detach())}
    return loss
"""


def test_pair_trainer_run_belongs_to_the_loss_module():
    from rlhf_spec import pair_trainer

    def make_loss(p):
        return None

    assert pair_trainer(make_loss).__module__ == __name__


def test_source_hash_follows_the_plugin_loss_of_a_pair_trainer(tmp_path):
    """Editing the loss of a ``pair_trainer`` stage registered with ``source_hash=True`` changes its key."""
    from rlhf_spec.testing import make_tiny_policy

    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-margin", "1.0.0", "margin_plugin", LOSS_PLUGIN)
    (site / "margin_plugin" / "loss.py").write_text(LOSS.replace("MARGIN", "1.0"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello there.", "rejected": "No."}) + "\n")
    spec = write_spec(tmp_path, {
        "name": "margin", "models": {"policy": {"path": str(make_tiny_policy(tmp_path / "policy"))}},
        "datasets": {"pairs": {"path": str(pairs), "chosen_column": "chosen", "rejected_column": "rejected"}},
        "stages": [{"id": "train", "kind": "train", "uses": "margin-loss",
                    "params": {"policy": "policy", "dataset": "pairs"}}]})
    env = {"PYTHONPATH": str(site)}

    def key() -> str:
        r = cli("plan", str(spec), "--json", "--cache-dir", str(tmp_path / "cache"), env=env)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)[0]["key"]

    first = key()
    assert key() == first
    (site / "margin_plugin" / "loss.py").write_text(LOSS.replace("MARGIN", "2.0"))
    assert key() != first, "editing the plugin's loss kept the stage's key"


# ----------------------------------------------------------------------------- params with an alias


class AliasedParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rows_count: int = Field(3, ge=1, alias="rows-count", description="Rows to write.")
    tag: str = Field("a", description="A plain field, no alias.")


def _write_rows(ctx):
    import datasets

    from rlhf_spec import StageResult

    n = ctx.params.rows_count
    ctx.save_dataset(datasets.Dataset.from_dict({
        "prompt_id": [f"{i:016x}" for i in range(n)],
        "prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(n)],
        "sample_index": [0] * n, "completion": [ctx.params.tag] * n}))
    return StageResult(rows=n)


def _alias_plugin():
    from rlhf_spec import StageImpl, hookimpl

    @hookimpl
    def rlhf_spec_register_stages(register):
        register(StageImpl(kind="sample", name="aliased-rows", params=AliasedParams, run=_write_rows, version="1"))

    return types.SimpleNamespace(__name__="alias_plugin", rlhf_spec_register_stages=rlhf_spec_register_stages)


def test_aliased_params_survive_the_worker_job(tmp_path):
    """A multi-process stage's workers validate the params again from the job file: by their aliases."""
    from rlhf_spec.launch import context_to_job, job_to_context
    from rlhf_spec.testing import make_context, registry_with

    reg = registry_with(_alias_plugin(), entry_points=False)
    params = AliasedParams.model_validate({"rows-count": 5})
    ctx = make_context(params, tmp_path, kind="sample", uses="aliased-rows", registry=reg)
    job = json.loads(json.dumps(context_to_job(ctx)))
    assert job["params"] == {"rows-count": 5, "tag": "a"}
    back, impl = job_to_context(job, reg)
    assert back.params == params and impl.name == "aliased-rows"


def test_key_view_names_a_field_by_its_alias_and_builtin_keys_keep_their_names():
    from rlhf_spec import key_view
    from rlhf_spec.plugins import registry

    assert key_view(AliasedParams.model_validate({"rows-count": 5})) == {"rows-count": 5, "tag": "a"}
    # no built-in params model has an alias, so no built-in stage's key changes
    aliased = []
    reg = registry()
    models = [r.params for r in reg.stages.values()] + [r.params for r in reg.rewards.values()]
    models += [r.params for r in reg.backends.values()]
    seen: set = set()
    while models:
        m = models.pop()
        if m in seen:
            continue
        seen.add(m)
        for fname, f in m.model_fields.items():
            if (f.alias or fname) != fname:
                aliased.append(f"{m.__name__}.{fname}")
            for sub in _model_types(f.annotation):
                models.append(sub)
    assert not aliased, aliased


def _model_types(tp) -> list:
    from typing import get_args

    out = [tp] if isinstance(tp, type) and issubclass(tp, BaseModel) else []
    for arg in get_args(tp) or ():
        out += _model_types(arg)
    return out


ALIAS_DIST = """
import datasets
from pydantic import BaseModel, ConfigDict, Field
from rlhf_spec import StageImpl, StageResult, hookimpl


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rows_count: int = Field(3, ge=1, alias="rows-count")


def run(ctx):
    n = ctx.params.rows_count
    ctx.save_dataset(datasets.Dataset.from_dict({
        "prompt_id": [f"{i:016x}" for i in range(n)], "prompt": [[{"role": "user", "content": "q"}]] * n,
        "sample_index": [0] * n, "completion": ["a"] * n}))
    return StageResult(rows=n)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="sample", name="aliased-rows", params=Params, run=run, version="1"))
"""


def test_plan_explain_names_the_alias(tmp_path):
    site = make_plugin_dist(tmp_path / "site", "rlhf-spec-aliased", "1.0.0", "aliased_plugin", ALIAS_DIST)
    env = {"PYTHONPATH": str(site)}
    stage = {"id": "rows", "kind": "sample", "uses": "aliased-rows", "params": {"rows-count": 3}}
    spec = write_spec(tmp_path, {"name": "aliased", "stages": [stage]})
    cache = str(tmp_path / "cache")
    r = cli("run", str(spec), "--cache-dir", cache, env=env)
    assert r.returncode == 0, r.stderr
    stage["params"]["rows-count"] = 4
    spec = write_spec(tmp_path, {"name": "aliased", "stages": [stage]})
    r = cli("plan", str(spec), "--json", "--explain", "--cache-dir", cache, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["changes"] == ["params.rows-count: 3 -> 4"]


# ----------------------------------------------------------------------------- testing helpers


def test_installed_record_and_registry_with(tmp_path):
    from rlhf_spec.testing import installed_record, make_context, registry_with

    rec = installed_record("backend", "transformers")
    assert rec.distribution == "rlhf-spec" and rec.name == "transformers"
    assert installed_record("sample", "generate").kind == "sample"
    with pytest.raises(LookupError, match="no 'sample' implementation named 'nope'"):
        installed_record("sample", "nope")
    reg = registry_with(_alias_plugin())
    rec = installed_record("sample", "aliased-rows", registry=reg)
    assert rec.distribution == "<in-process>" and ("sample", "generate") in reg.stages  # the installed ones too
    ctx = make_context(AliasedParams(), tmp_path, kind="sample", uses="aliased-rows", registry=reg)
    assert rec.run(ctx).rows == 3
