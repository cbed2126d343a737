"""The ``score``/``armorm`` stage: rewards from RLHFlow/ArmoRM-Llama3-8B-v0.1 (or a model shaped like it).

ArmoRM (Wang et al. 2024, "Interpretable Preferences via Multi-Objective Reward Modeling and
Mixture-of-Experts", arXiv:2406.12845) is a Llama-3-8B sequence classifier whose custom code
(``trust_remote_code``) returns an output with ``score``: the gating-weighted sum of its 19
objective rewards, one float per sequence. REBEL's ``rank.py`` (Gao et al. 2024, arXiv:2404.16767)
reads ``output.score`` for each (user prompt, assistant reply) chat, in bf16, truncated at 4096
tokens, one sequence per forward pass.

This stage computes the same quantity in batches: sequences are sorted by length, cut into batches
of at most ``batch_size`` sequences and ``max_batch_tokens`` padded tokens, and right-padded to the
longest sequence of their batch only (dynamic padding). ArmoRM finds each sequence's last token as
the position before the first ``config.pad_token_id``, so the batch is padded with exactly that id;
a sequence that contains the pad id itself, or a model without a pad id, is scored on its own.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from rlhf_spec.hookspecs import REWARD_MODEL, SAMPLES, SCORED, ModelRef, NotInKey, StageImpl, StageResult, hookimpl
from rlhf_spec.rewards import length_batches
from rlhf_spec.results import scored_result


class ArmoRMParams(BaseModel):
    """Params of ``score``/``armorm``."""

    model_config = ConfigDict(extra="forbid")

    reward_model: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))] = Field(
        ..., description="A /models name (e.g. hub RLHFlow/ArmoRM-Llama3-8B-v0.1 with trust_remote_code: true) or a stage id."
    )
    dtype: Literal["bfloat16", "float16", "float32", "model"] = Field(
        "bfloat16", description="Weights dtype (REBEL rank.py: bfloat16); 'model' uses the /models entry's dtype."
    )
    max_length: int = Field(4096, ge=8, le=131072, description="Truncate each chat to this many tokens (REBEL rank.py: 4096).")
    truncation_side: Literal["right", "left"] = Field(
        "right", description="Which end truncation cuts (REBEL rank.py: the tokenizer default, right)."
    )
    batch_size: Annotated[int, NotInKey()] = Field(16, ge=1, le=8192, description="Most sequences per forward pass. Not part of the key.")
    max_batch_tokens: Annotated[int, NotInKey()] = Field(
        32768, ge=8, description="Most padded tokens (sequences x longest length) per forward pass. Not part of the key."
    )
    num_shards: int = Field(8, ge=1, le=100000, description="Content-defined shards committed one by one, so a killed run resumes.")


def check(params: ArmoRMParams, spec) -> list:
    """Static check run by ``rlhf-spec validate``: the /models entry must allow remote code.

    Returns:
        a list of :class:`rlhf_spec.errors.Problem` with pointers relative to the stage's params
        (empty when the reward model is a stage output or the entry sets ``trust_remote_code``).
    """
    from rlhf_spec.errors import Problem

    name = params.reward_model
    model = spec.models.get(name)
    if model is None or model.trust_remote_code:
        return []
    return [Problem("/reward_model", f"ArmoRM needs remote code; set /models/{name}/trust_remote_code to true",
                    "its modeling code ships with the checkpoint; the flag allows it for this model only")]


def _torch_dtype(p: ArmoRMParams, src):
    from rlhf_spec.models import default_dtype

    return default_dtype(src.dtype if p.dtype == "model" else p.dtype)


def load_armorm(src, p: ArmoRMParams, device=None):
    """Load the reward model and its tokenizer from a :class:`rlhf_spec.models.ModelSource`.

    The model is loaded with ``AutoModelForSequenceClassification`` and the source's own
    ``trust_remote_code`` (from the spec's /models entry only); no ``num_labels`` is passed, so the
    checkpoint's head is kept as it is.

    Returns:
        ``(model, tokenizer)``, the model in eval mode on ``device`` (default CPU).

    Raises:
        OSError / ValueError from transformers when the files are missing, or when the checkpoint
        needs remote code that the spec does not allow.
    """
    from transformers import AutoModelForSequenceClassification

    if src.path:
        loc, kw = src.path, {}
    else:
        loc, kw = src.hub, ({"revision": src.revision} if src.revision else {})
    model = AutoModelForSequenceClassification.from_pretrained(loc, dtype=_torch_dtype(p, src),
                                                               trust_remote_code=bool(src.trust_remote_code), **kw)
    if device is not None:
        model.to(device)
    return model.eval(), src.load_tokenizer()


def encode_chats(tokenizer, prompts: list[list[dict]], responses: list[str], max_length: int,
                 truncation_side: str = "right") -> list[list[int]]:
    """Token ids of each chat ``prompt + [{"role": "assistant", "content": response}]``.

    The chat template renders the whole conversation (no generation prompt), as REBEL's ``rank.py``
    does; ids are cut to ``max_length`` from ``truncation_side``.

    Returns:
        one list of ints per (prompt, response), each at most ``max_length`` long.

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the reward model's tokenizer has no chat template; ArmoRM scores chats")
    out = []
    for prompt, response in zip(prompts, responses):
        text = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            ids = ids[:max_length] if truncation_side == "right" else ids[-max_length:]
        out.append(ids)
    return out


def score_forward(model, input_ids, attention_mask):
    """Rewards of one right-padded batch: ``model(...).score`` as float32.

    Args:
        input_ids: (B, T) int64 tensor, right-padded with ``model.config.pad_token_id``.
        attention_mask: (B, T) 0/1 tensor, 1 on real tokens.

    Returns:
        (B,) float32 tensor of rewards (ArmoRM: preference score, arbitrary units; a (B, 1) score
        is flattened).

    Raises:
        AttributeError: if the model's output has no ``score`` (not an ArmoRM-style model).
    """
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    score = out.score
    if score.dim() == 2:
        score = score[:, 0]
    return score.float()


def score_sequences(model, seqs: list[list[int]], pad_id: Optional[int], batch_size: int, max_batch_tokens: int,
                    progress=None) -> list[float]:
    """Score token sequences in length-bucketed, dynamically padded batches; returns floats in input order.

    Sequences that contain ``pad_id`` (where ArmoRM would stop reading early) and all sequences when
    ``pad_id`` is ``None`` are scored one per forward pass, unpadded.
    """
    import torch

    device = next(model.parameters()).device
    scores = [0.0] * len(seqs)
    alone = [i for i, s in enumerate(seqs) if pad_id is None or pad_id in s]
    alone_set = set(alone)
    rest = [i for i in range(len(seqs)) if i not in alone_set]
    batches = [[rest[j] for j in b] for b in length_batches([len(seqs[i]) for i in rest], batch_size, max_batch_tokens)]
    batches += [[i] for i in alone]
    for idx in batches:
        width = max(len(seqs[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id if pad_id is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : len(seqs[i])] = torch.tensor(seqs[i], dtype=torch.long)
            mask[r, : len(seqs[i])] = 1
        vals = score_forward(model, ids.to(device), mask.to(device)).tolist()
        for i, v in zip(idx, vals):
            scores[i] = float(v)
        if progress is not None:
            progress.advance(len(idx))
    return scores


def run(ctx) -> StageResult:
    """Add a float ``reward`` column (ArmoRM ``score``) to the input samples, shard by shard."""
    import torch

    p: ArmoRMParams = ctx.params
    rows = ctx.input_dataset(0)
    src = ctx.model("reward_model")
    with ctx.timer("load_reward_model"):
        ctx.progress.note("loading ArmoRM")
        model, tok = load_armorm(src, p, device="cuda" if torch.cuda.is_available() else None)
    pad_id = getattr(model.config, "pad_token_id", None)
    ctx.progress.note("scoring")

    def process(shard_rows, shard: int):
        seqs = encode_chats(tok, list(shard_rows["prompt"]), list(shard_rows["completion"]), p.max_length, p.truncation_side)
        scores = score_sequences(model, seqs, pad_id, p.batch_size, p.max_batch_tokens)
        ctx.progress.advance(len(shard_rows))
        return shard_rows.add_column("reward", scores)

    with ctx.timer("score"):
        out = ctx.run_shards(rows, process, p.num_shards)
    return scored_result(ctx, out)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="score", name="armorm", params=ArmoRMParams, run=run, version="1",
                       inputs=(SAMPLES,), min_inputs=1, max_inputs=1, output=SCORED,
                       description="ArmoRM reward (output.score) on chats, length-bucketed dynamic-padding batches",
                       check=check, resources=lambda p: {"processes": 1, "gpus": 1}))
