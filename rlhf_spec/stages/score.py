"""Built-in ``score`` stage: a Hugging Face sequence-classification reward model rates every completion."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from ..hookspecs import REWARD_MODEL, SAMPLES, SCORED, ModelRef, NotInKey, StageImpl, StageResult, hookimpl
from ..models import default_device
from ..results import scored_result
from ..rewards import RewardFormat, resolve_format, score_pairs


class ScoreParams(BaseModel):
    """Params of ``score``/``transformers``."""

    model_config = ConfigDict(extra="forbid")

    reward_model: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))] = Field(
        ..., description="A /models name (AutoModelForSequenceClassification, first logit) or a reward-model train stage id."
    )
    format: RewardFormat = Field(
        "auto", description="How (prompt, response) is shown to the model: chat template, sentence pair, or transcript. 'auto' uses the trained model's own format, else chat if the tokenizer has a template."
    )
    max_length: int = Field(512, ge=8, le=131072, description="Truncate inputs to this many tokens (prompt side first).")
    batch_size: Annotated[int, NotInKey()] = Field(32, ge=1, le=8192, description="Sequences per forward pass. Not part of the cache key.")
    bucket_by_length: Annotated[bool, NotInKey()] = Field(True, description="Sort by length before batching to cut padding. Not part of the key.")
    num_shards: int = Field(8, ge=1, le=100000, description="Content-defined shards committed one by one, so a killed run resumes.")


def run(ctx) -> StageResult:
    """Add a float ``reward`` column to the input samples."""
    p: ScoreParams = ctx.params
    rows = ctx.input_dataset(0)
    with ctx.timer("load_reward_model"):
        ctx.progress.note("loading reward model")
        src = ctx.model("reward_model")
        tok = src.load_tokenizer()
        model = src.load_sequence_classifier(device=default_device())
    fmt = resolve_format(p.format, tok, src.path if src.origin == "stage" else None)
    ctx.progress.note("scoring")

    def process(shard_rows, shard: int):
        scores = score_pairs(model, tok, shard_rows["prompt"], shard_rows["completion"], fmt, p.max_length, p.batch_size,
                             bucket=p.bucket_by_length, progress=ctx.progress)
        return shard_rows.add_column("reward", scores)

    with ctx.timer("score"):
        out = ctx.run_shards(rows, process, p.num_shards)
    return scored_result(ctx, out, format=fmt)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="score", name="transformers", params=ScoreParams, run=run, version="1",
                       inputs=(SAMPLES,), min_inputs=1, max_inputs=1, output=SCORED,
                       description="reward from a sequence-classification model, length-bucketed batches",
                       resources=lambda p: {"processes": 1, "gpus": "0-1"}))
