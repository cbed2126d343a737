"""The ``sample``/``vllm`` stage: n completions per prompt with vLLM on one or more GPUs.

It is a drop-in replacement for the built-in ``sample``/``transformers`` stage: same model and
dataset references, same output columns, same seeding scheme. vLLM is imported inside :func:`run`
only, so ``rlhf-spec validate``, ``plan``, ``plugins`` and ``schema`` work where vLLM is not installed.

Source of the defaults: the REBEL repository's ``src/ultrafeedback_largebatch/generate.py`` and the
REBEL tutorial (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards",
arXiv:2404.16767): 5 passes of ``SamplingParams(temperature=0.8, top_p=0.9, max_tokens=2048,
seed=p*50)``, tensor parallelism 8.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import Field

from rlhf_spec.generation import SamplingParams as _Sampling
from rlhf_spec.hookspecs import POLICY, SAMPLES, DatasetRef, ModelRef, NotInKey, StageImpl, StageResult, hookimpl
from rlhf_spec.results import samples_result

INSTALL_HINT = (
    "the 'vllm' sample stage needs vLLM, which is not installed in this environment; "
    "install it with `pip install rlhf-spec-vllm[vllm]` (or `pip install vllm`). "
    "vLLM runs on a CUDA GPU; on a CPU-only machine use \"uses\": \"transformers\" for the sample stage"
)

#: Output columns, in order; the same as the built-in ``sample``/``transformers`` stage writes.
OUTPUT_COLUMNS = ("prompt_id", "prompt", "sample_index", "completion", "completion_tokens", "prompt_tokens")


class VllmSampleParams(_Sampling):
    """Params of ``sample``/``vllm``.

    ``temperature``, ``top_p`` and ``max_new_tokens`` (vLLM's ``max_tokens``) come from
    :class:`rlhf_spec.generation.SamplingParams`, with the same bounds as the built-in stage.
    """

    policy: Annotated[str, ModelRef(artifacts=(POLICY,))] = Field(
        ..., description="The policy: a /models name or the id of a train stage (a save_pretrained folder)."
    )
    prompts: Annotated[str, DatasetRef(columns=("prompt",))] = Field(..., description="A /datasets name with prompts.")
    n: int = Field(5, ge=1, le=1024, description="Completions per prompt (REBEL: 5).")
    mode: Literal["passes", "n_per_request"] = Field(
        "passes",
        description="'passes': n passes over the prompts, one completion each, pass p seeded p * seed_stride plus the "
        "spec seed (REBEL's generate.py, and the built-in sample stage). 'n_per_request': one request per prompt with "
        "SamplingParams(n=n), seeded with the spec seed.",
    )
    seed_stride: int = Field(50, ge=0, description="Pass p is seeded p * seed_stride (+ the spec seed); REBEL: 50.")
    tensor_parallel_size: int = Field(
        1, ge=1, le=1024, description="GPUs the model is split over (vLLM tensor_parallel_size; REBEL tutorial: 8). "
        "Part of the key: it changes floating-point reduction order, hence samples."
    )
    gpu_memory_utilization: Annotated[float, NotInKey()] = Field(
        0.9, gt=0.0, le=1.0, description="Share of each GPU's memory vLLM may take (weights and KV cache). Not part of the key."
    )
    dtype: Optional[Literal["auto", "bfloat16", "float16", "float32"]] = Field(
        None, description="vLLM weights dtype; default: the policy's /models dtype ('auto' lets vLLM pick from the config)."
    )
    max_model_len: Optional[int] = Field(
        None, ge=16, description="vLLM context length (prompt + completion); default: the model's own. Lower it to save KV-cache memory."
    )
    max_prompt_tokens: Optional[int] = Field(
        None, ge=1, description="Skip prompts longer than this (chat template and generation prompt included) before sampling."
    )
    num_shards: int = Field(8, ge=1, le=100000, description="Content-defined shards committed one by one, so a killed run resumes.")


def import_vllm():
    """Import vLLM's ``LLM`` and ``SamplingParams``.

    Returns:
        ``(LLM, SamplingParams)`` classes.

    Raises:
        RuntimeError: when vLLM is not installed; the message says how to install it.
    """
    try:
        from vllm import LLM, SamplingParams
    except ImportError as exc:
        raise RuntimeError(f"{INSTALL_HINT} ({type(exc).__name__}: {exc})") from None
    return LLM, SamplingParams


def engine_kwargs(src, p: VllmSampleParams, seed: int) -> dict:
    """Keyword arguments of ``vllm.LLM`` for model source ``src`` (a :class:`rlhf_spec.models.ModelSource`).

    A local GGUF policy is given to vLLM as the ``.gguf`` file with its folder as the tokenizer; a hub
    model with its resolved revision; a stage output (a trained policy) as its folder.
    """
    import os

    kw: dict = {"tensor_parallel_size": p.tensor_parallel_size, "gpu_memory_utilization": p.gpu_memory_utilization,
                "dtype": p.dtype or src.dtype or "auto", "seed": seed, "trust_remote_code": bool(src.trust_remote_code)}
    if src.path:
        if src.gguf_file:
            kw["model"] = os.path.join(src.path, src.gguf_file)
            kw["tokenizer"] = src.tokenizer or src.path
        else:
            kw["model"] = src.path
    else:
        kw["model"] = src.hub
        if src.revision:
            kw["revision"] = src.revision
    if src.tokenizer and "tokenizer" not in kw:
        kw["tokenizer"] = src.tokenizer
    if p.max_model_len:
        kw["max_model_len"] = p.max_model_len
    return kw


def run(ctx) -> StageResult:
    """Sample ``n`` completions for every prompt with vLLM, shard by shard.

    Prompts are rendered with the policy tokenizer's chat template (generation prompt added) and
    given to vLLM as token ids without extra special tokens, so a template that already starts with
    BOS (Llama 3) does not get a second one.

    Output rows (one per prompt and pass): ``prompt_id`` (str), ``prompt`` (messages), ``sample_index``
    (int, the pass or the output index), ``completion`` (str, special tokens removed, whitespace
    stripped), ``completion_tokens`` (int, generated tokens including a final end-of-turn token),
    ``prompt_tokens`` (int).

    Raises:
        RuntimeError: vLLM is not installed (with the install command), or the tokenizer has no chat template.
    """
    LLM, VSamplingParams = import_vllm()
    import datasets

    from rlhf_spec.generation import chat_prompt_texts, prompt_lengths

    p: VllmSampleParams = ctx.params
    with ctx.timer("load_data"):
        prompts = ctx.dataset("prompts")
    src = ctx.model("policy")
    tok = src.load_tokenizer()
    texts = chat_prompt_texts(tok, list(prompts["prompt"]))
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    lengths = prompt_lengths(tok, texts)
    keep = [i for i, n in enumerate(lengths) if p.max_prompt_tokens is None or n <= p.max_prompt_tokens]
    skipped = len(prompts) - len(keep)
    prompts = prompts.select(keep).add_column("prompt_tokens", [lengths[i] for i in keep])
    prompts = prompts.add_column("token_ids", [ids[i] for i in keep])
    with ctx.timer("load_policy"):
        ctx.progress.note("starting vLLM")
        llm = LLM(**engine_kwargs(src, p, ctx.seed))
    ctx.progress.note("sampling")
    total_tokens = [0]

    def sampling(seed: int, n: int):
        return VSamplingParams(n=n, temperature=p.temperature, top_p=p.top_p, max_tokens=p.max_new_tokens, seed=seed)

    def process(rows, shard: int):
        out = {c: [] for c in OUTPUT_COLUMNS}
        pids, msgs, plens = list(rows["prompt_id"]), list(rows["prompt"]), list(rows["prompt_tokens"])
        reqs = [{"prompt_token_ids": list(t)} for t in rows["token_ids"]]
        if p.mode == "passes":
            plan = [(pas, sampling(ctx.seed + pas * p.seed_stride, 1)) for pas in range(p.n)]
        else:
            plan = [(None, sampling(ctx.seed, p.n))]
        for pas, sp in plan:
            results = llm.generate(reqs, sp, use_tqdm=False)
            for k, res in enumerate(results):
                for j, comp in enumerate(res.outputs):
                    out["prompt_id"].append(pids[k])
                    out["prompt"].append(msgs[k])
                    out["sample_index"].append(pas if pas is not None else j)
                    out["completion"].append(comp.text.strip())
                    out["completion_tokens"].append(len(comp.token_ids))
                    out["prompt_tokens"].append(plens[k])
                    total_tokens[0] += len(comp.token_ids)
        ctx.progress.advance(len(rows))
        return datasets.Dataset.from_dict(out)

    with ctx.timer("generate"):
        result = ctx.run_shards(prompts, process, p.num_shards)
    return samples_result(ctx, len(prompts), skipped, result, total_tokens[0])


def resources(p: VllmSampleParams) -> dict:
    """What ``rlhf-spec plan`` shows: one process holding ``tensor_parallel_size`` GPUs, and n samples per prompt."""
    return {"processes": 1, "gpus": p.tensor_parallel_size, "samples_per_prompt": p.n}


@hookimpl
def rlhf_spec_register_stages(register):
    register(StageImpl(kind="sample", name="vllm", params=VllmSampleParams, run=run, version="1",
                       inputs=(), min_inputs=0, max_inputs=0, output=SAMPLES,
                       description="n completions per prompt with vLLM (tensor parallel GPUs)",
                       resources=resources))
