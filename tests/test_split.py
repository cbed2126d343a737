"""The one split-by-prompt rule: it holds out exactly what each stage held out before it was shared (the
train stages' ``eval_size``, the ``pair`` stages' seeded ``test_size``), and the reward model's held-out
pairs are now whole prompts (its old split sorted rows, so a prompt's pairs could straddle the boundary)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from conftest import HH, data_file
from rlhf_spec.data import hash_unit, load_rows, save_rows, split_by_prompt

# ----------------------------------------------------------------------------- the rules as they were written


def old_hold_out_by_prompt(prompt_ids: list[str], n: int) -> tuple[list[int], list[int]]:
    """The train stages' split (pair trainer, SFT, KTO) before it was shared, verbatim."""
    if n <= 0:
        return list(range(len(prompt_ids))), []
    rows_of: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        rows_of.setdefault(pid, []).append(i)
    held: list[int] = []
    for pid in sorted(rows_of, key=lambda q: (hash_unit(q), q)):
        if len(held) >= n:
            break
        held += rows_of[pid]
    out = set(held)
    return [i for i in range(len(prompt_ids)) if i not in out], sorted(held)


def old_seeded_split(prompt_ids: list[str], n_test: int, seed: int) -> list[str]:
    """The ``pair`` stages' split (``best-worst`` and ``ai-feedback``) before it was shared, verbatim."""
    def split_rank(pid: str, seed: int) -> str:
        return hashlib.sha256(f"{seed}:{pid}".encode()).hexdigest()

    test_ids = set(sorted(prompt_ids, key=lambda pid: split_rank(pid, seed))[:n_test])
    return ["test" if pid in test_ids else "train" for pid in prompt_ids]


def random_prompt_ids(rng: random.Random, rows: int, prompts: int) -> list[str]:
    """``rows`` prompt ids (16 hex characters) drawn from ``prompts`` distinct ones, so some repeat."""
    pool = [f"{rng.getrandbits(64):016x}" for _ in range(prompts)]
    return [rng.choice(pool) for _ in range(rows)]


# ----------------------------------------------------------------------------- identical to the old rules


def test_unseeded_split_equals_the_train_stages_old_rule():
    rng = random.Random(0)
    for trial in range(300):
        rows = rng.randint(0, 60)
        pids = random_prompt_ids(rng, rows, rng.randint(1, 80))
        n = rng.randint(-2, rows + 3)
        assert split_by_prompt(pids, n) == old_hold_out_by_prompt(pids, n), (trial, pids, n)


def test_seeded_split_equals_the_pair_stages_old_rule():
    """Same test rows for the same prompt ids, seed and count, with one row per prompt (as both ``pair``
    stages write) and with repeated prompt ids, through the pair stages' :func:`assign_split`."""
    from rlhf_spec.data import assign_split

    rng = random.Random(1)
    for trial in range(300):
        unique = rng.random() < 0.5
        rows = rng.randint(1, 60)
        if unique:
            pids = [f"{rng.getrandbits(64):016x}" for _ in range(rows)]
        else:
            pids = random_prompt_ids(rng, rows, rng.randint(1, 80))
        n_test, seed = rng.randint(0, rows - 1), rng.randint(0, 5)
        held = set(split_by_prompt(pids, n_test, seed=seed)[1])
        assert ["test" if i in held else "train" for i in range(rows)] == old_seeded_split(pids, n_test, seed), trial
        share = rng.choice([n_test, round(n_test / rows, 3)])
        n = int(share) if isinstance(share, int) else int(round(share * rows))
        if n < rows:
            assert assign_split(pids, share, seed) == old_seeded_split(pids, n, seed), trial


def test_best_worst_stage_writes_the_old_split(tmp_path: Path):
    """``pair``/``best-worst`` run on scored rows: its ``split`` column is the old seeded split of its pairs."""
    import datasets

    from rlhf_spec.context import InputArtifact
    from rlhf_spec.stages.pair import PairParams, run
    from rlhf_spec.testing import make_context

    rng = random.Random(2)
    pids = sorted({f"{rng.getrandbits(64):016x}" for _ in range(40)})
    rows = [{"prompt_id": pid, "prompt": [{"role": "user", "content": pid}], "completion": f"reply {k} to {pid}",
             "reward": float(rng.random())} for pid in pids for k in range(2)]
    save_rows(datasets.Dataset.from_list(rows), tmp_path / "scored" / "data")
    for test_size, seed in ((7, 0), (7, 3), (0.25, 1)):
        folder = tmp_path / f"pair_{test_size}_{seed}"
        ctx = make_context(PairParams(test_size=test_size, split_seed=seed), folder, kind="pair", uses="best-worst",
                           inputs=[InputArtifact("score", "scored", "k" * 64, str(tmp_path / "scored"))])
        result = run(ctx)
        out = load_rows(folder / "out" / "data")
        n_test = test_size if isinstance(test_size, int) else round(test_size * len(out))
        assert list(out["split"]) == old_seeded_split(list(out["prompt_id"]), n_test, seed)
        assert result.metrics["test"] == n_test == list(out["split"]).count("test")


# ----------------------------------------------------------------------------- the reward model: whole prompts


def _straddling_eval_size(pids: list[str]) -> tuple[str, int]:
    """A prompt with two rows, and the eval_size whose boundary falls between them in hash order."""
    twice = sorted({p for p in pids if pids.count(p) > 1}, key=hash_unit)
    assert twice, "the file has no repeated prompt"
    pid = twice[0]
    return pid, sum(hash_unit(q) < hash_unit(pid) for q in pids) + 1


def test_reward_model_holds_out_whole_prompts(tmp_path: Path):
    """hh-rlhf's harmless-base test file read with every row (``dedupe_prompts: false``) repeats a few prompts;
    with ``eval_size`` ending between one prompt's two pairs, both pairs are held out (the old split, which
    sorted rows, trained on one and evaluated on the other)."""
    from rlhf_spec.stages.train import reward_model
    from rlhf_spec.stages.train.reward_model import RewardModelParams
    from rlhf_spec.testing import make_context

    dataset = {"path": str(data_file(HH)), "adapter": "hh-rlhf", "dedupe_prompts": False}
    pids = list(load_rows_of(dataset)["prompt_id"])
    pid, eval_size = _straddling_eval_size(pids)
    params = RewardModelParams(backbone="backbone", dataset="pairs", eval_size=eval_size)
    ctx = make_context(params, tmp_path, uses="reward-model", datasets={"dataset": dataset})
    rows, held = reward_model._rows(ctx, params)
    train_ids, held_ids = set(rows["prompt_id"]), set(held["prompt_id"])
    assert list(held["prompt_id"]).count(pid) == 2 and pid not in train_ids
    assert not train_ids & held_ids
    assert len(rows) + len(held) == len(pids) and len(held) == eval_size + 1
    assert held_ids == {p for p in pids if hash_unit(p) <= hash_unit(pid)}


def load_rows_of(dataset: dict):
    from rlhf_spec.data import load_spec_dataset
    from rlhf_spec.spec import DatasetSpec

    return load_spec_dataset(DatasetSpec.model_validate(dataset), Path("."))


@pytest.mark.parametrize("n", [0, 1, 5])
def test_split_by_prompt_edges(n: int):
    assert split_by_prompt([], n) == ([], [])
    kept, held = split_by_prompt(["a" * 16, "b" * 16, "a" * 16], n)
    assert sorted(kept + held) == [0, 1, 2] and len(held) >= min(n, 3) and (n > 0 or not held)
    assert (0 in held) == (2 in held)  # the repeated prompt stays on one side
