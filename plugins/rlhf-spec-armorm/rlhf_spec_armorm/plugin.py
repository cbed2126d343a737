"""The ``armorm`` reward: RLHFlow/ArmoRM-Llama3-8B-v0.1 (or a model shaped like it), with its objectives as components.

ArmoRM (Wang et al. 2024, "Interpretable Preferences via Multi-Objective Reward Modeling and
Mixture-of-Experts", arXiv:2406.12845) is a Llama-3-8B sequence classifier whose custom code
(``trust_remote_code``) returns an output with ``score``: the gating-weighted sum of its 19
objective rewards, one float per sequence. REBEL's ``rank.py`` (Gao et al. 2024, arXiv:2404.16767)
reads ``output.score`` for each (user prompt, assistant reply) chat, in bf16, truncated at 4096
tokens, one sequence per forward pass.

This reward computes the same quantity in batches: sequences are sorted by length, cut into batches
of at most ``batch_size`` sequences and ``max_batch_tokens`` padded tokens, and right-padded to the
longest sequence of their batch only (dynamic padding). ArmoRM finds each sequence's last token as
the position before the first ``config.pad_token_id``, so the batch is padded with exactly that id;
a sequence that contains the pad id itself, or a model without a pad id, is scored on its own.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from rlhf_spec import (
    REWARD_MODEL,
    ModelRef,
    NotInKey,
    Problem,
    RewardBatch,
    RewardImpl,
    RewardOutput,
    hookimpl,
    length_batches,
    pad_batch,
)

#: The 19 objectives of ArmoRM-Llama3-8B-v0.1, in the order of its ``rewards`` output (its model card).
OBJECTIVES = (
    "helpsteer-helpfulness", "helpsteer-correctness", "helpsteer-coherence", "helpsteer-complexity",
    "helpsteer-verbosity",
    "ultrafeedback-overall_score", "ultrafeedback-instruction_following", "ultrafeedback-truthfulness",
    "ultrafeedback-honesty", "ultrafeedback-helpfulness", "beavertails-is_safe", "prometheus-score",
    "argilla-overall_quality", "argilla-judge_lm", "code-complexity", "code-style", "code-explanation",
    "code-instruction-following", "code-readability",
)


class ArmoRMParams(BaseModel):
    """Params of the ``armorm`` reward."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))] = Field(
        ..., description="A /models name (e.g. hub RLHFlow/ArmoRM-Llama3-8B-v0.1 with trust_remote_code: true) or a "
                         "stage id."
    )
    dtype: Literal["bfloat16", "float16", "float32", "model"] = Field(
        "bfloat16", description="Weights dtype (REBEL rank.py: bfloat16); 'model' uses the /models entry's dtype."
    )
    max_length: int = Field(4096, ge=8, le=131072, description="Truncate each chat to this many tokens (REBEL rank.py: "
                                                               "4096).")
    truncation_side: Literal["right", "left"] = Field(
        "right", description="Which end truncation cuts (REBEL rank.py: the tokenizer default, right)."
    )
    batch_size: Annotated[int, NotInKey()] = Field(16, ge=1, le=8192, description="Most sequences per forward pass. "
                                                                                  "Not part of the key.")
    max_batch_tokens: Annotated[int, NotInKey()] = Field(
        32768, ge=8, description="Most padded tokens (sequences x longest length) per forward pass. Not part of the "
                                 "key."
    )
    components: bool = Field(True, description="Also report each objective's reward (output.rewards) as a component.")


def check(params: ArmoRMParams, spec) -> list:
    """Static check run by ``rlhf-spec validate``: the /models entry must allow remote code.

    Returns:
        a list of :class:`rlhf_spec.Problem` with pointers relative to the reward's params
        (empty when the model is a stage output or the entry sets ``trust_remote_code``).
    """
    name = params.model
    model = spec.models.get(name)
    if model is None or model.trust_remote_code:
        return []
    return [Problem("/model", f"ArmoRM needs remote code; set /models/{name}/trust_remote_code to true",
                    "its modeling code ships with the checkpoint; the flag allows it for this model only")]


def _torch_dtype(p: ArmoRMParams, src):
    import torch

    name = src.dtype if p.dtype == "model" else p.dtype
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_armorm(src, p: ArmoRMParams, device=None):
    """Load the reward model and its tokenizer from a :class:`rlhf_spec.ModelSource`.

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
        text = tokenizer.apply_chat_template(list(prompt) + [{"role": "assistant", "content": response}],
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_length:
            ids = ids[:max_length] if truncation_side == "right" else ids[-max_length:]
        out.append(ids)
    return out


def score_forward(model, input_ids, attention_mask):
    """Rewards of one right-padded batch: ``(score (B,), rewards (B, objectives) or None)`` as float32.

    Args:
        input_ids: (B, T) int64 tensor, right-padded with ``model.config.pad_token_id``.
        attention_mask: (B, T) 0/1 tensor, 1 on real tokens.

    Returns:
        ``score``: ArmoRM's gated preference score (arbitrary units; a (B, 1) score is flattened);
        ``rewards``: the per-objective rewards when the output has them.

    Raises:
        AttributeError: if the model's output has no ``score`` (not an ArmoRM-style model).
    """
    import torch

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    score = out.score
    if score.dim() == 2:
        score = score[:, 0]
    rewards = getattr(out, "rewards", None)
    return score.float(), (rewards.float() if rewards is not None else None)


def score_sequences(model, seqs: list[list[int]], pad_id: Optional[int], batch_size: int, max_batch_tokens: int,
                    progress=None) -> tuple[list[float], list[list[float]]]:
    """Score token sequences in length-bucketed, dynamically padded batches.

    Sequences that contain ``pad_id`` (where ArmoRM would stop reading early) and all sequences when
    ``pad_id`` is ``None`` are scored one per forward pass, unpadded.

    Returns:
        (scores, per-objective rewards), both in input order (the second empty lists when the model
        reports no objectives).
    """
    device = next(model.parameters()).device
    scores, objectives = [0.0] * len(seqs), [[] for _ in seqs]
    alone = [i for i, s in enumerate(seqs) if pad_id is None or pad_id in s]
    rest = [i for i in range(len(seqs)) if i not in set(alone)]
    batches = [[rest[j] for j in b] for b in length_batches([len(seqs[i]) for i in rest], batch_size, max_batch_tokens)]
    for idx in batches + [[i] for i in alone]:
        batch = pad_batch([seqs[i] for i in idx], pad_id if pad_id is not None else 0, device=device)
        vals, objs = score_forward(model, batch["input_ids"], batch["attention_mask"])
        for r, i in enumerate(idx):
            scores[i] = float(vals[r])
            objectives[i] = objs[r].tolist() if objs is not None else []
        if progress is not None:
            progress.advance(len(idx))
    return scores, objectives


class ArmoRMReward:
    """A loaded ArmoRM: ``score`` gives ``output.score`` per chat, and each objective as a component."""

    def __init__(self, model, tokenizer, params: ArmoRMParams):
        self.model, self.tokenizer, self.p = model, tokenizer, params
        self.pad_id = getattr(model.config, "pad_token_id", None)

    def score(self, batch: RewardBatch) -> RewardOutput:
        seqs = encode_chats(self.tokenizer, batch.prompts, batch.completions, self.p.max_length, self.p.truncation_side)
        scores, objs = score_sequences(self.model, seqs, self.pad_id, self.p.batch_size, self.p.max_batch_tokens)
        components = {}
        if self.p.components and objs and objs[0]:
            names = (
                OBJECTIVES if len(objs[0]) == len(OBJECTIVES) else tuple(f"objective_{j}" for j in range(len(objs[0])))
            )
            components = {n: [o[j] for o in objs] for j, n in enumerate(names)}
        return RewardOutput(scores=scores, components=components)


def load(params: ArmoRMParams, ctx) -> ArmoRMReward:
    """Load ArmoRM (the ``model`` reference) on the stage's device.

    Raises:
        OSError / ValueError from transformers, e.g. when remote code is not allowed for the model.
    """
    model, tok = load_armorm(ctx.model("model"), params, device=ctx.device)
    return ArmoRMReward(model, tok, params)


@hookimpl
def rlhf_spec_register_rewards(register):
    register(RewardImpl(name="armorm", params=ArmoRMParams, load=load, version="2", components=OBJECTIVES, check=check,
                        resources=lambda p: {"gpus": 1},
                        description="ArmoRM reward (output.score) on chats, with its 19 objectives as components"))
