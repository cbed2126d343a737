"""Training a policy on preference pairs: the shared params, reference logprobs computed once, the
loop, and saving the policy by the ``policy`` artifact contract.

An offline preference algorithm is one function ``make_loss(params) -> loss_fn`` where
``loss_fn(batch: PairBatch) -> (loss, stats)``; :func:`pair_trainer` turns it into a stage's ``run``::

    run = pair_trainer(lambda p: lambda b: slic_loss(b, p.delta))
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

from pydantic import Field

from ..records import POLICY, ModelRef, NotInKey, StageResult
from .batching import tokenize_pairs
from .training import OptimParams, Trainer


class PolicyTrainParams(OptimParams):
    """Params shared by the policy trainers (``rebel``, ``dpo`` and their relatives)."""

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="Policy to start from: a /models name or a train stage id.")
    reference: Optional[Annotated[str, ModelRef(artifacts=(POLICY,))]] = Field(
        None, description="Reference policy for the log-ratios; default: the starting policy (REBEL's pi_0).")
    logprob_temperature: float = Field(
        1.0, gt=0, le=10.0, description="Logits are divided by (T + 1e-7) before log-softmax; REBEL uses its sampling temperature, 0.8.")
    max_prompt_tokens: int = Field(1024, ge=1, description="Prompts are left-truncated to this many tokens.")
    max_response_tokens: int = Field(2048, ge=1, description="Responses are right-truncated to this many tokens.")
    eval_every: Annotated[Optional[int], NotInKey()] = Field(
        None, ge=1, description="Evaluate the loss on the test split every N updates (REBEL: 200). Not part of the key.")
    logprob_batch_size: Annotated[int, NotInKey()] = Field(8, ge=1, description="Pairs per forward pass for reference logprobs. Not part of the key.")


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
    temperature and the truncation lengths, so DPO and REBEL runs on the same pairs reuse it.

    Returns:
        (chosen, rejected): one float (nats) per row of ``rows``.

    Raises:
        RuntimeError: if the shared entry does not match the pairs.
    """
    import torch

    from .logprobs import pair_logprobs

    src = ctx.model("reference" if p.reference else "policy")
    preimage = {"pairs": ctx.inputs[0].key, "reference": src.identity, "temperature": p.logprob_temperature,
                "max_prompt_tokens": p.max_prompt_tokens, "max_response_tokens": p.max_response_tokens}

    def compute(tmp: Path) -> dict:
        model = src.load_causal_lm(device=ctx.device)
        items = tokenize_pairs(tok, rows, p.max_prompt_tokens, p.max_response_tokens)
        ch, rj = [], []
        ctx.progress.note("reference logprobs")
        ctx.progress.start(len(items))
        with torch.no_grad():
            for i in range(0, len(items), p.logprob_batch_size):
                c, r = pair_logprobs(model, tok.pad_token_id, items[i : i + p.logprob_batch_size], p.logprob_temperature)
                ch += c.tolist()
                rj += r.tolist()
                ctx.progress.advance(len(c))
        (tmp / "logprobs.json").write_text(json.dumps({"prompt_id": list(rows["prompt_id"]), "chosen": ch, "rejected": rj}))
        return {"pairs": len(items)}

    with ctx.timer("reference_logprobs"):
        path = ctx.memo("reference-logprobs", preimage, compute)
    data = json.loads((path / "logprobs.json").read_text())
    if data["prompt_id"] != list(rows["prompt_id"]):
        raise RuntimeError("reference logprobs do not match the pairs (corrupt shared entry)")
    return data["chosen"], data["rejected"]


class _PairData:
    """Tokenized pairs of one split with their rewards and reference logprobs, indexable by micro-batch."""

    def __init__(self, rows, tok, p, ref: Optional[tuple[list, list]], pos: dict):
        import torch

        self.items = tokenize_pairs(tok, rows, p.max_prompt_tokens, p.max_response_tokens)
        ix = [pos[pid] for pid in rows["prompt_id"]]
        self.ref = None if ref is None else (torch.tensor([ref[0][i] for i in ix]), torch.tensor([ref[1][i] for i in ix]))
        self.rewards = (torch.tensor(list(rows["chosen_reward"]), dtype=torch.float32),
                        torch.tensor(list(rows["rejected_reward"]), dtype=torch.float32))
        self.lengths = (torch.tensor([len(it.chosen_ids) - it.prompt_len for it in self.items], dtype=torch.float32),
                        torch.tensor([len(it.rejected_ids) - it.prompt_len for it in self.items], dtype=torch.float32))

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, model, pad_id: int, idx: list[int], temperature: float) -> PairBatch:
        from .logprobs import pair_logprobs

        pc, pr = pair_logprobs(model, pad_id, [self.items[i] for i in idx], temperature)
        dev = pc.device
        ref = (None, None) if self.ref is None else (self.ref[0][idx].to(dev), self.ref[1][idx].to(dev))
        return PairBatch(pc, pr, ref[0], ref[1], self.rewards[0][idx].to(dev), self.rewards[1][idx].to(dev),
                         self.lengths[0][idx].to(dev), self.lengths[1][idx].to(dev))


def _kl_stat(b: PairBatch) -> float:
    """KL(pi_0 || pi) on the stored responses, sampled from pi_0: k3 with log r = log pi_0 - log pi."""
    import torch

    from .kl import kl_estimate

    if b.reference_chosen_logps is None:
        return float("nan")
    with torch.no_grad():
        return float(kl_estimate(torch.cat([b.reference_chosen_logps, b.reference_rejected_logps]),
                                 torch.cat([b.policy_chosen_logps, b.policy_rejected_logps]).detach(), kind="k3").mean())


def _evaluator(test: Optional[_PairData], loss_fn, pad_id: int, p) -> Optional[Callable]:
    if test is None or len(test) == 0:
        return None

    def evaluate(model) -> dict:
        import torch

        losses = []
        with torch.no_grad():
            for i in range(0, len(test), p.logprob_batch_size):
                idx = list(range(i, min(i + p.logprob_batch_size, len(test))))
                loss, _ = loss_fn(test.batch(model, pad_id, idx, p.logprob_temperature))
                losses.append(float(loss) * len(idx))
        return {"loss": sum(losses) / len(test)}

    return evaluate


def train_on_pairs(ctx, make_loss: Callable, reference_free: bool = False) -> StageResult:
    """Train ``params.policy`` on the input ``pairs`` (split ``train``) with ``make_loss(params)``.

    Reference logprobs are computed once (a shared cache entry) unless ``reference_free``; the loss
    on the ``test`` split is reported as ``eval_loss``.

    Raises:
        ValueError: if the pairs have no training rows.
        TrainingDiverged: on a NaN/inf loss.
    """
    p = ctx.params
    pairs = ctx.input_dataset(0)
    train_rows, test_rows = split_rows(pairs, "train"), split_rows(pairs, "test")
    if len(train_rows) == 0:
        raise ValueError("the pairs input has no 'train' rows")
    src = ctx.model("policy")
    tok = src.load_tokenizer(padding_side="right")
    ref = None if reference_free else reference_logprobs(ctx, p, pairs, tok)
    pos = {pid: i for i, pid in enumerate(pairs["prompt_id"])}
    train = _PairData(train_rows, tok, p, ref, pos)
    test = _PairData(test_rows, tok, p, ref, pos) if len(test_rows) else None
    loss_fn = make_loss(p)

    def step(model, mb):
        b = train.batch(model, tok.pad_token_id, mb, p.logprob_temperature)
        loss, stats = loss_fn(b)
        if not reference_free:
            stats["kl_ref"] = _kl_stat(b)
        return loss, stats

    with ctx.timer("load_policy"):
        model = src.load_causal_lm()
    trainer = Trainer(p, model, len(train), step, ctx.partial_dir / "checkpoints", ctx.partial_dir / "tensorboard",
                      seed=ctx.seed + 555134, progress=ctx.progress, evaluate=_evaluator(test, loss_fn, tok.pad_token_id, p),
                      eval_every=p.eval_every, run_name=ctx.stage_id)
    ctx.progress.note("training")
    with ctx.timer("train"):
        metrics = trainer.train()
    with ctx.timer("save"):
        save_policy(ctx, trainer, tok)
    metrics.update({"train_pairs": len(train), "test_pairs": len(test) if test else 0})
    return StageResult(metrics=metrics)


def pair_trainer(make_loss: Callable, reference_free: bool = False) -> Callable:
    """A stage ``run`` function that trains a policy on pairs with ``make_loss`` (see :func:`train_on_pairs`).

    Several processes (``num_processes > 1``) are started by the runner itself; the returned
    function runs in each of them.
    """
    def run(ctx) -> StageResult:
        return train_on_pairs(ctx, make_loss, reference_free)

    return run


def save_policy(ctx, trainer, tokenizer, meta: Optional[dict] = None, padding_side: Optional[str] = "left") -> Path:
    """Write a trained model by the ``policy`` (or ``reward_model``) artifact contract (docs/plugins.md):
    ``model/`` (``save_pretrained`` weights with LoRA merged, config, tokenizer with left padding),
    ``history.json`` (one dict of logged values per update) and ``tensorboard/``.

    Every process must call it: under DeepSpeed ZeRO-3 gathering the weights is a collective;
    only the main process writes.

    Args:
        meta: optional JSON written as ``model/rlhf_spec_reward.json`` (reward models' input format).
        padding_side: set on the saved tokenizer (left, for generation); None keeps it.

    Returns:
        the ``model/`` folder.
    """
    state = trainer.full_state_dict()
    out = ctx.model_out_dir
    if trainer.accelerator.is_main_process:
        trainer.unwrapped().save_pretrained(str(out), state_dict=state)
        if padding_side:
            tokenizer.padding_side = padding_side
        tokenizer.save_pretrained(str(out))
        if meta is not None:
            (out / "rlhf_spec_reward.json").write_text(json.dumps(meta))
        (ctx.out_dir / "history.json").write_text(json.dumps(trainer.history))
        tb = ctx.partial_dir / "tensorboard"
        if tb.is_dir():
            shutil.copytree(tb, ctx.out_dir / "tensorboard", dirs_exist_ok=True)
    return out
