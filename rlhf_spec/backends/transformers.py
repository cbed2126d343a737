"""The built-in ``transformers`` generation backend: batched ``model.generate`` on CPU or one GPU.

Prompts arrive as token ids. They are left-padded into batches of ``batch_size`` requests (sorted
longest first when ``sort_by_length``, so a batch pads to similar lengths). Each batch is seeded with
``derive_seed(seed, crc32 of its prompt tokens)``, so a completion depends only on the call's seed and
the batch it was generated in, never on what ran before in the process. Tokens are drawn by
:class:`~rlhf_spec.backends.nucleus.NucleusSampler` (``sampler="candidates"``, the default) or by
generate's own sampler (``sampler="transformers"``).
"""

from __future__ import annotations

import zlib
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..hookspecs import hookimpl
from ..records import BackendImpl, Completion
from ..runtime import derive_seed
from . import SamplingParams


class TransformersParams(BaseModel):
    """Params of the ``transformers`` backend."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(8, ge=1, le=4096, description="Requests per generate call. It fixes batch composition (and "
                                                          "so the random stream), so it is part of the key.")
    sort_by_length: bool = Field(True, description="Batch prompts longest first to cut padding.")
    dtype: Literal["model", "float32", "bfloat16", "float16"] = Field(
        "model", description="Weights dtype for generation; 'model' uses the /models entry's dtype (float32 on CPU). "
        "bfloat16 roughly doubles CPU throughput where the CPU has bf16 instructions (AVX-512 BF16, AMX); it changes "
        "the samples, so it is part of the key.")
    cache: Literal["static", "dynamic"] = Field(
        "static", description="KV cache: 'static' preallocates it for the batch's prompt plus max_new_tokens (fewer "
                              "reallocations; "
        "needed for compile), 'dynamic' grows it token by token.")
    prefill_batch_tokens: int = Field(
        2048, ge=0, le=1_048_576, description="Prefill each distinct prompt once, in length buckets of at most this "
                                              "many "
        "padded tokens, and copy its keys and values to the rows that share it (rlhf_spec.backends.prefill); 0 lets "
        "generate run every row's prompt, padded to the batch's longest. Bucket shapes change bf16 rounding, so it is "
        "part of the key.")
    compile: bool = Field(
        False, description="torch.compile the forward pass (static cache only). Compiling takes about a minute per "
                           "batch shape "
        "and paid off on GPUs, not on a 2-core CPU in our measurements (docs/benchmarks.md).")
    sampler: Literal["candidates", "transformers"] = Field(
        "candidates", description="How a token is drawn. 'candidates': the nucleus is found among the most likely "
        "tokens (rows whose nucleus is larger are sorted in full) and drawn with a per-batch generator "
        "(rlhf_spec.backends.nucleus); the same distribution as transformers' top-p with much less work per step "
        "on CPU. 'transformers': generate's own top-p warper and multinomial draw, token for token what a plain "
        "generate loop with the same seed writes.")


def _stop_ids(tokenizer) -> set:
    eos = tokenizer.eos_token_id
    return {tokenizer.pad_token_id, *(eos if isinstance(eos, list) else [eos])}


class TransformersEngine:
    """A causal LM and its tokenizer, generating with ``model.generate`` (see the module docstring).

    Args:
        model: a causal LM in eval mode (its device is used).
        tokenizer: its tokenizer (pad and EOS ids).
        params: :class:`TransformersParams`.
    """

    def __init__(self, model, tokenizer, params: TransformersParams):
        self.model, self.tokenizer, self.p = model, tokenizer, params
        self.stop = _stop_ids(tokenizer)

    def _own_sampler(self, sampling: SamplingParams) -> bool:
        return self.p.sampler == "candidates" and sampling.temperature > 0

    def _config(self, sampling: SamplingParams):
        from transformers import GenerationConfig

        greedy = sampling.temperature <= 0 or self._own_sampler(sampling)
        extra: dict = {}
        if self.p.cache == "static" and not self.p.prefill_batch_tokens:  # else the engine passes its own cache
            extra["cache_implementation"] = "static"
        if self.p.compile:
            from transformers.generation.configuration_utils import CompileConfig

            cc = CompileConfig(fullgraph=False, dynamic=False)
            cc._compile_all_devices = True  # transformers compiles on GPUs only unless asked
            extra["compile_config"] = cc
        else:
            extra["disable_compile"] = True
        return GenerationConfig(
            do_sample=not greedy, temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None if greedy else 0,  # nucleus sampling only (None would mean transformers' default top-k of 50)
            max_new_tokens=sampling.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id, **extra)

    def _empty_cache(self, max_cache_len: int):
        from transformers import DynamicCache, StaticCache

        if self.p.cache == "static":
            return StaticCache(config=self.model.config, max_cache_len=max_cache_len)
        return DynamicCache(config=self.model.config)

    def _completion(self, row: list[int]) -> Completion:
        k = 0
        while k < len(row) and row[k] not in self.stop:
            k += 1
        stopped = k < len(row)
        ids = row[: k + 1] if stopped else row
        text = self.tokenizer.decode(row[:k], skip_special_tokens=True).strip()
        return Completion(token_ids=ids, text=text, finish_reason="stop" if stopped else "length")

    def generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams, n: int,
                 seed: int) -> list[list[Completion]]:
        """``n`` completions for each of P prompts (token-id lists), all drawn with ``seed``; returns P lists of ``n``.

        Raises:
            torch.OutOfMemoryError / MemoryError: lower ``batch_size`` or ``max_new_tokens``.
        """
        return self._generate(prompt_token_ids, sampling, [seed] * n)

    def generate_passes(self, prompt_token_ids: list[list[int]], sampling: SamplingParams,
                        seeds: list[int]) -> list[list[Completion]]:
        """One completion per prompt for each seed in ``seeds`` (the stages' sampling passes); returns one list of P
        completions per seed.

        With the candidate sampler the passes are generated together: a prompt's samples share one prefill and
        one decoding batch, and each is drawn with a generator seeded by its own pass seed and its batch.
        generate's own sampler draws from the global RNG, one seed per call, so it runs one call per pass.
        Greedy passes (temperature 0) do not depend on their seeds and are decoded once.

        Raises:
            torch.OutOfMemoryError / MemoryError: lower ``batch_size`` or ``max_new_tokens``.
        """
        if sampling.temperature <= 0:  # greedy passes ignore their seeds: decode once
            once = self._generate(prompt_token_ids, sampling, seeds[:1])
            return [[per[0] for per in once] for _ in seeds]
        if len(set(seeds)) > 1 and not self._own_sampler(sampling):
            return [[c[0] for c in self._generate(prompt_token_ids, sampling, [s])] for s in seeds]
        out = self._generate(prompt_token_ids, sampling, list(seeds))
        return [[per[j] for per in out] for j in range(len(seeds))]

    def _generate(self, prompt_token_ids: list[list[int]], sampling: SamplingParams,
                  seeds: list[int]) -> list[list[Completion]]:
        """Sample ``j`` of every prompt drawn with ``seeds[j]``; returns P lists of ``len(seeds)``."""
        import torch

        from .prefill import cache_kwarg, left_padded, prefill_cache

        requests = [(i, j) for i in range(len(prompt_token_ids)) for j in range(len(seeds))]
        order = list(range(len(requests)))
        if self.p.sort_by_length:
            order.sort(key=lambda r: -len(prompt_token_ids[requests[r][0]]))
        cfg, kwarg = self._config(sampling), cache_kwarg(self.model)
        done: dict[int, Completion] = {}
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.p.batch_size):
            idx = order[start : start + self.p.batch_size]
            seqs = [prompt_token_ids[requests[r][0]] for r in idx]
            width = max(len(s) for s in seqs)
            ids, mask = left_padded(seqs, width, pad, self.device)
            extra = {}
            if self.p.prefill_batch_tokens:
                cache = prefill_cache(self.model, seqs, pad, self._empty_cache(width + sampling.max_new_tokens),
                                      self.p.prefill_batch_tokens)
                if cache is not None:
                    extra[kwarg] = cache
            batch_hash = zlib.crc32(repr(seqs).encode())
            torch.manual_seed(derive_seed(seeds[requests[idx[0]][1]], batch_hash))  # generate's own sampler: one seed
            if self._own_sampler(sampling):
                extra["logits_processor"] = self._sampler(sampling, [seeds[requests[r][1]] for r in idx], batch_hash)
            with torch.no_grad():
                gen = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg, **extra)
            for r, row in zip(idx, gen[:, width:].tolist()):
                done[r] = self._completion(row)
        out: list[list[Completion]] = [[] for _ in prompt_token_ids]
        for r, (i, _) in enumerate(requests):
            out[i].append(done[r])
        return out

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _sampler(self, sampling: SamplingParams, row_seeds: list[int], batch_hash: int):
        """The candidate nucleus sampler for one batch: a generator per distinct seed, seeded with the batch's hash."""
        import torch
        from transformers import LogitsProcessorList

        from .nucleus import NucleusSampler

        def rng(seed: int):
            return torch.Generator(device=self.device).manual_seed(derive_seed(seed, batch_hash))

        distinct = sorted(set(row_seeds))
        if len(distinct) == 1:
            generator = rng(distinct[0])
        else:
            generator = [(torch.tensor([k for k, s in enumerate(row_seeds) if s == seed], device=self.device),
                          rng(seed))
                         for seed in distinct]
        return LogitsProcessorList([NucleusSampler(sampling.temperature, sampling.top_p, generator)])


def load(policy, params: TransformersParams, ctx) -> TransformersEngine:
    """Load ``policy`` (a :class:`~rlhf_spec.models.ModelSource`) and its tokenizer onto the stage's device.

    Raises:
        OSError / ValueError from transformers when the files are missing or unreadable.
    """
    from ..runtime import torch_dtype

    tok = policy.load_tokenizer(padding_side="left")
    dtype = None if params.dtype == "model" else torch_dtype(params.dtype)
    model = policy.load_causal_lm(dtype=dtype, device=ctx.device)
    return TransformersEngine(model, tok, params)


def _check(params: TransformersParams, spec) -> list:
    from ..errors import Problem

    if params.compile and params.cache != "static":
        return [Problem("/compile", "compiling needs the static KV cache", "set cache to 'static'")]
    return []


@hookimpl
def rlhf_spec_register_backends(register):
    register(BackendImpl(name="transformers", params=TransformersParams, load=load, version="3", check=_check,
                         description="batched transformers generate on CPU or one GPU"))
