"""Training stages on tiny real models: DPO, REBEL with LoRA, reward-model margin; --until and --force."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from conftest import entry_dir, stages_of
from rlhf_spec.testing import run_spec


@pytest.mark.slow
def test_dpo_and_lora_until(tmp_path, tiny_spec, tiny_models):
    rebel = tiny_spec["stages"][5]
    rebel["uses"] = "dpo"
    rebel["params"].pop("eta")
    rebel["params"].update(beta=0.5, learning_rate=1e-2)
    cache = tmp_path / "cache"
    r, report = run_spec(tiny_spec, tmp_path, "--until", "rebel")
    assert r.returncode == 0, r.stderr
    st = stages_of(report)
    assert "evaluate" not in st and st["rebel"]["status"] == "ran"
    m = st["rebel"]["metrics"]
    assert m["updates"] >= 1 and "train_implicit_accuracy_last10" in m
    # the trained weights differ from the starting policy
    trained = load_file(str(entry_dir(cache, st["rebel"]["key"]) / "model" / "model.safetensors"))
    start = load_file(str(tiny_models["policy"] / "model.safetensors"))
    changed = [k for k in start if k in trained and not (trained[k] == start[k]).all()]
    assert changed, "DPO updated no weight"

    # LoRA: adapters merged on save, so the saved model has the base model's parameter names
    rebel["uses"] = "rebel"
    rebel["params"].pop("beta")
    rebel["params"].update(eta=1.0, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    r, report = run_spec(tiny_spec, tmp_path, "--until", "rebel")
    assert r.returncode == 0, r.stderr
    st = stages_of(report)
    assert st["pair"]["status"] == "cached" and st["rebel"]["status"] == "ran"
    saved = load_file(str(entry_dir(cache, st["rebel"]["key"]) / "model" / "model.safetensors"))
    assert set(saved) == set(start)
    assert any(not (saved[k] == start[k]).all() for k in saved if "q_proj" in k or "v_proj" in k)
    assert all((saved[k] == start[k]).all() for k in saved if "mlp" in k)  # only adapted modules moved

    # --force reruns one stage with the same key; the reference logprobs are reused from the cache
    r, report = run_spec(tiny_spec, tmp_path, "--until", "rebel", "--force", "rebel")
    assert r.returncode == 0, r.stderr
    st2 = stages_of(report)
    assert st2["rebel"]["status"] == "ran" and st2["rebel"]["key"] == st["rebel"]["key"]
    assert st2["pair"]["status"] == "cached"


@pytest.mark.slow
def test_reward_model_margin_changes_key_and_loss(tmp_path, tiny_spec):
    r, first = run_spec(tiny_spec, tmp_path, "--until", "reward_model")
    assert r.returncode == 0, r.stderr
    r, second = run_spec(tiny_spec, tmp_path, "--until", "reward_model",
                         "--set", "stages.reward_model.params.margin=2.0")
    assert r.returncode == 0, r.stderr
    a, b = stages_of(first)["reward_model"], stages_of(second)["reward_model"]
    assert a["key"] != b["key"] and b["status"] == "ran"
    # with a margin of 2 inside the sigmoid the first-step loss is larger (-log sigmoid(x - 2) > -log sigmoid(x))
    assert b["metrics"]["train_loss_first"] > a["metrics"]["train_loss_first"] + 1.0
