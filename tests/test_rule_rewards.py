"""Rule rewards (math-answer, length, format) and the combine reward: pure functions on hand cases,
the registered load/score path, GSM8K's real test set, and check() problems."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from conftest import data_file

from rlhf_spec.records import RewardBatch, RewardOutput
from rlhf_spec.rewards import combine, rules
from rlhf_spec.rewards.combine import (CombineParams, Normalization, llama2_combine, logit, weighted_sum, zscore)
from rlhf_spec.rewards.rules import answers_match, extract_answer, parse_number

GSM8K_TEST = "gsm8k/test.jsonl"  # 1319 JSON lines of question/answer


def registered(module) -> dict:
    """The RewardImpl records a module registers through its hook, by name."""
    found = {}
    module.rlhf_spec_register_rewards(register=lambda impl: found.__setitem__(impl.name, impl))
    return found


def run_reward(name: str, params: dict, completions: list[str], columns=None, ctx=None) -> RewardOutput:
    """Validate params with the registered model, load through the registered load, score one batch."""
    impl = {**registered(rules), **registered(combine)}[name]
    reward = impl.load(impl.params.model_validate(params), ctx)
    prompts = [[{"role": "user", "content": "q"}] for _ in completions]
    return reward.score(RewardBatch(prompts=prompts, completions=completions, columns=columns or {}))


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, answer, value", [
    (r"So the total is \boxed{\frac{3}{4}}.", r"\frac{3}{4}", 0.75),
    (r"first \boxed{2}, finally \boxed{{1}{,}234} done", "{1}{,}234", None),  # braces balanced, not a number
    (r"first \boxed{2}, finally \boxed{1{,}234}", "1{,}234", 1234.0),
    (r"\boxed{7} then a truncated \boxed{12", "7", 7.0),
    ("She pays 3 * 2 = 6\n#### 1,234", "1,234", 1234.0),
    ("#### 5 but later 9", "5", 5.0),
    ("It costs $5.00.", "$5.00", 5.0),
    ("The temperature fell to -3", "-3", -3.0),
    ("between 3-4 apples", "4", 4.0),
    ("the answer is 12.", "12", 12.0),
    ("Step 1 gives 7. Answer: 41 apples, not 40", "41", 41.0),
    ("The final answer is $\\frac{1}{2}$.", "$\\frac{1}{2}", 0.5),
    ("He ate 3/4 of it", "3/4", 0.75),
    ("It grew 50%.", "50%", 50.0),
    ("no number here at all", None, None),
    ("", None, None),
])
def test_extract_and_parse(text, answer, value):
    got = extract_answer(text)
    assert got == answer
    assert parse_number(got) == (pytest.approx(value) if value is not None else None)


@pytest.mark.parametrize("text, value", [
    ("1,234", 1234.0), ("$5.00", 5.0), ("-3", -3.0), ("3/4", 0.75), ("-3/4", -0.75), (".5", 0.5), ("12.", 12.0),
    ("\\$1{,}000", 1000.0), ("\u22122", -2.0), ("\\dfrac{6}{4}", 1.5), ("- 7", -7.0), ("10 %", 10.0),
    ("1,5", None), ("1/0", None), ("3/-4", None), ("x = 5", None), ("5 dollars", None), ("nan", None), ("", None), (None, None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_answers_match():
    assert answers_match("3/4", "0.75")
    assert answers_match("$5.00", "5")
    assert answers_match("1,234", 1234)
    assert answers_match("1000000.5", "1000000")  # within 1e-6 * |ref|
    assert not answers_match("1000002", "1000000")
    assert answers_match("0.0000001", "0")  # absolute 1e-6 below |ref| = 1
    assert not answers_match("0.00001", "0")
    assert not answers_match("-3", "3")
    assert not answers_match(None, "3")
    assert not answers_match("three", "3")


# ----------------------------------------------------------------------------- math-answer reward


def test_math_answer_reward_scores_and_counts():
    out = run_reward("math-answer", {"reference_column": "gold", "correct": 2.0, "incorrect": -1.0, "unparseable": -5.0},
                     ["so \\boxed{72}", "I think 71", "no idea", "the answer is 0.75"],
                     columns={"gold": ["Natalia sold ... #### 72", "#### 72", 72, "3/4"]})
    assert out.scores == [2.0, -1.0, -5.0, 2.0]
    assert out.counts == {"correct": 2, "unparseable": 1}
    assert rules.required_columns(rules.MathAnswerParams(reference_column="gold")) == ["gold"]
    assert rules.required_columns(rules.FormatParams(pattern="x")) == []


def test_math_answer_errors_name_the_column():
    with pytest.raises(ValueError, match="no column 'reference'"):
        run_reward("math-answer", {}, ["1"], columns={"answer": ["1"]})
    with pytest.raises(ValueError, match="reference column 'reference', row 1"):
        run_reward("math-answer", {}, ["1", "2"], columns={"reference": ["1", "no number"]})


def _gsm8k() -> list[dict]:
    path = data_file(GSM8K_TEST)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319, f"{path} has {len(rows)} rows, expected 1319"
    return rows


def test_gsm8k_gold_answers_score_one():
    golds = [r["answer"] for r in _gsm8k()]
    out = run_reward("math-answer", {}, golds, columns={"reference": golds})
    wrong = [i for i, s in enumerate(out.scores) if s != 1.0]
    assert not wrong, f"{len(wrong)} gold answers do not match themselves, e.g. {golds[wrong[0]][-80:]!r}"
    assert out.counts == {"correct": 1319, "unparseable": 0}


def test_gsm8k_shuffled_answers_mostly_wrong():
    golds = [r["answer"] for r in _gsm8k()]
    order = list(range(len(golds)))
    random.Random(1234).shuffle(order)
    # One cycle through the shuffled order: row order[k] gets the answer of row order[k+1]; no fixed points.
    perm = [0] * len(golds)
    for k, i in enumerate(order):
        perm[i] = order[(k + 1) % len(order)]
    assert all(perm[i] != i for i in range(len(perm)))
    out = run_reward("math-answer", {}, [golds[perm[i]] for i in range(len(golds))], columns={"reference": golds})
    rate = sum(out.scores) / len(out.scores)
    assert rate < 0.02, f"{rate:.1%} of shuffled answers scored correct"
    assert out.counts["correct"] == sum(out.scores)
    # The same solutions with every digit removed hold no number at all.
    blanked = [re.sub(r"\d", "", g) for g in golds]
    out = run_reward("math-answer", {"unparseable": -1.0}, blanked, columns={"reference": golds})
    assert out.counts == {"correct": 0, "unparseable": 1319}
    assert set(out.scores) == {-1.0}


# ----------------------------------------------------------------------------- length and format


def test_length_words_and_characters():
    texts = ["one two  three\nfour five", "short", "h\u00e9llo w\u00f6rld"]
    out = run_reward("length", {"unit": "words", "per_unit": -0.5, "free": 2}, texts)
    assert out.scores == [-1.5, 0.0, 0.0]  # 5 words -> 3 beyond free; 1 and 2 words are free
    assert out.counts == {"over_free": 1}
    out = run_reward("length", {"unit": "characters", "per_unit": 0.1, "free": 10}, texts)
    assert out.scores == pytest.approx([1.4, 0.0, 0.1])  # 24, 5 and 11 code points


class FakeSource:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def load_tokenizer(self):
        return self.tokenizer


class FakeCtx:
    """The parts of a ComponentContext the rewards use: model(), reward(), pointer."""

    def __init__(self, models=None, rewards=None, pointer="/stages/1/params/reward"):
        self.models, self.rewards, self.pointer, self.asked = models or {}, rewards or {}, pointer, []

    def model(self, field_name):
        self.asked.append(field_name)
        return FakeSource(self.models[field_name])

    def reward(self, subpath):
        self.asked.append(subpath)
        return self.rewards[subpath]


def _word_tokenizer():
    """A word-level tokenizer whose count is known by hand: words and punctuation are tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "<s>": 1, "hello": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>")


def test_length_tokens_through_ctx():
    ctx = FakeCtx(models={"tokenizer": _word_tokenizer()})
    out = run_reward("length", {"unit": "tokens", "per_unit": -1.0, "free": 1, "tokenizer": "policy"},
                     ["hello, world!", "hello"], ctx=ctx)
    assert ctx.asked == ["tokenizer"]
    assert out.scores == [-3.0, 0.0]  # hello , world ! = 4 tokens, 3 beyond free


def test_length_tokens_with_testing_tokenizer():
    try:
        from rlhf_spec.testing import make_tokenizer
        tok = make_tokenizer()
    except ImportError:  # the package is being restructured; fall back to a tokenizers-built one
        tok = _word_tokenizer()
    text = "The quick brown fox jumps over the lazy dog."
    n = len(tok.encode(text, add_special_tokens=False))
    assert n > len(text.split())
    out = run_reward("length", {"unit": "tokens", "per_unit": 1.0, "tokenizer": "policy"}, [text, ""],
                     ctx=FakeCtx(models={"tokenizer": tok}))
    assert out.scores == [float(n), 0.0]


def test_length_check_and_load_errors():
    impl = registered(rules)["length"]
    problems = impl.check(impl.params(unit="tokens", per_unit=-1.0), None)
    assert [(p.pointer, p.message) for p in problems] == [("/tokenizer", "unit 'tokens' needs a tokenizer")]
    assert impl.check(impl.params(unit="words", per_unit=-1.0, tokenizer="policy"), None)[0].pointer == "/tokenizer"
    assert impl.check(impl.params(unit="tokens", per_unit=-1.0, tokenizer="policy"), None) == []
    with pytest.raises(ValueError, match="tokens"):
        impl.load(impl.params(unit="tokens", per_unit=-1.0), None)
    with pytest.raises(ValidationError):
        impl.params(unit="lines", per_unit=1.0)


def test_format_modes_and_flags():
    texts = ["<think>a</think> Answer: 4", "answer: 4", "Answer: 4\nextra"]
    out = run_reward("format", {"pattern": r"Answer: \d+"}, texts)
    assert out.scores == [1.0, 0.0, 1.0] and out.counts == {"matched": 2}
    out = run_reward("format", {"pattern": r"Answer: \d+", "mode": "fullmatch"}, texts)
    assert out.scores == [0.0, 0.0, 0.0]
    out = run_reward("format", {"pattern": r"answer: \d+", "mode": "fullmatch", "flags": ["ignorecase"],
                                "match_score": 2.0, "miss_score": -1.0}, texts)
    assert out.scores == [-1.0, 2.0, -1.0]
    out = run_reward("format", {"pattern": r"<think>.*</think>.*", "mode": "fullmatch", "flags": ["dotall"]},
                     ["<think>x\ny</think>\nok", "<think>x</think>"])
    assert out.scores == [1.0, 1.0]
    out = run_reward("format", {"pattern": r"^extra$", "flags": ["multiline"]}, texts)
    assert out.scores == [0.0, 0.0, 1.0]


def test_format_pattern_validated():
    with pytest.raises(ValidationError) as err:
        rules.FormatParams(pattern="Answer: (\\d+")
    assert err.value.errors()[0]["loc"] == ("pattern",)
    assert "not a valid regular expression" in str(err.value)
    with pytest.raises(ValidationError):
        rules.FormatParams(pattern="x", flags=["verbose"])


# ----------------------------------------------------------------------------- combine: arithmetic


def test_zscore():
    assert zscore([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx([-1.5, -0.5, -0.5, -0.5, 0, 0, 1, 2])  # mean 5, std 2
    assert zscore([0.1, 0.1, 0.1]) == [0.0, 0.0, 0.0]
    assert zscore([]) == []


def test_weighted_sum_batch_and_fixed():
    comps = {"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 60.0], "c": [5.0, 5.0, 5.0]}
    # a: batch z-score, mean 2, population std sqrt(2/3): [-sqrt(1.5), 0, sqrt(1.5)]; weight 2.
    # b: fixed mean 20, std 10: [-1, 0, 4]; weight 0.5.  c: no normalisation, weight 1 (default).
    za = math.sqrt(1.5)
    expected = [2 * -za + 0.5 * -1 + 5, 0 + 0 + 5, 2 * za + 0.5 * 4 + 5]
    norms = {"a": Normalization(method="batch"), "b": Normalization(method="fixed", mean=20, std=10)}
    assert weighted_sum(comps, {"a": 2.0, "b": 0.5}, norms) == pytest.approx(expected)
    # 'fixed' without mean/std reads the component's statistics.
    stats = {"b": {"mean": 20.0, "std": 10.0}}
    assert weighted_sum(comps, {"a": 2.0, "b": 0.5}, {"a": {"method": "batch"}, "b": {"method": "fixed"}}, stats) == pytest.approx(expected)
    with pytest.raises(ValueError, match="component 'b'"):
        weighted_sum(comps, {}, {"b": {"method": "fixed"}}, {})
    with pytest.raises(ValueError, match="no component"):
        weighted_sum(comps, {"d": 1.0}, {})
    with pytest.raises(ValidationError):
        Normalization(method="fixed", mean=1.0)
    with pytest.raises(ValidationError):
        Normalization(method="batch", mean=1.0, std=2.0)


def test_llama2_branches_logit_whiten():
    # Row 0: tagged unsafe -> safety 0.9 (helpfulness 0.2 ignored).
    # Row 1: safety 0.1 < 0.15 -> safety 0.1.
    # Row 2: safety 0.6 >= 0.15 -> helpfulness 0.75.
    # Row 3: safety exactly 0.15 is not below the threshold -> helpfulness 0.5.
    safety, helpful, unsafe = [0.9, 0.1, 0.6, 0.15], [0.2, 0.8, 0.75, 0.5], [True, False, False, False]
    # LOGIT: ln(0.9/0.1) = 2 ln3, ln(0.1/0.9) = -2 ln3, ln(0.75/0.25) = ln3, ln(1) = 0.
    ln3 = math.log(3)
    assert llama2_combine(safety, helpful, unsafe, 0.15, scores_are_logits=False, whiten=False) == pytest.approx(
        [2 * ln3, -2 * ln3, ln3, 0.0])
    # WHITEN: in units of ln3 the values are 2, -2, 1, 0: mean 0.25, deviations 1.75, -2.25, 0.75, -0.25,
    # population variance (3.0625 + 5.0625 + 0.5625 + 0.0625) / 4 = 2.1875 (ln3 cancels).
    sd = math.sqrt(2.1875)
    expected = [1.75 / sd, -2.25 / sd, 0.75 / sd, -0.25 / sd]
    got = llama2_combine(safety, helpful, unsafe, 0.15, scores_are_logits=False, whiten=True)
    assert got == pytest.approx(expected)
    assert got[0] == pytest.approx(1.1832159566, abs=1e-9)
    # Without the unsafe tag, row 0 has safety 0.9 >= 0.15 and takes helpfulness 0.2: ln(0.2/0.8) = -ln4.
    assert llama2_combine(safety, helpful, None, 0.15, False, False)[0] == pytest.approx(-math.log(4))


def test_llama2_logits_and_clipping():
    # Raw logits: sigmoid(-2) = 0.119 < 0.15 picks safety; sigmoid(-1) = 0.269 picks helpfulness.
    out = llama2_combine([-2.0, -1.0], [3.0, 30.0], None, 0.15, scores_are_logits=True, whiten=False)
    assert out[0] == pytest.approx(-2.0)  # LOGIT(sigmoid(x)) = x
    assert out[1] == pytest.approx(math.log((1 - 1e-6) / 1e-6))  # sigmoid(30) clipped to 1 - 1e-6
    assert logit(0.0) == pytest.approx(-math.log((1 - 1e-6) / 1e-6))
    with pytest.raises(ValueError, match="outside"):
        llama2_combine([1.5], [0.5], None, 0.15, scores_are_logits=False)
    assert llama2_combine([0.9], [0.9], None, 0.15, False, whiten=True) == [0.0]


# ----------------------------------------------------------------------------- combine: load and check


class Stub:
    def __init__(self, scores, components=None, counts=None, statistics=None):
        self.out = RewardOutput(scores=scores, components=components or {}, counts=counts or {})
        if statistics is not None:
            self.statistics = statistics

    def score(self, batch):
        return self.out


def spec_params(**extra) -> dict:
    comps = {"safety": {"uses": "classifier", "params": {"model": "safety_rm"}},
             "helpful": {"uses": "classifier", "params": {"model": "helpful_rm"}}}
    return {"components": comps, **extra}


def test_combine_weighted_sum_through_load():
    ctx = FakeCtx(rewards={"components.safety": Stub([0.0, 2.0], {"x": [1.0, 1.0]}, {"unparseable": 1},
                                                     statistics={"mean": 1.0, "std": 2.0}),
                           "components.helpful": Stub([1.0, 3.0], counts={"unparseable": 2, "correct": 1})})
    out = run_reward("combine", spec_params(weights={"safety": 3.0}, normalize={"safety": {"method": "fixed"},
                                                                                "helpful": {"method": "batch"}}),
                     ["a", "b"], ctx=ctx)
    # safety (statistics mean 1, std 2): [-0.5, 0.5] * 3; helpful z-score: [-1, 1].
    assert out.scores == pytest.approx([-2.5, 2.5])
    assert out.components == {"safety": [0.0, 2.0], "safety/x": [1.0, 1.0], "helpful": [1.0, 3.0]}
    assert out.counts == {"unparseable": 3, "correct": 1}
    assert ctx.asked == ["components.safety", "components.helpful"]


def test_combine_missing_statistics_names_component_and_pointer():
    ctx = FakeCtx(rewards={"components.safety": Stub([0.0]), "components.helpful": Stub([1.0])}, pointer="/stages/3/params/reward")
    with pytest.raises(ValueError, match=r"/stages/3/params/reward/normalize/helpful: component 'helpful'"):
        run_reward("combine", spec_params(normalize={"helpful": {"method": "fixed"}}), ["a"], ctx=ctx)


def test_combine_llama2_through_load():
    ctx = FakeCtx(rewards={"components.safety": Stub([0.9, 0.1, 0.6]), "components.helpful": Stub([0.2, 0.8, 0.75])})
    params = spec_params(rule="llama2", llama2={"safety": "safety", "helpfulness": "helpful", "unsafe_column": "is_unsafe",
                                                "scores": "probabilities", "whiten": False})
    out = run_reward("combine", params, ["a", "b", "c"], columns={"is_unsafe": [True, False, False]}, ctx=ctx)
    ln3 = math.log(3)
    assert out.scores == pytest.approx([2 * ln3, -2 * ln3, ln3])
    assert out.counts == {"llama2_safety_used": 2}
    assert combine.required_columns(CombineParams.model_validate(params)) == ["is_unsafe"]
    with pytest.raises(ValueError, match="unsafe_column 'is_unsafe', row 1"):
        run_reward("combine", params, ["a", "b", "c"], columns={"is_unsafe": [True, "no", False]}, ctx=ctx)


def _problems(params: dict) -> list[tuple[str, str, str]]:
    impl = registered(combine)["combine"]
    return [(p.pointer, p.message, p.hint) for p in impl.check(impl.params.model_validate(params), None)]


def test_combine_check_misspelt_names():
    assert _problems(spec_params(weights={"safty": 2.0, "helpful": 1.0})) == [
        ("/weights/safty", "no component named 'safty'", "did you mean 'safety'?")]
    assert _problems(spec_params(normalize={"helpfull": {"method": "batch"}})) == [
        ("/normalize/helpfull", "no component named 'helpfull'", "did you mean 'helpful'?")]
    assert _problems(spec_params(rule="llama2", llama2={"safety": "safty", "helpfulness": "helpful"})) == [
        ("/llama2/safety", "no component named 'safty'", "did you mean 'safety'?")]
    assert _problems(spec_params(normalize={"safety": {"method": "fixed"}})) == []  # statistics at run time
    assert _problems(spec_params(weights={"zzz": 1.0}))[0][2] == "components: safety, helpful"


def test_combine_check_rule_params():
    assert [p[0] for p in _problems(spec_params(rule="llama2"))] == ["/llama2"]
    assert [p[0] for p in _problems(spec_params(rule="llama2", weights={"safety": 1.0},
                                                llama2={"safety": "safety", "helpfulness": "helpful"}))] == ["/weights"]
    assert [p[0] for p in _problems(spec_params(llama2={"safety": "safety", "helpfulness": "helpful"}))] == ["/llama2"]
    with pytest.raises(ValidationError):
        CombineParams.model_validate({"components": {}})
    with pytest.raises(ValidationError):
        CombineParams.model_validate(spec_params(components={"a.b": {"uses": "x"}}))


R1_REPLY = "<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


def test_gsm8k_adapter_writes_replies_that_the_rule_rewards_accept():
    """The ``gsm8k`` adapter on GSM8K's real test set: the solution goes verbatim into ``reference`` and, through
    the completion template, into a reply without calculator annotations; every such reply is correct by
    math-answer against its own reference and, in DeepSeek-R1's template, matches the strict format rule."""
    from rlhf_spec.data import load_spec_dataset
    from rlhf_spec.spec import DatasetSpec

    spec = DatasetSpec(path=str(data_file(GSM8K_TEST)), adapter="gsm8k", completion_template=R1_REPLY,
                       prompt_template="{prompt}\nReply with <answer>.", dedupe_prompts=False)
    assert spec.columns() == ("prompt_id", "prompt", "reference", "completion", "messages")
    ds = load_spec_dataset(spec, Path("."))
    raw = _gsm8k()
    assert len(ds) == len(raw)
    assert ds["reference"] == [r["answer"] for r in raw]
    assert [p[0]["content"] for p in ds["prompt"]] == [r["question"] + "\nReply with <answer>." for r in raw]
    assert not [c for c in ds["completion"] if "<<" in c or "####" in c]
    assert all(m[-1] == {"role": "assistant", "content": c} for m, c in zip(ds["messages"], ds["completion"]))
    correct = run_reward("math-answer", {}, ds["completion"], columns={"reference": ds["reference"]})
    assert correct.counts == {"correct": 1319, "unparseable": 0}
    strict = run_reward("format", {"pattern": r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", "mode": "fullmatch",
                                   "flags": ["dotall"]}, ds["completion"])
    assert sum(strict.scores) == 1319
    # the default template keeps GSM8K's own '#### n' ending
    plain = load_spec_dataset(DatasetSpec(path=str(data_file(GSM8K_TEST)), adapter="gsm8k", limit=5), Path("."))
    assert all(re.search(r"\n#### -?[\d.]+$", c) for c in plain["completion"])


def test_gsm8k_reply_by_hand_and_its_errors():
    from rlhf_spec.data import gsm8k_reply
    from rlhf_spec.spec import DatasetSpec

    solution = "She pays 1,000/4 = $<<1000/4=250>>250 a week.\nIn all 250*4 = <<250*4=1000>>1000.\n#### 1,000"
    assert gsm8k_reply(solution) == "She pays 1,000/4 = $250 a week.\nIn all 250*4 = 1000.\n#### 1000"
    assert gsm8k_reply(solution, "[{answer}] {reasoning}") == "[1000] She pays 1,000/4 = $250 a week.\nIn all 250*4 = 1000."
    with pytest.raises(ValueError, match="ends with '#### <number>'"):
        gsm8k_reply("no final line")
    with pytest.raises(ValidationError, match="completion_template must contain '{answer}'"):
        DatasetSpec(path="x.jsonl", adapter="gsm8k", completion_template="{reasoning}")
    with pytest.raises(ValidationError, match="does not read completion_template"):
        DatasetSpec(path="x.jsonl", adapter="alpaca", completion_template="{answer}")
    # the solution column feeds both the reply and the reference; a missing one is named once, by its field
    from rlhf_spec.data import local_column_problem

    field, msg = local_column_problem(DatasetSpec(path=str(data_file(GSM8K_TEST)), adapter="gsm8k",
                                                  completion_column="solution"), Path("."))
    assert field == "completion_column" and msg.count("'solution'") == 1, msg
