"""Dataset adapters on the real hh-rlhf file: transcript parsing, prompt ids, disjoint selections."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_spec.data import hash_unit, load_spec_dataset, normalize_messages, parse_hh_transcript, prompt_id, split_hh_pair
from rlhf_spec.spec import DatasetSpec


def test_parse_transcript():
    msgs = parse_hh_transcript("\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: how are you?")
    assert msgs == [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
                    {"role": "user", "content": "how are you?"}]
    with pytest.raises(ValueError):
        parse_hh_transcript("no turns here")


def test_split_pair_shares_prompt():
    c = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: good"
    r = "\n\nHuman: q1\n\nAssistant: a1\n\nHuman: q2\n\nAssistant: bad"
    prompt, chosen, rejected = split_hh_pair(c, r)
    assert prompt[-1] == {"role": "user", "content": "q2"} and len(prompt) == 3
    assert (chosen, rejected) == ("good", "bad")


def test_normalize_messages_variants():
    assert normalize_messages("hi") == [{"role": "user", "content": "hi"}]
    assert normalize_messages([{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}]) == [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    with pytest.raises(ValueError):
        normalize_messages(3)


def test_prompt_id_is_content_hash():
    a = [{"role": "user", "content": "x"}]
    assert prompt_id(a) == prompt_id([dict(a[0])])
    assert prompt_id(a) != prompt_id([{"role": "user", "content": "y"}])
    assert 0.0 <= hash_unit(prompt_id(a)) < 1.0


def test_hash_ranges_are_disjoint_and_cover(hh_file: Path):
    base = Path("/")
    parts = [DatasetSpec(path=str(hh_file), adapter="hh-rlhf", hash_range=r) for r in ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0))]
    sets = [set(load_spec_dataset(p, base)["prompt_id"]) for p in parts]
    full = set(load_spec_dataset(DatasetSpec(path=str(hh_file), adapter="hh-rlhf"), base)["prompt_id"])
    assert sets[0].isdisjoint(sets[1]) and sets[1].isdisjoint(sets[2]) and sets[0].isdisjoint(sets[2])
    assert sets[0] | sets[1] | sets[2] == full
    assert len(full) > 2000  # 2312 rows, a few duplicate prompts


def test_limit_and_columns(hh_file: Path):
    ds = load_spec_dataset(DatasetSpec(path=str(hh_file), adapter="hh-rlhf", limit=5), Path("/"))
    assert len(ds) == 5
    assert set(ds.column_names) == {"prompt_id", "prompt", "chosen", "rejected"}
    row = ds[0]
    assert row["prompt"][-1]["role"] == "user" and row["chosen"] and row["rejected"]
