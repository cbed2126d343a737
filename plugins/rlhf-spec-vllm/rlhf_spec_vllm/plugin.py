"""The ``vllm`` generation backend: n completions per prompt with vLLM on one or more GPUs.

It is a drop-in replacement for the built-in ``transformers`` backend wherever a spec names a backend
(``sample``, ``evaluate``, online training): the same prompt token ids in, the same completions out,
and the same seeding scheme (docs/spec.md, "Seeds"): every request of a call is sampled with the
call's seed through ``SamplingParams(seed=...)``, as REBEL's ``generate.py`` seeds each pass p with
``p * 50``. vLLM is imported inside :func:`load` only, so ``rlhf-spec validate``, ``plan``,
``plugins`` and ``schema`` work where vLLM is not installed.

Source of the defaults: the REBEL repository's ``src/ultrafeedback_largebatch/generate.py`` and the
REBEL tutorial (Gao et al. 2024, "REBEL: Reinforcement Learning via Regressing Relative Rewards",
arXiv:2404.16767): ``SamplingParams(temperature=0.8, top_p=0.9, max_tokens=2048, seed=p*50)``,
tensor parallelism 8.
"""

from __future__ import annotations

import os
from typing import Annotated, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

from rlhf_spec import BackendImpl, Completion, NotInKey, hookimpl

INSTALL_HINT = (
    "the 'vllm' backend needs vLLM, which is not installed in this environment; "
    "install it with `pip install rlhf-spec-vllm[vllm]` (or `pip install vllm`). "
    "vLLM runs on a CUDA GPU; on a CPU-only machine use {\"uses\": \"transformers\"} as the backend"
)


class VllmParams(BaseModel):
    """Params of the ``vllm`` backend."""

    model_config = ConfigDict(extra="forbid")

    tensor_parallel_size: int = Field(
        1, ge=1, le=1024, description="GPUs the model is split over (vLLM tensor_parallel_size; REBEL tutorial: 8). "
        "Part of the key: it changes floating-point reduction order, hence samples.")
    gpu_memory_utilization: Annotated[float, NotInKey()] = Field(
        0.9, gt=0.0, le=1.0, description="Share of each GPU's memory vLLM may take (weights and KV cache). Not part of "
                                         "the key.")
    dtype: Optional[Literal["auto", "bfloat16", "float16", "float32"]] = Field(
        None, description="vLLM weights dtype; default: the policy's /models dtype ('auto' lets vLLM pick from the "
                          "config).")
    max_model_len: Optional[int] = Field(
        None, ge=16, description="vLLM context length (prompt + completion); default: the model's own. Lower it to "
                                 "save KV-cache memory.")


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


def engine_kwargs(src, p: VllmParams) -> dict:
    """Keyword arguments of ``vllm.LLM`` for model source ``src`` (a :class:`rlhf_spec.ModelSource`).

    A local GGUF policy is given to vLLM as the ``.gguf`` file with its folder as the tokenizer; a hub
    model with its resolved revision; a stage output (a trained policy) as its folder.
    """
    kw: dict = {"tensor_parallel_size": p.tensor_parallel_size, "gpu_memory_utilization": p.gpu_memory_utilization,
                "dtype": p.dtype or src.dtype or "auto", "trust_remote_code": bool(src.trust_remote_code)}
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
        if src.tokenizer_revision:
            kw["tokenizer_revision"] = src.tokenizer_revision
    if p.max_model_len:
        kw["max_model_len"] = p.max_model_len
    return kw


class VllmEngine:
    """A vLLM ``LLM`` generating from prompt token ids (see :meth:`generate`).

    Args:
        llm: a ``vllm.LLM`` (or an object with the same ``generate`` contract).
        sampling_cls: ``vllm.SamplingParams`` (or the same contract).
        eos_ids: token ids that end a completion (for ``finish_reason``).
    """

    def __init__(self, llm, sampling_cls, eos_ids=()):
        self.llm, self.sampling_cls, self.eos_ids = llm, sampling_cls, set(eos_ids)

    def generate(self, prompt_token_ids: list[list[int]], sampling, n: int, seed: int) -> list[list[Completion]]:
        """``n`` completions per prompt: one vLLM call with ``SamplingParams(n, temperature, top_p,
        max_tokens, seed)``; returns P lists of ``n`` :class:`rlhf_spec.Completion`.

        Completion texts have special tokens removed and whitespace stripped; token ids include the
        end-of-turn token when one was produced.
        """
        sp = self.sampling_cls(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                               max_tokens=sampling.max_new_tokens, seed=seed)
        results = self.llm.generate([{"prompt_token_ids": list(t)} for t in prompt_token_ids], sp, use_tqdm=False)
        out = []
        for res in results:
            out.append([Completion(token_ids=list(c.token_ids), text=c.text.strip(),
                                   finish_reason="stop" if getattr(c, "finish_reason", "stop") == "stop" else "length")
                        for c in res.outputs])
        return out


def load(policy, params: VllmParams, ctx) -> VllmEngine:
    """Start a vLLM engine for ``policy``.

    Raises:
        RuntimeError: vLLM is not installed (with the install command).
    """
    LLM, VSamplingParams = import_vllm()
    tok = policy.load_tokenizer()
    eos = tok.eos_token_id if isinstance(tok.eos_token_id, list) else [tok.eos_token_id]
    return VllmEngine(LLM(**engine_kwargs(policy, params)), VSamplingParams, eos)


@hookimpl
def rlhf_spec_register_backends(register):
    register(BackendImpl(name="vllm", params=VllmParams, load=load, version="2",
                         resources=lambda p: {"gpus": p.tensor_parallel_size},
                         description="vLLM on one or more GPUs (tensor parallel), seeded per request"))
