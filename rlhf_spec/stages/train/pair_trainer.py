"""Training a policy on preference pairs: the shared params, reference logprobs computed once, the
loop, and saving the policy by the ``policy`` artifact contract.

An offline preference algorithm is one function ``make_loss(params) -> loss_fn`` where
``loss_fn(batch: PairBatch) -> (loss, stats)``; :func:`pair_trainer` turns it into a stage's ``run``::

    run = pair_trainer(lambda p: lambda b: slic_loss(b, p.delta))
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

from pydantic import Field

from ...algorithms.batching import tokenize_pairs
from ...errors import Problem
from ...loops.save import metrics_before, save_policy, seconds_per_update
from ...loops.trainer import OptimParams, Trainer
from ...records import POLICY, DatasetRef, ModelRef, NotInKey, StageResult


class PolicyTrainParams(OptimParams):
    """Params shared by the policy trainers (``rebel``, ``dpo`` and their relatives)."""

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="Policy to start from: a /models "
                                                                                   "name or a train stage id.")
    reference: Optional[Annotated[str, ModelRef(artifacts=(POLICY,))]] = Field(
        None, description="Reference policy for the log-ratios; default: the starting policy (REBEL's pi_0).")
    logprob_temperature: float = Field(
        1.0, gt=0, le=10.0, description="Logits are divided by (T + 1e-7) before log-softmax; REBEL uses its sampling "
                                        "temperature, 0.8.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Prompts are left-truncated to this many tokens.")
    max_response_tokens: int = Field(2048, ge=1, description="Responses are right-truncated to this many tokens.")
    dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "chosen", "rejected"))]] = Field(
        None, description="Preference pairs from /datasets (e.g. 'sharegpt' or 'generic' with chosen/rejected "
                          "columns), instead of a pairs stage in inputs.")
    eval_size: int = Field(0, ge=0, description="When the pairs have no 'test' split: hold out this many train pairs "
                                                "(lowest prompt hash) for eval_preference_accuracy.")
    eval_every: Annotated[Optional[int], NotInKey()] = Field(
        None, ge=1,
        description="Evaluate the loss on the test split every N updates (REBEL: 200). Not part of the key.")
    logprob_batch_size: Annotated[int, NotInKey()] = Field(8, ge=1, description="Pairs per forward pass for reference "
                                                                                "logprobs. Not part of the key.")
    max_kl: Annotated[Optional[float], NotInKey()] = Field(
        None, gt=0, description="Stop (TrainingDiverged, last checkpoint kept) when an update's mean k2 divergence "
                                "from the reference "
                                "policy, (log pi - log pi_ref)^2 / 2 per response in nats (logged as kl_ref), exceeds "
                                "this. "
                                "Not part of the key: it never changes a finished model.")


@dataclass
class PairBatch:
    """One micro-batch of B preference pairs as a loss sees it (float32 tensors of shape (B,)).

    Attributes:
        policy_chosen_logps, policy_rejected_logps: sequence logprobs (nats) under the policy, with gradients.
        reference_chosen_logps, reference_rejected_logps: under the reference policy (None for a
            reference-free loss).
        chosen_rewards, rejected_rewards: the pairs' rewards (reward-model units).
        chosen_lengths, rejected_lengths: response lengths in tokens (end-of-turn included).
    """

    policy_chosen_logps: "object"
    policy_rejected_logps: "object"
    reference_chosen_logps: "object"
    reference_rejected_logps: "object"
    chosen_rewards: "object"
    rejected_rewards: "object"
    chosen_lengths: "object"
    rejected_lengths: "object"


def split_rows(rows, name: str):
    """The rows of a ``pairs`` dataset whose ``split`` column is ``name`` (``"train"`` or ``"test"``)."""
    return rows.select([i for i, s in enumerate(rows["split"]) if s == name])


def reference_logprobs(ctx, p: PolicyTrainParams, rows, tok) -> tuple[list[float], list[float]]:
    """Reference-policy logprobs of every pair's chosen and rejected response, computed once.

    Stored as a shared cache entry keyed by the pairs, the reference model's identity, the
    temperature and the truncation lengths, so DPO and REBEL runs on the same pairs reuse it. Under
    ``mixed_precision`` bf16/fp16 the forward passes run under the same autocast as the policy's
    (part of the entry's key), so both sides of a log-ratio share their numerics.

    Returns:
        (chosen, rejected): one float (nats) per row of ``rows``.

    Raises:
        RuntimeError: if the shared entry does not match the pairs.
    """
    import torch

    from ...algorithms.logprobs import pair_logprobs
    from ...loops.trainer import autocast

    src = ctx.model("reference" if p.reference else "policy")
    preimage = {"pairs": ctx.inputs[0].key if ctx.inputs else _rows_digest(rows), "reference": src.identity,
                "temperature": p.logprob_temperature,
                "max_prompt_tokens": p.max_prompt_tokens, "max_response_tokens": p.max_response_tokens}
    if p.mixed_precision != "no":  # absent at full precision: those entries keep their keys
        preimage["autocast"] = p.mixed_precision

    def compute(tmp: Path) -> dict:
        model = src.load_causal_lm(device=ctx.device)
        items = tokenize_pairs(tok, rows, p.max_prompt_tokens, p.max_response_tokens)
        ch, rj = [], []
        ctx.progress.note("reference logprobs")
        ctx.progress.start(len(items))
        with torch.no_grad(), autocast(ctx.device, p.mixed_precision):
            for i in range(0, len(items), p.logprob_batch_size):
                c, r = pair_logprobs(model, tok.pad_token_id, items[i : i + p.logprob_batch_size],
                                     p.logprob_temperature)
                ch += c.tolist()
                rj += r.tolist()
                ctx.progress.advance(len(c))
        (tmp / "logprobs.json").write_text(json.dumps({"prompt_id": list(rows["prompt_id"]), "chosen": ch,
                                                       "rejected": rj}))
        return {"pairs": len(items)}

    with ctx.timer("reference_logprobs"):
        path = ctx.memo("reference-logprobs", preimage, compute)
    data = json.loads((path / "logprobs.json").read_text())
    if data["prompt_id"] != list(rows["prompt_id"]):
        raise RuntimeError("reference logprobs do not match the pairs (corrupt shared entry)")
    return data["chosen"], data["rejected"]


def _rows_digest(rows) -> str:
    """sha256 of the pairs' content (prompt ids and both responses), for pairs read from a dataset."""
    import hashlib

    from ...hashing import canonical_json

    return hashlib.sha256(canonical_json([list(rows["prompt_id"]), list(rows["chosen"]),
                                          list(rows["rejected"])])).hexdigest()


def load_pairs(ctx):
    """The pairs a policy trainer reads: its pairs input, or ``params.dataset`` with a ``split`` column of
    ``"train"`` and zero rewards (a dataset has preferences, not reward values)."""
    if ctx.inputs:
        return ctx.input_dataset(0)
    rows = ctx.dataset("dataset")
    n = len(rows)
    return (rows.add_column("split", ["train"] * n).add_column("chosen_reward", [0.0] * n)
            .add_column("rejected_reward", [0.0] * n))


def pairs_check(params: PolicyTrainParams, spec, inputs) -> list[Problem]:
    """A pair trainer reads ``params.dataset`` or one pairs input: exactly one of them.

    The ``check`` of every stage whose ``run`` comes from :func:`pair_trainer` (attached to that
    ``run``); register it as ``StageImpl(check=...)`` for a stage that calls :func:`train_on_pairs` itself.

    Args:
        params: the stage's params (a :class:`PolicyTrainParams`); spec: the whole spec (unused);
        inputs: the artifact types of the stage's data inputs.

    Returns:
        at most one :class:`~rlhf_spec.Problem`, at ``/dataset`` (neither) or ``#/inputs`` (both).
    """
    dataset = getattr(params, "dataset", None)
    if not dataset and not inputs:
        return [Problem("/dataset", "training needs preference pairs: set params.dataset or give a pairs stage in "
                                    "inputs")]
    if dataset and inputs:
        return [Problem("#/inputs", "the trainer reads params.dataset or a pairs input, not both")]
    return []


class _PairData:
    """Tokenized pairs of one split with their rewards and reference logprobs, indexable by micro-batch."""

    def __init__(self, rows, tok, p, ref: Optional[tuple[list, list]], pos: dict):
        import torch

        self.items = tokenize_pairs(tok, rows, p.max_prompt_tokens, p.max_response_tokens)
        ix = [pos[pid] for pid in rows["prompt_id"]]
        self.ref = None if ref is None else (torch.tensor([ref[0][i] for i in ix]),
                                             torch.tensor([ref[1][i] for i in ix]))
        self.rewards = (torch.tensor(list(rows["chosen_reward"]), dtype=torch.float32),
                        torch.tensor(list(rows["rejected_reward"]), dtype=torch.float32))
        self.lengths = (torch.tensor([len(it.chosen_ids) - it.prompt_len for it in self.items], dtype=torch.float32),
                        torch.tensor([len(it.rejected_ids) - it.prompt_len for it in self.items], dtype=torch.float32))

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, model, pad_id: int, idx: list[int], temperature: float) -> PairBatch:
        """The micro-batch ``idx`` with the policy's logprobs from ``model``; ``model=None`` takes the
        reference logprobs as the policy's (the starting policy when it is the reference policy)."""
        from ...algorithms.logprobs import pair_logprobs

        if model is None:
            if self.ref is None:
                raise ValueError("a reference-free loss has no reference logprobs to start from")
            pc, pr = self.ref[0][idx], self.ref[1][idx]
        else:
            pc, pr = pair_logprobs(model, pad_id, [self.items[i] for i in idx], temperature)
        dev = pc.device
        ref = (None, None) if self.ref is None else (self.ref[0][idx].to(dev), self.ref[1][idx].to(dev))
        return PairBatch(pc, pr, ref[0], ref[1], self.rewards[0][idx].to(dev), self.rewards[1][idx].to(dev),
                         self.lengths[0][idx].to(dev), self.lengths[1][idx].to(dev))


def _kl_stat(b: PairBatch) -> float:
    """The divergence guard's reading: k2 = (log pi(y) - log pi_ref(y))^2 / 2 per response (nats),
    averaged over the chosen and rejected responses of the batch, shape (2B,) -> scalar.

    Schulman's k2 estimator (http://joschu.net/blog/kl-approx.html), taken on whole responses. It
    grows with the square of a response's log-ratio. k3 on whole responses grows with its exponent:
    once DPO has pushed a response's logprob a few nats from the reference's (32 tokens moved 0.2
    nats each), k3 reads hundreds of nats on a policy that has barely moved per token, and after a
    round of iterative DPO the pairs are sampled from neither policy, so no estimator is unbiased
    there; k2 stays a bounded, non-negative measure of how far the responses' logprobs have moved.
    Returns NaN for a reference-free loss.
    """
    import torch

    from ...algorithms.kl import kl_estimate

    if b.reference_chosen_logps is None:
        return float("nan")
    with torch.no_grad():
        policy = torch.cat([b.policy_chosen_logps, b.policy_rejected_logps]).detach()
        reference = torch.cat([b.reference_chosen_logps, b.reference_rejected_logps])
        return float(kl_estimate(policy, reference, estimator="k2").mean())


def _pair_splits(pairs, eval_size: int):
    """(train pairs, held-out pairs): the 'test' split, else ``eval_size`` train pairs by prompt hash."""
    from ...data import split_by_prompt

    train, test = split_rows(pairs, "train"), split_rows(pairs, "test")
    if len(test) == 0 and eval_size:
        keep, out = split_by_prompt(list(train["prompt_id"]), eval_size)
        train, test = train.select(keep), train.select(out)
    return train, test


def _evaluator(ctx, held: Optional[_PairData], loss_fn, rewards: Optional[Callable], pad_id: int,
               p) -> Optional[Callable]:
    """``evaluate(model)`` over the held-out pairs: mean loss and, given ``rewards``, the implicit-reward
    accuracy (ties count one half) and mean margin. ``evaluate(None)`` gives the same figures for the
    reference policy from its logprobs, with no forward pass."""
    if held is None or len(held) == 0:
        return None

    def evaluate(model) -> dict:
        import torch

        from ...algorithms.pairwise import pairwise_accuracy

        losses, cs, rs = 0.0, [], []
        with ctx.timer("eval"), torch.no_grad():
            for i in range(0, len(held), p.logprob_batch_size):
                idx = list(range(i, min(i + p.logprob_batch_size, len(held))))
                b = held.batch(model, pad_id, idx, p.logprob_temperature)
                losses += float(loss_fn(b)[0]) * len(idx)
                if rewards is not None:
                    c, r = rewards(p, b)
                    cs.append(c.float().cpu())
                    rs.append(r.float().cpu())
        out = {"loss": losses / len(held), "pairs": len(held)}
        if cs:
            c, r = torch.cat(cs), torch.cat(rs)
            out.update(preference_accuracy=pairwise_accuracy(c, r), implicit_reward_margin=float((c - r).mean()))
        return out

    return evaluate


def train_on_pairs(ctx, make_loss: Callable, reference_free: bool = False,
                   rewards: Optional[Callable] = None) -> StageResult:
    """Train ``params.policy`` on the input ``pairs`` (split ``train``) with ``make_loss(params)``.

    Reference logprobs are computed once (a shared cache entry) unless ``reference_free``. Pairs of the
    ``test`` split (or, when there is none, ``params.eval_size`` train pairs chosen by prompt hash) are
    held out: their loss is reported as ``eval_loss``, and with ``rewards(params, batch) -> (chosen,
    rejected)`` (the loss's implicit reward per response, shape (B,)) also ``eval_preference_accuracy``
    and ``eval_implicit_reward_margin``. ``seconds_per_update`` excludes evaluation.

    Raises:
        ValueError: if the pairs have no training rows.
        TrainingDiverged: on a NaN/inf loss.
    """
    p = ctx.params
    pairs = load_pairs(ctx)
    train_rows, held_rows = _pair_splits(pairs, p.eval_size)
    if len(train_rows) == 0:
        raise ValueError("the pairs input has no 'train' rows")
    src = ctx.model("policy")
    tok = src.load_tokenizer(padding_side="right")
    ref = None if reference_free else reference_logprobs(ctx, p, pairs, tok)
    pos = {pid: i for i, pid in enumerate(pairs["prompt_id"])}
    train = _PairData(train_rows, tok, p, ref, pos)
    held = _PairData(held_rows, tok, p, ref, pos) if len(held_rows) else None
    loss_fn = make_loss(p)

    def step(model, mb):
        b = train.batch(model, tok.pad_token_id, mb, p.logprob_temperature)
        loss, stats = loss_fn(b)
        if not reference_free:
            stats["kl_ref"] = _kl_stat(b)
        return loss, stats

    with ctx.timer("load_policy"):
        model = src.load_causal_lm()
    evaluate = _evaluator(ctx, held, loss_fn, rewards, tok.pad_token_id, p)
    trainer = Trainer(p, model, len(train), step, ctx.partial_dir / "checkpoints", ctx.partial_dir / "tensorboard",
                      seed=ctx.seed + 555134, progress=ctx.progress, eval_every=p.eval_every, run_name=ctx.stage_id,
                      evaluate=evaluate)
    before = metrics_before(trainer, evaluate, starts_at_reference(p, reference_free)) if evaluate else {}
    ctx.progress.note("training")
    with ctx.timer("train"):
        metrics = trainer.train()
    with ctx.timer("save"):
        save_policy(ctx, trainer, tok)
    metrics.update(before, train_pairs=len(train), test_pairs=len(held) if held else 0,
                   seconds_per_update=seconds_per_update(ctx, metrics))
    return StageResult(metrics=metrics)


def starts_at_reference(p: PolicyTrainParams, reference_free: bool = False) -> bool:
    """True when the starting policy is the reference policy: a reference-based loss with no
    ``reference`` model named, so the reference logprobs are those of the starting weights (LoRA's B
    matrices start at zero, so the adapters add nothing before the first update)."""
    return not reference_free and not p.reference


def pair_trainer(make_loss: Callable, reference_free: bool = False, rewards: Optional[Callable] = None) -> Callable:
    """A stage ``run`` function that trains a policy on pairs with ``make_loss`` (see :func:`train_on_pairs`).

    Several processes (``num_processes > 1``) are started by the runner itself; the returned
    function runs in each of them.

    The returned function carries what a plugin registering ``StageImpl(run=pair_trainer(...))``
    needs without further code:

    * ``run.check`` is :func:`pairs_check` (``params.dataset`` or one pairs input, exactly one); the
      registry uses it as the stage's ``check`` when the record gives none, and runs both otherwise;
    * ``run.__module__`` is the module of ``make_loss``, so ``source_hash=True`` digests the package
      that defines the loss (the plugin's), not rlhf-spec's.
    """
    def run(ctx) -> StageResult:
        return train_on_pairs(ctx, make_loss, reference_free, rewards)

    run.__module__ = getattr(make_loss, "__module__", None) or run.__module__
    run.check = pairs_check
    return run
