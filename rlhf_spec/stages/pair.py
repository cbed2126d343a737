"""Built-in ``pair`` stage: best and worst completion per prompt, and a seeded test split by prompt."""

from __future__ import annotations

from typing import Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..data import assign_split, check_test_size
from ..hookspecs import hookimpl
from ..records import PAIRS, SCORED, StageImpl, StageResult


class PairParams(BaseModel):
    """Params of ``pair``/``best-worst`` (REBEL: chosen = argmax reward, rejected = argmin)."""

    model_config = ConfigDict(extra="forbid")

    drop_identical: bool = Field(True, description="Drop pairs whose chosen and rejected texts are equal, or whose "
                                                   "rewards tie.")
    test_size: Union[int, float] = Field(
        0, ge=0, description="Prompts held out as split 'test': a count (int), or a share in [0, 1) (float). REBEL "
                             "holds out 1000."
    )
    split_seed: int = Field(0, ge=0, description="Seed of the prompt-level split (the REBEL script's split is "
                                                 "unseeded).")

    _share_below_one = field_validator("test_size")(check_test_size)


def run(ctx) -> StageResult:
    """One row per prompt with >= 2 scored completions: prompt, chosen, rejected, their rewards, and split."""
    p: PairParams = ctx.params
    rows = ctx.input_dataset(0)
    groups: dict[str, list[int]] = {}
    for i, pid in enumerate(rows["prompt_id"]):
        groups.setdefault(pid, []).append(i)
    rewards, comps, prompts = list(rows["reward"]), list(rows["completion"]), list(rows["prompt"])
    out = {"prompt_id": [], "prompt": [], "chosen": [], "rejected": [], "chosen_reward": [], "rejected_reward": []}
    dropped_single = dropped_identical = 0
    for pid, idx in groups.items():
        if len(idx) < 2:
            dropped_single += 1
            continue
        best = max(idx, key=lambda i: (rewards[i], -i))
        worst = min(idx, key=lambda i: (rewards[i], i))
        if p.drop_identical and (
            best == worst or comps[best].strip() == comps[worst].strip() or rewards[best] == rewards[worst]
        ):
            dropped_identical += 1
            continue
        out["prompt_id"].append(pid)
        out["prompt"].append(prompts[best])
        out["chosen"].append(comps[best])
        out["rejected"].append(comps[worst])
        out["chosen_reward"].append(float(rewards[best]))
        out["rejected_reward"].append(float(rewards[worst]))
    n = len(out["prompt_id"])
    if n == 0:
        raise ValueError(f"no pairs: {len(rows)} input rows over {len(groups)} prompts gave no prompt with two "
                         f"different, "
                         "differently scored completions (raise sample n, or loosen the filter)")
    out["split"] = assign_split(out["prompt_id"], p.test_size, p.split_seed)
    n_test = out["split"].count("test")
    import datasets

    ds = datasets.Dataset.from_dict(out)
    ctx.save_dataset(ds)
    margins = [c - r for c, r in zip(out["chosen_reward"], out["rejected_reward"])]
    return StageResult(metrics={"pairs": n, "train": n - n_test, "test": n_test, "dropped_single": dropped_single,
                                "dropped_identical": dropped_identical,
                                "reward_margin_mean": float(sum(margins) / len(margins)) if margins else 0.0}, rows=n)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="pair", name="best-worst", params=PairParams, run=run, version="1",
                       inputs=(SCORED,), min_inputs=1, max_inputs=1, output=PAIRS,
                       description="chosen = argmax reward, rejected = argmin; seeded prompt-level test split"))
