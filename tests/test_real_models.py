"""End to end on the real small models (SmolLM2-135M-Instruct, MiniLM) and real hh-rlhf data, minimal sizes."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, cli
from conftest import assert_metrics_match_the_table

pytestmark = pytest.mark.slow


def test_smoke_spec_end_to_end(tmp_path, real_cache):
    for p in ("models/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf", "models/all-MiniLM-L6-v2/model.safetensors",
              "data/hh-rlhf/harmless-base_test.jsonl.gz"):
        if not (ROOT / p).exists():
            pytest.fail(f"{p} missing: run `make assets`")
    report = tmp_path / "smoke.json"
    r = cli("run", "specs/smoke_cpu.json", "--cache-dir", str(real_cache), "--report", str(report), cwd=ROOT)
    assert r.returncode == 0, r.stderr + r.stdout[-3000:]
    rep = json.loads(report.read_text())
    stages = {s["id"]: s for s in rep["stages"]}
    assert [s["status"] for s in rep["stages"]] == ["ran"] * 7
    rm = stages["reward_model"]["metrics"]
    assert rm["eval_pairs"] == 48 and (rm["eval_accuracy"] * 96).is_integer()  # 48 pairs, ties count one half
    ev = stages["evaluate"]["metrics"]
    assert ev["prompts"] >= 4
    assert_metrics_match_the_table(stages["evaluate"])
    # the policy really changed: its samples' log-ratio against the reference is not identically zero
    assert ev["kl_k3"] > 0.0
    sample = stages["sample"]["metrics"]
    assert sample["samples"] == 2 * sample["prompts"] and sample["generated_tokens"] > 0
    # a second run is served entirely from the cache
    r2 = cli("run", "specs/smoke_cpu.json", "--cache-dir", str(real_cache), "--report", str(tmp_path / "again.json"), cwd=ROOT)
    assert r2.returncode == 0, r2.stderr
    assert {s["status"] for s in json.loads((tmp_path / "again.json").read_text())["stages"]} == {"cached"}
