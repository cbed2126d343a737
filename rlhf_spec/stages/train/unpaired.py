"""Training a policy on unpaired completions, each labelled desirable or undesirable: KTO.

Rows are (prompt, completion, label). They come from a ``kto`` dataset, or from preference pairs
unrolled (chosen -> desirable, rejected -> undesirable). The loss is :class:`~rlhf_spec.algorithms.kto.KTOLoss`
(Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", Eq. 8)::

    r      = log pi(y|x) - log pi_ref(y|x)
    z0     = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])     y'_i: a completion of another prompt
    loss   = mean( lambda_y - v(x, y) ),  v = lambda_D sigmoid(beta (r - z0)) or lambda_U sigmoid(beta (z0 - r))

``z0`` is estimated per micro-batch, from the rows in it, without gradient (section 4.2 of the paper).
Each row's mismatched completion ``y'_i`` is fixed before training (the next row, in a seeded shuffle,
whose prompt differs), as TRL's KL dataset does, so that its reference logprob is computed once with
the matched ones: one shared cache entry (``kto-reference-logprobs``), no reference model in memory
while training.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

from pydantic import Field

from ...errors import Problem
from ...loops.save import metrics_before, save_policy, seconds_per_update
from ...loops.trainer import Trainer
from ...records import DatasetRef, StageResult
from .pair_trainer import PolicyTrainParams, split_rows, starts_at_reference

_PARTNER_SEED = 8191  # the seeded shuffle that fixes each row's mismatched completion


class KTOParams(PolicyTrainParams):
    """Params of ``train``/``kto`` (Ethayarajh et al. 2024, Eq. 8; defaults: the paper's beta 0.1, equal weights,
    lr 5e-7 and batch 32). The paper advises ``lambda_D n_D / (lambda_U n_U)`` in [1, 4/3]; the run reports
    that ratio as ``desirable_ratio``."""

    dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "completion", "label"))]] = Field(
        None, description="Unpaired rows from /datasets (adapter 'kto'); or give a pairs stage as the input (chosen: "
                          "desirable, rejected: undesirable).")
    eval_dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "completion", "label"))]] = Field(
        None, description="Held-out unpaired rows; default: the pairs' 'test' split, or eval_size rows held out by "
                          "prompt hash.")
    eval_size: int = Field(0, ge=0, description="Rows (or, from pairs, pairs) held out by prompt hash when there is no "
                                                "other held-out set.")
    beta: float = Field(0.1, gt=0, le=100.0, description="Inverse temperature beta of the implicit reward.")
    desirable_weight: float = Field(1.0, gt=0, le=100.0, description="lambda_D, weight of desirable rows.")
    undesirable_weight: float = Field(1.0, gt=0, le=100.0, description="lambda_U, weight of undesirable rows.")
    learning_rate: float = Field(5e-7, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    per_device_train_batch_size: int = Field(4, ge=1, le=4096, description="Rows per micro-batch per process; at least "
                                                                           "2 (z0 needs other rows' completions).")
    gradient_accumulation_steps: int = Field(8, ge=1, le=65536, description="Micro-batches per optimizer update.")


@dataclass
class UnpairedRows:
    """Rows of (prompt, completion, label); ``pair`` is the index of the source pair (chosen and rejected
    rows of one pair share it), or -1 for unpaired data."""

    prompt_id: list[str] = field(default_factory=list)
    prompt: list[list[dict]] = field(default_factory=list)
    completion: list[str] = field(default_factory=list)
    label: list[bool] = field(default_factory=list)
    pair: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.label)

    @classmethod
    def from_dataset(cls, rows) -> "UnpairedRows":
        """From a dataset with ``prompt_id``, ``prompt``, ``completion`` and ``label`` columns."""
        return cls(list(rows["prompt_id"]), [list(p) for p in rows["prompt"]], list(rows["completion"]),
                   [bool(x) for x in rows["label"]], [-1] * len(rows))

    @classmethod
    def from_pairs(cls, rows) -> "UnpairedRows":
        """Pairs unrolled: each pair gives its chosen response (desirable) and its rejected one (undesirable)."""
        out = cls()
        for k, (pid, prompt, ch, rj) in enumerate(zip(rows["prompt_id"], rows["prompt"], rows["chosen"],
                                                      rows["rejected"])):
            for text, good in ((ch, True), (rj, False)):
                out.prompt_id.append(pid)
                out.prompt.append(list(prompt))
                out.completion.append(text)
                out.label.append(good)
                out.pair.append(k)
        return out


def kl_partners(prompt_ids: list[str], seed: int = _PARTNER_SEED) -> list[int]:
    """For each row ``i``, a row ``j`` with another prompt: its completion is ``y'_i`` in the estimate of ``z0``.

    The rows are shuffled with ``seed``; ``j`` is the next row after ``i`` in that order (cyclically)
    whose prompt differs, the "shift by one" of the paper's mismatched pairs.

    Raises:
        ValueError: if all rows share one prompt (no mismatched pair exists).
    """
    import torch

    n = len(prompt_ids)
    if len(set(prompt_ids)) < 2:
        raise ValueError(f"KTO's reference point needs completions of at least two different prompts; these {n} rows "
                         f"have "
                         f"{len(set(prompt_ids))}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    out = [0] * n
    for k, i in enumerate(order):
        step = 1
        while prompt_ids[order[(k + step) % n]] == prompt_ids[i]:
            step += 1
        out[i] = order[(k + step) % n]
    return out


class _Tokenized:
    """Rows as token ids: ``matched[i]`` = prompt_i + completion_i, ``kl[i]`` = prompt_i + completion of its partner."""

    def __init__(self, tok, rows: UnpairedRows, p: KTOParams, what: str):
        from ...algorithms.batching import TokenizedCompletion, prompt_ids, response_ids

        try:
            partner = kl_partners(rows.prompt_id)
        except ValueError as exc:
            raise ValueError(f"{what} rows: {exc}") from None
        prompts = [prompt_ids(tok, m, p.max_prompt_tokens) for m in rows.prompt]
        replies = [response_ids(tok, c, p.max_response_tokens) for c in rows.completion]
        self.matched = [TokenizedCompletion(q + r, len(q)) for q, r in zip(prompts, replies)]
        self.kl = [TokenizedCompletion(prompts[i] + replies[j], len(prompts[i])) for i, j in enumerate(partner)]

    def digest(self) -> str:
        """sha256 over every sequence's token ids and prompt length: what the reference logprobs depend on."""
        h = hashlib.sha256()
        for it in self.matched + self.kl:
            h.update(array("q", [it.prompt_len, len(it.input_ids)] + list(it.input_ids)).tobytes())
        return h.hexdigest()


def kto_reference_logprobs(ctx, p: KTOParams, parts: list[_Tokenized], pad_id: int) -> list[tuple[list[float],
                                                                                                  list[float]]]:
    """Reference-policy logprobs (nats) of every matched and mismatched sequence of ``parts``, computed once.

    A shared cache entry (``kto-reference-logprobs``) keyed by the token ids, the reference model's
    identity and the temperature; a rerun, or another KTO stage on the same rows, reads it back. Under
    ``mixed_precision`` bf16/fp16 the passes run under the policy's autocast (part of the key).

    Returns:
        for each part, ``(matched, kl)``: one float per row.

    Raises:
        RuntimeError: if the shared entry does not match the rows.
    """
    from ...algorithms.logprobs import batched_completion_logprobs
    from ...hashing import hash_json
    from ...loops.trainer import autocast

    src = ctx.model("reference" if p.reference else "policy")
    seqs = [s for part in parts for s in part.matched + part.kl]
    preimage = {"sequences": hash_json([part.digest() for part in parts]), "reference": src.identity,
                "temperature": p.logprob_temperature, "format": "kto-1"}
    if p.mixed_precision != "no":  # absent at full precision: those entries keep their keys
        preimage["autocast"] = p.mixed_precision

    def compute(tmp: Path) -> dict:
        model = src.load_causal_lm(device=ctx.device)
        ctx.progress.note("reference logprobs")
        with autocast(ctx.device, p.mixed_precision):
            values = batched_completion_logprobs(model, pad_id, seqs, p.logprob_temperature, p.logprob_batch_size)
        (tmp / "logprobs.json").write_text(json.dumps({"n": len(seqs), "logprobs": values}))
        return {"sequences": len(seqs)}

    with ctx.timer("reference_logprobs"):
        path = ctx.memo("kto-reference-logprobs", preimage, compute)
    values = json.loads((path / "logprobs.json").read_text())["logprobs"]
    if len(values) != len(seqs):
        raise RuntimeError("KTO reference logprobs do not match the rows (corrupt shared entry)")
    out, at = [], 0
    for part in parts:
        n = len(part.matched)
        out.append((values[at : at + n], values[at + n : at + 2 * n]))
        at += 2 * n
    return out


def reference_point(policy_kl_logps, reference_kl_logps):
    """``z0 = max(0, mean_i [log pi(y'_i|x_i) - log pi_ref(y'_i|x_i)])`` over the rows of this micro-batch on
    every process (summed with an all-reduce when torch.distributed is initialised), detached.

    Args:
        policy_kl_logps, reference_kl_logps: (B,) float logprobs (nats) of the mismatched sequences.

    Returns:
        0-dim tensor (nats), >= 0. Source: Ethayarajh et al. 2024, section 4.2 and Eq. 8 (see
        :func:`~rlhf_spec.algorithms.kto.kto_reference_point`, the one-process form).
    """
    import torch
    import torch.distributed as dist

    from ...algorithms.kto import kto_reference_point

    if not (dist.is_available() and dist.is_initialized()):
        return kto_reference_point(policy_kl_logps, reference_kl_logps)
    diff = (policy_kl_logps - reference_kl_logps).detach().float()
    t = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])
    dist.all_reduce(t)
    return (t[0] / t[1]).clamp_min(0.0)


class _KTOData:
    """Tokenized rows with their labels and reference logprobs, indexable by micro-batch."""

    def __init__(self, rows: UnpairedRows, tok_rows: _Tokenized, ref: tuple[list[float], list[float]]):
        import torch

        self.rows, self.tok = rows, tok_rows
        self.labels = torch.tensor(rows.label, dtype=torch.bool)
        self.ref, self.ref_kl = torch.tensor(ref[0]), torch.tensor(ref[1])

    def __len__(self) -> int:
        return len(self.rows)

    def logps(self, model, pad_id: int, idx: list[int], temperature: float):
        """(policy logprobs with gradient, policy logprobs of the mismatched sequences without) for rows ``idx``."""
        import torch

        from ...algorithms.logprobs import completion_logprobs

        lp = completion_logprobs(model, pad_id, [self.tok.matched[i] for i in idx], temperature)
        with torch.no_grad():
            kl = completion_logprobs(model, pad_id, [self.tok.kl[i] for i in idx], temperature)
        return lp, kl


def _rows(ctx, p: KTOParams) -> tuple[UnpairedRows, Optional[UnpairedRows]]:
    """(training rows, held-out rows or None) from the kto dataset or the pairs input."""
    from ...data import split_by_prompt

    if p.dataset:
        data = ctx.dataset("dataset")
        keep, out = split_by_prompt(list(data["prompt_id"]), 0 if p.eval_dataset else p.eval_size)
        train, held = UnpairedRows.from_dataset(data.select(keep)), UnpairedRows.from_dataset(data.select(out))
    else:
        pairs = ctx.input_dataset(0)
        tr, te = split_rows(pairs, "train"), split_rows(pairs, "test")
        if len(te) == 0 and p.eval_size and not p.eval_dataset:
            keep, out = split_by_prompt(list(tr["prompt_id"]), p.eval_size)
            tr, te = tr.select(keep), tr.select(out)
        train, held = UnpairedRows.from_pairs(tr), UnpairedRows.from_pairs(te)
    if p.eval_dataset:
        held = UnpairedRows.from_dataset(ctx.dataset("eval_dataset"))
    if len(train) == 0:
        raise ValueError("KTO has no training rows")
    return train, (held if len(held) else None)


def kto_step(loss_fn, data: _KTOData, pad_id: int, p: KTOParams):
    """The Trainer step of KTO: policy logprobs, z0 of this micro-batch, the loss and its stats."""
    def step(model, mb):
        lp, kl = data.logps(model, pad_id, mb, p.logprob_temperature)
        z0 = reference_point(kl, data.ref_kl[mb].to(kl.device))
        loss, st = loss_fn(lp, data.ref[mb].to(lp.device), data.labels[mb].to(lp.device), z0)
        return loss, {"loss": float(loss.detach()), **{k: float(v) for k, v in st.items()}}

    return step


def kto_evaluator(ctx, held: Optional[_KTOData], loss_fn, pad_id: int, p: KTOParams):
    """``evaluate(model)`` on the held-out rows: the KTO loss with ``z0`` estimated over all of them,
    ``label_accuracy`` (desirable rows with ``r > z0``, undesirable ones with ``r < z0``, r the log-ratio;
    ``r == z0`` counts one half, so the starting policy, where every ``r`` is 0, scores 0.5) and, for
    rows from pairs, ``preference_accuracy`` (chosen ``beta r`` above rejected, ties one half).
    ``evaluate(None)`` gives them for the reference policy from its logprobs, with no forward pass."""
    if held is None:
        return None

    def evaluate(model) -> dict:
        import torch

        if model is None:  # the reference policy: its logprobs are already here
            lp, kl = held.ref, held.ref_kl
        else:
            lps, kls = [], []
            with ctx.timer("eval"), torch.no_grad():
                for i in range(0, len(held), p.logprob_batch_size):
                    lp, kl = held.logps(model, pad_id, list(range(i, min(i + p.logprob_batch_size, len(held)))),
                                        p.logprob_temperature)
                    lps.append(lp.float().cpu())
                    kls.append(kl.float().cpu())
            lp, kl = torch.cat(lps), torch.cat(kls)
        z0 = (kl - held.ref_kl).mean().clamp_min(0.0)
        loss, _ = loss_fn(lp, held.ref, held.labels, z0)
        r = lp - held.ref
        correct = torch.where(held.labels, r > z0, r < z0).float() + 0.5 * (r == z0).float()
        out = {"loss": float(loss), "label_accuracy": float(correct.mean()), "kl": float(z0), "rows": len(held)}
        out.update(_pair_accuracy(held.rows.pair, held.rows.label, p.beta * r))
        return out

    return evaluate


def _pair_accuracy(pair: list[int], label: list[bool], rewards) -> dict:
    """``{"preference_accuracy", "pairs"}`` over rows that come in (chosen, rejected) pairs; {} for unpaired rows."""
    import torch

    from ...algorithms.pairwise import pairwise_accuracy

    chosen, rejected = {}, {}
    for i, (k, good) in enumerate(zip(pair, label)):
        if k >= 0:
            (chosen if good else rejected)[k] = i
    both = sorted(set(chosen) & set(rejected))
    if not both:
        return {}
    c = torch.stack([rewards[chosen[k]] for k in both])
    r = torch.stack([rewards[rejected[k]] for k in both])
    return {"preference_accuracy": pairwise_accuracy(c, r), "pairs": len(both)}


def kto_check(params: KTOParams, spec, inputs) -> list[Problem]:
    """Static checks of ``train``/``kto``: one data source, and micro-batches of at least 2 rows."""
    out = []
    if params.per_device_train_batch_size < 2:
        out.append(Problem("/per_device_train_batch_size", f"KTO estimates its reference point z0 from the other rows "
                                                           f"of each micro-batch, "
                           f"so per_device_train_batch_size must be at least 2 (got "
                           f"{params.per_device_train_batch_size})"))
    if not params.dataset and not inputs:
        out.append(Problem("/dataset", "KTO needs data: set params.dataset (a 'kto' dataset) or give a pairs stage in "
                                       "inputs"))
    if params.dataset and inputs:
        out.append(Problem("#/inputs", "KTO reads params.dataset or a pairs input, not both"))
    return out


def train_kto(ctx) -> StageResult:
    """Train ``params.policy`` with the KTO loss on unpaired rows (see the module docstring).

    Metrics beside the Trainer's: row counts, ``desirable_ratio`` (``lambda_D n_D / (lambda_U n_U)``),
    ``eval_label_accuracy`` and, for rows from pairs, ``eval_preference_accuracy``, ``seconds_per_update``.

    Raises:
        ValueError: no training rows, or one prompt only. TrainingDiverged: a NaN/inf loss.
    """
    from ...algorithms.kto import KTOLoss

    p: KTOParams = ctx.params
    train_rows, held_rows = _rows(ctx, p)
    src = ctx.model("policy")
    tok = src.load_tokenizer(padding_side="right")
    with ctx.timer("tokenize"):
        parts = [_Tokenized(tok, train_rows, p, "training")] + ([_Tokenized(tok, held_rows, p,
                                                                            "held-out")] if held_rows else [])
    refs = kto_reference_logprobs(ctx, p, parts, tok.pad_token_id)
    train = _KTOData(train_rows, parts[0], refs[0])
    held = _KTOData(held_rows, parts[1], refs[1]) if held_rows else None
    loss_fn = KTOLoss(p.beta, p.desirable_weight, p.undesirable_weight)
    with ctx.timer("load_policy"):
        model = src.load_causal_lm()
    evaluate = kto_evaluator(ctx, held, loss_fn, tok.pad_token_id, p)
    trainer = Trainer(p, model, len(train), kto_step(loss_fn, train, tok.pad_token_id, p),
                      ctx.partial_dir / "checkpoints",
                      ctx.partial_dir / "tensorboard", seed=ctx.seed + 424242, progress=ctx.progress,
                      eval_every=p.eval_every,
                      evaluate=evaluate, run_name=ctx.stage_id)
    before = metrics_before(trainer, evaluate, starts_at_reference(p)) if evaluate else {}
    ctx.progress.note("training")
    with ctx.timer("train"):
        metrics = trainer.train()
    with ctx.timer("save"):
        save_policy(ctx, trainer, tok)
    n_d = sum(train_rows.label)
    n_u = len(train_rows) - n_d
    metrics.update(before, train_rows=len(train_rows), desirable=n_d, undesirable=n_u,
                   eval_rows=len(held) if held else 0,
                   desirable_ratio=(p.desirable_weight * n_d / (p.undesirable_weight * n_u)) if n_u else None,
                   seconds_per_update=seconds_per_update(ctx, metrics))
    return StageResult(metrics=metrics)
