"""Built-in ``evaluate`` stage: the trained policy against the reference policy on held-out prompts.

Both policies answer each prompt once with the same sampling settings and seed;
a reward model scores both answers. Reported: each policy's mean reward, the
win rate of the trained policy (ties count one half) and a KL estimate
``KL(pi || pi_ref)`` from the trained policy's own samples.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

from pydantic import Field

from ..generation import SamplingParams, chat_prompt_texts, generate_completions, prompt_lengths
from ..hookspecs import METRICS, PAIRS, POLICY, REWARD_MODEL, DatasetRef, ModelRef, NotInKey, StageImpl, StageResult, hookimpl
from ..models import default_device
from ..rewards import RewardFormat, resolve_format, score_pairs


class EvaluateParams(SamplingParams):
    """Params of ``evaluate``/``reward-winrate``."""

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="The trained policy (a train stage id) or a /models name.")
    reference: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="The reference policy to compare against.")
    reward_model: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))] = Field(..., description="Reward model that judges both.")
    prompts: Optional[Annotated[str, DatasetRef(columns=("prompt",))]] = Field(
        None, description="Held-out prompts from /datasets; or give a pairs stage input and its 'test' split is used."
    )
    limit: Optional[int] = Field(None, ge=1, description="Evaluate at most this many prompts (after max_prompt_tokens).")
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="Skip prompts longer than this (chat template included).")
    batch_size: int = Field(8, ge=1, description="Prompts per generate call (part of the key: it fixes batch composition).")
    reward_format: RewardFormat = Field("auto", description="Reward-model input format (see score).")
    reward_max_length: int = Field(512, ge=8, description="Reward-model truncation length.")
    reward_batch_size: Annotated[int, NotInKey()] = Field(32, ge=1, description="Reward-model batch size. Not part of the key.")
    examples: Annotated[int, NotInKey()] = Field(8, ge=0, description="Example rows written to examples.md. Not part of the key.")
    alpaca_eval_outputs: bool = Field(
        False, description="Also write alpaca_eval/model_outputs.json and reference_outputs.json (AlpacaEval's format) for an API judge."
    )
    generator_name: str = Field("rlhf-spec-policy", description="The 'generator' field of the AlpacaEval outputs.")


def _sequence_logprobs(model, tok, texts: list[str], completions: list[str], temperature: float, batch_size: int) -> list[float]:
    """Sum of token logprobs of each completion (plus end-of-turn) after its rendered prompt."""
    import torch

    from ..losses import sequence_logprobs

    out: list[float] = []
    eos = tok.eos_token_id
    for i in range(0, len(texts), batch_size):
        seqs, starts = [], []
        for t, c in zip(texts[i : i + batch_size], completions[i : i + batch_size]):
            p = tok(t, add_special_tokens=False)["input_ids"]
            r = tok(c, add_special_tokens=False)["input_ids"] + [eos]
            seqs.append(p + r)
            starts.append(len(p))
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for j, (s, st) in enumerate(zip(seqs, starts)):
            ids[j, : len(s)] = torch.tensor(s)
            attn[j, : len(s)] = 1
            mask[j, st : len(s)] = True
        dev = next(model.parameters()).device
        ids, attn, mask = ids.to(dev), attn.to(dev), mask.to(dev)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn).logits
            out += sequence_logprobs(logits, ids, mask, temperature=temperature).tolist()
    return out


def run(ctx) -> StageResult:
    """Write ``metrics.json``, ``examples.md``, the per-prompt table (``data``) and optionally AlpacaEval outputs."""
    import datasets

    p: EvaluateParams = ctx.params
    if p.prompts:
        rows = ctx.dataset("prompts")
    elif ctx.inputs:
        all_rows = ctx.input_dataset(0)
        rows = all_rows.select([i for i, s in enumerate(all_rows["split"]) if s == "test"])
        if len(rows) == 0:
            raise ValueError("the pairs input has no 'test' rows; set test_size on the pair stage or give params.prompts")
    else:
        raise ValueError("evaluate needs params.prompts or a pairs input")
    temp = p.temperature if p.temperature > 0 else 1.0
    pol_src, ref_src = ctx.model("policy"), ctx.model("reference")
    tok = pol_src.load_tokenizer(padding_side="left")
    texts = chat_prompt_texts(tok, list(rows["prompt"]))
    lengths = prompt_lengths(tok, texts)
    keep = [i for i, n in enumerate(lengths) if p.max_prompt_tokens is None or n <= p.max_prompt_tokens]
    if p.limit:
        keep = keep[: p.limit]
    rows, texts, lengths = rows.select(keep), [texts[i] for i in keep], [lengths[i] for i in keep]
    if len(rows) == 0:
        raise ValueError("no evaluation prompts left after max_prompt_tokens")
    seed = ctx.seed * 1_000_003 + 4242
    ctx.progress.start(2 * len(rows))

    with ctx.timer("policy"):
        ctx.progress.note("policy samples")
        model = pol_src.load_causal_lm(device=default_device())
        pol_out, pol_tok = generate_completions(model, tok, texts, p, p.batch_size, seed, True, ctx.progress, lengths)
        pol_lp = _sequence_logprobs(model, tok, texts, pol_out, temp, p.batch_size)
        del model
    with ctx.timer("reference"):
        ctx.progress.note("reference samples")
        ref_tok_ = ref_src.load_tokenizer(padding_side="left")
        model = ref_src.load_causal_lm(device=default_device())
        ref_out, ref_ntok = generate_completions(model, ref_tok_, texts, p, p.batch_size, seed, True, ctx.progress, lengths)
        ref_lp_on_pol = _sequence_logprobs(model, ref_tok_, texts, pol_out, temp, p.batch_size)
        del model
    with ctx.timer("score"):
        ctx.progress.note("scoring")
        rm_src = ctx.model("reward_model")
        rm_tok = rm_src.load_tokenizer()
        rm = rm_src.load_sequence_classifier(device=default_device())
        fmt = resolve_format(p.reward_format, rm_tok, rm_src.path if rm_src.origin == "stage" else None)
        scores = score_pairs(rm, rm_tok, list(rows["prompt"]) * 2, pol_out + ref_out, fmt, p.reward_max_length, p.reward_batch_size)
    n = len(rows)
    r_pol, r_ref = scores[:n], scores[n:]
    wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(r_pol, r_ref))
    log_ratio = [a - b for a, b in zip(pol_lp, ref_lp_on_pol)]
    import math

    k3 = [math.expm1(-x) + x for x in log_ratio]
    metrics = {
        "prompts": n,
        "reward_mean_policy": sum(r_pol) / n,
        "reward_mean_reference": sum(r_ref) / n,
        "reward_delta": (sum(r_pol) - sum(r_ref)) / n,
        "win_rate": wins / n,
        "kl_k1": sum(log_ratio) / n,
        "kl_k3": sum(k3) / n,
        "policy_tokens_mean": sum(pol_tok) / n,
        "reference_tokens_mean": sum(ref_ntok) / n,
        "reward_format": fmt,
    }
    table = datasets.Dataset.from_dict({
        "prompt_id": list(rows["prompt_id"]), "prompt": list(rows["prompt"]), "policy": pol_out, "reference": ref_out,
        "policy_reward": r_pol, "reference_reward": r_ref, "log_ratio": log_ratio,
    })
    ctx.save_dataset(table)
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    lines = ["| prompt (last turn) | policy | reward | reference | reward |", "|---|---|---|---|---|"]

    def cell(s: str) -> str:
        s = " ".join(s.split())
        return (s[:160] + "...") if len(s) > 160 else s

    for i in range(min(p.examples, n)):
        last = rows["prompt"][i][-1]["content"]
        lines.append(f"| {cell(last)} | {cell(pol_out[i])} | {r_pol[i]:.3f} | {cell(ref_out[i])} | {r_ref[i]:.3f} |".replace("\n", " "))
    (ctx.out_dir / "examples.md").write_text("\n".join(lines) + "\n")
    if p.alpaca_eval_outputs:
        d = ctx.out_dir / "alpaca_eval"
        d.mkdir()
        for fname, outs, gen in (("model_outputs.json", pol_out, p.generator_name), ("reference_outputs.json", ref_out, "reference")):
            recs = [{"instruction": pr[-1]["content"], "output": o, "generator": gen, "dataset": "rlhf-spec"}
                    for pr, o in zip(rows["prompt"], outs)]
            (d / fname).write_text(json.dumps(recs, indent=2))
    return StageResult(metrics=metrics, rows=n)


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="evaluate", name="reward-winrate", params=EvaluateParams, run=run, version="2",
                       inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=METRICS,
                       description="reward win rate, mean rewards and KL of the policy against the reference"))
