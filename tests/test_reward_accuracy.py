"""``evaluate``/``reward-accuracy`` and the ``alpaca-eval`` adapter: agreement with labelled pairs
computed by hand, on a small file in AlpacaEval's format and on the real annotations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import data_file, run_inprocess, write_spec
from rlhf_spec.stages.reward_accuracy import agreement, judge_metrics
from rlhf_spec.stats import wilson_interval

ANNOTATIONS = "alpaca_eval/alpaca-7b__alpaca_eval_gpt4__annotations.json"


def _row(instruction, out1, out2, preference):
    return {"instruction": instruction, "output_1": out1, "output_2": out2, "preference": preference,
            "generator_1": "a", "generator_2": "b"}


def test_alpaca_eval_adapter_on_the_real_annotations():
    """789 of 805 annotations are not ties; preference 1 makes output_1 the chosen reply."""
    from rlhf_spec.data import load_spec_dataset
    from rlhf_spec.spec.models import DatasetSpec

    path = data_file(ANNOTATIONS)
    raw = json.loads(path.read_text())
    ds = load_spec_dataset(DatasetSpec(path=str(path), adapter="alpaca-eval"), path.parent)
    assert len(ds) == sum(r["preference"] in (1, 2) for r in raw) == 789
    first = next(r for r in raw if r["preference"] in (1, 2))
    won = first["output_1"] if first["preference"] == 1 else first["output_2"]
    assert ds[0]["prompt"] == [{"role": "user", "content": first["instruction"]}]
    assert ds[0]["chosen"] == won.strip() and ds[0]["rejected"] != ds[0]["chosen"]
    second = next(r for r in raw if r["preference"] == 2)
    row = ds[[p[0]["content"] for p in ds["prompt"]].index(second["instruction"])]
    assert row["chosen"] == second["output_2"].strip() and row["rejected"] == second["output_1"].strip()


def test_judge_metrics_by_hand():
    # pointwise: chosen above, below, tied, above -> 1 + 0 + 0.5 + 1 = 2.5 of 4
    v = {"chosen": [2.0, 0.0, 1.0, 3.0], "rejected": [1.0, 1.0, 1.0, -1.0]}
    longer = [True, False, None, False]  # the third pair has equal lengths
    m = judge_metrics(v, longer, 0.95)
    assert m["accuracy"] == 2.5 / 4 and m["pairs"] == 4
    assert (m["accuracy_ci_low"], m["accuracy_ci_high"]) == wilson_interval(2.5, 4, 0.95)
    assert m["margin_mean"] == pytest.approx((1 - 1 + 0 + 4) / 4)
    # picks: pair 1 agrees with a longer chosen -> longer; pair 2 disagrees with a shorter chosen -> longer;
    # pair 4 agrees with a shorter chosen -> shorter: 2 of 3 unequal pairs
    assert m["prefers_longer_rate"] == pytest.approx(2 / 3)
    # pairwise: P(chosen) 0.9, 0.2, 0.5 -> 1 + 0 + 0.5
    p = judge_metrics({"p_chosen": [0.9, 0.2, 0.5], "disagreement": [False, True, True]}, [True, True, True], 0.9)
    assert p["accuracy"] == 0.5 and p["order_disagreement_rate"] == pytest.approx(2 / 3)
    assert p["p_chosen_mean"] == pytest.approx(1.6 / 3)
    assert (p["accuracy_ci_low"], p["accuracy_ci_high"]) == wilson_interval(1.5, 3, 0.9)
    assert agreement([1.0], [1.0]) == [0.5]


def test_reward_accuracy_stage_with_a_length_reward(tmp_path):
    """A characters-length reward agrees exactly where the label chose the longer reply; ties are dropped."""
    rows = [_row("q1", "a long reply here", "short", 1),   # chosen longer: agree
            _row("q2", "tiny", "a much longer reply", 1),  # chosen shorter: disagree
            _row("q3", "x", "y", 0),                       # tie: dropped
            _row("q4", "ab", "abcdef", 2),                 # chosen longer: agree
            _row("q5", "same", "SAME", 2.0)]               # equal lengths: the reward ties, counts 1/2
    data = tmp_path / "annotations.json"
    data.write_text(json.dumps(rows))
    spec = {"name": "acc", "datasets": {"labelled": {"path": str(data), "adapter": "alpaca-eval"}},
            "stages": [{"id": "check", "kind": "evaluate", "uses": "reward-accuracy",
                        "params": {"dataset": "labelled", "examples": 2, "judges": {
                            "longer": {"uses": "length", "params": {"unit": "characters", "per_unit": 1.0}},
                            "shorter": {"uses": "length", "params": {"unit": "characters", "per_unit": -1.0}},
                            # a batch z-score keeps the order only if chosen and rejected are normalised together
                            "zscored": {"uses": "combine", "params": {
                                "components": {"chars": {"uses": "length", "params": {"unit": "characters", "per_unit": 1.0}}},
                                "normalize": {"chars": {"method": "batch"}}}}}}}]}
    code, report = run_inprocess(write_spec(tmp_path, spec), tmp_path / "cache", tmp_path / "report.json")
    assert code == 0
    m = report["stages"][0]["metrics"]
    assert m["pairs"] == 4 and m["primary_judge"] == "longer"
    assert m["accuracy"] == m["longer.accuracy"] == 2.5 / 4
    assert m["shorter.accuracy"] == 1.5 / 4
    assert m["zscored.accuracy"] == 2.5 / 4 and m["zscored.prefers_longer_rate"] == 1.0
    assert (m["longer.accuracy_ci_low"], m["longer.accuracy_ci_high"]) == pytest.approx(wilson_interval(2.5, 4))
    assert m["labels_prefer_longer_rate"] == pytest.approx(2 / 3)
    assert m["longer.prefers_longer_rate"] == 1.0 and m["shorter.prefers_longer_rate"] == 0.0
    out = Path(report["stages"][0]["output"])
    md = (out / "examples.md").read_text()
    assert "| longer | 0.625 |" in md and "| shorter | 0.375 |" in md


def test_reward_accuracy_needs_pairs_and_a_known_primary(tmp_path, capsys):
    from rlhf_spec.cli import main

    judge = {"uses": "length", "params": {"unit": "words", "per_unit": 1.0}}
    spec = {"name": "acc", "stages": [{"id": "check", "kind": "evaluate", "uses": "reward-accuracy",
                                       "params": {"primary": "lenght", "judges": {"length": judge}}}]}
    assert main(["validate", str(write_spec(tmp_path, spec))]) == 2
    err = capsys.readouterr().err
    assert "/stages/0/params/dataset: reward-accuracy needs labelled pairs" in err
    assert "/stages/0/params/primary: no judge named 'lenght'" in err and "length" in err
    spec["stages"][0]["params"].update(dataset="x", judges={"bad name!": judge})
    assert main(["validate", str(write_spec(tmp_path, spec))]) == 2
    assert "/stages/0/params/judges: judge name 'bad name!' may use letters, digits, '_' and '-' only" in capsys.readouterr().err
