"""Training a scalar reward model on preference pairs (Bradley-Terry, optional Llama 2 margin).

The trained model records its input format and its score statistics on the training data in
``model/rlhf_spec_reward.json``: the ``classifier`` reward reads the format, and a reward combination
can normalise with the statistics (``normalize: fixed``).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from ...loops.save import save_policy
from ...loops.trainer import OptimParams, Trainer
from ...records import REWARD_MODEL, DatasetRef, ModelRef, NotInKey, StageResult
from .pair_trainer import split_rows


class RewardModelParams(OptimParams):
    """Params of ``train``/``reward-model``: Bradley-Terry loss ``-log sigmoid(r(x,y_c) - r(x,y_r) - m)``.

    Source: Ouyang et al. 2022 (InstructGPT) Eq. 1; the margin ``m`` is Llama 2's (Touvron et al. 2023, Eq. 2).
    """

    backbone: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))] = Field(
        ..., description="Encoder or decoder to put a scalar head on (AutoModelForSequenceClassification, "
                         "num_labels=1).")
    dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "chosen", "rejected"))]] = Field(
        None, description="Preference pairs from /datasets; or give a pairs stage as the input.")
    eval_dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "chosen", "rejected"))]] = Field(
        None, description="Held-out pairs; default: the input's 'test' split, or eval_size pairs split off by prompt "
                          "hash.")
    eval_size: int = Field(0, ge=0, description="Pairs to hold out from the training data when no eval_dataset is "
                                                "given.")
    format: Literal["auto", "chat", "pair", "transcript"] = Field(
        "auto", description="Input format (see rlhf_spec.rewards.classifier); recorded in the output.")
    max_length: int = Field(256, ge=8, le=131072, description="Truncate inputs to this many tokens (prompt first).")
    margin: float = Field(0.0, ge=0.0, description="Constant margin m inside the sigmoid (Llama 2 uses "
                                                   "rating-dependent margins).")
    margin_column: Optional[str] = Field(None, description="Per-pair margin column of the input pairs (overrides "
                                                           "margin).")
    learning_rate: float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        "linear", description="LR schedule.")
    per_device_train_batch_size: int = Field(16, ge=1, le=4096, description="Pairs per micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer update.")
    eval_batch_size: Annotated[int, NotInKey()] = Field(64, ge=1, description="Pairs per forward pass in evaluation. "
                                                                              "Not part of the key.")


def _rows(ctx, p: RewardModelParams):
    """(training rows, held-out rows or None) from the params' datasets or the pairs input."""
    from ...data import split_by_prompt

    if p.dataset:
        with ctx.timer("load_data"):
            rows, held = ctx.dataset("dataset"), None
    else:
        all_rows = ctx.input_dataset(0)
        has_split = "split" in all_rows.column_names
        rows = split_rows(all_rows, "train") if has_split else all_rows
        held = split_rows(all_rows, "test") if has_split else None
    if p.eval_dataset:
        held = ctx.dataset("eval_dataset")
    elif p.eval_size:  # whole prompts, so no prompt's pairs land on both sides
        keep, out = split_by_prompt(list(rows["prompt_id"]), p.eval_size)
        held, rows = rows.select(out), rows.select(keep)
    return rows, (held if held is not None and len(held) else None)


class _Scorer:
    """Encodes pairs once and scores chosen/rejected encodings with the model in one forward pass."""

    def __init__(self, tok, fmt: str, max_length: int):
        self.tok, self.fmt, self.max_length = tok, fmt, max_length

    def encode(self, rows):
        from ...rewards.classifier import encode_for_reward

        c = encode_for_reward(self.tok, rows["prompt"], rows["chosen"], self.fmt, self.max_length)
        r = encode_for_reward(self.tok, rows["prompt"], rows["rejected"], self.fmt, self.max_length)
        return c, r

    def scores(self, model, ch: list, rj: list):
        from ...rewards.classifier import collate, reward_forward

        out = reward_forward(model, collate(self.tok, ch + rj, device=next(model.parameters()).device))
        return out[: len(ch)], out[len(ch):]


def _evaluator(scorer: _Scorer, ev, loss_fn, batch_size: int):
    def evaluate(model) -> dict:
        import torch

        from ...algorithms.pairwise import pairwise_accuracy

        cs, rs = [], []
        with torch.no_grad():
            for i in range(0, len(ev[0]), batch_size):
                c, r = scorer.scores(model, ev[0][i : i + batch_size], ev[1][i : i + batch_size])
                cs.append(c)
                rs.append(r)
        c, r = torch.cat(cs), torch.cat(rs)
        return {"accuracy": pairwise_accuracy(c, r), "loss": float(loss_fn(c, r)), "pairs": len(c),
                "reward_margin": float((c - r).mean())}

    return evaluate


STATISTICS_PAIRS = 256


def _statistics(scorer: _Scorer, model, enc, batch_size: int) -> dict:
    """Mean and std of the trained model's scores on the training responses (chosen and rejected), from at
    most :data:`STATISTICS_PAIRS` pairs spread evenly over the training set (enough for a normaliser: the
    std's relative standard error is about 1/sqrt(2 * 512) = 3%)."""
    import torch

    n = len(enc[0])
    pick = (
        sorted({i * n // STATISTICS_PAIRS for i in range(STATISTICS_PAIRS)}) if n > STATISTICS_PAIRS else list(range(n))
    )
    chosen, rejected = [enc[0][i] for i in pick], [enc[1][i] for i in pick]
    vals = []
    with torch.no_grad():
        for i in range(0, len(pick), batch_size):
            c, r = scorer.scores(model, chosen[i : i + batch_size], rejected[i : i + batch_size])
            vals.append(torch.cat([c, r]))
    v = torch.cat(vals).double()
    return {"mean": float(v.mean()), "std": float(v.std(unbiased=False).clamp_min(1e-8))}


def train_reward_model(ctx) -> StageResult:
    """Train a scalar reward model on preference pairs and report held-out pairwise accuracy.

    Raises:
        ValueError: no training pairs. TrainingDiverged: a NaN/inf loss.
    """
    import torch

    from ...algorithms.pairwise import PairwiseRewardLoss, pairwise_accuracy
    from ...rewards.classifier import resolve_format

    p: RewardModelParams = ctx.params
    rows, held = _rows(ctx, p)
    src = ctx.model("backbone")
    tok = src.load_tokenizer()
    with ctx.timer("load_backbone"):
        model = src.load_sequence_classifier(num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    scorer = _Scorer(tok, resolve_format(p.format, tok), p.max_length)
    with ctx.timer("tokenize"):
        tr = scorer.encode(rows)
    margins = torch.tensor(list(rows[p.margin_column]),
                           dtype=torch.float32) if p.margin_column else torch.full((len(rows),), p.margin)
    loss_fn = PairwiseRewardLoss()

    def step(model, mb):
        rc, rr = scorer.scores(model, [tr[0][i] for i in mb], [tr[1][i] for i in mb])
        loss = loss_fn(rc, rr, margins[mb].to(rc.device) if (p.margin or p.margin_column) else None)
        return loss, {"loss": float(loss.detach()), "accuracy": pairwise_accuracy(rc.detach(), rr.detach())}

    evaluate = _evaluator(scorer, scorer.encode(held), loss_fn, p.eval_batch_size) if held is not None else None
    trainer = Trainer(p, model, len(rows), step, ctx.partial_dir / "checkpoints", ctx.partial_dir / "tensorboard",
                      seed=ctx.seed + 1234, progress=ctx.progress, evaluate=evaluate, task_type="SEQ_CLS",
                      run_name=ctx.stage_id)
    ctx.progress.note("training reward model")
    with ctx.timer("train"):
        metrics = trainer.train()
    with ctx.timer("statistics"):
        stats = _statistics(scorer, trainer.accelerator.unwrap_model(trainer.model).eval(), tr, p.eval_batch_size)
    save_policy(ctx, trainer, tok, meta={"format": scorer.fmt, "max_length": p.max_length, "statistics": stats},
                padding_side=None)
    metrics.update({"train_pairs": len(rows), "format": scorer.fmt, "train_score_mean": stats["mean"],
                    "train_score_std": stats["std"]})
    return StageResult(metrics=metrics)
