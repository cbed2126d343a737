"""Built-in ``filter`` stage: token-length limits, empty and duplicate responses."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..hookspecs import hookimpl
from ..records import POLICY, SAMPLES, SCORED, ModelRef, StageImpl, StageResult


class FilterParams(BaseModel):
    """Params of ``filter``/``length``. Lengths count tokens of ``tokenizer``.

    The REBEL recipe keeps prompts of at most 1024 tokens (chat template with the
    generation prompt) and responses of at most 2048 tokens.
    """

    model_config = ConfigDict(extra="forbid")

    tokenizer: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(
        ..., description="Model whose tokenizer counts tokens (the policy).")
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="Drop prompts longer than this, generation prompt "
                                                                     "included.")
    max_response_tokens: Optional[int] = Field(None, ge=1, description="Drop responses longer than this (no special "
                                                                       "tokens).")
    drop_empty: bool = Field(True, description="Drop responses that are empty after stripping whitespace.")
    drop_duplicates: bool = Field(True, description="Keep the first of identical responses to the same prompt.")


def run(ctx) -> StageResult:
    """Keep the rows that pass every check; the output has the input's type and columns."""
    p: FilterParams = ctx.params
    rows = ctx.input_dataset(0)
    tok = ctx.model("tokenizer").load_tokenizer()
    stats = {"in": len(rows), "dropped_prompt_length": 0, "dropped_response_length": 0, "dropped_empty": 0,
             "dropped_duplicate": 0}
    plen_cache: dict[str, int] = {}
    if p.max_prompt_tokens is not None:
        for pid, prompt in zip(rows["prompt_id"], rows["prompt"]):
            if pid not in plen_cache:
                text = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
                plen_cache[pid] = len(tok(text, add_special_tokens=False)["input_ids"])
    rlen = tok(list(rows["completion"]),
               add_special_tokens=False)["input_ids"] if p.max_response_tokens is not None else None
    seen: set[tuple[str, str]] = set()
    keep = []
    ctx.progress.start(len(rows))
    for i, (pid, comp) in enumerate(zip(rows["prompt_id"], rows["completion"])):
        ctx.progress.advance(1)
        if p.max_prompt_tokens is not None and plen_cache[pid] > p.max_prompt_tokens:
            stats["dropped_prompt_length"] += 1
            continue
        if rlen is not None and len(rlen[i]) > p.max_response_tokens:
            stats["dropped_response_length"] += 1
            continue
        if p.drop_empty and not comp.strip():
            stats["dropped_empty"] += 1
            continue
        if p.drop_duplicates:
            k = (pid, comp.strip())
            if k in seen:
                stats["dropped_duplicate"] += 1
                continue
            seen.add(k)
        keep.append(i)
    out = rows.select(keep)
    ctx.save_dataset(out)
    stats["out"] = len(out)
    return StageResult(metrics=stats, rows=len(out), output_type=ctx.inputs[0].output_type)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="filter", name="length", params=FilterParams, run=run, version="1",
                       inputs=(SAMPLES, SCORED), min_inputs=1, max_inputs=1, output="same",
                       description="prompt/response token limits, empty and duplicate responses"))
