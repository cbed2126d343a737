"""Training stages on tiny real models: DPO, REBEL with LoRA, reward-model margin; --until and --force."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import cli, write_spec


def _stages(report_path):
    return {s["id"]: s for s in json.loads(report_path.read_text())["stages"]}


@pytest.mark.slow
def test_dpo_and_lora_until(tmp_path, tiny_spec):
    rebel = tiny_spec["stages"][5]
    rebel["uses"] = "dpo"
    rebel["params"].pop("eta")
    rebel["params"].update(beta=0.5, learning_rate=1e-2)
    spec = write_spec(tmp_path, tiny_spec)
    cache = tmp_path / "cache"
    r = cli("run", str(spec), "--cache-dir", str(cache), "--until", "rebel", "--report", str(tmp_path / "dpo.json"))
    assert r.returncode == 0, r.stderr
    st = _stages(tmp_path / "dpo.json")
    assert "evaluate" not in st and st["rebel"]["status"] == "ran"
    m = st["rebel"]["metrics"]
    assert m["updates"] >= 1 and "train_implicit_accuracy_last10" in m
    # the trained weights differ from the starting policy
    trained = load_file(str(next((cache / "entries").glob(f"*/{st['rebel']['key']}")) / "model" / "model.safetensors"))
    start = load_file(str(tiny_spec_model(tiny_spec) / "model.safetensors"))
    changed = [k for k in start if k in trained and not (trained[k] == start[k]).all()]
    assert changed, "DPO updated no weight"

    # LoRA: adapters merged on save, so the saved model has the base model's parameter names
    rebel["uses"] = "rebel"
    rebel["params"].pop("beta")
    rebel["params"].update(eta=1.0, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]})
    spec = write_spec(tmp_path, tiny_spec)
    r = cli("run", str(spec), "--cache-dir", str(cache), "--until", "rebel", "--report", str(tmp_path / "lora.json"))
    assert r.returncode == 0, r.stderr
    st = _stages(tmp_path / "lora.json")
    assert st["pair"]["status"] == "cached" and st["rebel"]["status"] == "ran"
    saved = load_file(str(next((cache / "entries").glob(f"*/{st['rebel']['key']}")) / "model" / "model.safetensors"))
    assert set(saved) == set(start)
    assert any(not (saved[k] == start[k]).all() for k in saved if "q_proj" in k or "v_proj" in k)
    assert all((saved[k] == start[k]).all() for k in saved if "mlp" in k)  # only adapted modules moved

    # --force reruns one stage with the same key; the reference logprobs are reused from the cache
    r = cli("run", str(spec), "--cache-dir", str(cache), "--until", "rebel", "--force", "rebel", "--report", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr
    st2 = _stages(tmp_path / "f.json")
    assert st2["rebel"]["status"] == "ran" and st2["rebel"]["key"] == st["rebel"]["key"]
    assert st2["pair"]["status"] == "cached"


def tiny_spec_model(spec):
    from pathlib import Path

    return Path(spec["models"]["policy"]["path"])


@pytest.mark.slow
def test_reward_model_margin_changes_key_and_loss(tmp_path, tiny_spec):
    spec = write_spec(tmp_path, tiny_spec)
    cache = tmp_path / "cache"
    r = cli("run", str(spec), "--cache-dir", str(cache), "--until", "reward_model", "--report", str(tmp_path / "a.json"))
    assert r.returncode == 0, r.stderr
    r = cli("run", str(spec), "--cache-dir", str(cache), "--until", "reward_model", "--report", str(tmp_path / "b.json"),
            "--set", "stages.reward_model.params.margin=2.0")
    assert r.returncode == 0, r.stderr
    a, b = _stages(tmp_path / "a.json")["reward_model"], _stages(tmp_path / "b.json")["reward_model"]
    assert a["key"] != b["key"] and b["status"] == "ran"
    # with a margin of 2 inside the sigmoid the first-step loss is larger (-log sigmoid(x - 2) > -log sigmoid(x))
    assert b["metrics"]["train_loss_first"] > a["metrics"]["train_loss_first"] + 1.0
