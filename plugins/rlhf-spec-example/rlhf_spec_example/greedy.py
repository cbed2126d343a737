"""``sample``/``greedy-and-sampled``: one greedy answer per prompt, then ``n - 1`` sampled ones.

Pass 0 decodes greedily (temperature 0, the policy's most likely answer token by token): a fixed
point to set the sampled answers against, as in best-of-n studies that report greedy decoding beside
sampling. Passes ``1 .. n-1`` are sampled with the stage's settings. Every pass ``p`` is seeded
``sampling_seed(spec seed, p, seed_stride)``, the rule of the built-in ``sample`` stage, and runs
through the generation backend the spec names (``ctx.backend``), so any installed backend works.

The output is a ``samples`` dataset (``sample_index`` 0 is the greedy answer), resumable shard by shard.
"""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from rlhf_spec import (
    POLICY,
    SAMPLES,
    BackendSpec,
    DatasetRef,
    ModelRef,
    SamplingParams,
    StageImpl,
    StageResult,
    generate_passes,
    prepare_prompts,
    sampling_seed,
)

#: the ``samples`` columns this stage writes, in order
COLUMNS = ("prompt_id", "prompt", "sample_index", "completion", "completion_tokens", "prompt_tokens")


class GreedyAndSampledParams(SamplingParams):
    """Params of ``sample``/``greedy-and-sampled``: the sampling settings apply to passes 1 .. n-1."""

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(
        ..., description="The policy: a /models name or a train stage id.")
    prompts: Annotated[str, DatasetRef(columns=("prompt",))] = Field(..., description="A /datasets name with prompts.")
    n: int = Field(4, ge=1, le=1024, description="Answers per prompt: pass 0 greedy, passes 1 .. n-1 sampled.")
    seed_stride: int = Field(50, ge=0, description="Pass p is seeded spec.seed + p * seed_stride.")
    backend: BackendSpec = Field(default_factory=lambda: BackendSpec(uses="transformers"),
                                 description="The generation backend: {\"uses\": name, \"params\": {...}}.")
    num_shards: int = Field(4, ge=1, le=100000, description="Shards committed one by one, so a killed run resumes.")
    max_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="Skip prompts longer than this (chat template included).")


def answers(engine, prompt_token_ids: list[list[int]], params: GreedyAndSampledParams, seed: int) -> list[list]:
    """The completions of every pass, ``n`` lists of P completions: pass 0 greedy, the others sampled.

    Args:
        engine: a loaded backend (:class:`rlhf_spec.Engine`).
        prompt_token_ids: P prompts as token ids (chat template applied, as :func:`rlhf_spec.prompt_token_ids` gives).
        params: the stage's params; seed: the spec seed.

    Raises:
        whatever the engine raises.
    """
    seeds = [sampling_seed(seed, p, params.seed_stride) for p in range(params.n)]
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=params.max_new_tokens)
    out = generate_passes(engine, prompt_token_ids, greedy, seeds[:1])
    if params.n > 1:
        out += generate_passes(engine, prompt_token_ids, params.sampling(), seeds[1:])
    return out


def rows_of(prompts, per_pass: list[list]) -> dict:
    """``samples`` columns (:data:`COLUMNS`) from the prompts (with ``prompt_tokens``) and each pass's completions."""
    out: dict = {c: [] for c in COLUMNS}
    for index, comps in enumerate(per_pass):
        for col in ("prompt_id", "prompt", "prompt_tokens"):
            out[col] += list(prompts[col])
        out["sample_index"] += [index] * len(prompts)
        out["completion"] += [c.text for c in comps]
        out["completion_tokens"] += [len(c.token_ids) for c in comps]
    return out


def run(ctx) -> StageResult:
    """Write ``n`` answers per prompt (pass 0 greedy) as a ``samples`` dataset, shard by shard."""
    import datasets

    p: GreedyAndSampledParams = ctx.params
    src = ctx.model("policy")
    tok = src.load_tokenizer(padding_side="left")
    engine = ctx.backend("backend", src)
    prompts, skipped = prepare_prompts(tok, ctx.dataset("prompts"), p.max_prompt_tokens)
    ctx.progress.start(len(prompts))

    def process(rows, shard: int):
        per_pass = answers(engine, [list(t) for t in rows["token_ids"]], p, ctx.seed)
        ctx.progress.advance(len(rows))
        return datasets.Dataset.from_dict(rows_of(rows, per_pass))

    with ctx.timer("generate"):
        result = ctx.run_shards(prompts, process, p.num_shards)
    ctx.save_dataset(result)
    greedy_tokens = [t for t, i in zip(result["completion_tokens"], result["sample_index"]) if i == 0]
    return StageResult(rows=len(result), metrics={
        "prompts": len(prompts), "prompts_skipped_too_long": skipped, "samples": len(result),
        "greedy_mean_tokens": sum(greedy_tokens) / len(greedy_tokens) if greedy_tokens else None})


def register_stage(register) -> None:
    register(StageImpl(kind="sample", name="greedy-and-sampled", params=GreedyAndSampledParams, run=run, version="1",
                       inputs=(), min_inputs=0, max_inputs=0, output=SAMPLES,
                       description="pass 0 greedy, passes 1 .. n-1 sampled, with any generation backend"))
