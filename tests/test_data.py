"""Dataset adapters on the real files: hh-rlhf transcripts, prompt ids, disjoint selections; the SFT and unpaired
adapters (messages, prompt-completion, alpaca, sharegpt, kto) on LLaMA-Factory's demos and AlpacaEval."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import HH, ROOT, data_file
from rlhf_spec.data import (
    hash_unit,
    load_spec_dataset,
    normalize_messages,
    parse_hh_transcript,
    prompt_id,
    split_hh_pair,
)
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


# ----------------------------------------------------------------------------- adapters as registered classes

#: Every shared data file through each adapter that reads it: (rows, sha256 prefix of the column names, features
#: and rows in order). Recorded with the adapters as they were before each became a registered class; a change
#: here changes every dataset's rows, and with them the figures of every spec that reads it.
ADAPTER_ROWS = {
    "hh-rlhf": (dict(path=HH, adapter="hh-rlhf"), 2310, "f6a27738617dae43"),
    "hh-rlhf-rm": (dict(path=HH, adapter="hh-rlhf", hash_range=(0.0, 0.35), limit=1000), 808, "858ec8f338eea60f"),
    "hh-rlhf-all-rows": (dict(path=HH, adapter="hh-rlhf", dedupe_prompts=False, prompt_template="Q: {prompt}"), 2312,
                         "9bd22967224d83bf"),
    "sharegpt-pairs": (dict(path=DPO_DEMO, adapter="sharegpt", chosen_column="chosen", rejected_column="rejected"), 295,
                       "27f2f6e3916a6bb0"),
    "kto": (dict(path=KTO_DEMO, adapter="kto"), 300, "48075a88fdfd081f"),
    "messages": (dict(path=KTO_DEMO, adapter="messages"), 300, "f6c0773b4a0c6477"),
    "messages-label": (dict(path=KTO_DEMO, adapter="messages", label_column="label", dedupe_prompts=False), 300,
                       "48075a88fdfd081f"),
    "alpaca": (dict(path=ALPACA, adapter="alpaca"), 805, "cfa038b94a115505"),
    "prompt-completion": (dict(path=ALPACA, adapter="prompt-completion", prompt_column="instruction",
                               completion_column="output", reference_column="generator"), 805, "b5f968b357f461fa"),
    "generic-prompts": (dict(path="alpaca_eval/text_davinci_003__model_outputs.json", prompt_column="instruction"), 805,
                        "f40fc1ecb8a6a12a"),
    "generic-pairs": (dict(path="alpaca_eval/alpaca-7b__model_outputs.json", prompt_column="instruction",
                           chosen_column="output", rejected_column="generator", hash_range=(0.2, 0.9)), 562,
                      "5590923db45bdff7"),
    "alpaca-eval": (dict(path="alpaca_eval/alpaca-7b__alpaca_eval_gpt4__annotations.json", adapter="alpaca-eval"), 789,
                    "01ac04f706da25f0"),
    "gsm8k": (dict(path="gsm8k/test.jsonl", adapter="gsm8k"), 1319, "96f17f8d3fdd9462"),
    "gsm8k-r1": (dict(path="gsm8k/train.jsonl", adapter="gsm8k", prompt_template="{prompt}\nThink first.", limit=700,
                      completion_template="<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"), 700,
                 "5b29aa2e63169e1e"),
    "generic-gsm8k-reference": (dict(path="gsm8k/test.jsonl", prompt_column="question", reference_column="answer",
                                     prompt_template="{prompt}\nPut the final number inside <answer> </answer>."), 1319,
                                "6a9afb435eb6ac0a"),
    "rt-polarity-prompts": (dict(path=RT[0], negative_path=RT[1], adapter="rt-polarity", hash_range=(0.4, 1.0),
                                 prompt_template="Continue: {prompt}"), 5970, "900b3270dae2f4e6"),
    "rt-polarity-pairs": (dict(path=RT[0], negative_path=RT[1], adapter="rt-polarity", rows="pairs", prompt_words=6,
                               encoding="latin-1"), 5066, "2afb5f7afd978a7b"),
}


def _rows_digest(ds) -> str:
    doc = {"columns": ds.column_names, "features": ds.features.to_dict(), "rows": ds.to_list()}
    return hashlib.sha256(json.dumps(doc, ensure_ascii=False).encode()).hexdigest()[:16]


@pytest.mark.parametrize("case", sorted(ADAPTER_ROWS))
def test_each_adapter_reads_the_shared_files_as_before(case: str):
    """Same rows, in the same order, with the same prompt ids, columns and types as before the registry."""
    fields, n, digest = ADAPTER_ROWS[case]
    fields = {k: (str(data_file(v)) if k in ("path", "negative_path") else v) for k, v in fields.items()}
    spec = DatasetSpec(**fields)
    ds = load_spec_dataset(spec, Path("."))
    assert set(ds.column_names) == set(spec.columns())
    assert (len(ds), _rows_digest(ds)) == (n, digest)


def test_builtin_adapters_register_through_the_entry_point():
    from rlhf_spec.data import FIT
    from rlhf_spec.plugins import load_registry

    reg = load_registry()
    names = ["generic", "hh-rlhf", "messages", "prompt-completion", "alpaca", "sharegpt", "kto", "rt-polarity",
             "alpaca-eval", "gsm8k"]
    assert [n for n in reg.datasets if n in names] == names
    for name in names:
        adapter = reg.datasets[name]
        assert adapter.distribution == "rlhf-spec" and adapter.entry_point == "datasets"
        assert set(adapter.fit_for) <= set(FIT)
    rows = [r for r in reg.rows() if r["surface"] == "dataset"]
    assert {r["name"] for r in rows} >= set(names)


def test_unknown_adapter_names_its_json_path_with_a_suggestion():
    from rlhf_spec.errors import SpecError
    from rlhf_spec.plugins import registry
    from rlhf_spec.spec import validate

    spec = json.loads((ROOT / "specs" / "sft_cpu.json").read_text())
    spec["datasets"]["heldout"]["adapter"] = "alpacca"
    with pytest.raises(SpecError) as err:
        validate(spec, registry(), base=ROOT, check_files=False)
    (problem,) = err.value.problems
    assert problem.pointer == "/datasets/heldout/adapter"
    assert "unknown dataset adapter 'alpacca'" in problem.message and "did you mean 'alpaca'?" in problem.message
    assert "hh-rlhf" in problem.message  # the installed adapters are listed
    with pytest.raises(ValueError, match="did you mean 'hh-rlhf'"):
        DatasetSpec(path="x.json", adapter="hh_rlhf")


def _plugin_module():
    """An in-process plugin that adds a ``question-answer`` adapter (upper-cased replies) and one broken record."""
    import types
    from dataclasses import dataclass

    from rlhf_spec import DatasetAdapter, hookimpl

    @dataclass(frozen=True, kw_only=True)
    class QuestionAnswer(DatasetAdapter):
        name: str = "question-answer"
        fit_for: tuple = ("completions",)
        fields: tuple = ("completion_column",)
        description: str = "question and ANSWER columns, the reply upper-cased."

        def source_columns(self, ds):
            return [("prompt", "question", "adapter", True),
                    ("completion", ds.completion_column or "answer", "adapter", True)]

        def build_row(self, row, ds):
            prompt = [{"role": "user", "content": row["question"]}]
            reply = row[ds.completion_column or "answer"].upper()
            return {"prompt": prompt, "completion": reply,
                    "messages": prompt + [{"role": "assistant", "content": reply}]}

    mod = types.ModuleType("qa_plugin")

    @hookimpl
    def rlhf_spec_register_datasets(register):
        register(QuestionAnswer())

    mod.rlhf_spec_register_datasets = rlhf_spec_register_datasets
    return mod


def test_a_plugin_adapter_is_validated_loaded_and_listed_in_the_schema(tmp_path: Path):
    import types

    from rlhf_spec import DatasetAdapter, hookimpl
    from rlhf_spec.errors import SpecError
    from rlhf_spec.plugins import load_registry, set_registry
    from rlhf_spec.spec import json_schema, validate

    broken = types.ModuleType("broken_adapters")

    @hookimpl
    def rlhf_spec_register_datasets(register):
        register(DatasetAdapter(name="nothing", fit_for=("rows",)))

    broken.rlhf_spec_register_datasets = rlhf_spec_register_datasets
    reg = load_registry(extra=[_plugin_module(), broken])
    assert "question-answer" in reg.datasets and "nothing" not in reg.datasets
    assert any("fit_for must name some of prompts, pairs, completions" in f.error for f in reg.failures)
    qa = [json.dumps({"question": f"q{i}", "answer": f"a{i}"}) for i in range(6)]
    (tmp_path / "qa.jsonl").write_text("\n".join(qa))
    spec = json.loads((ROOT / "specs" / "sft_cpu.json").read_text())
    spec["datasets"] = {name: {"path": "qa.jsonl", "adapter": "question-answer"} for name in spec["datasets"]}
    policy = tmp_path / spec["models"]["policy"]["path"]
    policy.mkdir(parents=True)
    (policy / spec["models"]["policy"]["gguf_file"]).write_bytes(b"")
    pipe = validate(spec, reg, base=tmp_path)
    ds = pipe.spec.datasets["train"]
    assert ds.columns() == ("prompt_id", "prompt", "completion", "messages")
    rows = load_spec_dataset(ds, tmp_path)
    assert rows["completion"] == [f"A{i}" for i in range(6)]
    assert rows["prompt_id"][0] == prompt_id([{"role": "user", "content": "q0"}])
    with pytest.raises(SpecError, match="/datasets/train/adapter: unknown dataset adapter 'question-answer'"):
        validate(spec, load_registry(), base=tmp_path)  # not installed there
    spec["datasets"]["train"]["completion_column"] = "reply"
    with pytest.raises(SpecError, match="/datasets/train/adapter: qa.jsonl has no column.s. 'reply'"):
        validate(spec, reg, base=tmp_path)  # the plugin's columns are checked like a built-in's
    set_registry(reg)
    try:
        enum = json_schema(reg)["$defs"]["DatasetSpec"]["properties"]["adapter"]["enum"]
    finally:
        set_registry(None)
    assert enum[:2] == ["generic", "hh-rlhf"] and "question-answer" in enum
