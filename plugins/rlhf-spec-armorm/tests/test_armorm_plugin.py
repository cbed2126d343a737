"""The ArmoRM reward plugin on CPU, with a tiny real model shaped like ArmoRM.

The tiny model is built like ArmoRM: a ``LlamaPreTrainedModel`` with a 2-layer ``LlamaModel``, a
multi-objective linear head and a softmax gate, saved with its own modeling file and an ``auto_map``,
so it loads only with ``trust_remote_code``, exactly like RLHFlow/ArmoRM-Llama3-8B-v0.1. Its forward
returns an output whose reward is in ``score`` (shape (B,)), not in ``logits``, and it reads each
sequence's last token as the one before the first ``config.pad_token_id``, as ArmoRM does.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MODELING = '''
"""A tiny ArmoRM look-alike for tests: a Llama backbone, a multi-objective head, a gate, and ``score``."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput


class TinyArmoConfig(LlamaConfig):
    model_type = "tiny_armo"


@dataclass
class TinyArmoOutput(ModelOutput):
    score: Optional[torch.FloatTensor] = None
    rewards: Optional[torch.FloatTensor] = None


class TinyArmoForScore(LlamaPreTrainedModel):
    config_class = TinyArmoConfig

    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        # like ArmoRM, the head's width is the number of objectives, not num_labels
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # ArmoRM's rule: the last token is the one before the first pad id (the final position if none)
        last = (torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1) % input_ids.shape[-1]
        rewards = self.regression_layer(hidden[torch.arange(input_ids.shape[0]), last])  # (B, objectives)
        gate = torch.softmax(rewards, dim=-1)
        return TinyArmoOutput(score=(gate * rewards).sum(-1), rewards=rewards)
'''

CHATS = [
    ([{"role": "user", "content": "How do I bake bread at home?"}], "Mix flour, water, salt and yeast, knead it, let "
                                                                    "it rise, then bake."),
    ([{"role": "user", "content": "What is the capital of France?"}], "Paris."),
    ([{"role": "user", "content": "Tell me a joke."}], "Why did the chicken cross the road? To get to the other side, "
                                                       "of course."),
    ([{"role": "user", "content": "hi"}], "Hello! How can I help you today?"),
    ([{"role": "user", "content": "Can you help me with something dangerous?"}], "I can't help with that, but I can "
                                                                                 "suggest something safer instead."),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}], "Blue."),
    ([{"role": "user", "content": "Explain a hash function."}],
     "A hash function maps data of any size to a fixed-size value; equal inputs give equal outputs, and good ones "
     "spread "
     "different inputs evenly so collisions are rare."),
    ([{"role": "user", "content": "Count to five."}], "One, two, three, four, five."),
    ([{"role": "user", "content": "Say nothing."}], ""),
    ([{"role": "user", "content": "What's 2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user",
                                                                                          "content": "And times 3?"}],
                                                                                          "12."),
]


def cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rlhf_spec", *args], cwd=str(cwd), env=env, capture_output=True,
                          text=True, timeout=timeout)


def make_tiny_armo(folder: Path, seed: int = 0) -> Path:
    """Save the tiny remote-code reward model (4 objectives) and a chat tokenizer to ``folder``."""
    import torch

    from rlhf_spec.testing import make_tokenizer

    folder.mkdir(parents=True)
    (folder / "modeling_tiny_armo.py").write_text(MODELING)
    spec = importlib.util.spec_from_file_location("modeling_tiny_armo_build", folder / "modeling_tiny_armo.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tok = make_tokenizer([p[-1]["content"] + " " + r for p, r in CHATS])
    torch.manual_seed(seed)
    cfg = mod.TinyArmoConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                             num_objectives=4,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    model = mod.TinyArmoForScore(cfg)
    torch.nn.init.normal_(model.regression_layer.weight,
                          std=1.0)  # rewards of order 1, so the comparison below is not trivially small
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    conf = json.loads((folder / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "modeling_tiny_armo.TinyArmoConfig",
                        "AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoForScore"}
    (folder / "config.json").write_text(json.dumps(conf, indent=2))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from rlhf_spec.testing import make_tiny_policy

    d = tmp_path_factory.mktemp("armorm_tiny")
    prompts = d / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in CHATS))
    return {"dir": d, "armo": make_tiny_armo(d / "armo"), "policy": make_tiny_policy(d / "policy"), "prompts": prompts}


def spec_dict(tiny: dict, trust: bool = True, **params) -> dict:
    p = {"model": "armo", "dtype": "float32", "batch_size": 4}
    p.update(params)
    armo = {"path": str(tiny["armo"])}
    if trust:
        armo["trust_remote_code"] = True
    return {
        "name": "armorm-tiny", "seed": 0, "requires": ["rlhf-spec-armorm>=0.2"],
        "models": {"policy": {"path": str(tiny["policy"])}, "armo": armo},
        "datasets": {"prompts": {"path": str(tiny["prompts"])}},
        "stages": [
            {"id": "sample", "kind": "sample", "uses": "generate",
             "params": {"policy": "policy", "prompts": "prompts", "n": 2, "max_new_tokens": 12, "num_shards": 2,
                        "backend": {"uses": "transformers", "params": {"batch_size": 8}}}},
            {"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"],
             "params": {"reward": {"uses": "armorm", "params": p}, "num_shards": 2}},
        ],
    }


def write(tmp: Path, spec: dict) -> Path:
    path = tmp / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def _source(tiny, trust=True):
    from rlhf_spec import ModelSource

    return ModelSource(name="armo", origin="spec", path=str(tiny["armo"]), trust_remote_code=trust)


def _single(model, seq):
    import torch
    from rlhf_spec_armorm.plugin import score_forward

    score, rewards = score_forward(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long))
    return float(score[0]), rewards[0].tolist()


def test_entry_point_and_plugins_listing(tmp_path):
    eps = [ep for ep in md.entry_points(group="rlhf_spec") if ep.value == "rlhf_spec_armorm.plugin"]
    assert len(eps) == 1, "install the plugin: pip install --no-deps -e plugins/rlhf-spec-armorm"
    assert eps[0].dist.metadata["Name"] == "rlhf-spec-armorm"
    r = cli("plugins", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    rows = [s for s in json.loads(r.stdout)["implementations"] if (s["surface"], s["name"]) == ("reward", "armorm")]
    assert len(rows) == 1 and rows[0]["distribution"] == "rlhf-spec-armorm"


def test_validation_requires_trust_remote_code_on_the_model_entry(tiny, tmp_path):
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, trust=False))), cwd=tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert ("/stages/1/params/reward/params/model: ArmoRM needs remote code; set /models/armo/trust_remote_code to true"
            in r.stderr), r.stderr
    r = cli("validate", str(write(tmp_path, spec_dict(tiny, trust=True))), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_the_model_really_needs_remote_code(tiny):
    """The tiny model is a real remote-code checkpoint: without the flag transformers refuses it."""
    from rlhf_spec_armorm.plugin import ArmoRMParams, load_armorm

    p = ArmoRMParams(model="armo", dtype="float32")
    with pytest.raises((ValueError, OSError)):
        load_armorm(_source(tiny, trust=False), p)
    model, tok = load_armorm(_source(tiny, trust=True), p)
    assert type(model).__name__ == "TinyArmoForScore" and tok.chat_template


def test_bucketed_batches_equal_one_at_a_time(tiny):
    from rlhf_spec_armorm.plugin import ArmoRMParams, encode_chats, load_armorm, score_sequences

    from rlhf_spec import length_batches

    model, tok = load_armorm(_source(tiny), ArmoRMParams(model="armo", dtype="float32"))
    pad = model.config.pad_token_id
    seqs = encode_chats(tok, [p for p, _ in CHATS], [r for _, r in CHATS], max_length=4096)
    lengths = [len(s) for s in seqs]
    assert len(set(lengths)) >= 6, lengths
    assert any(len({lengths[i] for i in b}) > 1 for b in length_batches(lengths, 4, 10_000)), "no batch needs padding"
    batched, objectives = score_sequences(model, seqs, pad, batch_size=4, max_batch_tokens=10_000)
    single = [_single(model, s) for s in seqs]
    assert max(abs(a - b[0]) for a, b in zip(batched, single)) < 1e-5, (batched, single)
    assert max(abs(x - y) for o, b in zip(objectives, single) for x, y in zip(o, b[1])) < 1e-5
    assert max(b[0] for b in single) - min(b[0] for b in single) > 1e-2, (
        "rewards are all alike; the comparison would prove nothing"
    )
    # padding with anything but the model's pad id moves ArmoRM's read position, and the scores change
    wrong = next(t for t in range(len(tok)) if t != pad and all(t not in s for s in seqs))
    shifted, _ = score_sequences(model, seqs, wrong, batch_size=4, max_batch_tokens=10_000)
    assert max(abs(a - b[0]) for a, b in zip(shifted, single)) > 1e-4


def test_truncation_keeps_the_configured_end(tiny):
    from rlhf_spec_armorm.plugin import ArmoRMParams, encode_chats, load_armorm

    _, tok = load_armorm(_source(tiny), ArmoRMParams(model="armo", dtype="float32"))
    full = encode_chats(tok, [CHATS[6][0]], [CHATS[6][1]], max_length=4096)[0]
    right = encode_chats(tok, [CHATS[6][0]], [CHATS[6][1]], max_length=16)[0]
    left = encode_chats(tok, [CHATS[6][0]], [CHATS[6][1]], max_length=16, truncation_side="left")[0]
    assert len(full) > 16 and right == full[:16] and left == full[-16:]


def test_score_stage_end_to_end(tiny, tmp_path):
    """sample (built-in) -> score with this reward through the runner; the reward and every objective
    column match direct scoring, one chat at a time."""
    import datasets
    from rlhf_spec_armorm.plugin import ArmoRMParams, encode_chats, load_armorm

    r = cli("run", str(write(tmp_path, spec_dict(tiny))), "--cache-dir", str(tmp_path / "cache"),
            "--report", str(tmp_path / "r.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr + r.stdout[-2000:]
    stages = {s["id"]: s for s in json.loads((tmp_path / "r.json").read_text())["stages"]}
    scored = datasets.load_from_disk(str(Path(stages["score"]["output"]) / "data"))
    assert len(scored) == 2 * len(CHATS)
    assert [c for c in scored.column_names if c.startswith("reward")] == ["reward"] + [
        f"reward/objective_{j}" for j in range(4)
    ]
    model, tok = load_armorm(_source(tiny), ArmoRMParams(model="armo", dtype="float32"))
    seqs = encode_chats(tok, list(scored["prompt"]), list(scored["completion"]), max_length=4096)
    direct = [_single(model, s) for s in seqs]
    assert max(abs(a[0] - b) for a, b in zip(direct, scored["reward"])) < 1e-5
    assert max(abs(a[1][2] - b) for a, b in zip(direct, scored["reward/objective_2"])) < 1e-5
    m = stages["score"]["metrics"]
    assert (
        m["scored"] == len(scored)
        and abs(m["reward/objective_0_mean"] - sum(scored["reward/objective_0"]) / len(scored)) < 1e-9
    )


def test_reward_contract(tiny):
    from rlhf_spec.plugins import load_registry
    from rlhf_spec.testing import check_contract

    impl = load_registry().rewards["armorm"]
    check_contract(impl, {"model": "armo", "max_length": 4096, "batch_size": 16}, spec_for_key=spec_dict(tiny))
