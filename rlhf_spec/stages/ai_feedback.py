"""``pair``/``ai-feedback``: chosen and rejected labelled by AI feedback (RLAIF).

For each prompt, its first two distinct completions (by ``sample_index``) are shown to a pairwise
``llm-judge`` in both orders (:meth:`rlhf_spec.rewards.judge.LLMJudge.compare`), and the averaged
``p = P(first preferred)`` decides: the first is chosen when ``p >= 0.5``, else the second. This is
the preference-labelling step of Bai et al. 2022 ("Constitutional AI") and Lee et al. 2023 ("RLAIF"),
with the two-order averaging of Zheng et al. 2023 against position bias.

Output (``pairs``): ``prompt_id``, ``prompt``, ``chosen``, ``rejected``, ``chosen_reward`` =
``p_chosen = max(p, 1 - p)``, ``rejected_reward`` = ``1 - p_chosen``, ``split``, plus
``ai_preference`` (= ``p_chosen``) and ``order_disagreement`` (the two orders picked different
replies). The rewards are AI-preference probabilities in [0, 1], not reward-model units: their
difference ``2 p_chosen - 1`` is a confidence, not a reward margin.

The judging runs shard by shard (:meth:`rlhf_spec.StageContext.run_shards`), so verdicts are kept
per shard and a killed run resumes; the test split is drawn over prompts afterwards, as in
``best-worst`` (:func:`rlhf_spec.data.split_by_prompt`).
"""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data import assign_split, check_test_size
from ..errors import Problem
from ..hookspecs import hookimpl
from ..records import PAIRS, SAMPLES, SCORED, RewardSpec, StageImpl, StageResult, component_resources

JUDGE = "llm-judge"


class AIFeedbackParams(BaseModel):
    """Params of ``pair``/``ai-feedback``."""

    model_config = ConfigDict(extra="forbid")

    judge: RewardSpec = Field(..., description="A pairwise judge: {\"uses\": \"llm-judge\", \"params\": {\"model\": "
                                               "..., \"mode\": \"pairwise\"}}.")
    test_size: Union[int, float] = Field(
        0, ge=0, description="Prompts held out as split 'test': a count (int), or a share in [0, 1) (float).")
    split_seed: int = Field(0, ge=0, description="Seed of the prompt-level split.")
    num_shards: int = Field(8, ge=1, le=100000, description="Content-defined shards committed one by one, so a killed "
                                                            "run resumes.")
    drop_ties: bool = Field(True, description="Drop pairs the judge cannot separate: |p - 0.5| < min_margin, or "
                                              "exactly 0.5.")
    min_margin: float = Field(0.0, ge=0.0, lt=0.5, description="With drop_ties: the least |p - 0.5| kept (0.0 drops "
                                                               "exact ties only).")

    _share_below_one = field_validator("test_size")(check_test_size)


def check(params: AIFeedbackParams, spec, inputs) -> list[Problem]:
    """Static check: the judge must declare that it compares two replies, with its params
    (:meth:`~rlhf_spec.records.RewardImpl.is_pairwise`; ``llm-judge`` does in mode ``"pairwise"``).

    Returns:
        a list with one :class:`~rlhf_spec.errors.Problem` at ``/judge`` naming the reward and its
        distribution when it does not; else an empty list (also for a judge not yet resolved against
        a registry: validation resolves it first, and an unknown reward is reported at ``/judge/uses``).
    """
    j = params.judge
    if j._impl is None or j._parsed is None or j._impl.is_pairwise(j._parsed):
        return []
    need = f"ai-feedback compares two replies, so it needs a pairwise judge; {j._impl.origin()}"
    if j._impl.pairwise is False:
        hint = f"use a pairwise judge: {{\"uses\": \"{JUDGE}\", \"params\": {{\"mode\": \"pairwise\", ...}}}}"
        return [Problem("/judge", f"{need} scores one reply at a time (it declares no pairwise capability)", hint)]
    hint = f"set its params to compare two replies ({JUDGE}: set judge.params.mode to 'pairwise')"
    return [Problem("/judge", f"{need} is not pairwise with these params", hint)]


def first_two_distinct(rows) -> list[dict]:
    """Per prompt, its first two completions (by ``sample_index``) with different stripped texts.

    Args:
        rows: a mapping or dataset with ``prompt_id``, ``prompt``, ``sample_index`` and ``completion``.

    Returns:
        one dict ``{prompt_id, prompt, a, b}`` per prompt, in order of first appearance; ``b`` is None
        for a prompt without two distinct completions (and ``a`` too when it has none).
    """
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(rows["prompt_id"]):
        groups.setdefault(pid, []).append(i)
    comps, idxs, prompts = list(rows["completion"]), list(rows["sample_index"]), list(rows["prompt"])
    out = []
    for pid, members in groups.items():
        picked: list[int] = []
        for i in sorted(members, key=lambda i: (idxs[i], i)):
            if all(comps[i].strip() != comps[j].strip() for j in picked):
                picked.append(i)
            if len(picked) == 2:
                break
        texts = [comps[i] for i in picked] + [None, None]
        out.append({"prompt_id": pid, "prompt": prompts[members[0]], "a": texts[0], "b": texts[1]})
    return out


def label_pairs(candidates: list[dict], p_a: list[float], disagree: list[bool]) -> dict:
    """Columns of the labelled pairs: the first reply is chosen when ``p_a >= 0.5``, else the second;
    ``chosen_reward = ai_preference = max(p_a, 1 - p_a)``, ``rejected_reward = 1 - chosen_reward``.

    Args:
        candidates: from :func:`first_two_distinct`; p_a, disagree: :meth:`LLMJudge.compare`'s output
            for the candidates that have two replies, in order.

    Returns:
        a dict of equal-length lists, one row per candidate (``split`` not included) and a ``judged``
        column, False (with empty texts and zero rewards) for a candidate without two replies: a shard
        keeps one row per prompt, since an empty shard cannot be saved and loaded back.
    """
    out = {k: [] for k in ("prompt_id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward",
                           "ai_preference", "order_disagreement", "judged")}
    verdicts = iter(zip(p_a, disagree))
    for c in candidates:
        judged = c["b"] is not None
        p, d = next(verdicts) if judged else (1.0, False)
        first = p >= 0.5
        pc = p if first else 1.0 - p
        out["prompt_id"].append(c["prompt_id"])
        out["prompt"].append(c["prompt"])
        out["chosen"].append((c["a"] if first else c["b"]) if judged else "")
        out["rejected"].append((c["b"] if first else c["a"]) if judged else "")
        out["chosen_reward"].append(float(pc) if judged else 0.0)
        out["rejected_reward"].append(float(1.0 - pc) if judged else 0.0)
        out["ai_preference"].append(float(pc) if judged else 0.0)
        out["order_disagreement"].append(bool(d))
        out["judged"].append(judged)
    return out


def is_tie(p_chosen: float, drop_ties: bool, min_margin: float) -> bool:
    """Whether a pair is dropped as a tie: ``drop_ties`` and (``|p - 0.5| < min_margin`` or ``p == 0.5``)."""
    margin = abs(p_chosen - 0.5)
    return drop_ties and (margin < min_margin or margin == 0.0)


def _features(rows):
    import datasets

    f, v = rows.features, datasets.Value
    return datasets.Features({"prompt_id": f["prompt_id"], "prompt": f["prompt"], "chosen": v("string"),
                              "rejected": v("string"),
                              "chosen_reward": v("float64"), "rejected_reward": v("float64"),
                              "ai_preference": v("float64"), "order_disagreement": v("bool"), "judged": v("bool")})


def run(ctx) -> StageResult:
    """Label each prompt's first two distinct completions with the judge, shard by shard; write ``pairs``.

    Metrics: ``judged``, ``pairs``, ``train``, ``test``, ``dropped_single`` (prompts without two
    distinct completions), ``dropped_ties``, ``order_disagreement_rate`` and ``preference_margin_mean``
    (mean ``|p - 0.5|``), both over the judged pairs.

    Raises:
        ValueError: if no pair is left, or the split leaves no training pair; the judge's errors.
    """
    import datasets

    p: AIFeedbackParams = ctx.params
    rows = ctx.input_dataset(0)
    features = _features(rows)
    with ctx.timer("load_judge"):
        ctx.progress.note("loading judge")
        judge = ctx.reward("judge")
    ctx.progress.note("judging")

    def process(shard_rows, shard: int):
        cands = first_two_distinct(shard_rows)
        two = [c for c in cands if c["b"] is not None]
        p_a, disagree = judge.compare([c["prompt"] for c in two], [c["a"] for c in two], [c["b"] for c in two]) \
            if two else ([], [])
        ctx.progress.advance(len(shard_rows))
        return (datasets.Dataset.from_dict(label_pairs(cands, p_a, disagree), features=features),
                {"dropped_single": len(cands) - len(two)})

    with ctx.timer("judge"):
        labelled = ctx.run_shards(rows, process, p.num_shards)
    judged = labelled.select([i for i, ok in enumerate(labelled["judged"]) if ok]).remove_columns("judged")
    prefs, disagree = list(judged["ai_preference"]), list(judged["order_disagreement"])
    keep = [i for i, x in enumerate(prefs) if not is_tie(x, p.drop_ties, p.min_margin)]
    if not keep:
        raise ValueError(f"no pairs: {len(rows)} input rows gave {len(judged)} judged pairs and every one was "
                         "dropped (prompts need two distinct completions; lower min_margin or set drop_ties false)")
    out = judged.select(keep)
    split = assign_split(list(out["prompt_id"]), p.test_size, p.split_seed)
    out = out.add_column("split", split)
    ctx.save_dataset(out)
    n, n_test, m = len(out), split.count("test"), max(1, len(judged))
    return StageResult(metrics={
        "judged": len(judged), "pairs": n, "train": n - n_test, "test": n_test,
        "dropped_single": len(labelled) - len(judged), "dropped_ties": len(judged) - n,
        "order_disagreement_rate": sum(disagree) / m, "preference_margin_mean": sum(abs(x - 0.5) for x in prefs) / m,
    }, rows=n)


@hookimpl
def rlhf_spec_register_stages(register):
    """Register the ``pair`` stage ``ai-feedback`` (:class:`AIFeedbackParams`, :func:`run`, :func:`check`)."""
    register(StageImpl(kind="pair", name="ai-feedback", params=AIFeedbackParams, run=run, version="1", check=check,
                       inputs=(SAMPLES, SCORED), min_inputs=1, max_inputs=1, output=PAIRS,
                       description="chosen/rejected by a pairwise LLM judge (both orders averaged); seeded "
                                   "prompt-level test split",
                       resources=lambda p: {"processes": 1, "gpus": "0-1", "judge": p.judge.uses,
                                            **component_resources(p.judge)}))
