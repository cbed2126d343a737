"""Generation backends: the sampling settings every backend honours, the chat-prompt helpers, and
the passes of a sampling stage (:func:`generate_passes`; pass seeds: :func:`rlhf_spec.runtime.sampling_seed`).

The built-in backend is ``transformers`` (:mod:`rlhf_spec.backends.transformers`); vLLM ships as the
``rlhf-spec-vllm`` plugin package. A stage names its backend with ``{"uses": ..., "params": ...}``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SamplingParams(BaseModel):
    """Sampling settings shared by ``sample``, ``evaluate`` and online training, for every backend.

    Defaults follow the REBEL tutorial (temperature 0.8, top_p 0.9). Nucleus sampling only: no
    top-k cut-off, as REBEL's vLLM sampler.
    """

    model_config = ConfigDict(extra="forbid")

    temperature: float = Field(0.8, ge=0.0, le=10.0, description="Softmax temperature; 0 means greedy decoding.")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="Most tokens generated per completion.")

    def sampling(self) -> "SamplingParams":
        """These settings alone (a stage's params model may subclass this one)."""
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens)


def generate_passes(engine, prompt_token_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> list:
    """One completion per prompt for each sampling pass; returns one list of P ``Completion`` per seed.

    Pass ``p`` is drawn with ``seeds[p]`` (docs/spec.md, "Seeds"). An engine that defines
    ``generate_passes(prompt_token_ids, sampling, seeds)`` gets all passes at once, so that it can share
    the prompts' prefill and batch the passes together; any other engine gets one
    ``generate(prompt_token_ids, sampling, 1, seed)`` call per pass.

    Args:
        engine: a loaded backend engine (``generate``, maybe ``generate_passes``).
        prompt_token_ids: P prompts as token-id lists (chat template applied).
        sampling: the sampling settings, shared by every pass.
        seeds: one int seed per pass.

    Returns:
        ``len(seeds)`` lists of P completions, pass by pass, prompts in input order.

    Raises:
        whatever the engine raises (out of memory: lower its batch size or ``max_new_tokens``).
    """
    if hasattr(engine, "generate_passes"):
        return engine.generate_passes(prompt_token_ids, sampling, list(seeds))
    return [[c[0] for c in engine.generate(prompt_token_ids, sampling, 1, seed)] for seed in seeds]


def chat_prompt_texts(tokenizer, prompts: list[list[dict]]) -> list[str]:
    """Render chat messages with the tokenizer's chat template and the generation prompt.

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the policy's tokenizer has no chat template; use a chat model or set one")
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts]


def prompt_token_ids(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    """Token ids of chat prompts (template and generation prompt, no extra special tokens), as
    backends take them. A template that starts with BOS (Llama 3) does not get a second one.

    Returns:
        P lists of token ids, one per prompt, unpadded.

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    texts = chat_prompt_texts(tokenizer, prompts)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def prepare_prompts(tokenizer, rows, max_prompt_tokens: int | None):
    """Prompt rows ready for a backend: ``token_ids`` (chat template and generation prompt applied, as
    :func:`prompt_token_ids` gives them) and ``prompt_tokens`` (their count) added, and prompts longer
    than ``max_prompt_tokens`` tokens dropped (``None``: keep all).

    Args:
        tokenizer: the policy's tokenizer, with a chat template.
        rows: a ``datasets.Dataset`` with a ``prompt`` column of chat messages.

    Returns:
        (rows, number skipped as too long).

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    ids = prompt_token_ids(tokenizer, list(rows["prompt"]))
    keep = [i for i, t in enumerate(ids) if max_prompt_tokens is None or len(t) <= max_prompt_tokens]
    rows = rows.select(keep).add_column("token_ids", [ids[i] for i in keep])
    return rows.add_column("prompt_tokens", [len(ids[i]) for i in keep]), len(ids) - len(keep)
