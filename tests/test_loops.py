"""The loops layer: the accelerate core every trainer shares (optimizer, micro-step, checkpoints), the
experience maker of online RL, and the layer rule that loops/ imports nothing above it."""

from __future__ import annotations

import ast
import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import ROOT

# What loops/ may import of the package (each other included): the layers below it.
ALLOWED = ("rlhf_spec.loops", "rlhf_spec.algorithms", "rlhf_spec.records", "rlhf_spec.errors", "rlhf_spec.hashing",
           "rlhf_spec.runtime", "rlhf_spec.model_source", "rlhf_spec.files")


def _package_imports(path: Path) -> list[str]:
    """Every ``rlhf_spec...`` module ``path`` imports, at module or function level, relative ones resolved."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "rlhf_spec.loops".split(".")[: 2 - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                out += [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                out.append(node.module or "")
    return [m for m in out if m == "rlhf_spec" or m.startswith("rlhf_spec.")]


def test_loops_import_only_the_layers_below_them():
    files = sorted((ROOT / "rlhf_spec" / "loops").glob("*.py"))
    assert len(files) >= 5
    upward = {f.name: m for f in files for m in _package_imports(f) if not m.startswith(ALLOWED)}
    assert not upward, f"loops/ modules import layers above them: {upward}"


# ----------------------------------------------------------------------------- the optimizer


def _optim_params(**kw):
    base = dict(learning_rate=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1, scheduler="constant",
                warmup_ratio=0.0)
    return types.SimpleNamespace(**{**base, **kw})


def test_make_optimizer_builds_8bit_adamw_from_bitsandbytes_with_the_same_settings(monkeypatch):
    from rlhf_spec.loops.core import make_optimizer

    made = []

    class FakeAdamW8bit(torch.optim.AdamW):
        def __init__(self, params, **kw):
            made.append(kw)
            super().__init__(params, **kw)

    fake = types.ModuleType("bitsandbytes")
    fake.optim = types.SimpleNamespace(AdamW8bit=FakeAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    model = torch.nn.Linear(3, 2)
    model.bias.requires_grad_(False)

    opt, sched = make_optimizer(model, _optim_params(optimizer="adamw_8bit"), num_updates=10)
    assert type(opt) is FakeAdamW8bit
    assert made == [{"lr": 0.01, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}]
    assert [p for g in opt.param_groups for p in g["params"]] == [model.weight]  # trainable parameters only
    assert sched.get_last_lr() == [0.01]

    opt, _ = make_optimizer(model, _optim_params(), num_updates=10)  # params without the field: torch's AdamW
    assert type(opt) is torch.optim.AdamW
    with pytest.raises(ValueError, match="adamw_8bit"):
        make_optimizer(model, _optim_params(optimizer="sgd"), num_updates=10)


# ----------------------------------------------------------------------------- the core: micro-step and checkpoints


class _Wrapped(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.policy = torch.nn.Linear(3, 1)


def _core(tmp_path: Path, seed: int):
    from rlhf_spec.loops.core import TrainingCore
    from rlhf_spec.loops.trainer import OptimParams

    params = OptimParams(learning_rate=0.1, per_device_train_batch_size=1, gradient_accumulation_steps=1, log_with=[],
                         scheduler="constant", warmup_ratio=0.0)
    core = TrainingCore(params, tmp_path / "tb", tmp_path / "checkpoints", seed=0, prefix="step",
                        state_file="state.json")
    core.prepare(_Wrapped(seed), num_updates=4, run_name="test", part="policy")
    return core


def test_core_micro_step_checkpoint_and_resume_restore_weights_history_and_loop_state(tmp_path):
    from rlhf_spec.loops.core import TrainingDiverged

    core = _core(tmp_path, seed=1)
    x = torch.ones(2, 3)
    before = core.unwrapped().weight.detach().clone()
    stats = core.micro_step(lambda: ((core.model.policy(x) ** 2).mean(), {"loss": 1.5}), "at nowhere")
    assert stats == {"loss": 1.5}
    assert not torch.equal(before, core.unwrapped().weight)  # the optimizer stepped
    with pytest.raises(TrainingDiverged, match=r"^loss is nan at update 7 \(micro-step 2\)$"):
        core.micro_step(lambda: (torch.tensor(float("nan")), {}), "at update 7 (micro-step 2)")

    for step in (1, 2):
        core.history.append({"step": step, "loss": 0.5 * step})
        core.save_checkpoint(step, {"step": step, "evals": [[0, 1.0]]}, {"step": step}, f"k:{step}")
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest.json", "step-0000002"]
    assert json.loads((ckpts / "latest.json").read_text()) == {"dir": "step-0000002", "step": 2}
    assert core.last_checkpoint == 2
    saved = core.unwrapped().weight.detach().clone()

    other = _core(tmp_path, seed=2)  # another start: its weights differ until the checkpoint is loaded
    assert not torch.equal(saved, other.unwrapped().weight)
    path, pointer, state = other.load_checkpoint()
    assert path == ckpts / "step-0000002" and pointer == {"dir": "step-0000002", "step": 2}
    assert state["step"] == 2 and state["evals"] == [[0, 1.0]]
    assert other.history == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 1.0}]
    assert torch.equal(saved, other.unwrapped().weight)
    assert other.mean({"a": 2.0}) == {"a": 2.0} and other.any_process(True) and not other.any_process(False)


# ----------------------------------------------------------------------------- the experience maker


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    from rlhf_spec.testing import make_tiny_policy

    return make_tiny_policy(tmp_path_factory.mktemp("loops_policy") / "policy")


class _Engine:
    """Generates fixed completions and records how it was called."""

    def __init__(self, events: list):
        self.model, self.events, self.calls = None, events, []

    def generate(self, prompt_ids, sampling, n, seed):
        from rlhf_spec.records import Completion

        self.calls.append((prompt_ids, sampling, n, seed, self.model, self.model.training))
        self.events.append("generate")
        replies = [[40, 41, 42], [43], [44, 45], [46, 47, 48, 49]]
        return [[Completion(token_ids=replies[(i * n + j) % 4], text="x" * (i * n + j + 1)) for j in range(n)]
                for i in range(len(prompt_ids))]


class _Reward:
    def __init__(self, events: list, fail: bool = False):
        self.events, self.fail, self.batches = events, fail, []

    def score(self, batch):
        from rlhf_spec.errors import RewardError
        from rlhf_spec.records import RewardOutput

        self.events.append("score")
        self.batches.append(batch)
        if self.fail:
            raise RewardError("reward 'r' returned a non-finite score")
        scores = [-float(len(t)) for t in batch.completions]
        return RewardOutput(scores=scores, components={"short": scores}, counts={"empty": 0})


def _maker(tiny_policy: Path, fail: bool = False):
    from transformers import AutoModelForCausalLM

    from rlhf_spec.algorithms.value_head import ActorCritic
    from rlhf_spec.loops.experience import ExperienceMaker

    events: list = []
    model = ActorCritic(AutoModelForCausalLM.from_pretrained(str(tiny_policy)))
    model.train()
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_policy))
    engine, reward = _Engine(events), _Reward(events, fail)
    maker = ExperienceMaker(engine, reward, reference, model, lambda: model.policy, pad_id=0, device="cpu",
                            temperature=1.0, logprob_batch_size=3, needs_values=False)
    return maker, model, engine, reward, events


def test_experience_maker_generates_scores_and_reads_logprobs_through_what_it_is_given(tiny_policy):
    import datasets
    maker, model, engine, reward, events = _maker(tiny_policy)
    prompts = [[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]
    rows = datasets.Dataset.from_dict({"prompt": prompts, "token_ids": [[3, 10, 11], [3, 12]], "prompt_tokens": [3, 2],
                                       "reference": ["ra", "rb"]})
    exp, info = maker.make(rows, "sampling", 2, 7, "at rollout step 1", on_generated=lambda: events.append("generated"))

    assert events == ["generate", "generated", "score"]
    ((ids, sampling, n, seed, generated_by, training),) = engine.calls
    assert ids == [[3, 10, 11], [3, 12]] and (sampling, n, seed) == ("sampling", 2, 7)
    assert generated_by is model.policy and not training and model.training  # eval mode for generation only
    (batch,) = reward.batches
    assert batch.completions == ["x", "xx", "xxx", "xxxx"]
    assert batch.prompts == [rows["prompt"][0]] * 2 + [rows["prompt"][1]] * 2
    assert batch.columns == {"reference": ["ra", "ra", "rb", "rb"]}  # the prompt's own columns stay out

    assert len(exp) == 4 and exp.group_size == 2 and exp.values is None
    assert exp.resp_lens == [3, 1, 2, 4]
    assert [it.input_ids for it in exp.items][1] == [3, 10, 11, 43] and exp.items[2].prompt_len == 2
    assert exp.scores.tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert exp.mask.tolist() == [[True] * 3 + [False], [True] + [False] * 3, [True] * 2 + [False] * 2, [True] * 4]
    assert torch.equal(info["components"]["short"], exp.scores) and info["counts"] == {"empty": 0}
    # the policy starts at the reference weights: its logprobs are the reference's, the KL is 0
    torch.testing.assert_close(exp.old_logprobs, exp.ref_logprobs)
    assert float(exp.kl_tokens.abs().max()) == 0.0
    assert (exp.entropy[exp.mask] > 0).all() and (exp.old_logprobs[~exp.mask] == 0).all()
    # logprob of rollout 3's last token, read off the reference's logits directly
    seq = torch.tensor([exp.items[3].input_ids])
    with torch.no_grad():
        logits = maker.reference(input_ids=seq).logits[0, -2] / (1.0 + 1e-7)
    assert float(exp.old_logprobs[3, 3]) == pytest.approx(float(torch.log_softmax(logits.float(), -1)[49]), abs=1e-5)


def test_experience_maker_stops_on_a_reward_error_naming_where(tiny_policy):
    import datasets

    from rlhf_spec.errors import RewardError

    maker, *_ = _maker(tiny_policy, fail=True)
    rows = datasets.Dataset.from_dict({"prompt": [[{"role": "user", "content": "a"}]], "token_ids": [[3, 10]]})
    with pytest.raises(RewardError) as ei:
        maker.make(rows, "sampling", 2, 7, "at rollout step 3; the last checkpoint (step 2) is kept")
    want = "reward 'r' returned a non-finite score at rollout step 3; the last checkpoint (step 2) is kept"
    assert str(ei.value) == want


def test_rollout_stats_k1_and_k3_kl_per_sequence_and_reward_components():
    from rlhf_spec.algorithms.policy_gradient import Experience
    from rlhf_spec.loops.experience import rollout_stats

    mask = torch.tensor([[True, True], [True, False]])
    old = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    exp = Experience(items=[None, None], resp_lens=[2, 1], scores=torch.tensor([1.0, 3.0]), mask=mask,
                     old_logprobs=old, ref_logprobs=torch.zeros(2, 2), entropy=torch.tensor([[1.0, 2.0], [3.0, 0.0]]),
                     group_size=1)
    row = rollout_stats(exp, {"components": {"c": torch.tensor([0.0, 2.0])}, "counts": {}}, lambda t: t, lambda d: d)

    def k3(x):
        return math.expm1(-x) + x

    assert row["kl"] == pytest.approx(((0.1 - 0.2) + 0.3) / 2)
    assert row["kl_k3"] == pytest.approx(((k3(0.1) + k3(-0.2)) + k3(0.3)) / 2)
    assert row["entropy"] == pytest.approx(2.0)  # token mean over the mask
    assert (row["reward_mean"], row["reward_std"], row["response_length_mean"]) == pytest.approx((2.0, 1.0, 1.5))
    assert (row["reward/c_mean"], row["reward/c_std"]) == pytest.approx((1.0, 1.0))
