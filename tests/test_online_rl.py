"""Online RL stages (``train``/``ppo``, ``grpo``, ``rloo``, ``reinforce++``) on a tiny real Llama.

The task: the ``length`` rule reward with ``unit: "characters"`` and a negative ``per_unit``, so shorter
replies score higher. A random-initialised policy writes about 7 characters in 8 tokens; it learns to
pick short tokens and to stop early within ten rollout steps at a high learning rate. Every run goes
through the real runner (``rlhf-spec run``), in this process or, where a run must be killed with
SIGKILL, in a subprocess; the stages come from an in-process registry until the entry points are in
pyproject.toml.

Runs use one CPU thread: on a shared 2-core machine a tiny model's forward pass took about 35 times
longer with two threads contending than with one. Seeds, prompts and kill points are deterministic, so
every verdict below holds exactly on every rerun.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import rlhf_spec.stages.train.online as online_stages
from conftest import ROOT, registry_fixture
from rlhf_spec.cli import main

STEPS = 10
REQUIRED = ("policy_loss", "kl", "kl_coef", "entropy", "clip_fraction", "reward_mean", "reward_std",
            "response_length_mean", "learning_rate", "step")
DRIVER = """
import sys
from rlhf_spec.plugins import load_registry, set_registry
import rlhf_spec.stages.train.online as online
reg = load_registry()
if ("train", "ppo") not in reg.stages:
    reg = load_registry(extra=[online])
set_registry(reg)
from rlhf_spec.cli import main
sys.exit(main(sys.argv[1:]))
"""


# ----------------------------------------------------------------------------- fixtures


def _nan_reward_plugin():
    """A test reward that scores ``-len(text)`` and returns NaN for every completion on its ``nan_at_call``-th call."""
    from pydantic import BaseModel, ConfigDict

    from rlhf_spec import RewardImpl, RewardOutput, hookimpl

    class NanParams(BaseModel):
        model_config = ConfigDict(extra="forbid")
        nan_at_call: int = 2

    class NanReward:
        def __init__(self, p):
            self.p, self.calls = p, 0

        def score(self, batch):
            self.calls += 1
            bad = self.calls == self.p.nan_at_call
            return RewardOutput(scores=[float("nan") if bad else -float(len(t)) for t in batch.completions])

    @hookimpl
    def rlhf_spec_register_rewards(register):
        register(RewardImpl(name="test-nan-at-call", params=NanParams, load=lambda p, ctx: NanReward(p), version="1"))

    mod = types.ModuleType("online_test_rewards")
    mod.rlhf_spec_register_rewards = rlhf_spec_register_rewards
    return mod


# The installed plugins, the online stages (unless installed already) and the NaN test reward, installed as the
# process-wide registry with one torch thread.
online_registry = registry_fixture(_nan_reward_plugin(), unless_installed=[online_stages], install=True, torch_threads=1,
                                   name="online_registry")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("online_prompts") / "prompts.jsonl"
    topics = ["bread", "rain", "chess", "tea", "music", "boats", "maps", "bees", "glass", "salt", "paper", "wool"]
    with open(path, "w") as f:
        for i, t in enumerate(topics * 2):
            f.write(json.dumps({"prompt": f"Tell me one thing about {t}." if i < 12 else f"What is {t} for?"}) + "\n")
    return path


def online_spec(algo: str, models: dict, prompts: Path, **params) -> dict:
    """One online stage on the tiny policy: 4 prompts x 4 completions of at most 8 tokens per step."""
    p = {"policy": "policy", "prompts": "prompts", "eval_prompts": "eval_prompts", "eval_every": 5,
         "reward": {"uses": "length", "params": {"unit": "characters", "per_unit": -0.1}},
         "total_steps": STEPS, "rollout_prompts": 4, "group_size": 4, "max_new_tokens": 8, "learning_rate": 0.05,
         "per_device_train_batch_size": 4, "save_every": 2, "backend": {"uses": "transformers", "params": {"batch_size": 16}}}
    p.update(params)
    return {"name": "online-" + algo.replace("+", "p"), "seed": 0, "models": {"policy": {"path": str(models["policy"])},
                                                         "backbone": {"path": str(models["reward"])}},
            "datasets": {"prompts": {"path": str(prompts), "hash_range": [0.0, 0.75]},
                         "eval_prompts": {"path": str(prompts), "hash_range": [0.75, 1.0]}},
            "stages": [{"id": "rl", "kind": "train", "uses": algo, "params": p}]}


def _run(folder: Path, spec: dict) -> dict:
    """Run ``spec`` in this process; returns its one stage's report entry."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    main(["run", str(folder / "spec.json"), "--cache-dir", str(folder / "cache"), "--report", str(folder / "report.json")])
    return json.loads((folder / "report.json").read_text())["stages"][0]


def _run_killed(folder: Path, spec: dict, kill_at: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]]]:
    """Run ``spec`` in a subprocess that kills itself (SIGKILL) at commit point ``kill_at``; returns the
    process and the (kind, detail) commit points it passed."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spec.json").write_text(json.dumps(spec))
    log = folder / f"commits-{kill_at.replace(':', '_')}.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", RLHF_SPEC_KILL_AT_COMMIT=kill_at,
               RLHF_SPEC_COMMIT_LOG=str(log))
    proc = subprocess.run([sys.executable, "-c", DRIVER, "run", str(folder / "spec.json"), "--cache-dir", str(folder / "cache"),
                           "--report", str(folder / "report.json")], capture_output=True, text=True, env=env, timeout=600,
                          cwd=str(ROOT))
    commits = [tuple(line.split(" ", 3)[2:4]) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, commits


def _entry(folder: Path, key: str) -> Path:
    return folder / "cache" / "entries" / key[:2] / key


def _weights(folder: Path, key: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(_entry(folder, key) / "model" / "model.safetensors"))


# ----------------------------------------------------------------------------- every algorithm learns and logs


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["ppo", "grpo", "rloo", "reinforce++"])
def test_algorithm_learns_moves_weights_and_logs_every_field(algo, tmp_path, online_registry, tiny_models, prompts_file):
    import torch
    from safetensors.torch import load_file

    # the length penalty as the one component of a combination: the same scores, logged per component too
    reward = {"uses": "combine", "params": {"components": {"short": {"uses": "length", "params": {"unit": "characters", "per_unit": -0.1}}}}}
    st = _run(tmp_path, online_spec(algo, tiny_models, prompts_file, reward=reward))
    assert st["status"] == "ran", st.get("reason")
    m, entry = st["metrics"], _entry(tmp_path, st["key"])

    # the policy artifact: weights moved, same tensor names as the starting policy (no value head inside)
    start = load_file(str(tiny_models["policy"] / "model.safetensors"))
    trained = _weights(tmp_path, st["key"])
    assert set(trained) == set(start)
    moved = max(float((trained[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3, f"{algo} barely moved the weights ({moved})"
    assert (entry / "model" / "tokenizer_config.json").is_file()

    # one history row per rollout step, every field logged; the evaluation on the listed steps
    history = json.loads((entry / "history.json").read_text())
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    want = REQUIRED + (("value_loss",) if algo == "ppo" else ()) + (("kl_loss",) if algo == "grpo" else ())
    for row in history:
        missing = [k for k in want if k not in row or not isinstance(row[k], (int, float))]
        assert not missing, (algo, row["step"], missing)
        assert all(v == v for v in row.values() if isinstance(v, float)), row  # no NaN
        assert row["reward/short_mean"] == pytest.approx(row["reward_mean"]), row
        assert row["reward/short_std"] == pytest.approx(row["reward_std"]), row
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollouts come from the reference weights
    assert [r["step"] for r in history if "eval_reward_mean" in r] == [5, 10]
    assert m["eval_steps"] == [0, 5, 10] and "eval_reward_mean_first" in m and "eval_reward_mean_last" in m
    for phase in ("generation", "scoring", "reference", "optimisation"):
        assert m[f"seconds_per_step_{phase}"] >= 0
    events = list((entry / "tensorboard").rglob("events.out.tfevents*"))
    assert events, "nothing written for the trackers"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in want if k != "step"} | {"train/eval_reward_mean", "train/reward/short_std"} <= tags, sorted(tags)
    assert [e.step for e in acc.Scalars("train/reward_mean")] == list(range(1, STEPS + 1))

    # the reward goes up: the last three steps' mean reward beats the first three's clearly
    rewards = [r["reward_mean"] for r in history]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, (algo, [round(r, 3) for r in rewards])
    assert torch.isfinite(torch.tensor(rewards)).all()


# ----------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
@pytest.mark.parametrize("algo,extra", [("ppo", {}), ("grpo", {"ppo_epochs": 2, "minibatch_size": 8, "per_device_train_batch_size": 4,
                                                                  "gradient_accumulation_steps": 2})])
def test_sigkill_mid_rollout_and_mid_optimisation_resumes_to_the_same_weights(algo, extra, tmp_path, online_registry,
                                                                                tiny_models, prompts_file):
    spec = online_spec(algo, tiny_models, prompts_file, total_steps=6, eval_every=3, **extra)
    fresh = _run(tmp_path / "fresh", spec)
    assert fresh["status"] == "ran", fresh.get("reason")
    key = fresh["key"]
    k12 = key[:12]
    killed = tmp_path / "killed"

    # 1. killed once step 3's rollouts are generated (checkpoint 2 is on disk)
    proc, commits = _run_killed(killed, spec, f"after:rollout:{k12}:3")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert commits[-1] == ("rollout", f"{k12}:3") and ("checkpoint", f"{k12}:2") in commits
    # 2. resumed from step 2, killed in the middle of step 5's optimisation (after its first epoch of several)
    proc, commits = _run_killed(killed, spec, f"after:update:{k12}:5")
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert commits[-1] == ("update", f"{k12}:5:0")
    assert [c for c in commits if c[0] == "checkpoint"] == [("checkpoint", f"{k12}:4")]
    assert commits[0] == ("rollout", f"{k12}:3"), "the resumed run did not start at step 3"
    # 3. resumed from step 4 and finished here
    st = _run(killed, spec)
    assert st["status"] == "ran" and st["key"] == key, st.get("reason")
    assert st["metrics"]["resumed_from_step"] == 4

    a, b = _weights(tmp_path / "fresh", key), _weights(killed, key)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ from the uninterrupted run's by {worst}"
    ha = json.loads((_entry(tmp_path / "fresh", key) / "history.json").read_text())
    hb = json.loads((_entry(killed, key) / "history.json").read_text())
    assert [r["reward_mean"] for r in ha] == [r["reward_mean"] for r in hb]
    same = {k: v for k, v in fresh["metrics"].items() if not k.startswith(("seconds_", "resumed_"))}
    assert same == {k: v for k, v in st["metrics"].items() if not k.startswith(("seconds_", "resumed_"))}


# ----------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_nan_reward_stops_the_stage_naming_the_step_and_keeps_the_checkpoint(tmp_path, online_registry, tiny_models, prompts_file):
    spec = online_spec("grpo", tiny_models, prompts_file, total_steps=4, save_every=1, eval_prompts=None, eval_every=None,
                       reward={"uses": "test-nan-at-call", "params": {"nan_at_call": 3}})
    st = _run(tmp_path, spec)
    assert st["status"] == "failed"
    assert "non-finite scores value (nan)" in st["reason"], st["reason"]
    assert "at rollout step 3; the last checkpoint (step 2) is kept" in st["reason"], st["reason"]
    assert "/stages/0/params/reward" in st["reason"]  # the reward's JSON pointer
    ckpts = [p.name for p in (tmp_path / "cache" / "partial" / st["key"] / "checkpoints").iterdir() if p.name.startswith("step-")]
    assert ckpts == ["step-0000002"]


@pytest.mark.slow
def test_kl_past_max_kl_stops_the_stage_with_step_and_value(tmp_path, online_registry, tiny_models, prompts_file):
    spec = online_spec("reinforce++", tiny_models, prompts_file, max_kl=0.5, eval_prompts=None, eval_every=None, save_every=1)
    st = _run(tmp_path, spec)
    assert st["status"] == "failed"
    found = re.search(r"OnlineTrainingStopped: KL\(policy \|\| reference\) is ([0-9.e+-]+) nats per sequence at rollout step (\d+), "
                      r"above max_kl 0.5; stopped before updating on it; the last checkpoint \(step (\d+)\) is kept", st["reason"])
    assert found, st["reason"]
    value, step, kept = float(found.group(1)), int(found.group(2)), int(found.group(3))
    assert value > 0.5 and step >= 2 and kept == step - 1
    assert (tmp_path / "cache" / "partial" / st["key"] / "checkpoints" / f"step-{kept:07d}").is_dir()


def test_a_pairwise_reward_is_refused_by_its_declared_capability(online_registry, tiny_models, prompts_file):
    """Online training needs a score per rollout: a reward that declares itself pairwise with its params
    (llm-judge in mode 'pairwise') is refused at /reward with the reward and its distribution named."""
    from rlhf_spec.errors import SpecError
    from rlhf_spec.spec import validate

    judge = {"uses": "llm-judge", "params": {"model": "policy", "mode": "pairwise"}}
    with pytest.raises(SpecError) as ei:
        validate(online_spec("grpo", tiny_models, prompts_file, reward=judge), online_registry)
    found = [p for p in ei.value.problems if p.pointer == "/stages/0/params/reward"]
    assert found and "reward 'llm-judge' (rlhf-spec" in found[0].message and "pairwise" in found[0].message, \
        [p.render() for p in ei.value.problems]
    validate(online_spec("grpo", tiny_models, prompts_file, reward=dict(judge, params={"model": "policy"})),
             online_registry)


def test_group_size_one_and_a_non_live_backend_are_validation_errors(tmp_path, online_registry, tiny_models, prompts_file):
    from rlhf_spec.errors import SpecError
    from rlhf_spec.spec import validate

    for algo in ("grpo", "rloo"):
        with pytest.raises(SpecError) as ei:
            validate(online_spec(algo, tiny_models, prompts_file, group_size=1), online_registry)
        (problem,) = ei.value.problems
        assert problem.pointer == "/stages/0/params/group_size", problem.render()
        assert "at least 2" in problem.message
    for algo in ("ppo", "reinforce++"):  # no group baseline: one completion per prompt is fine
        validate(online_spec(algo, tiny_models, prompts_file, group_size=1), online_registry)

    bad = online_spec("ppo", tiny_models, prompts_file, temperature=0.0, minibatch_size=5, total_episodes=10,
                      backend={"uses": "vllm", "params": {}} if "vllm" in online_registry.backends else {"uses": "transformers"})
    with pytest.raises(SpecError) as ei:
        validate(bad, online_registry)
    pointers = {p.pointer: p.message for p in ei.value.problems}
    assert {"/stages/0/params/temperature", "/stages/0/params/minibatch_size", "/stages/0/params/total_episodes"} <= set(pointers)
    if "vllm" in online_registry.backends:
        assert "live policy weights; 'vllm' would need weight sync" in pointers["/stages/0/params/backend/uses"]

    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(SpecError) as ei:
            validate(online_spec("grpo", tiny_models, prompts_file, optimizer="adamw_8bit"), online_registry)
        (problem,) = ei.value.problems
        assert problem.pointer == "/stages/0/params/optimizer" and "bitsandbytes" in problem.message, problem.render()


# ----------------------------------------------------------------------------- variants


@pytest.mark.slow
def test_ppo_with_a_critic_from_a_reward_model_ptx_and_a_saved_value_model(tmp_path, online_registry, tiny_models, prompts_file, hh_file):
    from safetensors.torch import load_file

    spec = online_spec("ppo", tiny_models, prompts_file, total_steps=3, eval_prompts=None, eval_every=None, critic="backbone",
                       kl_controller="adaptive", target_kl=0.1, horizon=100, ptx_coef=0.5, ptx_dataset="sft",
                       ptx_max_response_tokens=16, max_prompt_tokens=256, save_value_model=True)
    spec["datasets"]["sft"] = {"path": str(hh_file), "adapter": "hh-rlhf", "limit": 8}
    st = _run(tmp_path, spec)
    assert st["status"] == "ran", st.get("reason")
    entry = _entry(tmp_path, st["key"])
    history = json.loads((entry / "history.json").read_text())
    assert all("ptx_loss" in r and "value_loss" in r for r in history)
    # the adaptive controller moves beta after each step by at most 20% x rollouts / horizon: step 1's KL is 0
    # (below the 0.1 target: beta shrinks), step 2's is far above it (beta grows)
    coefs = [r["kl_coef"] for r in history]
    assert history[0]["kl"] == pytest.approx(0.0, abs=1e-5) and history[1]["kl"] > 0.12, [r["kl"] for r in history]
    assert coefs == pytest.approx([0.05, 0.05 * (1 - 0.2 * 16 / 100), 0.05 * (1 - 0.2 * 16 / 100) * (1 + 0.2 * 16 / 100)]), coefs
    critic = load_file(str(entry / "value_model" / "model.safetensors"))
    assert any(k.startswith("classifier") for k in critic), sorted(critic)[:5]
    assert set(load_file(str(entry / "model" / "model.safetensors"))) == set(load_file(str(tiny_models["policy"] / "model.safetensors")))


@pytest.mark.slow
def test_grpo_lora_dapo_options_and_value_head_saved(tmp_path, online_registry, tiny_models, prompts_file):
    from safetensors.torch import load_file

    spec = online_spec("grpo", tiny_models, prompts_file, total_steps=2, eval_prompts=None, eval_every=None,
                       lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, clip_eps_high=0.28,
                       loss_aggregation="token-mean", kl_coef=0.0, scale="none")
    st = _run(tmp_path, spec)
    assert st["status"] == "ran", st.get("reason")
    start = load_file(str(tiny_models["policy"] / "model.safetensors"))
    saved = _weights(tmp_path, st["key"])
    assert set(saved) == set(start)  # adapters merged
    assert any(not (saved[k] == start[k]).all() for k in saved if "q_proj" in k or "v_proj" in k)
    assert all((saved[k] == start[k]).all() for k in saved if "mlp" in k)

    # PPO with LoRA: the value head reads the adapted policy's hidden states and is saved beside the policy
    spec = online_spec("ppo", tiny_models, prompts_file, total_steps=1, eval_prompts=None, eval_every=None, save_value_model=True,
                       ppo_epochs=1, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    st = _run(tmp_path / "ppo", spec)
    assert st["status"] == "ran", st.get("reason")
    entry = _entry(tmp_path / "ppo", st["key"])
    head = load_file(str(entry / "value_model" / "value_head.safetensors"))
    assert head["summary.weight"].shape == (1, 32)
    assert set(load_file(str(entry / "model" / "model.safetensors"))) == set(start)


# ----------------------------------------------------------------------------- the online specs

def _assets_base(tmp_path: Path) -> Path:
    """A working folder with models/ (the project's) and data/gsm8k, data/rt-polarity (the shared real files)."""
    base = tmp_path / "base"
    (base / "data").mkdir(parents=True)
    os.symlink(ROOT / "models", base / "models")
    for sub in ("gsm8k", "rt-polarity"):
        for root in (ROOT / "data", ROOT.parent / "shared" / "data"):
            if (root / sub).is_dir():
                os.symlink(root / sub, base / "data" / sub)
                break
        else:
            pytest.skip(f"data/{sub} not found")
    return base


@pytest.mark.parametrize("name", ["ppo_sentiment_cpu.json", "grpo_gsm8k_cpu.json"])
def test_online_specs_validate_as_written(name, tmp_path, online_registry):
    """Both online specs validate on the real files: datasets (rt-polarity sentences, GSM8K with its reference
    column and prompt template), stage and reward params, references and every implementation's checks."""
    from rlhf_spec.spec import validate

    validate(json.loads((ROOT / "specs" / name).read_text()), online_registry, base=_assets_base(tmp_path))
