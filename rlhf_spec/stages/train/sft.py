"""Supervised fine-tuning (SFT) of a policy on conversations, with the loss on assistant tokens only.

A conversation becomes one token sequence (the chat template rendered once) and a mask that is True
on the tokens of the assistant turns being trained: each turn's text and the end-of-turn tokens the
template writes after it, never its role header. The loss is the mean cross-entropy over the masked
tokens::

    L = - (1 / |A|) * sum_{t in A} log pi(x_t | x_<t)          A = masked (assistant) positions t >= 1

the usual SFT objective restricted to the responses (Ouyang et al. 2022, "Training language models to
follow instructions with human feedback", section 3.5, supervised fine-tuning on demonstrations).

Optional packing concatenates the examples into blocks of exactly ``max_length`` tokens; optional QLoRA
(Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs") trains LoRA adapters on the
policy loaded in 4-bit NF4 with bitsandbytes (a CUDA GPU only).
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Literal, Optional

from pydantic import Field

from ...algorithms.conversation import (
    SFTExample,
    assistant_nll,
    collate,
    heldout_loss,
    pack_examples,
    tokenize_conversation,
)
from ...errors import Problem
from ...loops.save import metrics_before, save_policy, seconds_per_update
from ...loops.trainer import OptimParams, Trainer, apply_lora
from ...records import POLICY, DatasetRef, ModelRef, NotInKey, StageResult


class SFTParams(OptimParams):
    """Params of ``train``/``sft``: mean cross-entropy over the assistant tokens (see the module docstring).

    Defaults follow common SFT recipes (Stanford Alpaca; TRL's SFTTrainer): AdamW at 2e-5 with betas
    (0.9, 0.999) and no weight decay, cosine schedule with 3% warm-up, 3 epochs, gradient clipping at 1.0.
    """

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(..., description="Model to fine-tune: a /models name "
                                                                                   "or a train stage id.")
    dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "completion"))]] = Field(
        None, description="SFT data from /datasets (adapters messages, prompt-completion, alpaca, sharegpt, kto); or "
                          "give one samples/scored stage as the input.")
    eval_dataset: Optional[Annotated[str, DatasetRef(columns=("prompt", "completion"))]] = Field(
        None, description="Held-out SFT data; default: eval_size rows held out by prompt hash.")
    eval_size: int = Field(0, ge=0, description="Rows held out from the training data (whole prompts, lowest prompt "
                                                "hash first) when no eval_dataset is given.")
    assistant_turns: Optional[Literal["all", "last"]] = Field(
        None, description="Assistant turns in the loss: 'all' (every assistant turn of the conversation) or 'last' "
                          "(the completion only). "
                          "Default: 'all' for a dataset, 'last' for rows of an input stage (their earlier turns were "
                          "not written by the policy).")
    max_length: int = Field(1024, ge=8, le=1048576, description="Sequences are right-truncated to this many tokens; "
                                                                "with packing, the block length (examples are then not "
                                                                "truncated but run on into the next block).")
    packing: bool = Field(False, description="Concatenate the examples into blocks of exactly max_length tokens "
                                             "(attention crosses example boundaries).")
    qlora: bool = Field(False, description="Load the policy in 4-bit NF4 (bitsandbytes, CUDA GPU only) and train the "
                                           "LoRA adapters of params.lora (QLoRA).")
    chat_template: Optional[str] = Field(None, description="Jinja chat template set on the tokenizer before training "
                                                           "and saved with the policy (for a model without one).")
    learning_rate: float = Field(2e-5, gt=0, le=1.0, description="Peak learning rate (AdamW).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0, description="Share of updates spent warming up.")
    per_device_train_batch_size: int = Field(8, ge=1, le=4096, description="Sequences (or packed blocks) per "
                                                                           "micro-batch per process.")
    gradient_accumulation_steps: int = Field(1, ge=1, le=65536, description="Micro-batches per optimizer update.")
    epochs: float = Field(3.0, gt=0, description="Passes over the training sequences when total_episodes is unset.")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="Clip the gradient norm (None: no clipping).")
    eval_every: Annotated[Optional[int], NotInKey()] = Field(None, ge=1, description="Evaluate the held-out loss every "
                                                                                     "N updates. Not part of the key.")
    eval_batch_size: Annotated[int, NotInKey()] = Field(8, ge=1, description="Sequences per forward pass in "
                                                                             "evaluation. Not part of the key.")


# ----------------------------------------------------------------------------- data


def _conversations(rows, from_input: bool) -> list[list[dict]]:
    """Each row's conversation: its ``messages`` column (a dataset), else ``prompt`` + the completion."""
    if not from_input and "messages" in rows.column_names:
        return [list(m) for m in rows["messages"]]
    return [list(p) + [{"role": "assistant", "content": c}] for p, c in zip(rows["prompt"], rows["completion"])]


def _desirable(rows):
    """The rows whose ``label`` is True (all rows when there is no label column), and how many were left out:
    SFT on KTO-style data imitates the desirable completions only."""
    if rows is None or "label" not in rows.column_names:
        return rows, 0
    keep = [i for i, good in enumerate(rows["label"]) if good]
    return rows.select(keep), len(rows) - len(keep)


def sft_rows(ctx, p: SFTParams):
    """(training rows, held-out rows or None, rows come from an input stage, undesirable rows left out) for ``p``.

    Rows labelled undesirable (``label`` False, KTO data) are left out of both.

    Raises:
        ValueError: if an input stage's rows lack ``prompt``/``completion``.
    """
    from ...data import split_by_prompt

    from_input = not p.dataset
    rows, skipped = _desirable(ctx.input_dataset(0) if from_input else ctx.dataset("dataset"))
    missing = {"prompt", "completion"} - set(rows.column_names)
    if missing:
        raise ValueError(f"the SFT data has no column(s) {sorted(missing)}; it has {rows.column_names}")
    held = None
    if p.eval_dataset:
        held, n = _desirable(ctx.dataset("eval_dataset"))
        skipped += n
    elif p.eval_size:
        keep, out = split_by_prompt(list(rows["prompt_id"]), p.eval_size)
        rows, held = rows.select(keep), rows.select(out)
    return rows, (held if held is not None and len(held) else None), from_input, skipped


def build_examples(tok, rows, p: SFTParams, from_input: bool, pack: bool) -> tuple[list[SFTExample], int]:
    """Tokenized examples of ``rows``: right-truncated to ``max_length`` tokens, or, with ``pack``, whole and
    packed into blocks of ``max_length`` (a long example runs on into the next block). Also returns how many
    rows were dropped because (after truncation) they had no assistant token to predict."""
    turns = p.assistant_turns or ("last" if from_input else "all")
    examples = [tokenize_conversation(tok, m, None if pack else p.max_length,
                                      turns) for m in _conversations(rows, from_input)]
    kept = [ex for ex in examples if any(ex.loss_mask[1:])]
    return (pack_examples(kept, p.max_length) if pack else kept), len(examples) - len(kept)


# ----------------------------------------------------------------------------- QLoRA


def qlora_problems(p: SFTParams) -> list[Problem]:
    """Why ``qlora`` cannot run here: bitsandbytes 4-bit needs the package and a CUDA GPU, and
    trains LoRA adapters (``params.lora``). Pointers are relative to the params."""
    if not p.qlora:
        return []
    out, why = [], []
    if importlib.util.find_spec("bitsandbytes") is None:
        why.append("bitsandbytes is not installed (pip install bitsandbytes)")
    import torch

    if not torch.cuda.is_available():
        why.append("this machine has no CUDA GPU (torch.cuda.is_available() is False)")
    if why:
        out.append(
            Problem(
                "/qlora",
                "qlora loads the policy in 4-bit with bitsandbytes, which needs a CUDA GPU: " + "; ".join(why),
                "set qlora to false (plain LoRA: params.lora) or validate and run on a CUDA machine",
            )
        )
    if p.lora is None:
        out.append(Problem("/lora", 'qlora trains LoRA adapters on the 4-bit policy: set params.lora (e.g. {"r": 16})'))
    return out


def load_policy_4bit(src, p: SFTParams):
    """The policy in 4-bit NF4 with double quantization on this process's GPU, made ready for k-bit
    training (``peft.prepare_model_for_kbit_training``: norms and head in float32, input gradients on).

    Raises:
        ImportError: without bitsandbytes. OSError/ValueError from transformers.
    """
    import os

    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=compute)
    src._prepare_gguf()  # a GGUF policy is dequantised once; 4-bit loading reads that copy
    loc, kw = src._location()
    model = AutoModelForCausalLM.from_pretrained(loc, quantization_config=cfg, dtype=compute,
                                                 trust_remote_code=src.trust_remote_code,
                                                 device_map={"": int(os.environ.get("LOCAL_RANK", "0"))}, **kw)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=p.gradient_checkpointing)


class MergedQLoRA:
    """What :func:`~rlhf_spec.loops.save.save_policy` reads of a trainer, for a QLoRA run: the
    trained adapters merged into a fresh copy of the policy in its full dtype (merging into the 4-bit
    weights would save a quantized model, which the ``policy`` contract does not allow)."""

    def __init__(self, trainer, src, p: SFTParams):
        self.trainer, self.src, self.p = trainer, src, p
        self.accelerator, self.history = trainer.accelerator, trainer.history

    def full_state_dict(self):
        """None: the weights are taken from :meth:`unwrapped` (no sharded state to gather)."""
        return None

    def unwrapped(self):
        """The policy in its spec dtype (on CPU) with the trained LoRA adapters merged in.

        Raises:
            OSError/ValueError from transformers when the policy cannot be loaded again.
        """
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        adapters = get_peft_model_state_dict(self.accelerator.unwrap_model(self.trainer.model))
        model = apply_lora(self.src.load_causal_lm(), self.p.lora)
        dtype = next(model.parameters()).dtype
        set_peft_model_state_dict(model, {k: v.detach().to("cpu", dtype) for k, v in adapters.items()})
        return model.merge_and_unload()


# ----------------------------------------------------------------------------- the stage


def sft_check(params: SFTParams, spec, inputs) -> list[Problem]:
    """Static checks of ``train``/``sft``: one data source, and QLoRA's requirements (see :func:`qlora_problems`)."""
    out = []
    if not params.dataset and not inputs:
        out.append(Problem("/dataset", "SFT needs data: set params.dataset or give one samples/scored stage in inputs"))
    if params.dataset and inputs:
        out.append(Problem("#/inputs", "SFT reads params.dataset or an input stage, not both"))
    return out + qlora_problems(params)


def train_sft(ctx) -> StageResult:
    """Fine-tune ``params.policy`` on conversations with the assistant-token loss; report the held-out
    loss at the starting weights (``eval_loss_before``) and after training (``eval_loss``).

    Raises:
        ValueError: no usable training sequence, a template that breaks the prefix assumption.
        TrainingDiverged: on a NaN/inf loss.
    """
    p: SFTParams = ctx.params
    rows, held, from_input, undesirable = sft_rows(ctx, p)
    src = ctx.model("policy")
    tok = src.load_tokenizer(padding_side="right")
    if p.chat_template:
        tok.chat_template = p.chat_template
    with ctx.timer("tokenize"):
        train, dropped = build_examples(tok, rows, p, from_input, p.packing)
        test = build_examples(tok, held, p, from_input, False)[0] if held is not None else []
    if not train:
        raise ValueError(f"no SFT sequence to train on ({len(rows)} rows; {dropped} left without assistant tokens by "
                         f"max_length={p.max_length})")
    pad = tok.pad_token_id

    def step(model, mb):
        nll, n = assistant_nll(model, collate([train[i] for i in mb], pad, next(model.parameters()).device))
        loss = nll / max(1, n)
        return loss, {"loss": float(loss.detach()), "tokens": n}

    def evaluate(model) -> dict:
        with ctx.timer("eval"):
            return heldout_loss(model, test, pad, p.eval_batch_size)

    with ctx.timer("load_policy"):
        model = load_policy_4bit(src, p) if p.qlora else src.load_causal_lm()
    trainer = Trainer(p, model, len(train), step, ctx.partial_dir / "checkpoints", ctx.partial_dir / "tensorboard",
                      seed=ctx.seed + 771, progress=ctx.progress, evaluate=evaluate if test else None,
                      eval_every=p.eval_every,
                      run_name=ctx.stage_id)
    before = _loss_before(trainer, lambda m: heldout_loss(m, test, pad, p.eval_batch_size)) if test else {}
    ctx.progress.note("training")
    with ctx.timer("train"):
        metrics = trainer.train()
    with ctx.timer("save"):
        save_policy(ctx, MergedQLoRA(trainer, src, p) if p.qlora else trainer, tok)
    metrics.update(before, train_rows=len(rows), train_sequences=len(train), dropped_no_assistant_tokens=dropped,
                   skipped_undesirable=undesirable,
                   eval_rows=len(held) if held is not None else 0, packing=p.packing,
                   seconds_per_update=seconds_per_update(ctx, metrics))
    return StageResult(metrics=metrics)


def _loss_before(trainer, evaluate) -> dict:
    """The held-out loss at the starting weights (before any update), as ``eval_loss_before``."""
    return {"eval_loss_before": metrics_before(trainer, evaluate)["eval_loss_before"]}
