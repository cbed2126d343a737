"""The worked example plugin: its two parts against hand-computed values, its use of the public API only,
and the package built as a wheel, installed beside rlhf-spec (not as an editable checkout) and run in a spec."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[1]
PLUGINS = HERE.parent
sys.path.insert(0, str(HERE))  # unit tests import the package from this source tree; the wheel test installs the wheel
PROMPTS = ["How do I bake bread at home?", "What is the capital of France?", "Tell me a joke about chickens.",
           "Give me three tips for sleeping better.", "Explain what a hash function is.", "Write a haiku about rain.",
           "Why is the sky blue?", "How do magnets work?"]


def test_imports_only_the_public_api():
    import rlhf_spec

    seen = []
    for path in sorted((HERE / "rlhf_spec_example").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                bad = [a.name for a in node.names if a.name.startswith("rlhf_spec") and a.name != "rlhf_spec"]
                assert not bad, f"{path.name} imports {bad}; import names from rlhf_spec"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rlhf_spec"):
                assert node.module == "rlhf_spec", (
                    f"{path.name}: from {node.module} import ...; only rlhf_spec is public"
                )
                for a in node.names:
                    assert a.name in rlhf_spec.__all__, f"{path.name}: {a.name} is not in rlhf_spec.__all__"
                    seen.append(a.name)
    assert {"hookimpl", "RewardImpl", "StageImpl", "pair_trainer", "PolicyTrainParams", "generate_passes",
            "prepare_prompts", "sampling_seed", "BackendSpec", "SamplingParams"} <= set(seen)


def test_tests_import_only_the_public_api_and_testing():
    """The example's tests too: ``rlhf_spec`` and the ``rlhf_spec.testing`` helpers, nothing else."""
    for node in ast.walk(ast.parse(Path(__file__).read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("rlhf_spec."):
            assert node.module == "rlhf_spec.testing", f"line {node.lineno}: from {node.module} import ..."


def test_reading_ease_by_hand():
    from rlhf_spec_example.readability import reading_ease, syllables

    # 6 words, 1 sentence, 6 syllables: 206.835 - 1.015 * 6 - 84.6 * 1
    assert reading_ease("The cat sat on the mat.") == pytest.approx((206.835 - 6.09 - 84.6, 6))
    # complicated 4, vocabulary 5, obfuscates 4, meaning 2: 15 syllables over 4 words, one sentence
    assert [syllables(w) for w in ("complicated", "vocabulary", "obfuscates", "meaning")] == [4, 5, 4, 2]
    assert reading_ease("Complicated vocabulary obfuscates meaning.")[0] == pytest.approx(
        206.835 - 1.015 * 4 - 84.6 * 15 / 4
    )
    # two sentences halve the words per sentence
    two = reading_ease("The cat sat. The dog ran!")[0]
    assert two == pytest.approx(206.835 - 1.015 * 3 - 84.6 * 1)
    assert reading_ease("...") == (0.0, 0)


def test_reward_through_its_record():
    from rlhf_spec_example.readability import ReadabilityParams, load

    from rlhf_spec import RewardBatch

    r = load(ReadabilityParams(scale=0.01, empty_score=-1.0), None)
    out = r.score(RewardBatch(prompts=[[]] * 3, completions=["The cat sat on the mat.", "", "Yes."]))
    assert out.scores[0] == pytest.approx(0.01 * (206.835 - 6.09 - 84.6)) and out.scores[1] == -1.0
    assert out.counts == {"empty": 1}


def test_slic_loss_by_hand():
    import torch
    from rlhf_spec_example.slic import SlicParams, slic_loss

    from rlhf_spec import PairBatch

    pc, pr = torch.tensor([-5.0, -3.0], requires_grad=True), torch.tensor([-5.5, -1.0])
    b = PairBatch(pc, pr, None, None, torch.zeros(2), torch.zeros(2), torch.ones(2), torch.ones(2))
    loss, stats = slic_loss(SlicParams(policy="p", delta=1.0, regularization=0.1))(b)
    # hinges: 1 + 5 - 5.5 = 0.5 and 1 + 3 - 1 = 3 -> mean 1.75; minus 0.1 * mean(-5, -3) = +0.4
    assert float(loss) == pytest.approx(2.15)
    assert stats["hinge_active"] == 1.0
    loss.backward()
    # d/d pc: -1/2 (hinge, each active) - 0.1/2 (regularisation)
    assert pc.grad.tolist() == pytest.approx([-0.55, -0.55])


def _tiny(tmp: Path) -> dict:
    from rlhf_spec.testing import make_tiny_policy

    policy = make_tiny_policy(tmp / "policy", texts=PROMPTS)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return {"policy": str(policy), "prompts": str(prompts)}


def spec_dict(tiny: dict) -> dict:
    judge = {"uses": "flesch-readability", "params": {"scale": 0.01}}
    return {
        "name": "example-plugin", "seed": 0, "requires": ["rlhf-spec-example>=0.1"],
        "models": {"policy": {"path": tiny["policy"]}},
        "datasets": {"prompts": {"path": tiny["prompts"], "hash_range": [0.0, 0.75]},
                     "held_out": {"path": tiny["prompts"], "hash_range": [0.75, 1.0]}},
        "stages": [
            {"id": "sample", "kind": "sample", "uses": "generate",
             "params": {"policy": "policy", "prompts": "prompts", "n": 3, "max_new_tokens": 12, "num_shards": 2}},
            {"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"], "params": {"reward": judge}},
            {"id": "pair", "kind": "pair", "uses": "best-worst", "inputs": ["score"]},
            {"id": "slic", "kind": "train", "uses": "slic-hf", "inputs": ["pair"],
             "params": {"policy": "policy", "learning_rate": 1e-3, "per_device_train_batch_size": 2,
                        "gradient_accumulation_steps": 1,
                        "max_prompt_tokens": 64, "max_response_tokens": 16, "save_every": 1}},
            {"id": "evaluate", "kind": "evaluate", "uses": "reward-winrate",
             "params": {"policy": "slic", "reference": "policy", "prompts": "held_out", "max_new_tokens": 12,
                        "judges": {"readability": judge}, "bootstrap_resamples": 200}},
        ],
    }


def test_contracts():
    from rlhf_spec.testing import check_contract, installed_record, registry_with

    reg = registry_with(__import__("rlhf_spec_example"))
    check_contract(installed_record("reward", "flesch-readability", registry=reg), {"scale": 0.02})
    check_contract(installed_record("train", "slic-hf", registry=reg), {"policy": "policy", "delta": 2.0})
    check_contract(installed_record("sample", "greedy-and-sampled", registry=reg),
                   {"policy": "p", "prompts": "d", "n": 2})


def test_greedy_and_sampled_is_the_backend_as_sample_calls_it(tmp_path):
    """The stage's answers are the backend's, called as the built-in ``sample`` calls it: the prompts'
    token ids, one seed per pass by the sampling-seed rule, pass 0 greedy."""
    import datasets
    from rlhf_spec_example.greedy import GreedyAndSampledParams

    from rlhf_spec import ModelSource, SamplingParams, generate_passes, prompt_token_ids, sampling_seed
    from rlhf_spec.testing import execute, make_context, registry_with

    tiny = _tiny(tmp_path)
    reg = registry_with(__import__("rlhf_spec_example"))
    params = GreedyAndSampledParams(policy="policy", prompts="prompts", n=3, max_new_tokens=8, num_shards=1,
                                    seed_stride=7, backend={"uses": "transformers", "params": {"batch_size": 4}})
    policy = ModelSource(name="policy", origin="spec", path=tiny["policy"])
    ctx = make_context(params, tmp_path / "stage", kind="sample", uses="greedy-and-sampled", seed=3,
                       models={"policy": policy}, datasets={"prompts": {"path": tiny["prompts"]}}, registry=reg)
    result = execute(ctx, reg.stages[("sample", "greedy-and-sampled")])
    out = datasets.load_from_disk(str(tmp_path / "stage" / "out" / "data"))
    assert result.rows == len(out) == 3 * len(PROMPTS) and result.metrics["prompts"] == len(PROMPTS)
    by_pass = {(pid, i): c for pid, i, c in zip(out["prompt_id"], out["sample_index"], out["completion"])}

    engine = ctx.backend("backend", policy)
    rows = ctx.dataset("prompts")
    ids = prompt_token_ids(policy.load_tokenizer(padding_side="left"), list(rows["prompt"]))
    greedy = generate_passes(engine, ids, SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=8), [3])[0]
    sampled = generate_passes(engine, ids, params.sampling(), [sampling_seed(3, p, 7) for p in (1, 2)])
    assert [by_pass[(pid, 0)] for pid in rows["prompt_id"]] == [c.text for c in greedy]
    for p, comps in zip((1, 2), sampled):
        assert [by_pass[(pid, p)] for pid in rows["prompt_id"]] == [c.text for c in comps]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    """Every package under plugins/ built as a wheel; this one installed (not editable) into a folder."""
    import shutil

    out = tmp_path_factory.mktemp("wheels")
    packages = [p for p in sorted(PLUGINS.iterdir()) if (p / "pyproject.toml").is_file()]
    for p in packages:  # build from copies: a build writes metadata folders into its source tree
        shutil.copytree(p, out / "src" / p.name, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                        str(out / "dist"),
                        *[str(out / "src" / p.name) for p in packages]], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    wheels = sorted(p.name for p in (out / "dist").glob("*.whl"))
    assert len(wheels) == len(packages) >= 3, wheels
    mine = next((out / "dist").glob("rlhf_spec_example-*.whl"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(out / "site"),
                        str(mine)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out / "site"


def test_wheel_installed_beside_rlhf_spec_runs_a_spec(wheel_site, tmp_path):
    from rlhf_spec.testing import run_spec

    env = {"PYTHONPATH": str(wheel_site)}
    code = ("import importlib.metadata as md, json; d = md.distribution('rlhf-spec-example'); "
            "print(json.dumps([str(d.locate_file('')), d.read_text('direct_url.json')]))")
    where = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=dict(os.environ, **env))
    located, direct = json.loads(where.stdout)
    assert Path(located).resolve() == wheel_site.resolve() and (direct is None or "editable" not in direct)
    proc, rep = run_spec(spec_dict(_tiny(tmp_path)), tmp_path / "run", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    stages = {s["id"]: s for s in rep["stages"]}
    assert stages["score"]["metrics"]["scored"] == 3 * stages["sample"]["metrics"]["prompts"]
    slic = stages["slic"]["metrics"]
    assert slic["updates"] >= 1 and "train_calibration_last10" in slic and "train_kl_ref_last10" not in slic
    memos = [
        json.loads(m.read_text())["stage"].get("memo")
        for m in (tmp_path / "run" / "cache").glob("entries/*/*/manifest.json")
    ]
    assert "reference-logprobs" not in memos, "a reference-free loss computed reference logprobs"
    assert memos.count("policy-answers") == 2  # evaluate's answers of both policies
    ev = stages["evaluate"]["metrics"]
    assert ev["primary_judge"] == "readability" and ev["prompts"] == stages["evaluate"]["rows"]
    listing = subprocess.run([sys.executable, "-m", "rlhf_spec", "plugins", "--json"], capture_output=True, text=True,
                             env=dict(os.environ, **env))
    rows = [r for r in json.loads(listing.stdout)["implementations"] if r["distribution"] == "rlhf-spec-example"]
    assert {(r["surface"], r["name"]) for r in rows} == {("reward", "flesch-readability"), ("stage", "slic-hf"),
                                                         ("stage", "greedy-and-sampled")}


def test_greedy_and_sampled_runs_in_a_spec(wheel_site, tmp_path):
    from rlhf_spec.testing import run_spec

    tiny = _tiny(tmp_path)
    spec = {"name": "greedy", "seed": 0, "models": {"policy": {"path": tiny["policy"]}},
            "datasets": {"prompts": {"path": tiny["prompts"], "limit": 4}},
            "stages": [{"id": "sample", "kind": "sample", "uses": "greedy-and-sampled",
                        "params": {"policy": "policy", "prompts": "prompts", "n": 2, "max_new_tokens": 8}},
                       {"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"],
                        "params": {"reward": {"uses": "flesch-readability"}}}]}
    proc, rep = run_spec(spec, tmp_path / "run", env={"PYTHONPATH": str(wheel_site)})
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    stages = {s["id"]: s for s in rep["stages"]}
    assert stages["sample"]["metrics"]["samples"] == 8 and stages["score"]["metrics"]["scored"] == 8


def test_slic_with_a_dataset_and_a_pairs_input_is_rejected(wheel_site, tmp_path):
    """``pair_trainer`` stages read ``params.dataset`` or a pairs input, exactly one: checked by ``validate``."""
    from rlhf_spec.testing import write_json

    tiny = _tiny(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello there.", "rejected": "No."}) + "\n")
    spec = spec_dict(tiny)
    spec["datasets"]["pairs"] = {"path": str(pairs), "chosen_column": "chosen", "rejected_column": "rejected"}
    spec["stages"][3]["params"]["dataset"] = "pairs"
    env = dict(os.environ, PYTHONPATH=str(wheel_site))

    def validate() -> subprocess.CompletedProcess:
        path = write_json(tmp_path / "spec.json", spec)
        return subprocess.run([sys.executable, "-m", "rlhf_spec", "validate", str(path)], capture_output=True,
                              text=True, env=env)

    r = validate()
    assert r.returncode == 2 and "/stages/3/inputs" in r.stderr and "not both" in r.stderr, r.stderr
    spec["stages"][3]["inputs"] = []
    assert validate().returncode == 0  # the dataset alone
    del spec["stages"][3]["params"]["dataset"]
    r = validate()
    assert r.returncode == 2 and "/stages/3/params/dataset" in r.stderr, r.stderr


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_result(wheel_site, tmp_path):
    from rlhf_spec.testing import check_resume

    os.environ["PYTHONPATH"] = str(wheel_site) + os.pathsep + os.environ.get("PYTHONPATH", "")
    try:
        res = check_resume(spec_dict(_tiny(tmp_path)), tmp_path / "resume", every=3)
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    assert res["kills"] >= 3, res["kills"]
