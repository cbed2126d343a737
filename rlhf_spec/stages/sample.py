"""Built-in ``sample`` stage: the policy writes n completions per prompt, with any generation backend.

Seeds (docs/spec.md, "Seeds"): pass ``p`` of ``n`` gives every prompt one completion and is sampled
with seed ``spec.seed + p * seed_stride``, the seed every backend receives for every request of the
pass; with the REBEL tutorial's stride of 50 that is its ``seed=p*50``.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from ..backends import SamplingParams, generate_passes, prepare_prompts
from ..hookspecs import hookimpl
from ..records import (
    POLICY,
    SAMPLES,
    BackendSpec,
    DatasetRef,
    ModelRef,
    RewardBatch,
    StageImpl,
    StageResult,
    component_resources,
)
from ..runtime import sampling_seed

#: Columns of a ``samples`` dataset, in order; other prompt columns (``reference``, ...) follow them.
SAMPLE_COLUMNS = ("prompt_id", "prompt", "sample_index", "completion", "completion_tokens", "prompt_tokens")


class SampleParams(SamplingParams):
    """Params of ``sample``/``generate``."""

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="The policy: a /models name or the "
                                                                                   "id of a train stage.")
    prompts: Annotated[str, DatasetRef(columns=("prompt",))] = Field(..., description="A /datasets name with prompts.")
    n: int = Field(4, ge=1, le=1024, description="Completions per prompt (one per pass).")
    seed_stride: int = Field(50, ge=0, description="Pass p is seeded spec.seed + p * seed_stride (REBEL: 50).")
    backend: BackendSpec = Field(default_factory=lambda: BackendSpec(uses="transformers"),
                                 description="The generation backend: {\"uses\": name, \"params\": {...}}.")
    num_shards: int = Field(8, ge=1, le=100000, description="Content-defined shards committed one by one, so a killed "
                                                            "run resumes.")
    max_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="Skip prompts longer than this (chat template and generation prompt included) before "
                                "sampling.")


def samples_of(rows, completions_per_pass: list[list], passes: list[int]) -> dict:
    """Sample rows (columns :data:`SAMPLE_COLUMNS` plus carried prompt columns) from per-pass completions.

    Args:
        rows: the prompts (with ``prompt_tokens``).
        completions_per_pass: for each pass, one :class:`~rlhf_spec.records.Completion` per prompt.
        passes: the pass index of each entry of ``completions_per_pass``.
    """
    carried = RewardBatch.data_columns(rows.column_names)  # what a reward of a later stage receives
    out = {c: [] for c in list(SAMPLE_COLUMNS) + carried}
    for pas, comps in zip(passes, completions_per_pass):
        for col in ("prompt_id", "prompt", "prompt_tokens", *carried):
            out[col] += list(rows[col])
        out["sample_index"] += [pas] * len(rows)
        out["completion"] += [c.text for c in comps]
        out["completion_tokens"] += [len(c.token_ids) for c in comps]
    return out


def run(ctx) -> StageResult:
    """Sample ``n`` completions for every prompt, shard by shard.

    Output rows: ``prompt_id`` (str), ``prompt`` (messages), ``sample_index`` (int, the pass),
    ``completion`` (str), ``completion_tokens`` (int, generated tokens with the end-of-turn token),
    ``prompt_tokens`` (int), then the prompts' other columns (``reference``, ...).
    """
    import datasets

    p: SampleParams = ctx.params
    with ctx.timer("load_data"):
        prompts = ctx.dataset("prompts")
    with ctx.timer("load_policy"):
        ctx.progress.note("loading policy")
        src = ctx.model("policy")
        tok = src.load_tokenizer(padding_side="left")
        engine = ctx.backend("backend", src)
    prompts, skipped = prepare_prompts(tok, prompts, p.max_prompt_tokens)
    ctx.progress.note("sampling")
    sampling = p.sampling()

    def process(rows, shard: int):
        ids = [list(t) for t in rows["token_ids"]]
        per_pass = generate_passes(engine, ids, sampling, [sampling_seed(ctx.seed, pas,
                                                                         p.seed_stride) for pas in range(p.n)])
        out = samples_of(rows, per_pass, list(range(p.n)))
        ctx.count("generated_tokens_now", sum(out["completion_tokens"]))
        ctx.progress.advance(len(rows))
        return datasets.Dataset.from_dict(out)

    with ctx.timer("generate"):
        result = ctx.run_shards(prompts, process, p.num_shards)
    return samples_result(ctx, len(prompts), skipped, result)


def samples_result(ctx, prompts: int, skipped: int, result) -> StageResult:
    """Save ``result`` (a samples dataset) and return the sample metrics: prompts, prompts skipped as
    too long, samples, and generation throughput in tokens/s (None when everything was resumed)."""
    ctx.save_dataset(result)
    secs, now = ctx.output.timings.get("generate", 0.0), ctx.output.counters.pop("generated_tokens_now", 0)
    return StageResult(metrics={"prompts": prompts, "prompts_skipped_too_long": skipped, "samples": len(result),
                                "generated_tokens": int(sum(result["completion_tokens"])) if len(result) else 0,
                                "tokens_per_second": round(now / secs, 2) if secs > 0 and now else None},
                       rows=len(result))


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="sample", name="generate", params=SampleParams, run=run, version="3",
                       inputs=(), min_inputs=0, max_inputs=0, output=SAMPLES,
                       description="n completions per prompt from the policy, with any generation backend",
                       resources=lambda p: {"processes": 1, "gpus": "0-1", "samples_per_prompt": p.n,
                                            "backend": p.backend.uses,
                                            **component_resources(p.backend)}))
