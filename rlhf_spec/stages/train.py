"""Built-in ``train`` stages: REBEL, DPO (policy) and Bradley-Terry reward-model training.

Policy training reads ``pairs`` (split ``train``), computes the reference-policy
logprobs of every chosen and rejected response once (a shared cache entry), and
runs the :class:`rlhf_spec.training.Trainer` loop. With ``num_processes > 1`` the
loop runs under ``accelerate launch`` (see :mod:`rlhf_spec.launch`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal, Optional

from pydantic import Field

from ..hookspecs import PAIRS, POLICY, REWARD_MODEL, DatasetRef, ModelRef, NotInKey, StageImpl, StageResult, hookimpl
from ..training import OptimParams, Trainer

# ----------------------------------------------------------------------------- shared: pairs -> tokens


class PolicyTrainParams(OptimParams):
    """Params shared by the policy trainers (``rebel``, ``dpo``)."""

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="Policy to start from: a /models name or a train stage id.")
    reference: Optional[Annotated[str, ModelRef(artifacts=(POLICY,))]] = Field(
        None, description="Reference policy for the log-ratios; default: the starting policy (REBEL's pi_0)."
    )
    logprob_temperature: float = Field(
        1.0, gt=0, le=10.0, description="Logits are divided by (T + 1e-7) before log-softmax; REBEL uses its sampling temperature, 0.8."
    )
    max_prompt_tokens: int = Field(1024, ge=1, description="Prompts are left-truncated to this many tokens.")
    max_response_tokens: int = Field(2048, ge=1, description="Responses are right-truncated to this many tokens.")
    eval_every: Annotated[Optional[int], NotInKey()] = Field(
        None, ge=1, description="Evaluate the loss on the test split every N updates (REBEL: 200). Not part of the key."
    )
    logprob_batch_size: Annotated[int, NotInKey()] = Field(8, ge=1, description="Pairs per forward pass for reference logprobs. Not part of the key.")


def tokenize_pairs(tokenizer, rows, max_prompt: int, max_response: int) -> list[dict]:
    """Token ids of every (prompt, chosen) and (prompt, rejected) sequence.

    The prompt is the chat template with the generation prompt (left-truncated to
    ``max_prompt``); each response is followed by the end-of-turn token and
    right-truncated to ``max_response``.

    Returns:
        per pair: ``chosen_ids``, ``rejected_ids`` (lists of int) and ``prompt_len`` (int).
    """
    out = []
    eos = tokenizer.eos_token_id
    for prompt, chosen, rejected in zip(rows["prompt"], rows["chosen"], rows["rejected"]):
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        p_ids = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt:]
        item = {"prompt_len": len(p_ids)}
        for name, resp in (("chosen", chosen), ("rejected", rejected)):
            r_ids = tokenizer(resp, add_special_tokens=False)["input_ids"][: max_response - 1] + [eos]
            item[f"{name}_ids"] = p_ids + r_ids
        out.append(item)
    return out


def pair_logprobs(model, tokenizer, items: list[dict], temperature: float):
    """Sequence logprobs of the chosen and rejected responses of a batch of pairs.

    One forward pass over the 2B right-padded sequences.

    Returns:
        (chosen_logps (B,), rejected_logps (B,)) float32; sum over response tokens of log pi(y_t | x, y_<t).
    """
    import torch

    from ..losses import sequence_logprobs

    seqs = [it["chosen_ids"] for it in items] + [it["rejected_ids"] for it in items]
    starts = [it["prompt_len"] for it in items] * 2
    width = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    resp = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        resp[i, st : len(s)] = True
    ids, attn, resp = ids.to(device), attn.to(device), resp.to(device)
    logits = model(input_ids=ids, attention_mask=attn).logits
    lp = sequence_logprobs(logits, ids, resp, temperature=temperature)
    b = len(items)
    return lp[:b], lp[b:]


def reference_logprobs(ctx, p: PolicyTrainParams, rows, tok) -> tuple[list[float], list[float]]:
    """Reference-policy logprobs of every pair's chosen and rejected response, computed once.

    Stored as a shared cache entry keyed by the pairs, the reference model's identity,
    the temperature and the truncation lengths, so DPO and REBEL runs on the same
    pairs reuse it.
    """
    import torch

    ref_param = "reference" if p.reference else "policy"
    src = ctx.model(ref_param)
    preimage = {"pairs": ctx.inputs[0].key, "reference": src.identity, "temperature": p.logprob_temperature,
                "max_prompt_tokens": p.max_prompt_tokens, "max_response_tokens": p.max_response_tokens}

    def compute(tmp: Path) -> dict:
        model = src.load_causal_lm(device=_local_device())
        items = tokenize_pairs(tok, rows, p.max_prompt_tokens, p.max_response_tokens)
        ch, rj = [], []
        ctx.progress.note("reference logprobs")
        ctx.progress.start(len(items))
        with torch.no_grad():
            for i in range(0, len(items), p.logprob_batch_size):
                c, r = pair_logprobs(model, tok, items[i : i + p.logprob_batch_size], p.logprob_temperature)
                ch += c.tolist()
                rj += r.tolist()
                ctx.progress.advance(len(c))
        (tmp / "logprobs.json").write_text(json.dumps({"prompt_id": list(rows["prompt_id"]), "chosen": ch, "rejected": rj}))
        del model
        return {"pairs": len(items)}

    with ctx.timer("reference_logprobs"):
        path = ctx.memo("reference-logprobs", preimage, compute)
    data = json.loads((path / "logprobs.json").read_text())
    if data["prompt_id"] != list(rows["prompt_id"]):
        raise RuntimeError("reference logprobs do not match the pairs (corrupt shared entry)")
    return data["chosen"], data["rejected"]


def _local_device():
    """This process's GPU (``cuda:LOCAL_RANK`` under a launcher), or ``None`` (CPU) without CUDA."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _split(rows, name: str):
    idx = [i for i, s in enumerate(rows["split"]) if s == name]
    return rows.select(idx)


def train_policy(ctx, make_loss):
    """Run policy training for REBEL/DPO; ``make_loss(params)`` returns ``step_loss(pc, pr, rc, rr, Rc, Rr) -> (loss, stats)``.

    Raises:
        ValueError: if the pairs have no training rows.
        rlhf_spec.training.TrainingDiverged: on a NaN/inf loss.
    """
    import torch

    from ..losses import kl_estimate

    p = ctx.params
    pairs = ctx.input_dataset(0)
    train_rows, test_rows = _split(pairs, "train"), _split(pairs, "test")
    if len(train_rows) == 0:
        raise ValueError("the pairs input has no 'train' rows")
    src = ctx.model("policy")
    tok = src.load_tokenizer()
    tok.padding_side = "right"
    ref_c, ref_r = reference_logprobs(ctx, p, pairs, tok)
    pos = {pid: i for i, pid in enumerate(pairs["prompt_id"])}
    train_items = tokenize_pairs(tok, train_rows, p.max_prompt_tokens, p.max_response_tokens)
    test_items = tokenize_pairs(tok, test_rows, p.max_prompt_tokens, p.max_response_tokens) if len(test_rows) else []

    def gather(rows, items):
        ix = [pos[pid] for pid in rows["prompt_id"]]
        return (items, torch.tensor([ref_c[i] for i in ix]), torch.tensor([ref_r[i] for i in ix]),
                torch.tensor(list(rows["chosen_reward"]), dtype=torch.float32), torch.tensor(list(rows["rejected_reward"]), dtype=torch.float32))

    tr = gather(train_rows, train_items)
    te = gather(test_rows, test_items) if test_items else None
    step_loss = make_loss(p)

    def step(model, mb):
        items = [tr[0][i] for i in mb]
        pc, pr = pair_logprobs(model, tok, items, p.logprob_temperature)
        rc, rr, Rc, Rr = (t[mb].to(pc.device) for t in tr[1:])
        loss, stats = step_loss(pc, pr, rc, rr, Rc, Rr)
        # KL(pi_0 || pi) on the stored responses, sampled from pi_0: k3 with log r = log pi_0 - log pi
        with torch.no_grad():
            kl = kl_estimate(torch.cat([rc, rr]), torch.cat([pc, pr]).detach(), kind="k3").mean()
        stats["kl_ref"] = float(kl)
        return loss, stats

    def evaluate(model):
        if te is None:
            return {}
        losses = []
        with torch.no_grad():
            for i in range(0, len(te[0]), p.logprob_batch_size):
                sl = list(range(i, min(i + p.logprob_batch_size, len(te[0]))))
                pc, pr = pair_logprobs(model, tok, [te[0][j] for j in sl], p.logprob_temperature)
                rc, rr, Rc, Rr = (t[sl].to(pc.device) for t in te[1:])
                loss, _ = step_loss(pc, pr, rc, rr, Rc, Rr)
                losses.append(float(loss) * len(sl))
        return {"loss": sum(losses) / len(te[0])}

    with ctx.timer("load_policy"):
        model = src.load_causal_lm()
    trainer = Trainer(p, model, len(train_items), step, ctx.partial_dir / "checkpoints", ctx.partial_dir / "tensorboard",
                      seed=ctx.seed + 555134, progress=ctx.progress, evaluate=evaluate if te else None, eval_every=p.eval_every)
    ctx.progress.note("training")
    with ctx.timer("train"):
        metrics = trainer.train()
    state = trainer.full_state_dict()  # a collective under DeepSpeed ZeRO-3: every process calls it
    if trainer.accelerator.is_main_process:
        with ctx.timer("save"):
            trainer.unwrapped().save_pretrained(str(ctx.model_out_dir), state_dict=state)
            tok.padding_side = "left"
            tok.save_pretrained(str(ctx.model_out_dir))
            (ctx.out_dir / "history.json").write_text(json.dumps(trainer.history))
            _copy_tensorboard(ctx)
    metrics.update({"train_pairs": len(train_items), "test_pairs": len(test_items)})
    return StageResult(metrics=metrics)


def _copy_tensorboard(ctx) -> None:
    import shutil

    src = ctx.partial_dir / "tensorboard"
    if src.is_dir():
        shutil.copytree(src, ctx.out_dir / "tensorboard", dirs_exist_ok=True)


def _run_maybe_distributed(ctx, body):
    """Run ``body(ctx)`` here, or under ``accelerate launch`` when ``num_processes > 1``."""
    from ..launch import in_worker, launch_stage

    if ctx.params.num_processes > 1 and not in_worker():
        return launch_stage(ctx)
    return body(ctx)


# ----------------------------------------------------------------------------- REBEL


class RebelParams(PolicyTrainParams):
    """Params of ``train``/``rebel``.

    Loss (REBEL repo form): ``((log pi/pi_0 (y) - log pi/pi_0 (y')) - eta * (r(y) - r(y')))**2``,
    averaged over pairs (Gao et al. 2024, REBEL, Eq. 1, up to the scale of eta).
    """

    eta: float = Field(1e6, gt=0, description="Reward scale eta (REBEL repo: 1e6 with ArmoRM rewards).")


def _rebel_loss(p: RebelParams):
    from ..losses import REBELLoss, rebel_stats

    fn = REBELLoss(p.eta)

    def step_loss(pc, pr, rc, rr, Rc, Rr):
        loss = fn(pc, pr, rc, rr, Rc, Rr)
        st = rebel_stats(pc.detach(), pr.detach(), rc, rr, Rc, Rr, eta=p.eta)
        return loss, {"loss": float(loss.detach()), "reward_margin": float(st["reward_margin"]), "logratio_margin": float(st["logratio_margin"])}

    return step_loss


def run_rebel(ctx) -> StageResult:
    """Train the policy with the REBEL regression loss; output a ``policy`` folder."""
    return _run_maybe_distributed(ctx, lambda c: train_policy(c, _rebel_loss))


# ----------------------------------------------------------------------------- DPO


class DPOParams(PolicyTrainParams):
    """Params of ``train``/``dpo``: ``-log sigmoid(beta * h)``, h the log-ratio margin (Rafailov et al. 2023, Eq. 7)."""

    beta: float = Field(0.1, gt=0, le=100.0, description="KL strength beta.")
    label_smoothing: float = Field(0.0, ge=0.0, le=0.5, description="Conservative DPO label smoothing.")
    lr: float = Field(5e-7, gt=0, le=1.0, description="Peak learning rate (AdamW).")


def _dpo_loss(p: DPOParams):
    from ..losses import DPOLoss

    fn = DPOLoss(p.beta, p.label_smoothing)

    def step_loss(pc, pr, rc, rr, Rc, Rr):
        loss, cr, rj = fn(pc, pr, rc, rr)
        return loss, {"loss": float(loss.detach()), "reward_margin": float((Rc - Rr).mean()),
                      "implicit_reward_margin": float((cr - rj).mean()), "implicit_accuracy": float((cr > rj).float().mean())}

    return step_loss


def run_dpo(ctx) -> StageResult:
    """Train the policy with DPO; output a ``policy`` folder."""
    return _run_maybe_distributed(ctx, lambda c: train_policy(c, _dpo_loss))


# ----------------------------------------------------------------------------- reward model


class RewardModelParams(OptimParams):
    """Params of ``train``/``reward-model``: Bradley-Terry loss ``-log sigmoid(r(x,y_c) - r(x,y_r) - m)``.

    Source: Ouyang et al. 2022 (InstructGPT) Eq. 1; the margin ``m`` is Llama 2's (Touvron et al. 2023, Eq. 2).
    """

    backbone: Annotated[str, ModelRef(artifacts=(REWARD_MODEL,))] = Field(
        ..., description="Encoder or decoder to put a scalar head on (AutoModelForSequenceClassification, num_labels=1)."
    )
    dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "chosen", "rejected"))]] = Field(
        None, description="Preference pairs from /datasets; or give a pairs stage as the input."
    )
    eval_dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "chosen", "rejected"))]] = Field(
        None, description="Held-out pairs; default: the input's 'test' split, or eval_size pairs split off by prompt hash."
    )
    eval_size: int = Field(0, ge=0, description="Pairs to hold out from the training data when no eval_dataset is given.")
    format: Literal["auto", "chat", "pair", "transcript"] = Field("auto", description="Input format (see rlhf_spec.rewards); recorded in the output.")
    max_length: int = Field(256, ge=8, le=131072, description="Truncate inputs to this many tokens (prompt first).")
    margin: float = Field(0.0, ge=0.0, description="Constant margin m inside the sigmoid (Llama 2 uses rating-dependent margins).")
    margin_column: Optional[str] = Field(None, description="Per-pair margin column of the input pairs (overrides margin).")
    lr: float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field("linear", description="LR schedule.")
    per_device_batch_size: int = Field(16, ge=1, le=4096, description="Pairs per micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer update.")
    eval_batch_size: Annotated[int, NotInKey()] = Field(64, ge=1, description="Pairs per forward pass in evaluation. Not part of the key.")


def run_reward_model(ctx) -> StageResult:
    """Train a scalar reward model on preference pairs and report held-out pairwise accuracy.

    With ``num_processes > 1`` the training runs under ``accelerate launch`` or ``torchrun``
    (see :mod:`rlhf_spec.launch`), as the policy trainers do.
    """
    return _run_maybe_distributed(ctx, _train_reward_model)


def _train_reward_model(ctx) -> StageResult:
    import torch

    from ..data import hash_unit
    from ..losses import PairwiseRewardLoss, pairwise_accuracy
    from ..rewards import collate, encode_for_reward, resolve_format, reward_forward

    p: RewardModelParams = ctx.params
    if p.dataset:
        with ctx.timer("load_data"):
            rows = ctx.dataset("dataset")
        eval_rows = None
    elif ctx.inputs:
        all_rows = ctx.input_dataset(0)
        rows = _split(all_rows, "train") if "split" in all_rows.column_names else all_rows
        eval_rows = _split(all_rows, "test") if "split" in all_rows.column_names else None
    else:
        raise ValueError("reward-model needs params.dataset or a pairs input")
    if p.eval_dataset:
        eval_rows = ctx.dataset("eval_dataset")
    elif p.eval_size:
        pids = list(rows["prompt_id"])
        order = sorted(range(len(rows)), key=lambda i: hash_unit(pids[i]))
        held = set(order[: p.eval_size])
        eval_rows = rows.select(sorted(held))
        rows = rows.select([i for i in range(len(rows)) if i not in held])
    src = ctx.model("backbone")
    tok = src.load_tokenizer()
    with ctx.timer("load_backbone"):
        model = src.load_sequence_classifier(num_labels=1)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    fmt = resolve_format(p.format, tok)

    def encode(rs):
        c = encode_for_reward(tok, rs["prompt"], rs["chosen"], fmt, p.max_length)
        r = encode_for_reward(tok, rs["prompt"], rs["rejected"], fmt, p.max_length)
        return c, r

    with ctx.timer("tokenize"):
        tr_c, tr_r = encode(rows)
    margins = torch.tensor(list(rows[p.margin_column]), dtype=torch.float32) if p.margin_column else torch.full((len(rows),), p.margin)
    loss_fn = PairwiseRewardLoss()

    def scores(model, ch, rj):
        batch = collate(tok, ch + rj)
        dev = next(model.parameters()).device
        out = reward_forward(model, {k: v.to(dev) for k, v in batch.items()})
        return out[: len(ch)], out[len(ch):]

    def step(model, mb):
        rc, rr = scores(model, [tr_c[i] for i in mb], [tr_r[i] for i in mb])
        m = margins[mb].to(rc.device)
        loss = loss_fn(rc, rr, m if (p.margin or p.margin_column) else None)
        return loss, {"loss": float(loss.detach()), "accuracy": pairwise_accuracy(rc.detach(), rr.detach())}

    ev = encode(eval_rows) if eval_rows is not None and len(eval_rows) else None

    def evaluate(model):
        if ev is None:
            return {}
        cs, rs = [], []
        with torch.no_grad():
            for i in range(0, len(ev[0]), p.eval_batch_size):
                c, r = scores(model, ev[0][i : i + p.eval_batch_size], ev[1][i : i + p.eval_batch_size])
                cs.append(c)
                rs.append(r)
        c, r = torch.cat(cs), torch.cat(rs)
        return {"accuracy": pairwise_accuracy(c, r), "loss": float(loss_fn(c, r)), "pairs": len(c),
                "reward_margin": float((c - r).mean())}

    trainer = Trainer(p, model, len(rows), step, ctx.partial_dir / "checkpoints", ctx.partial_dir / "tensorboard",
                      seed=ctx.seed + 1234, progress=ctx.progress, evaluate=evaluate if ev else None, eval_every=None,
                      task_type="SEQ_CLS")
    ctx.progress.note("training reward model")
    with ctx.timer("train"):
        metrics = trainer.train()
    out = ctx.model_out_dir
    state = trainer.full_state_dict()  # a collective under DeepSpeed ZeRO-3: every process calls it
    if trainer.accelerator.is_main_process:
        trainer.unwrapped().save_pretrained(str(out), state_dict=state)
        tok.save_pretrained(str(out))
        (out / "rlhf_spec_reward.json").write_text(json.dumps({"format": fmt, "max_length": p.max_length}))
        (ctx.out_dir / "history.json").write_text(json.dumps(trainer.history))
        _copy_tensorboard(ctx)
    metrics.update({"train_pairs": len(rows), "format": fmt})
    return StageResult(metrics=metrics)


def _policy_resources(p) -> dict:
    out = {"processes": p.num_processes, "gpus": p.num_processes, "global_batch": p.global_batch(),
           "episodes": p.total_episodes or f"{p.epochs} epoch(s)"}
    if p.total_episodes:
        out["updates"] = max(1, p.total_episodes // p.global_batch())
    return out


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="train", name="rebel", params=RebelParams, run=run_rebel, version="1",
                       inputs=(PAIRS,), min_inputs=1, max_inputs=1, output=POLICY,
                       description="REBEL: regress log-ratio differences onto eta * reward differences",
                       resources=_policy_resources))
    register(StageImpl(kind="train", name="dpo", params=DPOParams, run=run_dpo, version="1",
                       inputs=(PAIRS,), min_inputs=1, max_inputs=1, output=POLICY,
                       description="DPO: -log sigmoid(beta * log-ratio margin)", resources=_policy_resources))
    register(StageImpl(kind="train", name="reward-model", params=RewardModelParams, run=run_reward_model, version="1",
                       inputs=(PAIRS,), min_inputs=0, max_inputs=1, output=REWARD_MODEL,
                       description="Bradley-Terry reward model (optional Llama 2 margin), held-out pairwise accuracy",
                       resources=_policy_resources))
