"""The ``classifier`` reward: a Hugging Face sequence-classification model (a trained reward model).

A reward model reads (prompt, response) as one of three formats:

* ``chat``: the tokenizer's chat template over prompt + assistant reply (chat reward models);
* ``pair``: a sentence pair (prompt transcript, reply), truncating the prompt first (BERT-style);
* ``transcript``: one ``\\n\\nHuman: ...\\n\\nAssistant: ...`` text, truncated from the left.

Training (``train``/``reward-model``) and scoring use the same function, and the
trained model's folder records its format in ``rlhf_spec_reward.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from ..algorithms.batching import length_batches, pad_batch
from ..data import render_transcript
from ..hookspecs import hookimpl
from ..records import REWARD_MODEL, ModelRef, NotInKey, RewardBatch, RewardImpl, RewardOutput

RewardFormat = Literal["auto", "chat", "pair", "transcript"]
META_FILE = "rlhf_spec_reward.json"


def resolve_format(fmt: str, tokenizer, model_dir: Optional[str] = None) -> str:
    """Pick a concrete format: the trained model's recorded one, else chat if the tokenizer has a template,
    else pair."""
    if fmt != "auto":
        return fmt
    if model_dir:
        meta = Path(model_dir) / META_FILE
        if meta.is_file():
            return json.loads(meta.read_text()).get("format", "pair")
    return "chat" if getattr(tokenizer, "chat_template", None) else "pair"


def encode_for_reward(tokenizer, prompts: list[list[dict]], responses: list[str], fmt: str,
                      max_length: int) -> list[dict]:
    """Tokenise (prompt, response) pairs for a reward model, without padding.

    Returns:
        one dict per pair with ``input_ids`` (and ``token_type_ids`` for pair format), each at most ``max_length``
        tokens.

    Raises:
        ValueError: for an unknown format.
    """
    tokenizer.truncation_side = "left"
    prompts, responses = list(prompts), list(responses)
    out = []
    if fmt == "chat":
        texts = [
            tokenizer.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=False) for p,
            r in zip(prompts, responses)
        ]
        enc = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=False)
    elif fmt == "pair":
        # Keep the end of the prompt and the start of the response: the response gets at least
        # half the budget, the prompt the rest (left-truncated, so the last turns survive).
        budget = max_length - tokenizer.num_special_tokens_to_add(pair=True)
        p_ids = tokenizer([render_transcript(p).strip() for p in prompts], add_special_tokens=False)["input_ids"]
        r_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
        firsts, seconds = [], []
        for a, b in zip(p_ids, r_ids):
            b = b[: max(budget // 2, budget - len(a))]
            a = a[len(a) - (budget - len(b)):] if len(a) > budget - len(b) else a
            firsts.append(tokenizer.decode(a))
            seconds.append(tokenizer.decode(b))
        enc = tokenizer(firsts, seconds, truncation="longest_first", max_length=max_length)
    elif fmt == "transcript":
        enc = tokenizer([render_transcript(p, r).strip() for p, r in zip(prompts, responses)], truncation=True,
                        max_length=max_length)
    else:
        raise ValueError(f"unknown reward format {fmt!r}")
    keys = [k for k in ("input_ids", "token_type_ids") if k in enc]
    for i in range(len(prompts)):
        out.append({k: enc[k][i] for k in keys})
    return out


def collate(tokenizer, items: list[dict], pad_id: Optional[int] = None, device=None) -> dict:
    """Right-pad encoded reward inputs (``input_ids``, optional ``token_type_ids``) into one batch
    (see :func:`rlhf_spec.algorithms.batching.pad_batch`); ``pad_id`` defaults to the tokenizer's."""
    pad = pad_id if pad_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    types = [it["token_type_ids"] for it in items] if "token_type_ids" in items[0] else None
    return pad_batch([it["input_ids"] for it in items], pad, token_type_ids=types, device=device)


def reward_forward(model, batch):
    """Scalar rewards (B,) float32: the first logit of a sequence-classification model, or a
    1-D ``score`` output (ArmoRM-style custom heads)."""
    out = model(**batch)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out.score
    return (logits if logits.dim() == 1 else logits[:, 0]).float()


# Padded tokens per forward pass when scoring on CPU. There a forward pass costs about the same per
# token at any batch size, so wide batches only add padding and push activations out of the caches:
# buckets of 64 rows x 256 tokens scored MiniLM pairs about a third slower than buckets of at most
# 1024 tokens (docs/benchmarks.md). On GPUs no cap applies: there wider batches are faster.
CPU_BATCH_TOKENS = 1024


def score_pairs(model, tokenizer, prompts, responses, fmt: str, max_length: int, batch_size: int,
                bucket: bool = True, progress=None, max_batch_tokens: Optional[int] = None) -> list[float]:
    """Score N (prompt, response) pairs; returns N floats in input order.

    With ``bucket``, sequences are sorted by length before batching, so padding
    is small, and a batch holds at most ``max_batch_tokens`` padded tokens
    (default: :data:`CPU_BATCH_TOKENS` on CPU, no limit on other devices; 0: no
    limit). Without ``bucket``, batches are ``batch_size`` rows in input order.
    The scores are the same either way up to float rounding.

    Raises:
        torch.OutOfMemoryError / MemoryError: lower ``batch_size`` or ``max_length``.
    """
    import torch

    items = encode_for_reward(tokenizer, prompts, responses, fmt, max_length)
    device = next(model.parameters()).device
    if bucket:
        if max_batch_tokens is None:
            max_batch_tokens = CPU_BATCH_TOKENS if device.type == "cpu" else 0
        batches = length_batches([len(it["input_ids"]) for it in items], batch_size, max_batch_tokens)
    else:
        batches = [list(range(s, min(s + batch_size, len(items)))) for s in range(0, len(items), batch_size)]
    scores = [0.0] * len(items)
    with torch.no_grad():
        for idx in batches:
            batch = collate(tokenizer, [items[i] for i in idx], pad_id=getattr(model.config, "pad_token_id", None),
                            device=device)
            vals = reward_forward(model, batch).tolist()
            for i, v in zip(idx, vals):
                scores[i] = float(v)
            if progress is not None:
                progress.advance(len(idx))
    return scores


class ClassifierParams(BaseModel):
    """Params of the ``classifier`` reward: the first logit of a sequence-classification model."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))] = Field(
        ..., description="A /models name (AutoModelForSequenceClassification, first logit) or a reward-model train "
                         "stage id."
    )
    format: RewardFormat = Field(
        "auto", description="How (prompt, response) is shown to the model: chat template, sentence pair, or "
                            "transcript. 'auto' uses the trained model's own format, else chat if the tokenizer has a "
                            "template."
    )
    max_length: int = Field(512, ge=8, le=131072,
                            description="Truncate inputs to this many tokens (prompt side first).")
    batch_size: Annotated[int, NotInKey()] = Field(32, ge=1, le=8192, description="Sequences per forward pass. Not "
                                                                                  "part of the cache key.")
    bucket_by_length: Annotated[bool, NotInKey()] = Field(True, description="Sort by length before batching to cut "
                                                                            "padding. Not part of the key.")


class ClassifierReward:
    """A loaded sequence-classification reward model (see :func:`score_pairs`).

    Attributes:
        statistics: ``{"mean", "std"}`` of the model's scores on its training data, when the model was
            trained by ``train``/``reward-model`` (else None); a combination normalises with them.
    """

    def __init__(self, model, tokenizer, fmt: str, params: ClassifierParams, statistics: Optional[dict] = None):
        self.model, self.tokenizer, self.format, self.p = model, tokenizer, fmt, params
        self.statistics = statistics

    def score(self, batch: RewardBatch) -> RewardOutput:
        """One float per completion: the model's first logit (reward units of the model)."""
        scores = score_pairs(self.model, self.tokenizer, batch.prompts, batch.completions, self.format,
                             self.p.max_length,
                             self.p.batch_size, bucket=self.p.bucket_by_length)
        return RewardOutput(scores=scores)


def load(params: ClassifierParams, ctx) -> ClassifierReward:
    """Load the model and tokenizer named by ``params.model`` onto the stage's device.

    Raises:
        OSError / ValueError from transformers when the files are missing or unreadable.
    """
    src = ctx.model("model")
    tok = src.load_tokenizer()
    model = src.load_sequence_classifier(device=ctx.device)
    fmt = resolve_format(params.format, tok, src.path if src.origin == "stage" else None)
    meta = Path(src.path) / META_FILE if src.path else None
    stats = json.loads(meta.read_text()).get("statistics") if meta is not None and meta.is_file() else None
    return ClassifierReward(model, tok, fmt, params, stats)


@hookimpl
def rlhf_spec_register_rewards(register):
    register(RewardImpl(name="classifier", params=ClassifierParams, load=load, version="1",
                        description="first logit of a sequence-classification reward model (e.g. a trained "
                                    "Bradley-Terry model)"))
