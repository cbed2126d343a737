"""Built-in ``evaluate`` stage ``reward-accuracy``: how often rewards agree with labelled preferences.

Every judge (any reward) sees each labelled pair (prompt, chosen, rejected). A pointwise reward
agrees with the label when it scores ``chosen`` above ``rejected`` (a tie counts one half); a
pairwise judge agrees when ``P(chosen preferred)``, averaged over both orders, is above 1/2 (exactly
1/2 counts one half), and its two-order disagreement rate is reported too. Per judge: the accuracy
with a Wilson interval over pairs, and how often it picks the longer reply next to how often the
labels do (a length-biased judge picks the longer reply far more often than the labels).

This is how a reward model is checked against held-out human labels (Ouyang et al. 2022, section
5.1, report reward-model accuracy the same way), how an AI-feedback labeller is checked against a
stronger annotator (Lee et al. 2023, RLAIF, "AI labeler alignment"), and the measure of RewardBench
(Lambert et al. 2024).
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..errors import Problem
from ..hookspecs import hookimpl
from ..records import METRICS, PAIRS, DatasetRef, NotInKey, StageImpl, StageResult
from .judging import Judges, cell, heldout_pairs, num, primary_problems, row_columns, score_sides


class RewardAccuracyParams(BaseModel):
    """Params of ``evaluate``/``reward-accuracy``."""

    model_config = ConfigDict(extra="forbid")

    judges: Judges = Field(..., min_length=1, description="Rewards to check, by name: each {\"uses\", \"params\"}.")
    primary: Optional[str] = Field(None, description="The judge whose figures are the headline (accuracy, ...); "
                                                     "default: the first.")
    dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "chosen", "rejected"))]] = Field(
        None, description="Labelled preference pairs from /datasets; or give a pairs input and its 'test' split is "
                          "used.")
    limit: Optional[int] = Field(None, ge=1, description="Check at most this many pairs (in dataset order).")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Level of the Wilson intervals.")
    examples: Annotated[int, NotInKey()] = Field(8, ge=0, description="Pairs written to examples.md. Not part of the "
                                                                      "key.")


def _check(params: RewardAccuracyParams, spec, inputs) -> list[Problem]:
    out = []
    if not params.dataset and not inputs:
        out.append(Problem("/dataset", "reward-accuracy needs labelled pairs: set params.dataset or give a pairs stage "
                                       "in inputs"))
    return out + primary_problems(params.primary, params.judges)


def _pairs(ctx, p: RewardAccuracyParams):
    rows = ctx.dataset("dataset") if p.dataset else heldout_pairs(ctx, "dataset")
    if p.limit:
        rows = rows.select(range(min(p.limit, len(rows))))
    if len(rows) == 0:
        raise ValueError("no labelled pairs to check")
    return rows


def agreement(chosen_scores: list[float], rejected_scores: list[float]) -> list[float]:
    """Per pair: 1 when the reward scores chosen above rejected, 1/2 on a tie, else 0. Both lists have length N."""
    return [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen_scores, rejected_scores)]


def _verdicts(ctx, name: str, rows) -> dict:
    """One judge on every pair: ``{"chosen", "rejected"}`` scores (N each) from a pointwise reward, or
    ``{"p_chosen", "disagreement"}`` (N each) from a pairwise judge."""
    with ctx.timer(f"judge_{name}"):
        ctx.progress.note(f"judge {name}")
        reward = ctx.reward(f"judges.{name}")
        prompts = list(rows["prompt"])
        if reward.pairwise:
            p, dis = reward.compare(prompts, list(rows["chosen"]), list(rows["rejected"]))
            out = {"p_chosen": list(p), "disagreement": list(dis)}
        else:
            chosen, rejected = score_sides(reward, prompts, [list(rows["chosen"]), list(rows["rejected"])],
                                           row_columns(rows))
            out = {"chosen": chosen, "rejected": rejected}
        ctx.progress.advance(1)
    return out


def judge_metrics(v: dict, chosen_longer: list[bool], confidence: float) -> dict:
    """Accuracy (ties one half) with its Wilson interval, and length preference, from one judge's verdicts.

    Args:
        v: ``{"chosen": (N,), "rejected": (N,)}`` scores, or ``{"p_chosen": (N,), "disagreement": (N,)}``.
        chosen_longer: (N,) whether the labelled chosen reply has more characters than the rejected one.

    Returns:
        ``accuracy``, ``accuracy_ci_low``/``_high``, ``pairs``, ``prefers_longer_rate`` (share of pairs with
        unequal lengths where the judge's pick is the longer reply), and ``margin_mean`` (mean
        chosen - rejected score) or ``p_chosen_mean`` and ``order_disagreement_rate``.

    Raises:
        ValueError: from :func:`rlhf_spec.stats.wilson_interval` on an empty list.
    """
    from ..stats import wilson_interval

    if "p_chosen" in v:
        agree = agreement(v["p_chosen"], [0.5] * len(v["p_chosen"]))
        extra = {"p_chosen_mean": sum(v["p_chosen"]) / len(agree),
                 "order_disagreement_rate": sum(v["disagreement"]) / len(agree)}
    else:
        agree = agreement(v["chosen"], v["rejected"])
        extra = {"margin_mean": sum(c - r for c, r in zip(v["chosen"], v["rejected"])) / len(agree)}
    n = len(agree)
    low, high = wilson_interval(sum(agree), n, confidence)
    # the judge picks the longer reply when it agrees with a label that chose the longer one, or disagrees with one
    # that did not
    unequal = [(a, longer) for a, longer in zip(agree, chosen_longer) if longer is not None]
    picks_longer = [a if longer else 1.0 - a for a, longer in unequal]
    return {"accuracy": sum(agree) / n, "accuracy_ci_low": low, "accuracy_ci_high": high, "pairs": n,
            "prefers_longer_rate": sum(picks_longer) / len(picks_longer) if picks_longer else None, **extra}


def run(ctx) -> StageResult:
    """Write ``metrics.json``, ``examples.md`` and the per-pair table (``data``)."""
    import datasets

    p: RewardAccuracyParams = ctx.params
    rows = _pairs(ctx, p)
    ctx.progress.start(len(p.judges))
    judged = {name: _verdicts(ctx, name, rows) for name in p.judges}
    chosen_longer = [None if len(c) == len(r) else len(c) > len(r) for c, r in zip(rows["chosen"], rows["rejected"])]
    primary = p.primary or next(iter(p.judges))
    metrics: dict = {"pairs": len(rows),
                     "labels_prefer_longer_rate": _rate([x for x in chosen_longer if x is not None]),
                     "primary_judge": primary}
    for name, v in judged.items():
        res = judge_metrics(v, chosen_longer, p.confidence)
        metrics.update({f"{name}.{k}": x for k, x in res.items()})
        if name == primary:
            metrics.update(res)
    table = {"prompt_id": list(rows["prompt_id"]), "prompt": list(rows["prompt"]), "chosen": list(rows["chosen"]),
             "rejected": list(rows["rejected"])}
    for name, v in judged.items():
        table.update({f"{k}/{name}": v[k] for k in v})
    ctx.save_dataset(datasets.Dataset.from_dict(table))
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (ctx.out_dir / "examples.md").write_text(_examples(metrics, table, p.examples, list(p.judges)))
    return StageResult(metrics=metrics, rows=len(rows))


def _rate(flags: list[bool]) -> Optional[float]:
    return sum(flags) / len(flags) if flags else None


def _examples(metrics: dict, table: dict, examples: int, judges: list[str]) -> str:
    """``examples.md``: accuracy per judge, then the first pairs with every judge's verdict."""
    lines = ["# Reward accuracy on labelled pairs", "", f"{metrics['pairs']} pairs; the labels prefer the longer reply "
                                                        f"in "
             f"{num(metrics['labels_prefer_longer_rate'])} of those with unequal lengths.", "",
             "| judge | accuracy | 95% interval | prefers longer |", "|---|---|---|---|"]
    for j in judges:
        lines.append(f"| {j} | {metrics[f'{j}.accuracy']:.3f} | [{metrics[f'{j}.accuracy_ci_low']:.3f}, "
                     f"{metrics[f'{j}.accuracy_ci_high']:.3f}] | {num(metrics[f'{j}.prefers_longer_rate'])} |")
    lines += ["", "| prompt (last turn) | chosen | rejected | " + " | ".join(judges) + " |",
              "|" + "---|" * (3 + len(judges))]
    for i in range(min(examples, len(table["prompt_id"]))):
        verdicts = [(f"P={num(table[f'p_chosen/{j}'][i])}" if f"p_chosen/{j}" in table
                     else f"{num(table[f'chosen/{j}'][i])} vs {num(table[f'rejected/{j}'][i])}") for j in judges]
        lines.append(f"| {cell(table['prompt'][i][-1]['content'])} | {cell(table['chosen'][i])} | "
                     f"{cell(table['rejected'][i])} | " + " | ".join(verdicts) + " |")
    return "\n".join(lines) + "\n"


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="evaluate", name="reward-accuracy", params=RewardAccuracyParams, run=run, version="1",
                       inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=METRICS, check=_check,
                       description="agreement of rewards and judges with labelled chosen/rejected pairs (accuracy with "
                                   "a "
                                   "Wilson interval, length preference, two-order disagreement)"))
