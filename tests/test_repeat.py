"""``repeat`` blocks: the expanded graph, its keys against the same graph written by hand, and errors that
point into the block with the round."""

from __future__ import annotations

import copy

from conftest import manifests, plan_keys, spec_problems, stages_of, write_spec
from rlhf_spec.testing import run_spec


def _block_spec(tiny_spec: dict, rounds: int = 2) -> dict:
    """The tiny pipeline with sample..evaluate as a repeat block: round r samples from and trains from round r-1's policy."""
    spec = copy.deepcopy(tiny_spec)
    body = []
    for st in spec["stages"][1:]:
        st = copy.deepcopy(st)
        if st["id"] in ("sample", "rebel"):
            st["params"]["policy"] = "{prev:rebel}"
        if st["id"] == "evaluate":
            st["params"]["policy"] = "{id:rebel}"
        st["description"] = "round {round} of " + st["id"]
        body.append(st)
    spec["stages"] = [spec["stages"][0], {"repeat": {"rounds": rounds, "initial": {"rebel": "policy"}, "stages": body}}]
    return spec


def _by_hand(tiny_spec: dict, rounds: int = 2) -> dict:
    """The same graph written out: every stage copied per round, ids and references renamed by hand."""
    spec = copy.deepcopy(tiny_spec)
    out = [spec["stages"][0]]
    for r in range(1, rounds + 1):
        for st in spec["stages"][1:]:
            st = copy.deepcopy(st)
            st["id"] = f"{st['id']}_iter{r}"
            st["inputs"] = [f"{i}_iter{r}" for i in st.get("inputs", [])]
            if st["id"].startswith(("sample", "rebel")):
                st["params"]["policy"] = "policy" if r == 1 else f"rebel_iter{r - 1}"
            if st["id"].startswith("evaluate"):
                st["params"]["policy"] = f"rebel_iter{r}"
            out.append(st)
    spec["stages"] = out
    return spec


def _plan(tmp_path, spec: dict, name: str) -> list[tuple[str, str]]:
    """(stage id, key) of every stage of ``spec`` (written to ``tmp_path/name``), in plan order."""
    return list(plan_keys(write_spec(tmp_path, spec, name), tmp_path / "c").items())


def test_keys_equal_those_of_the_graph_written_by_hand(tmp_path, tiny_spec):
    block, hand = _plan(tmp_path, _block_spec(tiny_spec, 3), "block.json"), _plan(tmp_path, _by_hand(tiny_spec, 3), "hand.json")
    assert [i for i, _ in block] == [i for i, _ in hand]  # plan shows the expanded ids, in order
    assert block == hand
    assert len(block) == 1 + 3 * 6 and "sample_iter3" in dict(block)
    # round 2 really builds on round 1: its keys differ from round 1's, and round 3's from round 2's
    keys = dict(block)
    assert len({keys[f"sample_iter{r}"] for r in (1, 2, 3)}) == 3


def _errors(spec: dict) -> list[str]:
    return [p.render() for p in spec_problems(spec)]


def test_a_reference_to_a_stage_the_block_does_not_have(tiny_spec):
    spec = _block_spec(tiny_spec)
    spec["stages"][1]["repeat"]["stages"][0]["params"]["policy"] = "{prev:rebl}"
    errs = _errors(spec)
    assert len(errs) == 2  # once per round
    for r, err in zip((1, 2), errs):
        assert err.startswith(f"/stages/1/repeat/stages/0/params/policy: no stage 'rebl' in the repeat block (round {r})")
        assert "did you mean 'rebel'?" in err


def test_round_one_needs_an_initial_value(tiny_spec):
    spec = _block_spec(tiny_spec)
    del spec["stages"][1]["repeat"]["initial"]
    errs = _errors(spec)
    assert errs and all("round 1 has no previous round for '{prev:rebel}'" in e for e in errs), errs
    assert errs[0].startswith("/stages/1/repeat/stages/0/params/policy:") and "repeat.initial.rebel" in errs[0]


def test_problems_inside_expanded_stages_point_into_the_block_with_the_round(tiny_spec):
    spec = _block_spec(tiny_spec)
    spec["stages"][1]["repeat"]["stages"][0]["params"]["temprature"] = 0.5
    spec["stages"][1]["repeat"]["stages"][3]["inputs"] = ["fliter"]
    errs = _errors(spec)
    for r in (1, 2):
        assert f"/stages/1/repeat/stages/0/params/temprature: unknown key 'temprature' (round {r}) (did you mean 'temperature'?)" in errs
        assert any(e.startswith("/stages/1/repeat/stages/3/inputs/0: unknown stage 'fliter'") and f"(round {r})" in e for e in errs), errs


def test_a_malformed_block(tiny_spec):
    spec = _block_spec(tiny_spec)
    spec["stages"][1]["repeat"]["rounds"] = 0
    spec["stages"][1]["repeat"]["id"] = "{id}"
    spec["stages"][1]["repeat"]["rouds"] = 2
    errs = _errors(spec)
    assert any(e.startswith("/stages/1/repeat/rounds:") for e in errs)
    assert any(e.startswith("/stages/1/repeat/id:") and "{round}" in e for e in errs)
    assert any(e.startswith("/stages/1/repeat/rouds: unknown key") and "did you mean 'rounds'?" in e for e in errs)


def test_set_reaches_an_expanded_stage(tmp_path, tiny_spec):
    path = write_spec(tmp_path, _block_spec(tiny_spec))
    a = plan_keys(path, tmp_path / "c", "--set", "stages.sample_iter2.params.n=2")
    b = plan_keys(path, tmp_path / "c")
    assert a["sample_iter1"] == b["sample_iter1"] and a["sample_iter2"] != b["sample_iter2"]


def test_per_round_values_keep_their_type_and_equal_the_graph_by_hand(tmp_path, tiny_spec):
    """``values``: round r's entry replaces '{value:NAME}' (a whole-string placeholder keeps the JSON type, so
    a number stays a number), and the keys equal those of the stages written out with the numbers."""
    from rlhf_spec.spec.repeat import expand

    spec = _block_spec(tiny_spec)
    block = spec["stages"][1]["repeat"]
    block["values"] = {"temperature": [0.7, 0.9]}
    block["stages"][0]["params"]["temperature"] = "{value:temperature}"
    block["stages"][0]["description"] = "sampling at T={value:temperature}"
    stages = expand(spec)[0]["stages"]
    assert [s["params"]["temperature"] for s in stages if s["id"].startswith("sample")] == [0.7, 0.9]
    assert stages[1]["description"] == "sampling at T=0.7"
    hand = _by_hand(tiny_spec)
    for st in hand["stages"]:
        if st["id"].startswith("sample"):
            st["params"]["temperature"] = 0.7 if st["id"].endswith("1") else 0.9
    assert _plan(tmp_path, spec, "block.json") == _plan(tmp_path, hand, "hand.json")


def test_per_round_values_need_one_entry_per_round_and_a_name_that_exists(tiny_spec):
    spec = _block_spec(tiny_spec)
    block = spec["stages"][1]["repeat"]
    block["values"] = {"temperature": [0.7]}
    errs = _errors(spec)
    assert errs == ["/stages/1/repeat/values/temperature: needs one entry per round (2), got 1 entries"], errs
    block["values"] = {"temperature": [0.7, 0.9]}
    block["stages"][0]["params"]["temperature"] = "{value:temprature}"
    errs = _errors(spec)
    assert len(errs) == 2 and errs[1].startswith(
        "/stages/1/repeat/stages/0/params/temperature: no per-round value 'temprature' in the repeat block (round 2)"), errs
    assert "did you mean 'temperature'?" in errs[0]


def test_rounds_share_the_reference_policys_evaluation_answers(tmp_path, tiny_spec):
    """Every round's evaluate compares against the same reference on the same prompts: the reference answers
    once (one shared ``policy-answers`` entry), and both rounds' tables hold the same reference answers."""
    import datasets

    r, report = run_spec(_block_spec(tiny_spec), tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout
    stages = stages_of(report)
    tables = [datasets.load_from_disk(str(tmp_path / stages[f"evaluate_iter{i}"]["output"] / "data")) for i in (1, 2)]
    assert tables[0]["reference"] == tables[1]["reference"]
    assert tables[0]["policy"] != tables[1]["policy"]
    memos = [m["stage"] for m in manifests(tmp_path / "cache").values()]
    answers = [m["id"] for m in memos if m.get("memo") == "policy-answers"]
    # round 1: its policy and the reference; round 2: its policy only
    assert sorted(answers) == ["evaluate_iter1", "evaluate_iter1", "evaluate_iter2"]
