"""Built-in ``sample`` stage: the policy writes n completions per prompt (transformers ``generate``)."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import Field

from ..generation import SamplingParams, chat_prompt_texts, generate_completions, prompt_lengths
from ..hookspecs import POLICY, SAMPLES, DatasetRef, ModelRef, StageImpl, StageResult, hookimpl
from ..models import default_device
from ..results import samples_result


class SampleParams(SamplingParams):
    """Params of ``sample``/``transformers``.

    Pass ``p`` (0-based) of ``n`` draws one completion per prompt and is seeded
    ``p * seed_stride`` plus the spec seed, as the REBEL tutorial seeds its vLLM
    passes (``seed=p*50``).
    """

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(
        ..., description="The policy: a /models name or the id of a train stage."
    )
    prompts: Annotated[str, DatasetRef(columns=("prompt",))] = Field(..., description="A /datasets name with prompts.")
    n: int = Field(4, ge=1, le=1024, description="Completions per prompt (one per pass).")
    seed_stride: int = Field(50, ge=0, description="Pass p is seeded p * seed_stride (+ the spec seed).")
    batch_size: int = Field(8, ge=1, le=4096, description="Prompts per generate call. Changes batch composition, so it is part of the key.")
    num_shards: int = Field(8, ge=1, le=100000, description="Content-defined shards committed one by one, so a killed run resumes.")
    sort_by_length: bool = Field(True, description="Batch prompts longest first to cut padding.")
    max_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="Skip prompts longer than this (chat template and generation prompt included) before sampling."
    )


def run(ctx) -> StageResult:
    """Sample ``n`` completions for every prompt, shard by shard.

    Output rows: ``prompt_id`` (str), ``prompt`` (messages), ``sample_index`` (int, the pass),
    ``completion`` (str), ``completion_tokens`` (int), ``prompt_tokens`` (int).
    """
    p: SampleParams = ctx.params
    with ctx.timer("load_data"):
        prompts = ctx.dataset("prompts")
    with ctx.timer("load_policy"):
        ctx.progress.note("loading policy")
        src = ctx.model("policy")
        tok = src.load_tokenizer(padding_side="left")
        model = src.load_causal_lm(device=default_device())
    texts = chat_prompt_texts(tok, list(prompts["prompt"]))
    lengths = prompt_lengths(tok, texts)
    keep = [i for i, n in enumerate(lengths) if p.max_prompt_tokens is None or n <= p.max_prompt_tokens]
    skipped = len(prompts) - len(keep)
    prompts = prompts.select(keep)
    prompts = prompts.add_column("prompt_tokens", [lengths[i] for i in keep])
    prompts = prompts.add_column("text", [texts[i] for i in keep])
    ctx.progress.note("sampling")
    total_tokens = [0]

    def process(rows, shard: int):
        import datasets

        out = {"prompt_id": [], "prompt": [], "sample_index": [], "completion": [], "completion_tokens": [], "prompt_tokens": []}
        for pas in range(p.n):
            seed = ctx.seed * 1_000_003 + pas * p.seed_stride + shard * 7919 * 1_000_033
            comps, ntok = generate_completions(model, tok, list(rows["text"]), p, p.batch_size, seed, p.sort_by_length,
                                               progress=None, lengths=list(rows["prompt_tokens"]))
            total_tokens[0] += sum(ntok)
            out["prompt_id"] += list(rows["prompt_id"])
            out["prompt"] += list(rows["prompt"])
            out["sample_index"] += [pas] * len(rows)
            out["completion"] += comps
            out["completion_tokens"] += ntok
            out["prompt_tokens"] += list(rows["prompt_tokens"])
        ctx.progress.advance(len(rows))
        return datasets.Dataset.from_dict(out)

    with ctx.timer("generate"):
        result = ctx.run_shards(prompts, process, p.num_shards)
    return samples_result(ctx, len(prompts), skipped, result, total_tokens[0])


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="sample", name="transformers", params=SampleParams, run=run, version="2",
                       inputs=(), min_inputs=0, max_inputs=0, output=SAMPLES,
                       description="n completions per prompt with transformers generate (CPU or GPU)",
                       resources=lambda p: {"processes": 1, "gpus": "0-1"}))
