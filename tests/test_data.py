"""Dataset adapters on the real files: hh-rlhf transcripts, prompt ids, disjoint selections; the SFT and unpaired
adapters (messages, prompt-completion, alpaca, sharegpt, kto) on LLaMA-Factory's demos and AlpacaEval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import data_file
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


# ----------------------------------------------------------------------------- SFT and unpaired adapters, on the real files

DPO_DEMO = "llama-factory/dpo_en_demo.json"
KTO_DEMO = "llama-factory/kto_en_demo.json"
ALPACA = "alpaca_eval/gpt4__model_outputs.json"


def _raw(rel: str) -> list[dict]:
    return json.loads(data_file(rel).read_text())


def test_first_release_identity_and_columns_are_unchanged(hh_file: Path):
    """Existing cache keys hash the dataset's dump: the fields added later stay out of it while unset."""
    ds = DatasetSpec(path=str(hh_file), adapter="hh-rlhf", hash_range=(0.0, 0.5), limit=3)
    assert ds.model_dump(mode="json", exclude={"path", "revision"}) == {
        "hub": None, "config": None, "split": "train", "adapter": "hh-rlhf", "prompt_column": "prompt", "chosen_column": None,
        "rejected_column": None, "hash_range": [0.0, 0.5], "limit": 3, "dedupe_prompts": True}
    assert DatasetSpec(path="x.json").columns() == ("prompt_id", "prompt")
    assert DatasetSpec(path="x.json", chosen_column="c", rejected_column="r").columns() == ("prompt_id", "prompt", "chosen", "rejected")
    assert "completion_column" in DatasetSpec(path="x.json", adapter="alpaca", completion_column="out").model_dump()
    with pytest.raises(ValueError, match="does not read completion_column"):
        DatasetSpec(path="x.json", completion_column="out")


def test_sharegpt_preference_pairs():
    raw = _raw(DPO_DEMO)
    spec = DatasetSpec(path=str(data_file(DPO_DEMO)), adapter="sharegpt", chosen_column="chosen", rejected_column="rejected")
    assert spec.columns() == ("prompt_id", "prompt", "chosen", "rejected")
    ds = load_spec_dataset(spec, Path("/"))
    assert set(ds.column_names) == set(spec.columns())
    assert len(ds) == len({prompt_id(normalize_messages(r["conversations"])) for r in raw})  # one row per prompt
    by_id = {prompt_id(normalize_messages(r["conversations"])): r for r in raw}
    with_system = 0
    for row in ds:
        src = by_id[row["prompt_id"]]
        assert row["prompt"] == normalize_messages(src["conversations"]) and row["prompt"][-1]["role"] == "user"
        assert row["chosen"] == src["chosen"]["value"] and row["rejected"] == src["rejected"]["value"]
        with_system += row["prompt"][0]["role"] == "system"
    assert with_system > 50  # the demo's system turns ('from': 'system') are kept as system messages


def test_sharegpt_conversations_for_sft(tmp_path: Path):
    """The demo's conversations with their chosen reply appended: SFT rows whose prompt matches the pairs'."""
    raw = _raw(DPO_DEMO)[:40]
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(json.dumps({"conversations": r["conversations"] + [r["chosen"]]}) for r in raw))
    spec = DatasetSpec(path=str(path), adapter="sharegpt")
    assert spec.columns() == ("prompt_id", "prompt", "completion", "messages")
    ds = load_spec_dataset(spec, Path("/"))
    for row, src in zip(ds, raw):
        assert row["prompt"] == normalize_messages(src["conversations"])
        assert row["completion"] == src["chosen"]["value"]
        assert row["messages"] == row["prompt"] + [{"role": "assistant", "content": row["completion"]}]
        assert row["prompt_id"] == prompt_id(row["prompt"])


def test_kto_and_messages_adapters():
    raw = _raw(KTO_DEMO)
    spec = DatasetSpec(path=str(data_file(KTO_DEMO)), adapter="kto")
    assert spec.columns() == ("prompt_id", "prompt", "completion", "messages", "label")
    ds = load_spec_dataset(spec, Path("/"))
    assert len(ds) == len({(prompt_id(r["messages"][:-1]), r["messages"][-1]["content"], r["label"]) for r in raw})
    assert sum(ds["label"]) > 100 and len(ds) - sum(ds["label"]) > 100
    for row, src in zip(ds.select(range(50)), raw):
        assert row["messages"] == src["messages"] and row["prompt"] == src["messages"][:-1]
        assert row["completion"] == src["messages"][-1]["content"] and row["label"] is src["label"]
    plain = load_spec_dataset(DatasetSpec(path=str(data_file(KTO_DEMO)), adapter="messages"), Path("/"))
    assert "label" not in plain.column_names and plain["prompt_id"][:50] == ds["prompt_id"][:50]
    assert sum(len(m) > 2 for m in plain["messages"]) > 50  # multi-turn conversations keep every turn


def test_alpaca_and_prompt_completion_on_alpaca_eval(tmp_path: Path):
    raw = _raw(ALPACA)
    spec = DatasetSpec(path=str(data_file(ALPACA)), adapter="alpaca")
    assert spec.columns() == ("prompt_id", "prompt", "completion", "messages")
    ds = load_spec_dataset(spec, Path("/"))
    assert len(ds) == len({(r["instruction"], r["output"]) for r in raw})
    for row, src in zip(ds.select(range(20)), raw):
        assert row["prompt"] == [{"role": "user", "content": src["instruction"]}] and row["completion"] == src["output"]
    same = load_spec_dataset(DatasetSpec(path=str(data_file(ALPACA)), adapter="prompt-completion", prompt_column="instruction",
                                         completion_column="output"), Path("/"))
    assert same["prompt_id"] == ds["prompt_id"] and same["completion"] == ds["completion"]
    # an input is appended to the instruction after a blank line
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Translate.", "input": "Bonjour", "output": "Hello"},
                                {"instruction": "Say hi.", "input": "", "output": "Hi"}]))
    rows = load_spec_dataset(DatasetSpec(path=str(path), adapter="alpaca"), Path("/"))
    assert rows["prompt"] == [[{"role": "user", "content": "Translate.\n\nBonjour"}], [{"role": "user", "content": "Say hi."}]]


def test_adapter_column_problems_and_bad_rows(tmp_path: Path):
    from rlhf_spec.data import local_column_problem, parse_label, split_conversation

    kto = DatasetSpec(path=str(data_file(KTO_DEMO)), adapter="kto", label_column="ok")
    field, msg = local_column_problem(kto, Path("/"))
    assert field == "label_column" and "'ok'" in msg
    field, _ = local_column_problem(DatasetSpec(path=str(data_file(ALPACA)), adapter="sharegpt"), Path("/"))
    assert field == "adapter"  # the default 'conversations' column is missing
    assert local_column_problem(DatasetSpec(path=str(data_file(ALPACA)), adapter="alpaca"), Path("/")) is None
    with pytest.raises(ValueError, match="end with an assistant turn"):
        split_conversation([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}])
    assert parse_label("False") is False and parse_label(1) is True
    with pytest.raises(ValueError):
        parse_label(None)


RT = ("rt-polarity/rt-polarity.pos", "rt-polarity/rt-polarity.neg")


def _rt(rows: str, lo: float, hi: float, **kw) -> DatasetSpec:
    return DatasetSpec(path=str(data_file(RT[0])), negative_path=str(data_file(RT[1])), adapter="rt-polarity", rows=rows,
                       hash_range=(lo, hi), **kw)


def test_rt_polarity_pairs_and_prompts_are_disjoint_by_sentence():
    """Pairs put a positive sentence's rest over a negative one's; disjoint hash ranges share no sentence, and the
    prompt's own sentence is the chosen one for half of the pairs (so coherence alone does not predict the label)."""
    pos, neg = ({" ".join(line.split()) for line in data_file(f).read_text(encoding="utf-8").splitlines()} for f in RT)
    pairs = load_spec_dataset(_rt("pairs", 0.0, 0.4, prompt_template="Continue: {prompt}"), Path("."))
    prompts = load_spec_dataset(_rt("prompts", 0.4, 1.0, prompt_template="Continue: {prompt}"), Path("."))
    assert pairs.column_names == ["prompt_id", "prompt", "chosen", "rejected"] and len(pairs) > 1500
    own = 0
    for row in pairs.select(range(200)):
        head = row["prompt"][0]["content"].removeprefix("Continue: ")
        assert len(head.split()) == 4 and row["prompt"][0]["content"].startswith("Continue: ")
        own += f"{head} {row['chosen']}" in pos
        assert f"{head} {row['chosen']}" in pos or f"{head} {row['rejected']}" in neg
    assert 80 <= own <= 120
    assert not set(pairs["prompt_id"]) & set(prompts["prompt_id"])
    assert len(prompts) > 5000 and prompts.column_names == ["prompt_id", "prompt"]
    assert _rt("pairs", 0, 1).columns() == ("prompt_id", "prompt", "chosen", "rejected")


def test_rt_polarity_problems(tmp_path: Path):
    from rlhf_spec.data import local_column_problem

    with pytest.raises(ValueError, match="negative_path"):
        DatasetSpec(path="pos.txt", adapter="rt-polarity")
    with pytest.raises(ValueError, match="does not read negative_path"):
        DatasetSpec(path="x.json", negative_path="neg.txt")
    (tmp_path / "pos.txt").write_bytes("caf\xe9 au lait is fine here\n".encode("latin-1"))
    (tmp_path / "neg.txt").write_text("bad\n")
    ds = DatasetSpec(path="pos.txt", negative_path="neg.txt", adapter="rt-polarity")
    field, msg = local_column_problem(ds, tmp_path)
    assert field == "encoding" and "latin-1" in msg
    ds = DatasetSpec(path="pos.txt", negative_path="missing.txt", adapter="rt-polarity", encoding="latin-1")
    assert local_column_problem(ds, tmp_path)[0] == "negative_path"


def test_reference_column_and_prompt_template_on_gsm8k(tmp_path: Path):
    """GSM8K's answer is kept verbatim as ``reference`` (for math-answer); the template rewrites the question,
    and the prompt id hashes the prompt the policy sees."""
    path = data_file("gsm8k/test.jsonl")
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    ds = DatasetSpec(path=str(path), prompt_column="question", reference_column="answer",
                     prompt_template="{prompt}\nAnswer in {braces} <answer></answer>.", limit=5)
    rows = load_spec_dataset(ds, Path("."))
    assert ds.columns() == ("prompt_id", "prompt", "reference") and len(rows) == 5
    row = rows[0]
    assert row["reference"] == first["answer"] and row["reference"].rstrip().endswith("#### 18")
    assert row["prompt"][0]["content"] == first["question"] + "\nAnswer in {braces} <answer></answer>."
    assert row["prompt_id"] == prompt_id(row["prompt"])
    plain = load_spec_dataset(DatasetSpec(path=str(path), prompt_column="question", limit=5), Path("."))
    assert plain[0]["prompt_id"] != row["prompt_id"]
    with pytest.raises(ValueError, match=r"\{prompt\}"):
        DatasetSpec(path="x.json", prompt_template="no slot")
    from rlhf_spec.data import local_column_problem

    bad = DatasetSpec(path=str(path), prompt_column="question", reference_column="solution")
    assert local_column_problem(bad, Path("."))[0] == "reference_column"
    assert "reference_column" not in DatasetSpec(path="x.json").model_dump()
