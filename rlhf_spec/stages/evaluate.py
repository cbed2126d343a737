"""Built-in ``evaluate`` stage: the trained policy against the reference policy on held-out prompts.

Both policies answer each prompt ``samples_per_prompt`` (k) times with the same backend, sampling
settings and seeds (pass p is seeded ``spec.seed + p * seed_stride``, as in ``sample``). Every judge
(any reward) scores every answer. Reported per judge (:func:`rlhf_spec.stats.compare`): the win rate
of the policy over all k x k answer pairs of a prompt (ties count one half) with a bootstrap 95%
interval over prompts and a Wilson interval, both mean rewards and their paired difference with its
interval, and the length-controlled win rate (AlpacaEval 2's method). The first judge (or
``primary``) gives the headline figures. Also: ``KL(pi || pi_ref)`` estimated on the policy's own
answers (k1, k3) and the mean answer length of both policies. Each policy's answers are a shared
cache entry, so the reference policy answers once for all evaluate stages that compare against it.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional

from pydantic import Field

from ..algorithms.batching import tokenize_completions
from ..algorithms.kl import kl_mean_float
from ..backends import SamplingParams, generate_passes, prepare_prompts
from ..errors import Problem
from ..hookspecs import hookimpl
from ..records import METRICS, PAIRS, POLICY, BackendSpec, DatasetRef, ModelRef, NotInKey, StageImpl, StageResult
from ..runtime import sampling_seed
from .judging import Judges, cell, heldout_pairs, num, primary_problems, row_columns, score_sides


class EvaluateParams(SamplingParams):
    """Params of ``evaluate``/``reward-winrate``."""

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="The trained policy (a train stage "
                                                                                   "id) or a /models name.")
    reference: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="The reference policy to compare "
                                                                                      "against.")
    judges: Judges = Field(..., min_length=1, description="Judges by name: each a reward {\"uses\", \"params\"}. A "
                                                          "judge other than the training reward shows reward hacking.")
    primary: Optional[str] = Field(None, description="The judge whose figures are the headline (win_rate, ...); "
                                                     "default: the first.")
    backend: BackendSpec = Field(default_factory=lambda: BackendSpec(uses="transformers"),
                                 description="Generation backend for both policies.")
    prompts: Optional[Annotated[str, DatasetRef(columns=("prompt",))]] = Field(
        None, description="Held-out prompts from /datasets; or give a pairs input and its 'test' split is used.")
    samples_per_prompt: int = Field(1, ge=1, le=64, description="Answers per prompt from each policy (k).")
    seed_stride: int = Field(50, ge=0, description="Pass p is seeded spec.seed + p * seed_stride.")
    limit: Optional[int] = Field(None, ge=1,
                                 description="Evaluate at most this many prompts (after max_prompt_tokens).")
    max_prompt_tokens: Optional[int] = Field(None, ge=1, description="Skip prompts longer than this (chat template "
                                                                     "included).")
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Level of the reported intervals.")
    bootstrap_resamples: int = Field(4000, ge=100, le=100000, description="Bootstrap resamples over prompts.")
    logprob_batch_size: int = Field(8, ge=1, description="Answers per forward pass for the KL estimate.")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no", description="Autocast of the KL pass (both policies' logprobs of the policy's answers); bf16 is about "
                          "twice as fast "
                          "on CPUs with AVX-512 bf16. The answers come from the backend at its own dtype.")
    examples: Annotated[int, NotInKey()] = Field(8, ge=0, description="Example rows written to examples.md. Not part "
                                                                      "of the key.")
    alpaca_eval_outputs: bool = Field(False, description="Also write alpaca_eval/model_outputs.json and "
                                                         "reference_outputs.json (AlpacaEval's format).")
    generator_name: str = Field("rlhf-spec-policy", description="The 'generator' field of the AlpacaEval outputs.")


def _check(params: EvaluateParams, spec, inputs) -> list[Problem]:
    out = []
    if not params.prompts and not inputs:
        out.append(Problem("/prompts", "evaluate needs held-out prompts: set params.prompts or give a pairs stage in "
                                       "inputs"))
    return out + primary_problems(params.primary, params.judges)


def _prompts(ctx, p: EvaluateParams, tok):
    if p.prompts:
        rows = ctx.dataset("prompts")
    else:
        rows = heldout_pairs(ctx, "prompts")
    rows, _ = prepare_prompts(tok, rows, p.max_prompt_tokens)
    if p.limit:
        rows = rows.select(range(min(p.limit, len(rows))))
    if len(rows) == 0:
        raise ValueError("no evaluation prompts left after max_prompt_tokens")
    return rows


def _answers(ctx, name: str, src, rows, p: EvaluateParams) -> tuple[list, list]:
    """k answers per prompt from one policy: (texts (P, k), token counts (P, k)).

    Stored as a shared cache entry (``policy-answers``) keyed by the policy's identity, the prompts'
    token ids, the sampling settings, the backend (name, version, params), the seeds and k: the
    reference policy answers once for every evaluate stage that compares against it on the same
    prompts (each round of a ``repeat``, and reruns with other judges).
    """
    from ..hashing import hash_json
    from ..refs import key_view

    ids = [list(t) for t in rows["token_ids"]]
    preimage = {"policy": src.identity, "prompt_tokens": hash_json(ids),
                "sampling": p.sampling().model_dump(mode="json"), "backend": key_view(p)["backend"],
                "seed": ctx.seed, "seed_stride": p.seed_stride, "samples_per_prompt": p.samples_per_prompt}

    def compute(tmp) -> dict:
        ctx.progress.note(f"{name} answers")
        engine = ctx.backend("backend", src)
        passes = generate_passes(engine, ids, p.sampling(),
                                 [sampling_seed(ctx.seed, k, p.seed_stride) for k in range(p.samples_per_prompt)])
        del engine
        texts = [[passes[k][i].text for k in range(len(passes))] for i in range(len(ids))]
        ntok = [[len(passes[k][i].token_ids) for k in range(len(passes))] for i in range(len(ids))]
        (tmp / "answers.json").write_text(json.dumps({"texts": texts, "tokens": ntok}))
        return {"prompts": len(ids), "tokens": sum(map(sum, ntok))}

    with ctx.timer(name):
        path = ctx.memo("policy-answers", preimage, compute)
        ctx.progress.advance(len(rows))
    data = json.loads((path / "answers.json").read_text())
    if len(data["texts"]) != len(ids):
        raise RuntimeError(f"the shared {name} answers do not match the prompts (corrupt entry {path.name})")
    return data["texts"], data["tokens"]


def _log_ratios(ctx, rows, pol_texts, p: EvaluateParams) -> list[list[float]]:
    """log pi(y|x) - log pi_ref(y|x) (nats) of every policy answer, with logits at the sampling temperature,
    both sides under the same autocast (``mixed_precision``)."""
    from ..algorithms.logprobs import batched_completion_logprobs
    from ..loops.trainer import autocast

    temp = p.temperature if p.temperature > 0 else 1.0
    k = p.samples_per_prompt
    prompts = [pr for pr in rows["prompt"] for _ in range(k)]
    answers = [a for per in pol_texts for a in per]
    lps = []
    with ctx.timer("kl"):
        for param in ("policy", "reference"):
            src = ctx.model(param)
            tok = src.load_tokenizer(padding_side="right")
            model = src.load_causal_lm(device=ctx.device)
            with autocast(ctx.device, p.mixed_precision):
                lps.append(batched_completion_logprobs(model, tok.pad_token_id, tokenize_completions(tok, prompts,
                                                                                                     answers), temp,
                                                       p.logprob_batch_size))
            del model
    flat = [a - b for a, b in zip(*lps)]
    return [flat[i * k:(i + 1) * k] for i in range(len(rows))]


def _judge(ctx, name: str, rows, pol: list, ref: list) -> dict:
    """Judge ``name``'s verdicts on both policies' answers: ``{"scores": ((P, k), (P, k))}`` from a
    pointwise reward (both policies' answers scored in one call, :func:`score_sides`), or
    ``{"preferences": (P, k), "disagreement": rate}`` from a pairwise judge (policy answer j against
    reference answer j, both orders averaged)."""
    k = len(pol[0])
    n = len(rows)
    with ctx.timer(f"judge_{name}"):
        reward = ctx.reward(f"judges.{name}")
        prompts = [pr for pr in rows["prompt"] for _ in range(k)]
        flat_pol, flat_ref = [a for per in pol for a in per], [a for per in ref for a in per]
        if reward.pairwise:
            p, dis = reward.compare(prompts, flat_pol, flat_ref)
            return {"preferences": [p[i * k:(i + 1) * k] for i in range(n)], "disagreement": sum(dis) / len(dis)}
        out = score_sides(reward, prompts, [flat_pol, flat_ref], row_columns(rows, k))
    return {"scores": tuple([o[i * k:(i + 1) * k] for i in range(n)] for o in out)}


def _metrics(p: EvaluateParams, judged: dict, lengths: tuple, log_ratio: list) -> dict:
    from ..stats import compare, compare_preferences

    primary = p.primary or next(iter(p.judges))
    m: dict = {}
    for name, v in judged.items():
        if "preferences" in v:
            res = compare_preferences(v["preferences"], lengths[0], lengths[1], confidence=p.confidence, seed=0,
                                      n_resamples=p.bootstrap_resamples)
            res["order_disagreement_rate"] = v["disagreement"]
        else:
            res = compare(v["scores"][0], v["scores"][1], lengths[0], lengths[1], confidence=p.confidence, seed=0,
                          n_resamples=p.bootstrap_resamples)
        m.update({f"{name}.{key}": v for key, v in res.items()})
        if name == primary:
            m.update(res)
    flat = [x for per in log_ratio for x in per]
    m["kl_k1"], m["kl_k3"] = kl_mean_float(flat, "k1"), kl_mean_float(flat, "k3")
    m["policy_tokens_mean"], m["reference_tokens_mean"] = m.get("length_mean_policy"), m.get("length_mean_reference")
    m["primary_judge"] = primary
    return m


def run(ctx) -> StageResult:
    """Write ``metrics.json``, ``examples.md``, the per-answer table (``data``) and optionally AlpacaEval outputs."""
    import datasets

    p: EvaluateParams = ctx.params
    pol_src, ref_src = ctx.model("policy"), ctx.model("reference")
    rows = _prompts(ctx, p, pol_src.load_tokenizer(padding_side="left"))
    ctx.progress.start(2 * len(rows))
    pol, pol_n = _answers(ctx, "policy", pol_src, rows, p)
    ref, ref_n = _answers(ctx, "reference", ref_src, rows, p)
    log_ratio = _log_ratios(ctx, rows, pol, p)
    ctx.progress.note("judging")
    judged = {name: _judge(ctx, name, rows, pol, ref) for name in p.judges}
    metrics = _metrics(p, judged, (pol_n, ref_n), log_ratio)
    table = _table(rows, pol, ref, pol_n, ref_n, log_ratio, judged)
    ctx.save_dataset(datasets.Dataset.from_dict(table))
    (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (ctx.out_dir / "examples.md").write_text(examples_markdown(metrics, table, p.examples, list(p.judges)))
    if p.alpaca_eval_outputs:
        _alpaca_eval(ctx.out_dir / "alpaca_eval", rows, pol, ref, p.generator_name)
    return StageResult(metrics=metrics, rows=len(table["prompt_id"]))


def _table(rows, pol, ref, pol_n, ref_n, log_ratio, judged) -> dict:
    """One row per (prompt, sample): both answers, their lengths, the log-ratio and every judge's scores."""
    k = len(pol[0])
    t = {"prompt_id": [], "prompt": [], "sample_index": [], "policy": [], "reference": [], "policy_tokens": [],
         "reference_tokens": [], "log_ratio": []}
    for name, v in judged.items():
        for col in ([f"policy_reward/{name}", f"reference_reward/{name}"] if "scores" in v else [f"preference/{name}"]):
            t[col] = []
    for i, (pid, prompt) in enumerate(zip(rows["prompt_id"], rows["prompt"])):
        for j in range(k):
            for col, v in (("prompt_id", pid), ("prompt", prompt), ("sample_index", j), ("policy", pol[i][j]),
                           ("reference", ref[i][j]), ("policy_tokens", pol_n[i][j]), ("reference_tokens", ref_n[i][j]),
                           ("log_ratio", log_ratio[i][j])):
                t[col].append(v)
            for name, v in judged.items():
                if "scores" in v:
                    t[f"policy_reward/{name}"].append(v["scores"][0][i][j])
                    t[f"reference_reward/{name}"].append(v["scores"][1][i][j])
                else:
                    t[f"preference/{name}"].append(v["preferences"][i][j])
    return t


def _verdict(table: dict, judge: str, side: str, i: int) -> str:
    """A judge's verdict on row ``i``: the side's score, or for a pairwise judge P(policy preferred)."""
    if f"preference/{judge}" in table:
        p = table[f"preference/{judge}"][i]
        return num(p if side == "policy" else 1 - p)
    return num(table[f"{side}_reward/{judge}"][i])


def examples_markdown(metrics: dict, table: dict, examples: int, judges: list[str]) -> str:
    """``examples.md``: the headline figures per judge, then the first answers of both policies with each
    judge's verdict (a score, or for a pairwise judge the probability that side is preferred)."""
    lines = ["# Evaluation", "", "| judge | win rate | 95% interval | LC win rate | reward policy | reward reference |",
             "|---|---|---|---|---|---|"]
    for j in judges:
        lines.append(f"| {j} | {metrics[f'{j}.win_rate']:.3f} | [{metrics[f'{j}.win_rate_ci_low']:.3f}, "
                     f"{metrics[f'{j}.win_rate_ci_high']:.3f}] | {metrics[f'{j}.lc_win_rate']:.3f} | "
                     f"{num(metrics[f'{j}.reward_mean_policy'])} | {num(metrics[f'{j}.reward_mean_reference'])} |")
    lines += ["", f"KL(policy || reference): k1 {metrics['kl_k1']:.3f}, k3 {metrics['kl_k3']:.3f} nats per answer; "
              f"mean length {metrics['length_mean_policy']:.1f} vs {metrics['length_mean_reference']:.1f} tokens.", ""]
    head = "| prompt (last turn) | policy | " + " | ".join(judges) + " | reference | " + " | ".join(judges) + " |"
    lines += [head, "|" + "---|" * (3 + 2 * len(judges))]
    for i in range(min(examples, len(table["prompt_id"]))):
        ps = " | ".join(_verdict(table, j, "policy", i) for j in judges)
        rs = " | ".join(_verdict(table, j, "reference", i) for j in judges)
        lines.append(f"| {cell(table['prompt'][i][-1]['content'])} | {cell(table['policy'][i])} | {ps} | "
                     f"{cell(table['reference'][i])} | {rs} |")
    return "\n".join(lines) + "\n"


def _alpaca_eval(d, rows, pol, ref, generator: str) -> None:
    d.mkdir()
    for fname, outs, gen in (("model_outputs.json", pol, generator), ("reference_outputs.json", ref, "reference")):
        recs = [{"instruction": pr[-1]["content"], "output": o[0], "generator": gen, "dataset": "rlhf-spec"}
                for pr, o in zip(rows["prompt"], outs)]
        (d / fname).write_text(json.dumps(recs, indent=2))


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="evaluate", name="reward-winrate", params=EvaluateParams, run=run, version="4",
                       inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=METRICS, check=_check,
                       description="win rates with intervals (per judge), length-controlled win rate, rewards and KL "
                                   "of the policy vs the reference"))
