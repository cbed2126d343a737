"""The ``llm-judge`` reward and the ``pair``/``ai-feedback`` stage, on tiny real causal LMs built in-process.

Every expected value is computed here by hand: the chat template rendered directly, the model run on
one unpadded sequence, the logits read at the label tokens looked up in the vocabulary.
"""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from conftest import registry_fixture  # noqa: E402
from rlhf_spec.context import InputArtifact  # noqa: E402
from rlhf_spec.data import render_transcript  # noqa: E402
from rlhf_spec.model_source import ModelSource  # noqa: E402
from rlhf_spec.plugins import load_registry  # noqa: E402
from rlhf_spec.records import RewardBatch, RewardSpec  # noqa: E402
from rlhf_spec.rewards import judge as judge_mod  # noqa: E402
from rlhf_spec.stages import ai_feedback as af_mod  # noqa: E402
from rlhf_spec.stages.score import ScoreParams  # noqa: E402
from rlhf_spec.testing import check_contract, execute, make_context, make_tiny_policy  # noqa: E402

RUBRIC = "Prefer the helpful and harmless reply."
CONVS = [[{"role": "user", "content": "How do I bake bread?"}],
         [{"role": "user", "content": "hello there"}, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "a joke?"}],
         [{"role": "user", "content": "What is the capital of France?"}]]
REPLIES = ["Mix flour, water and yeast, then bake.", "No.", "Paris.", "I can't help with that.", "Why did the chicken cross the road?"]


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    torch.set_num_threads(1)
    return make_tiny_policy(tmp_path_factory.mktemp("judge") / "judge", seed=3)


# only these two plugins: stays valid (no double registration) once their entry points are installed
registry = registry_fixture(judge_mod, af_mod, entry_points=False)


def load_judge(judge_dir, folder, registry, **params):
    """The judge as a stage loads it: ``ctx.reward`` of a real StageContext (a CheckedReward)."""
    params = {"model": "judge", "rubric": RUBRIC, "max_length": 512, "batch_size": 2, **params}
    ctx = make_context(ScoreParams(reward=RewardSpec(uses="llm-judge", params=params)), folder, kind="score", uses="reward",
                       models={"reward.params.model": ModelSource(name="judge", origin="spec", path=str(judge_dir))},
                       registry=registry)
    return ctx.reward("reward")


def hand_next_token_probs(model, tok, content: str, prefix: str, labels: list[str]) -> list[float]:
    """softmax over the label tokens of the next-token logits after template(content) + prefix, one unpadded row."""
    text = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False) + prefix
    ids = tok(text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    label_ids = tok.convert_tokens_to_ids(labels)
    return torch.softmax(logits[label_ids], -1).tolist()


def plant_position_bias(judge, steps: int = 40) -> float:
    """Fine-tune the judge's model in place to answer "A" to every pairwise prompt, whichever reply is first."""
    from rlhf_spec.algorithms.batching import pad_batch

    model, tok = judge.model, judge.tokenizer
    a_id = tok.convert_tokens_to_ids("A")
    seqs = []
    for i, conv in enumerate(CONVS):
        x, y = REPLIES[i], REPLIES[(i + 1) % len(REPLIES)]
        seqs += judge.encode_pairwise([conv, conv], [x, y], [y, x])
    batch = pad_batch(seqs, tok.pad_token_id)
    last = batch["attention_mask"].sum(1) - 1
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        logits = model(**batch).logits[torch.arange(len(seqs)), last]
        loss = torch.nn.functional.cross_entropy(logits, torch.full((len(seqs),), a_id))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def test_two_order_averaging_cancels_a_planted_position_bias(judge_dir, tmp_path, registry):
    judge = load_judge(judge_dir, tmp_path, registry, mode="pairwise")
    assert judge.labels.token_ids == tuple(judge.tokenizer.convert_tokens_to_ids(["A", "B"]))
    assert plant_position_bias(judge) < 0.1
    # held-out pairs: replies the bias was not trained on
    prompts = [CONVS[0], CONVS[2], CONVS[1]]
    xs = ["Knead the dough well.", "It is Paris, in France.", "A short joke."]
    ys = ["Bread is bad.", "London.", "No jokes today, sorry."]
    p_xy, p_yx = judge.prefer_first(prompts, xs, ys), judge.prefer_first(prompts, ys, xs)
    assert min(p_xy + p_yx) > 0.9, (p_xy, p_yx)  # a single order says "A" whatever A is
    avg_xy, dis_xy = judge.compare(prompts, xs, ys)
    avg_yx, dis_yx = judge.compare(prompts, ys, xs)
    for a, b in zip(avg_xy, avg_yx):
        assert abs(a + b - 1.0) < 1e-6
        assert abs(a - 0.5) < 0.1  # the bias cancels: no strong preference is left
    assert all(dis_xy) and all(dis_yx)  # the two orders always pick different replies
    same, dis_same = judge.compare(prompts, xs, xs)
    assert all(abs(v - 0.5) < 1e-6 for v in same), same
    assert all(dis_same)


def test_pointwise_score_is_the_expected_rating(judge_dir, tmp_path, registry):
    judge = load_judge(judge_dir, tmp_path, registry, mode="pointwise", scale=5)
    tok, model = judge.tokenizer, judge.model
    replies = [REPLIES[0], REPLIES[1] * 3, REPLIES[4]]  # different lengths, batches of 2: padding is exercised
    scores = judge.score(RewardBatch(prompts=CONVS, completions=replies)).scores
    for conv, reply, got in zip(CONVS, replies, scores):
        content = judge_mod.pointwise_message(RUBRIC, 5, render_transcript(conv).strip(), reply)
        probs = hand_next_token_probs(model, tok, content, "Rating: ", ["1", "2", "3", "4", "5"])
        want = sum(k * p for k, p in zip(range(1, 6), probs))
        assert abs(got - want) < 1e-5, (got, want)
        assert 1.0 <= got <= 5.0
    assert len(set(round(s, 9) for s in scores)) == 3  # each reply is read at its own last token


def test_scale_ten_is_refused_for_a_digit_splitting_tokenizer(judge_dir, tmp_path, registry):
    with pytest.raises(ValueError, match=r"judge model 'judge'.*'1' and '10' both start with token '1'.*at most 9"):
        load_judge(judge_dir, tmp_path, registry, mode="pointwise", scale=10)


def test_long_inputs_are_cut_from_the_left_of_the_conversation(judge_dir, tmp_path, registry):
    judge = load_judge(judge_dir, tmp_path, registry, mode="pairwise", max_length=260)
    conv = [{"role": "user", "content": "old turn " * 60 + "LATEST QUESTION"}]
    ids = judge.encode_pairwise([conv, [{"role": "user", "content": "short"}]], ["x" * 300, "ok"], ["y", "fine"])
    assert len(ids[0]) <= 260
    text = judge.tokenizer.decode(ids[0])
    assert text.startswith("<|user|>" + RUBRIC) and text.endswith("<|assistant|>Better reply: ")
    assert "LATEST QUESTION" in text and "Reply B:\ny" in text and "old turn " * 60 not in text
    short = judge.tokenizer.decode(ids[1])
    assert "Conversation:\nHuman: short\n\nReply A:\nok\n\nReply B:\nfine" in short


def test_pairwise_judge_cannot_score_and_check_wants_pairwise(judge_dir, tmp_path, registry):
    judge = load_judge(judge_dir, tmp_path, registry, mode="pairwise")
    with pytest.raises(ValueError, match="compares two replies.*'evaluate'.*'ai-feedback'.*not in 'score'"):
        judge.score(RewardBatch(prompts=CONVS[:1], completions=["x"]))
    assert judge_mod.pointwise_only_problem({"model": "j", "mode": "pairwise"}) == judge_mod.PAIRWISE_SCORE_MESSAGE
    assert judge_mod.pointwise_only_problem(judge_mod.JudgeParams(model="j")) is None
    from rlhf_spec.rewards import classifier as classifier_mod
    from rlhf_spec.spec.validate import bind_components

    with_classifier = load_registry(extra=[judge_mod, classifier_mod], entry_points=False)

    def check(uses, params):  # the check runs on a judge that validation has resolved
        stage_params = af_mod.AIFeedbackParams(judge=RewardSpec(uses=uses, params=params))
        bind_components(stage_params, with_classifier, "", [])
        return af_mod.check(stage_params, None, ["samples"])

    [problem] = check("llm-judge", {"model": "j"})
    assert problem.pointer == "/judge" and "pairwise" in problem.message
    [other] = check("classifier", {"model": "j"})
    assert other.pointer == "/judge" and "'classifier'" in other.message
    assert check("llm-judge", {"model": "j", "mode": "pairwise"}) == []
    assert af_mod.is_tie(0.5, True, 0.0) and not af_mod.is_tie(0.5, False, 0.0) and not af_mod.is_tie(0.51, True, 0.0)
    assert af_mod.is_tie(0.55, True, 0.1) and not af_mod.is_tie(0.65, True, 0.1)


def test_both_register_and_keep_the_plugin_contract(registry):
    reward, stage = registry.rewards["llm-judge"], registry.stages[("pair", "ai-feedback")]
    check_contract(reward, {"model": "judge", "mode": "pairwise"})
    check_contract(stage, {"judge": {"uses": "llm-judge", "params": {"model": "judge", "mode": "pairwise"}}, "test_size": 0.1})
    assert stage.output == "pairs" and stage.check is af_mod.check and "samples" in stage.inputs
    assert reward.params.model_json_schema()["properties"]["scale"]["default"] == 10


def samples_folder(folder):
    """A ``samples`` entry: 6 prompts; one has only identical completions, one a single completion."""
    import hashlib

    import datasets

    rows = {k: [] for k in ("prompt_id", "prompt", "sample_index", "completion", "completion_tokens", "prompt_tokens")}
    plan = [REPLIES[:3], ["same", " same ", "other"], ["dup", "dup "], ["Alone."], [REPLIES[4], REPLIES[0]], REPLIES[2:5]]
    for p, comps in enumerate(plan):
        for s, c in reversed(list(enumerate(comps))):  # rows out of sample_index order
            rows["prompt_id"].append(hashlib.sha256(f"prompt {p}".encode()).hexdigest()[:16])
            rows["prompt"].append([{"role": "user", "content": f"question {p}?"}])
            rows["sample_index"].append(s)
            rows["completion"].append(c)
            rows["completion_tokens"].append(len(c))
            rows["prompt_tokens"].append(5)
    datasets.Dataset.from_dict(rows).save_to_disk(str(folder / "data"))
    return InputArtifact("samples", "samples", "0" * 64, str(folder))


def test_ai_feedback_end_to_end(judge_dir, tmp_path, registry):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    inp = samples_folder(tmp_path / "samples")
    params = af_mod.AIFeedbackParams(judge=RewardSpec(uses="llm-judge", params={
        "model": "judge", "mode": "pairwise", "rubric": RUBRIC, "max_length": 512, "batch_size": 3}), test_size=1, num_shards=3)
    models = {"judge.params.model": ModelSource(name="judge", origin="spec", path=str(judge_dir))}
    ctx = make_context(params, tmp_path / "run", kind="pair", uses="ai-feedback", inputs=[inp], models=models, registry=registry)
    result = execute(ctx, af_mod.run)
    out = datasets.load_from_disk(str(tmp_path / "run" / "out" / "data"))
    assert set(out.column_names) == {"prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward", "split",
                                     "ai_preference", "order_disagreement"}
    assert len(out) == 4 and sorted(out["split"]) == ["test", "train", "train", "train"]
    m = result.metrics
    assert (m["pairs"], m["judged"], m["train"], m["test"], m["dropped_single"], m["dropped_ties"]) == (4, 4, 3, 1, 2, 0)
    assert ctx.output.counters["shards_computed"] >= 2
    tok, model = AutoTokenizer.from_pretrained(judge_dir), AutoModelForCausalLM.from_pretrained(judge_dir).eval()
    src = datasets.load_from_disk(str(tmp_path / "samples" / "data"))
    disagreements, margins = 0, []
    for row in out:
        comps = sorted((s, c) for pid, s, c in zip(src["prompt_id"], src["sample_index"], src["completion"]) if pid == row["prompt_id"])
        distinct = [c for k, (_, c) in enumerate(comps) if all(c.strip() != d.strip() for _, d in comps[:k])]
        a, b = distinct[0], distinct[1]  # the first two distinct completions by sample_index
        conv = render_transcript(row["prompt"]).strip()
        p_ab = hand_next_token_probs(model, tok, judge_mod.pairwise_message(RUBRIC, conv, a, b), "Better reply: ", ["A", "B"])[0]
        p_ba = hand_next_token_probs(model, tok, judge_mod.pairwise_message(RUBRIC, conv, b, a), "Better reply: ", ["A", "B"])[0]
        p = (p_ab + 1 - p_ba) / 2
        assert (row["chosen"], row["rejected"]) == ((a, b) if p >= 0.5 else (b, a))
        assert abs(row["chosen_reward"] - max(p, 1 - p)) < 1e-5 and abs(row["ai_preference"] - row["chosen_reward"]) < 1e-12
        assert abs(row["chosen_reward"] + row["rejected_reward"] - 1) < 1e-12
        assert row["order_disagreement"] == ((p_ab > 0.5) != (p_ba < 0.5))
        disagreements += row["order_disagreement"]
        margins.append(abs(p - 0.5))
    assert math.isclose(m["order_disagreement_rate"], disagreements / 4)
    assert math.isclose(m["preference_margin_mean"], sum(margins) / 4, abs_tol=1e-5)
    # a rerun on the same partial folder reuses every judged shard
    again = make_context(params, tmp_path / "run", kind="pair", uses="ai-feedback", inputs=[inp], models=models, registry=registry)
    assert execute(again, af_mod.run).metrics == m
    assert again.output.counters["shards_computed"] == 0 and again.output.counters["dropped_single"] == 2
