"""One copy of each shared rule: the KL estimators, the row columns a reward receives, atomic writes,
a component's resources, and the pairwise capability of a reward."""

from __future__ import annotations

import ast
import json
import math
import random
from pathlib import Path

import pytest
import torch
from pydantic import BaseModel, ConfigDict

from rlhf_spec.algorithms.kl import KL_ESTIMATORS, kl_estimate, kl_mean_float, kl_term_float, kl_terms
from rlhf_spec.algorithms.ops import masked_mean
from rlhf_spec.algorithms.ppo import ClippedPolicyLoss, aggregate_loss
from rlhf_spec.context import CheckedReward, InputArtifact
from rlhf_spec.errors import RewardError
from rlhf_spec.errors import CacheError, SpecError
from rlhf_spec.hookspecs import hookimpl
from rlhf_spec.plugins import load_registry
from rlhf_spec.records import RewardBatch, RewardImpl, RewardOutput, RewardSpec, component_resources

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- KL estimators


def _log_ratios(n: int = 100_000, seed: int = 0) -> list[float]:
    """n per-token log-ratios: uniform in the quickstart's range -20..20, a tenth of them near 0."""
    rng = random.Random(seed)
    wide = [rng.uniform(-20.0, 20.0) for _ in range(n - n // 10)]
    return wide + [rng.uniform(-1e-4, 1e-4) for _ in range(n // 10)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_k3_is_the_online_loop_formula_bit_for_bit(dtype):
    x = torch.tensor(_log_ratios(), dtype=dtype).reshape(10, 100, 100)  # any shape
    got = kl_terms(x, "k3")
    assert got.shape == x.shape and got.dtype == dtype
    assert torch.equal(got, (torch.expm1(-x) + x).clamp_min(0))
    # the clamp changes no finite value: the unclamped k3 is never negative after rounding
    assert torch.equal(got, torch.expm1(-x) + x)


def test_k1_k2_terms_and_the_sign_convention():
    x = torch.tensor(_log_ratios(1000))
    assert torch.equal(kl_terms(x, "k1"), x)
    assert torch.equal(kl_terms(x, "k2"), 0.5 * x.square())
    # log_ratio = log pi - log pi_ref: a policy that puts more mass on its samples gives k1 > 0
    pi, ref = torch.tensor([0.9, 0.1]), torch.tensor([0.5, 0.5])
    exact = float((pi * (pi / ref).log()).sum())
    per_sample = kl_terms(pi.log() - ref.log(), "k3")
    assert math.isclose(float((pi * per_sample).sum()), exact, rel_tol=1e-5)  # k3 is unbiased under pi
    with pytest.raises(ValueError, match="unknown KL estimator 'k4'; expected one of"):
        kl_terms(x, "k4")


def test_evaluate_kl_figures_keep_their_python_float_reduction():
    flat = _log_ratios()
    # the formulas the evaluate stage computed its kl_k1 / kl_k3 with, in Python floats
    assert kl_mean_float(flat, "k1") == sum(flat) / len(flat)
    assert kl_mean_float(flat, "k3") == sum(max(0.0, math.expm1(-x) + x) for x in flat) / len(flat)
    assert all(kl_term_float(x, "k3") == max(0.0, math.expm1(-x) + x) for x in flat[:1000])
    assert kl_term_float(0.5, "k2") == 0.125 and kl_term_float(-0.5, "k1") == -0.5
    with pytest.raises(ValueError, match="at least one"):
        kl_mean_float([], "k3")
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_mean_float(flat, "kl")


def test_kl_estimate_takes_an_estimator_not_a_kind():
    lp, ref = torch.randn(4, 6), torch.randn(4, 6)
    mask = torch.rand(4, 6) > 0.3
    for name in KL_ESTIMATORS:
        want = torch.where(mask, kl_terms(lp - ref, name), torch.zeros(4, 6)).sum(-1)
        assert torch.equal(kl_estimate(lp, ref, mask, estimator=name), want)
    with pytest.raises(TypeError):
        kl_estimate(lp, ref, kind="k3")  # 'kind' names the stage kind in this project


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_clipped_policy_loss_k3_terms_are_unchanged(aggregation):
    """Loss, statistics and gradient equal the formulas written out before kl_terms existed."""
    gen = torch.Generator().manual_seed(0)
    old, ref = -3 * torch.rand(8, 12, generator=gen), -3 * torch.rand(8, 12, generator=gen)
    new = (old + 0.3 * torch.randn(8, 12, generator=gen)).requires_grad_()
    adv = torch.randn(8, 12, generator=gen)
    mask = torch.rand(8, 12, generator=gen) > 0.25
    ref = torch.where(mask, ref, torch.full_like(ref, float("-inf")))  # padding holds -inf
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, aggregation=aggregation, max_tokens=12)
    loss, stats = ClippedPolicyLoss(kl_coef=0.05, **kw)(new, old, adv, mask, ref)
    grad, = torch.autograd.grad(loss, new)

    pg, _ = ClippedPolicyLoss(kl_coef=0.0, **kw)(new, old, adv, mask)
    zero = torch.zeros_like(new)
    d = torch.where(mask, new - old, zero).detach()
    r = torch.where(mask, ref - new, zero)
    old_kl = aggregate_loss(torch.expm1(r) - r, mask, aggregation, 12)
    old_loss = pg + 0.05 * old_kl
    old_grad, = torch.autograd.grad(old_loss, new)
    assert torch.equal(loss, old_loss) and torch.equal(grad, old_grad)
    assert torch.equal(stats["ref_kl"], old_kl.detach())
    assert torch.equal(stats["approx_kl"], masked_mean(torch.expm1(d) - d, mask))


def test_pair_trainer_kl_stat_is_k2():
    from types import SimpleNamespace

    from rlhf_spec.stages.train.pair_trainer import _kl_stat

    pc, pr, rc, rr = (torch.randn(5) for _ in range(4))
    b = SimpleNamespace(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                        reference_rejected_logps=rr)
    lr = torch.cat([pc, pr]) - torch.cat([rc, rr])
    assert _kl_stat(b) == float((0.5 * lr.square()).mean())


# ----------------------------------------------------------------------------- reward columns


def _rows(columns: dict):
    import datasets

    return datasets.Dataset.from_dict(columns)


PROMPT = [{"role": "user", "content": "2 + 2?"}]


def test_from_rows_gives_score_the_columns_it_always_passed():
    rows = _rows({"prompt_id": ["a", "b"], "prompt": [PROMPT, PROMPT], "sample_index": [0, 1], "completion": ["4", "5"],
                  "completion_tokens": [1, 1], "prompt_tokens": [7, 7], "reference": ["4", "4"],
                  "messages": [PROMPT, PROMPT], "label": [True, False], "reward": [1.0, 0.0],
                  "reward/helpful": [1.0, 0.0]})
    batch = RewardBatch.from_rows(rows, list(rows["completion"]))
    standard = {"prompt_id", "prompt", "sample_index", "completion", "completion_tokens", "prompt_tokens"}
    before = {c: list(rows[c]) for c in rows.column_names if c not in standard and not c.startswith("reward")}
    assert batch.columns == before == {"reference": ["4", "4"], "messages": [PROMPT, PROMPT], "label": [True, False]}
    assert list(batch.columns) == ["reference", "messages", "label"]  # the rows' order
    assert batch.prompts == [PROMPT, PROMPT] and batch.completions == ["4", "5"] and len(batch) == 2


def test_from_rows_repeats_each_row_for_its_group_of_completions():
    rows = _rows({"prompt_id": ["a", "b"], "prompt": [PROMPT, [{"role": "user", "content": "hi"}]],
                  "token_ids": [[1, 2], [3]], "prompt_tokens": [2, 1], "reference": ["4", "x"],
                  "chosen": ["c1", "c2"], "rejected": ["r1", "r2"], "completion": ["demo 1", "demo 2"]})
    texts = ["a0", "a1", "a2", "b0", "b1", "b2"]  # G = 3 rollouts per prompt, grouped by prompt
    batch = RewardBatch.from_rows(rows, texts)
    assert batch.prompts == [rows["prompt"][0]] * 3 + [rows["prompt"][1]] * 3
    assert batch.columns == {"reference": ["4", "4", "4", "x", "x", "x"]}  # a demonstration is not the completion
    given = [[{"role": "user", "content": str(i)}] for i in range(6)]
    assert RewardBatch.from_rows(rows, texts, prompts=given).prompts == given
    assert RewardBatch.from_rows(rows, []).columns == {"reference": []}
    with pytest.raises(ValueError, match="got 5 completions for 2 rows"):
        RewardBatch.from_rows(rows, texts[:5])
    with pytest.raises(ValueError, match="got 2 prompts for 6 completions"):
        RewardBatch.from_rows(rows, texts, prompts=given[:2])


def test_judged_pairs_and_samples_follow_the_same_rule():
    from rlhf_spec.stages.judging import row_columns
    from rlhf_spec.stages.sample import SAMPLE_COLUMNS, samples_of

    pairs = _rows({"prompt_id": ["a"], "prompt": [PROMPT], "chosen": ["4"], "rejected": ["5"], "chosen_reward": [0.9],
                   "rejected_reward": [0.1], "split": ["test"], "reference": ["4"]})
    want = {"chosen_reward": [0.9, 0.9], "rejected_reward": [0.1, 0.1], "reference": ["4", "4"]}
    assert row_columns(pairs, 2) == want
    assert row_columns(pairs, 2) == RewardBatch.from_rows(pairs, ["x", "y"]).columns
    assert set(SAMPLE_COLUMNS) <= RewardBatch.OWN_COLUMNS
    prompts = _rows({"prompt_id": ["a"], "prompt": [PROMPT], "reference": ["4"], "chosen": ["c"], "rejected": ["r"],
                     "completion": ["demo"], "messages": [PROMPT], "token_ids": [[1]], "prompt_tokens": [1]})
    from rlhf_spec.records import Completion

    out = samples_of(prompts, [[Completion(token_ids=[5, 6], text="four")]], [0])
    assert list(out) == list(SAMPLE_COLUMNS) + ["reference", "messages"]
    assert out["completion"] == ["four"]


class _Spy:
    """A reward that records every batch it gets and scores each completion by its length."""

    batches: list = []

    def score(self, batch):
        self.batches.append(batch)
        return RewardOutput(scores=[float(len(c)) for c in batch.completions])


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Plugins:
    """In-process rewards: a spy, a pairwise comparer, and one that declares resources."""

    @hookimpl
    def rlhf_spec_register_rewards(self, register):
        register(RewardImpl(name="spy", params=_NoParams, load=lambda params, ctx: _Spy(), version="1"))
        register(RewardImpl(name="comparer", params=_NoParams, load=lambda params, ctx: _Comparer(), version="1",
                            pairwise=True))
        register(RewardImpl(name="heavy", params=_NoParams, load=lambda params, ctx: _Spy(), version="1",
                            resources=lambda params: {"reward_gpus": 1}))


def test_score_stage_builds_its_batches_with_from_rows(tmp_path, monkeypatch):
    import datasets

    from rlhf_spec.stages import score
    from rlhf_spec.testing import execute, make_context

    rows = {"prompt_id": ["a", "b", "c"], "prompt": [PROMPT] * 3, "sample_index": [0, 0, 0],
            "completion": ["4", "four", "IV"], "completion_tokens": [1, 1, 1], "prompt_tokens": [7, 7, 7],
            "reference": ["4", "4", "4"], "messages": [PROMPT] * 3}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "samples" / "data"))
    inp = InputArtifact("samples", "samples", "0" * 64, str(tmp_path / "samples"))
    reg = load_registry(extra=[_Plugins()], entry_points=False)
    params = score.ScoreParams(reward=RewardSpec(uses="spy"), num_shards=1)
    _Spy.batches.clear()
    built = []
    real = RewardBatch.from_rows.__func__
    spy = classmethod(lambda cls, *a, **k: built.append(real(cls, *a, **k)) or built[-1])
    monkeypatch.setattr(RewardBatch, "from_rows", spy)
    execute(make_context(params, tmp_path / "run", kind="score", uses="reward", inputs=[inp], registry=reg), score.run)
    [batch] = _Spy.batches
    assert built == [batch]
    assert batch.completions == ["4", "four", "IV"]
    assert batch.columns == {"reference": ["4"] * 3, "messages": [PROMPT] * 3}


# ----------------------------------------------------------------------------- atomic writes


def test_file_primitives_are_a_leaf_at_import_time():
    tree = ast.parse((ROOT / "rlhf_spec" / "files.py").read_text())
    internal = [node.module for node in tree.body if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert internal == ["errors"]  # rlhf_spec.errors imports the standard library only
    errors = ast.parse((ROOT / "rlhf_spec" / "errors.py").read_text())
    assert not [n for n in errors.body
                if isinstance(n, ast.ImportFrom) and (n.level or n.module.startswith("rlhf_spec"))]


def test_atomic_writes_leave_no_temporary_file(tmp_path):
    from rlhf_spec.files import atomic_write_bytes, atomic_write_json, atomic_write_text

    atomic_write_bytes(tmp_path / "deep" / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    obj = {"b": [1, 2.5], "a": "x"}
    atomic_write_json(tmp_path / "c.json", obj)
    assert (tmp_path / "deep" / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "c.json").read_text() == json.dumps(obj, indent=1, sort_keys=True)  # the format it always had
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(CacheError, match="cannot write"):
        atomic_write_text(tmp_path / "dir.json", "x")  # a folder is in the way: the rename fails
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []


def test_digest_memo_writes_through_the_file_primitives(tmp_path, monkeypatch):
    import rlhf_spec.hashing as fs
    from rlhf_spec.files import sha256_file
    from rlhf_spec.hashing import HashState

    f = tmp_path / "weights.bin"
    f.write_bytes(b"weights")
    written = []
    real = fs.atomic_write_text
    monkeypatch.setattr(fs, "atomic_write_text", lambda path, text: (written.append(Path(path)), real(path, text)))
    assert HashState(tmp_path / "memo").file_digest(f) == sha256_file(f)
    [slot] = written
    assert json.loads(slot.read_text())["sha256"] == sha256_file(f)
    assert HashState(tmp_path / "memo").file_digest(f) == sha256_file(f) and len(written) == 1  # served from the memo

    def refuse(path, text):
        raise CacheError("read-only")

    monkeypatch.setattr(fs, "atomic_write_text", refuse)
    g = tmp_path / "other.bin"
    g.write_bytes(b"other")
    assert HashState(tmp_path / "memo").file_digest(g) == sha256_file(g)  # a memo that cannot be written is skipped


class _FakeConfig:
    pass


class _FakeModel:
    def __init__(self):
        self.config = _FakeConfig()

    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text("{}")


class _FakeTokenizer:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer.json").write_text("{}")


def test_gguf_conversion_is_fsynced_and_committed(tmp_path, monkeypatch):
    import transformers

    import rlhf_spec.model_source as fs
    from rlhf_spec.model_source import ModelSource

    synced = []
    real = fs.fsync_tree
    monkeypatch.setattr(fs, "fsync_tree", lambda folder: (synced.append(Path(folder)), real(folder)))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _FakeModel())
    monkeypatch.setattr(ModelSource, "load_tokenizer", lambda self, **k: _FakeTokenizer())
    conv = tmp_path / "converted" / "m"
    src = ModelSource(name="m", origin="spec", path=str(tmp_path), gguf_file="m.gguf", converted_dir=str(conv))
    src._prepare_gguf()
    assert sorted(p.name for p in conv.iterdir()) == ["config.json", "tokenizer.json"]
    assert len(synced) == 1 and synced[0].parent == conv.parent and synced[0] != conv
    assert [p.name for p in conv.parent.iterdir()] == ["m"]  # no temporary folder left
    # another process's copy already there (without config.json yet): kept, ours discarded
    other = tmp_path / "converted" / "n"
    other.mkdir()
    (other / "theirs").write_text("x")
    theirs = ModelSource(name="n", origin="spec", path=str(tmp_path), gguf_file="n.gguf", converted_dir=str(other))
    theirs._prepare_gguf()
    assert [p.name for p in other.iterdir()] == ["theirs"]
    assert sorted(p.name for p in other.parent.iterdir()) == ["m", "n"]


# ----------------------------------------------------------------------------- resources and the pairwise capability


def _bound(params, registry):
    from rlhf_spec.spec.validate import bind_components

    problems: list = []
    bind_components(params, registry, "", problems)
    assert not problems
    return params


def test_component_resources_live_with_the_records():
    from rlhf_spec.stages import ai_feedback, score

    reg = load_registry(extra=[_Plugins(), score, ai_feedback], entry_points=False)
    spec = _bound(score.ScoreParams(reward=RewardSpec(uses="heavy")), reg).reward
    assert component_resources(spec) == {"reward_gpus": 1}
    assert component_resources(_bound(score.ScoreParams(reward=RewardSpec(uses="spy")), reg).reward) == {}
    stage = reg.stages[("pair", "ai-feedback")]
    params = _bound(ai_feedback.AIFeedbackParams(judge=RewardSpec(uses="comparer")), reg)
    assert stage.resources(params) == {"processes": 1, "gpus": "0-1", "judge": "comparer"}
    heavy = _bound(score.ScoreParams(reward=RewardSpec(uses="heavy")), reg)
    assert reg.stages[("score", "reward")].resources(heavy)["reward_gpus"] == 1
    with pytest.raises(RuntimeError, match="not resolved"):
        component_resources(RewardSpec(uses="heavy"))


class _Comparer:
    """A pairwise reward that is not llm-judge: prefers the longer completion."""

    def score(self, batch):
        raise ValueError("compares only")

    def compare(self, prompts, a, b):
        return [1.0 if len(x) > len(y) else 0.0 for x, y in zip(a, b)], [False] * len(a)


def test_pairwise_is_declared_on_the_record():
    from rlhf_spec.rewards import judge

    assert RewardImpl(name="x", params=_NoParams, load=print).is_pairwise(_NoParams()) is False
    assert RewardImpl(name="x", params=_NoParams, load=print, pairwise=True).is_pairwise(_NoParams()) is True
    reg = load_registry(extra=[judge], entry_points=False)
    rec = reg.rewards["llm-judge"]
    assert rec.is_pairwise(judge.JudgeParams(model="j", mode="pairwise"))
    assert not rec.is_pairwise(judge.JudgeParams(model="j"))


def _spec(judge: dict, score_reward: dict | None = None) -> dict:
    stages = [{"id": "sample", "kind": "sample", "uses": "generate",
               "params": {"policy": "policy", "prompts": "prompts"}},
              {"id": "label", "kind": "pair", "uses": "ai-feedback", "inputs": ["sample"], "params": {"judge": judge}}]
    if score_reward:
        stages.append({"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"],
                       "params": {"reward": score_reward}})
    return {"name": "t", "seed": 0, "models": {"policy": {"path": "policy"}},
            "datasets": {"prompts": {"path": "p.jsonl"}}, "stages": stages}


def _problems(data: dict, registry) -> list:
    from rlhf_spec.spec.validate import validate

    try:
        validate(data, registry, check_files=False)
    except SpecError as exc:
        return exc.problems
    return []


def test_validation_checks_the_declared_capability():
    reg = load_registry(extra=[_Plugins()])  # the installed built-ins and the in-process rewards
    assert _problems(_spec({"uses": "comparer"}), reg) == []  # any reward that declares it, not only llm-judge
    [p] = _problems(_spec({"uses": "spy"}), reg)
    assert p.pointer == "/stages/1/params/judge" and "pairwise" in p.message
    assert "reward 'spy' (<in-process>)" in p.message  # the reward and its distribution
    [p] = _problems(_spec({"uses": "llm-judge", "params": {"model": "policy"}}), reg)
    assert p.pointer == "/stages/1/params/judge" and "mode to 'pairwise'" in p.hint
    assert _problems(_spec({"uses": "llm-judge", "params": {"model": "policy", "mode": "pairwise"}}), reg) == []
    [p] = _problems(_spec({"uses": "comparer"}, {"uses": "comparer"}), reg)
    assert p.pointer == "/stages/2/params/reward" and "gives no score to one" in p.message


def test_checked_reward_compares_only_when_declared():
    prompts, a, b = [PROMPT] * 2, ["long reply", "x"], ["short", "longer"]
    ok = CheckedReward(_Comparer(), "reward 'comparer' (<in-process>)", "/stages/1/params/judge", pairwise=True)
    assert ok.compare(prompts, a, b) == ([1.0, 0.0], [False, False])
    undeclared = CheckedReward(_Comparer(), "reward 'comparer' (<in-process>)", "/stages/1/params/judge")
    with pytest.raises(RewardError, match="/stages/1/params/judge: reward 'comparer'.*does not compare"):
        undeclared.compare(prompts, a, b)

    class Short(_Comparer):
        def compare(self, prompts, a, b):
            return [0.5], [False]

    with pytest.raises(RewardError, match="returned 1 preferences for 2 pairs"):
        CheckedReward(Short(), "reward 'short'", "/x", pairwise=True).compare(prompts, a, b)

    class NaN(_Comparer):
        def compare(self, prompts, a, b):
            return [0.5, float("nan")], [False, True]

    with pytest.raises(RewardError, match="non-finite preference"):
        CheckedReward(NaN(), "reward 'nan'", "/x", pairwise=True).compare(prompts, a, b)
