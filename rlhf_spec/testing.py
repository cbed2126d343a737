"""Helpers for testing rlhf-spec and its plugins: tiny real models and the plugin contract.

* :func:`make_tiny_policy` / :func:`make_tiny_reward_model` build random-initialised
  transformers models with a real (small, trained in-process) tokenizer and a chat
  template, saved as ``save_pretrained`` folders. They load and run in well under a second.
* :func:`check_stage_contract` checks what every plugin must satisfy: the params
  model exports a JSON Schema, rejects unknown keys, and the stage's cache key is
  stable across processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "[CLS]", "[SEP]"]

_DEFAULT_TEXT = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, knead, rest and bake.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side.",
    "I can't help with that request, but I can suggest something safer instead.",
    "Human: hello there. Assistant: hi, how can I help you today?",
]


def make_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 256):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in-process, with a chat template.

    Special tokens: ``<pad>`` (pad), ``<|end|>`` (end of turn, EOS), role markers, ``[CLS]``/``[SEP]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts or _DEFAULT_TEXT) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_policy(folder: str | os.PathLike, seed: int = 0, texts: Optional[Iterable[str]] = None) -> Path:
    """Save a random-initialised 2-layer ``LlamaForCausalLM`` (hidden 32) and its tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(texts)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_reward_model(folder: str | os.PathLike, seed: int = 0, texts: Optional[Iterable[str]] = None) -> Path:
    """Save a random-initialised 2-layer ``BertModel`` backbone (hidden 32) and its tokenizer to ``folder``.

    Load it with ``AutoModelForSequenceClassification(num_labels=1)`` for a fresh scalar head.
    """
    import torch
    from transformers import BertConfig, BertModel

    tok = make_tokenizer(texts)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(folder)
    tok.chat_template = None
    tok.save_pretrained(folder)
    return Path(folder)


def hh_rows(path: str | os.PathLike, n: int) -> list[dict]:
    """The first ``n`` rows of an hh-rlhf jsonl(.gz) file."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def check_stage_contract(impl, example_params: dict, spec_for_key: Optional[dict] = None) -> None:
    """Assert the plugin contract for one registered :class:`~rlhf_spec.hookspecs.StageImpl`.

    * the params model exports a JSON Schema and accepts ``example_params``;
    * it rejects an unknown key (``extra="forbid"``);
    * if ``spec_for_key`` (a whole spec dict using the stage) is given, ``rlhf-spec plan --json``
      in two fresh processes gives the same keys.

    Raises:
        AssertionError: naming the part of the contract that fails.
    """
    from pydantic import ValidationError

    schema = impl.params.model_json_schema()
    assert schema.get("type") == "object", f"{impl.kind}/{impl.name}: params schema is not an object"
    impl.params.model_validate(example_params)
    try:
        impl.params.model_validate({**example_params, "surely_not_a_param": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{impl.kind}/{impl.name}: params model accepts unknown keys; use extra='forbid'")
    if spec_for_key is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            sp = Path(d) / "spec.json"
            sp.write_text(json.dumps(spec_for_key))
            keys = []
            for _ in range(2):
                out = subprocess.run([sys.executable, "-m", "rlhf_spec", "plan", str(sp), "--json", "--cache-dir", str(Path(d) / "c")],
                                     capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONHASHSEED="random"))
                keys.append([r["key"] for r in json.loads(out.stdout)])
            assert keys[0] == keys[1], f"{impl.kind}/{impl.name}: cache keys differ between processes"
