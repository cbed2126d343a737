"""The offline family on tiny real models: SFT (assistant mask, packing, held-out loss), best-of-n,
IPO/SimPO/ORPO/KTO through the runner, and the static checks (QLoRA without CUDA, KTO batch size)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from conftest import (data_file, entry_dir, keep_stages, manifests, mini_spec, registry_fixture, run_inprocess,
                      spec_problems, stage_of, stages_of, write_spec)

ALPACA = "alpaca_eval/gpt4__model_outputs.json"
KTO = "llama-factory/kto_en_demo.json"


# ----------------------------------------------------------------------------- fixtures and helpers


# the installed plugins, the offline stages among them
registry = registry_fixture(require=[("train", "sft"), ("filter", "best-of-n")], strict=True, install=True)


def base_spec(models: dict, hh: Path) -> dict:
    """sample (3 per prompt) -> score -> pair (2 test pairs) on tiny models: the data the trainers read. The
    mini spec without REBEL, on 10 prompts, each stage in one shard."""
    spec = keep_stages(mini_spec(models, hh), "sample", "score", "pair")
    spec["name"] = "offline"
    spec["datasets"]["prompts"]["limit"] = 10
    sample = stage_of(spec, "sample")["params"]
    sample.update(n=3, num_shards=1)
    sample["backend"]["params"]["batch_size"] = 8
    stage_of(spec, "score")["params"]["num_shards"] = 1
    stage_of(spec, "pair")["params"]["test_size"] = 2
    return spec


TRAIN = {"policy": "policy", "learning_rate": 1e-2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "epochs": 1.0,
         "max_prompt_tokens": 128, "max_response_tokens": 16, "save_every": 100}


def run_spec_inprocess(spec: dict, folder: Path, cache: Path, *extra: str) -> dict:
    """Write ``spec`` into ``folder`` and run it in this process; assert it succeeds; its stages by id."""
    code, rep = run_inprocess(write_spec(folder, spec), cache, folder / "report.json", *extra)
    assert code == 0, rep.get("error")
    return stages_of(rep)


def memo_keys(cache: Path, name: str) -> list[str]:
    return [k for k, m in manifests(cache).items() if m["stage"].get("memo") == name]


def moved(out: str, start: Path) -> bool:
    """Whether the saved policy under ``out`` differs from the starting weights (same tensor names)."""
    from safetensors.torch import load_file

    a, b = load_file(str(Path(out) / "model" / "model.safetensors")), load_file(str(start / "model.safetensors"))
    assert a.keys() == b.keys()
    return any(not (a[k] == b[k]).all() for k in a)


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory, tiny_models, hh_file, registry) -> Path:
    """The sample -> score -> pair entries, computed once; tests copy the cache and add their stages."""
    d = tmp_path_factory.mktemp("offline_base")
    st = run_spec_inprocess(base_spec(tiny_models, hh_file), d, d / "cache")
    assert st["pair"]["metrics"]["test"] == 2 and st["pair"]["metrics"]["train"] >= 4, st["pair"]["metrics"]
    return d / "cache"


def with_stages(tiny_models, hh_file, *stages) -> dict:
    spec = base_spec(tiny_models, hh_file)
    spec["stages"] += list(stages)
    return spec


def own_cache(base_cache: Path, tmp_path: Path) -> Path:
    shutil.copytree(base_cache, tmp_path / "cache")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_models["policy"]))


CONVERSATION = [{"role": "user", "content": "How do I bake bread at home?"},
                {"role": "assistant", "content": "Mix flour, water, salt and yeast."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."}]


# ----------------------------------------------------------------------------- SFT: the mask, packing


def hand_built(tok, messages, trained: set) -> tuple[list[int], list[bool]]:
    """Token ids and mask of the tiny chat template written out piece by piece: ``<|role|>`` + content +
    ``<|end|>`` per turn, the mask on the content and ``<|end|>`` of the assistant turns in ``trained``."""
    ids, mask = [], []
    for i, m in enumerate(messages):
        for piece, on in ((f"<|{m['role']}|>", False), (m["content"], i in trained), ("<|end|>", i in trained)):
            t = tok(piece, add_special_tokens=False)["input_ids"]
            ids += t
            mask += [on] * len(t)
    return ids, mask


def test_assistant_mask_is_exactly_the_assistant_tokens(tok, tiny_models):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_spec.algorithms.conversation import assistant_nll, assistant_spans, collate, mask_by_token_prefix, tokenize_conversation

    want_ids, want_mask = hand_built(tok, CONVERSATION, {1, 3})
    ex = tokenize_conversation(tok, CONVERSATION)
    assert ex.input_ids == want_ids and ex.loss_mask == want_mask
    assert sum(want_mask) >= 8 and not all(want_mask)
    # the slow-tokenizer path (token prefixes) finds the same mask
    assert mask_by_token_prefix(tok, *assistant_spans(tok, CONVERSATION)) == (want_ids, want_mask)
    # only the final reply
    last = tokenize_conversation(tok, CONVERSATION, turns="last")
    assert last.loss_mask == hand_built(tok, CONVERSATION, {3})[1]
    # truncation keeps a prefix of both
    short = tokenize_conversation(tok, CONVERSATION, max_length=10)
    assert short.input_ids == want_ids[:10] and short.loss_mask == want_mask[:10]

    # the loss is the mean NLL over exactly those tokens
    model = AutoModelForCausalLM.from_pretrained(str(tiny_models["policy"])).eval()
    with torch.no_grad():
        nll, n = assistant_nll(model, collate([ex], tok.pad_token_id))
        logp = torch.log_softmax(model(input_ids=torch.tensor([want_ids])).logits[0].float(), -1)
    manual = -sum(float(logp[t - 1, want_ids[t]]) for t in range(1, len(want_ids)) if want_mask[t])
    assert n == sum(want_mask[1:]) and float(nll) == pytest.approx(manual, rel=1e-5)


def test_a_template_that_rewrites_earlier_turns_is_refused(tok):
    from rlhf_spec.algorithms.conversation import tokenize_conversation

    t = tok.__class__.from_pretrained(tok.name_or_path)
    t.chat_template = ("{% for m in messages %}{% if loop.last %}[last]{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>"
                       "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    with pytest.raises(ValueError, match="prefix"):
        tokenize_conversation(t, CONVERSATION)
    t.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_conversation(t, CONVERSATION)


def test_packing_gives_blocks_of_exactly_max_length(tok):
    from rlhf_spec.algorithms.conversation import pack_examples, tokenize_conversation

    convs = [[{"role": "user", "content": f"question {i} about bread"}, {"role": "assistant", "content": "Mix flour and water " * (i + 1)}]
             for i in range(6)]
    examples = [tokenize_conversation(tok, c) for c in convs]
    stream = [t for ex in examples for t in ex.input_ids]
    stream_mask = [m for ex in examples for m in ex.loss_mask]
    blocks = pack_examples(examples, 16)
    assert blocks and all(len(b.input_ids) == 16 and len(b.loss_mask) == 16 for b in blocks)
    # the stream cut every 16 tokens, the remainder and blocks without an assistant token to predict dropped
    starts = [k for k in range(0, len(stream) - 15, 16) if any(stream_mask[k + 1 : k + 16])]
    assert 0 < len(starts) < len(stream) // 16
    assert [b.input_ids for b in blocks] == [stream[k : k + 16] for k in starts]
    assert [b.loss_mask for b in blocks] == [stream_mask[k : k + 16] for k in starts]
    with pytest.raises(ValueError, match="fewer than one block"):
        pack_examples(examples[:1], 10_000)


# ----------------------------------------------------------------------------- SFT through the runner


def test_sft_lowers_the_heldout_loss(tmp_path, tiny_models, registry):
    spec = {"name": "sft", "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"alpaca": {"path": str(data_file(ALPACA)), "adapter": "alpaca", "limit": 40}},
            "stages": [{"id": "sft", "kind": "train", "uses": "sft",
                        "params": {"policy": "policy", "dataset": "alpaca", "eval_size": 8, "max_length": 128, "learning_rate": 5e-3,
                                   "warmup_ratio": 0.0, "per_device_train_batch_size": 8, "epochs": 4, "save_every": 100}}]}
    st = run_spec_inprocess(spec, tmp_path, tmp_path / "cache")["sft"]
    m = st["metrics"]
    assert m["eval_rows"] >= 8 and m["train_rows"] + m["eval_rows"] == 40
    assert m["eval_loss"] < m["eval_loss_before"] - 0.5, m
    assert m["train_sequences"] == m["train_rows"] - m["dropped_no_assistant_tokens"] > 20
    assert m["updates"] == (m["train_sequences"] * 4) // 8 and m["seconds_per_update"] > 0
    assert moved(st["output"], tiny_models["policy"])
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(Path(st["output"]) / "model")).chat_template  # a policy by the contract


def test_best_of_n_keeps_the_best_sample_and_applies_threshold(tmp_path, registry):
    import datasets

    from rlhf_spec.context import InputArtifact
    from rlhf_spec.data import save_rows
    from rlhf_spec.stages.best_of_n import BestOfNParams, run
    from rlhf_spec.testing import execute, make_context

    rows = {"prompt_id": ["a", "a", "a", "b", "b", "c"], "sample_index": [0, 1, 2, 0, 1, 0],
            "reward": [0.1, 0.5, 0.5, -1.0, -2.0, 2.0], "completion": ["a0", "a1", "a2", "b0", "b1", "c0"]}
    rows["prompt"] = [[{"role": "user", "content": p}] for p in rows["prompt_id"]]
    save_rows(datasets.Dataset.from_dict(rows), tmp_path / "up" / "data")
    up = InputArtifact("score", "scored", "0" * 64, str(tmp_path / "up"))

    def kept(folder, **params):
        ctx = make_context(BestOfNParams(**params), tmp_path / folder, kind="filter", inputs=[up], registry=registry)
        res = execute(ctx, run)
        out = datasets.load_from_disk(str(ctx.out_dir / "data"))
        return sorted(out["completion"]), res

    comps, res = kept("plain")
    assert comps == ["a1", "b0", "c0"]  # a: tie at 0.5 goes to the lower sample_index
    assert res.output_type == "scored" and res.metrics["prompts"] == 3 and res.metrics["kept"] == 3
    assert res.metrics["mean_best_reward"] == pytest.approx((0.5 - 1.0 + 2.0) / 3)
    assert res.metrics["mean_reward"] == pytest.approx(sum(rows["reward"]) / 6)
    comps, res = kept("threshold", threshold=0.0)
    assert comps == ["a1", "c0"] and res.metrics["dropped_below_threshold"] == 1
    comps, res = kept("top", top_fraction=0.34)  # ceil(0.34 * 3) = 2 best prompts
    assert comps == ["a1", "c0"] and res.metrics["dropped_below_top_fraction"] == 1

    from rlhf_spec.data import load_rows
    from rlhf_spec.stages.best_of_n import ThresholdParams, run_threshold

    def above(folder, **params):
        ctx = make_context(ThresholdParams(**params), tmp_path / folder, kind="filter", inputs=[up], registry=registry)
        res = execute(ctx, run_threshold)
        return sorted(load_rows(ctx.out_dir / "data")["completion"]), res

    comps, res = above("rest", threshold=0.1)  # ReST keeps every sample at or above tau, several per prompt
    assert comps == ["a0", "a1", "a2", "c0"] and res.metrics["prompts_kept"] == 2
    assert res.metrics["mean_kept_reward"] == pytest.approx((0.1 + 0.5 + 0.5 + 2.0) / 4)
    comps, _ = above("rest1", threshold=0.1, max_per_prompt=1)  # the best first, ties to the lower sample_index
    assert comps == ["a1", "c0"]
    comps, res = above("rest_none", threshold=5.0)
    assert comps == [] and res.metrics["kept"] == 0


def test_rejection_sampling_fine_tuning_through_the_runner(tmp_path, tiny_models, hh_file, base_cache):
    """sample -> score -> best-of-n -> sft (packed): the filter keeps one max-reward row per prompt."""
    import datasets

    spec = with_stages(tiny_models, hh_file,
                       {"id": "best", "kind": "filter", "uses": "best-of-n", "inputs": ["score"], "params": {}},
                       {"id": "sft", "kind": "train", "uses": "sft", "inputs": ["best"],
                        "params": {"policy": "policy", "packing": True, "max_length": 32, "per_device_train_batch_size": 2,
                                   "learning_rate": 1e-2, "epochs": 1, "save_every": 100}})
    st = run_spec_inprocess(spec, tmp_path, own_cache(base_cache, tmp_path))
    scored = datasets.load_from_disk(str(Path(st["score"]["output"]) / "data"))
    best = datasets.load_from_disk(str(Path(st["best"]["output"]) / "data"))
    top = {}
    for pid, r in zip(scored["prompt_id"], scored["reward"]):
        top[pid] = max(top.get(pid, r), r)
    assert len(best) == len(top) == st["best"]["metrics"]["prompts"]
    assert all(r == top[pid] for pid, r in zip(best["prompt_id"], best["reward"]))
    assert st["best"]["output_type"] == "scored"
    m = st["sft"]["metrics"]
    assert m["train_rows"] == len(best) and m["train_sequences"] >= 1 and m["packing"] is True
    assert moved(st["sft"]["output"], tiny_models["policy"])


# ----------------------------------------------------------------------------- preference losses through the runner


@pytest.mark.parametrize("uses, extra, reference_free", [("ipo", {"beta": 0.5}, False),
                                                         ("simpo", {"beta": 2.0, "gamma": 0.5}, True),
                                                         ("orpo", {"lam": 0.5}, True)])
def test_preference_stage_end_to_end(tmp_path, tiny_models, hh_file, base_cache, uses, extra, reference_free):
    spec = with_stages(tiny_models, hh_file, {"id": uses, "kind": "train", "uses": uses, "inputs": ["pair"], "params": {**TRAIN, **extra}})
    cache = own_cache(base_cache, tmp_path)
    st = run_spec_inprocess(spec, tmp_path, cache)[uses]
    m = st["metrics"]
    assert st["status"] == "ran" and m["updates"] >= 2 and m["test_pairs"] == 2 and m["eval_pairs"] == 2
    assert m["eval_preference_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and "eval_loss" in m
    assert m["seconds_per_update"] > 0
    assert moved(st["output"], tiny_models["policy"])
    used = manifests(cache)[st["key"]]["used_keys"]
    if reference_free:  # no reference policy is ever run
        assert memo_keys(cache, "reference-logprobs") == [] and used == [] and "seconds_reference_logprobs" not in m
        assert "train_kl_ref_last10" not in m
    else:
        assert used == memo_keys(cache, "reference-logprobs") and len(used) == 1


def test_eval_size_holds_out_train_pairs_when_there_is_no_test_split(tmp_path, tiny_models, hh_file, base_cache):
    spec = with_stages(tiny_models, hh_file, {"id": "simpo", "kind": "train", "uses": "simpo", "inputs": ["pair"],
                                              "params": {**TRAIN, "eval_size": 2}})
    spec["stages"][2]["params"]["test_size"] = 0
    st = run_spec_inprocess(spec, tmp_path, own_cache(base_cache, tmp_path))
    pairs = st["pair"]["metrics"]["pairs"]
    m = st["simpo"]["metrics"]
    assert m["test_pairs"] == 2 and m["train_pairs"] == pairs - 2 and "eval_preference_accuracy" in m


def test_figures_before_training_are_read_from_the_reference_logprobs(tiny_models, hh_file):
    """At its starting weights a LoRA policy is its reference (the adapters' B is zero), so the held-out
    figures before training are read from the reference logprobs with no forward pass: DPO's loss log 2,
    a zero margin and ties (one half each). A forward pass of the LoRA-wrapped policy over other batches
    (other padding) agrees up to round-off, and a policy that has moved does not."""
    import contextlib
    import math
    import types

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_spec.algorithms.batching import tokenize_pairs
    from rlhf_spec.algorithms.logprobs import pair_logprobs
    from rlhf_spec.stages.train.pair_trainer import _evaluator, _PairData
    from rlhf_spec.loops.trainer import LoraParams, apply_lora
    from rlhf_spec.testing import hh_rows
    from rlhf_spec.stages.train.preference import DPOParams, dpo_loss, dpo_rewards

    raw = hh_rows(hh_file, 8)
    rows = Dataset.from_dict({"prompt_id": [f"p{i}" for i in range(8)],
                              "prompt": [[{"role": "user", "content": r["chosen"][:120]}] for r in raw],
                              "chosen": [r["chosen"][-80:] for r in raw], "rejected": [r["rejected"][-80:] for r in raw],
                              "chosen_reward": [0.0] * 8, "rejected_reward": [0.0] * 8})
    tok = AutoTokenizer.from_pretrained(str(tiny_models["policy"]), padding_side="right")
    p = DPOParams(policy="policy", beta=0.5, max_prompt_tokens=24, max_response_tokens=16, logprob_batch_size=3)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["policy"])).eval()
    with torch.no_grad():  # the reference pass: all 8 pairs in one batch
        c, r = pair_logprobs(base, tok.pad_token_id, tokenize_pairs(tok, rows, 24, 16), 1.0)
    held = _PairData(rows, tok, p, (c.tolist(), r.tolist()), {f"p{i}": i for i in range(8)})
    ctx = types.SimpleNamespace(timer=lambda name: contextlib.nullcontext())
    evaluate = _evaluator(ctx, held, dpo_loss(p), dpo_rewards, tok.pad_token_id, p)
    read = evaluate(None)
    assert read["loss"] == pytest.approx(math.log(2), abs=1e-6), read
    assert read["implicit_reward_margin"] == 0.0 and read["preference_accuracy"] == 0.5 and read["pairs"] == 8, read
    policy = apply_lora(base, LoraParams(r=4, target_modules=["q_proj", "v_proj"])).eval()
    fwd = evaluate(policy)  # batches of 3: other padding than the reference pass
    assert fwd["loss"] == pytest.approx(read["loss"], abs=1e-5) and abs(fwd["implicit_reward_margin"]) < 1e-5, fwd
    with torch.no_grad():
        for name, w in policy.named_parameters():
            if "lora_B" in name:
                w.add_(0.05)
    moved_policy = evaluate(policy)
    assert abs(moved_policy["loss"] - read["loss"]) > 1e-3, moved_policy


def test_kto_figures_before_training_are_read_from_the_reference_logprobs(tiny_models, hh_file):
    """KTO's held-out figures at the starting weights, read from the reference logprobs (no forward pass),
    on unbalanced rows (4 desirable, 2 undesirable, so a wrong log-ratio cannot average out to a tie):
    every log-ratio and z0 is 0, the loss 1 - sigmoid(0) = 0.5 and every verdict a tie (one half). A
    forward pass of the LoRA-wrapped policy over other batches agrees up to round-off."""
    import contextlib
    import types

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_spec.algorithms.kto import KTOLoss
    from rlhf_spec.algorithms.logprobs import completion_logprobs
    from rlhf_spec.loops.trainer import LoraParams, apply_lora
    from rlhf_spec.stages.train.unpaired import KTOParams, UnpairedRows, _KTOData, _Tokenized, kto_evaluator
    from rlhf_spec.testing import hh_rows

    raw = hh_rows(hh_file, 6)
    rows = UnpairedRows([f"p{i}" for i in range(6)], [[{"role": "user", "content": r["chosen"][:120]}] for r in raw],
                        [r["chosen"][-80:] for r in raw], [True] * 4 + [False] * 2, [-1] * 6)
    tok = AutoTokenizer.from_pretrained(str(tiny_models["policy"]), padding_side="right")
    p = KTOParams(policy="policy", beta=0.5, max_prompt_tokens=24, max_response_tokens=16, logprob_batch_size=4)
    parts = _Tokenized(tok, rows, p, "held-out")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_models["policy"])).eval()
    with torch.no_grad():  # the reference pass: all 6 rows in one batch
        ref = [completion_logprobs(base, tok.pad_token_id, seqs, 1.0).tolist() for seqs in (parts.matched, parts.kl)]
    ctx = types.SimpleNamespace(timer=lambda name: contextlib.nullcontext())
    evaluate = kto_evaluator(ctx, _KTOData(rows, parts, ref), KTOLoss(p.beta), tok.pad_token_id, p)
    read = evaluate(None)
    assert read["loss"] == pytest.approx(0.5, abs=1e-6) and read["kl"] == 0.0, read
    assert read["label_accuracy"] == 0.5 and read["rows"] == 6, read
    fwd = evaluate(apply_lora(base, LoraParams(r=4, target_modules=["q_proj", "v_proj"])).eval())  # batches of 4
    assert fwd["loss"] == pytest.approx(read["loss"], abs=1e-5) and fwd["kl"] == pytest.approx(0.0, abs=1e-5), fwd


def test_dpo_reports_heldout_accuracy(tmp_path, tiny_models, base_cache):
    """``dpo`` reports the held-out accuracy of its implicit reward and reuses the shared reference logprobs."""
    from rlhf_spec.context import InputArtifact
    from rlhf_spec.model_source import ModelSource
    from rlhf_spec.stages.train.preference import DPOParams, run_dpo
    from rlhf_spec.testing import execute, make_context

    key = next(k for k, m in manifests(base_cache).items() if m["stage"].get("id") == "pair")
    up = InputArtifact("pair", "pairs", key, str(entry_dir(base_cache, key)))
    src = ModelSource(name="policy", origin="spec", path=str(tiny_models["policy"]), identity={"path": "tiny"})
    params = DPOParams(**{k: v for k, v in TRAIN.items() if k != "save_every"}, beta=0.5)
    ctx = make_context(params, tmp_path, inputs=[up], models={"policy": src})
    m = execute(ctx, run_dpo).metrics
    assert m["eval_pairs"] == 2 and m["eval_preference_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0) and m["seconds_per_update"] > 0
    assert len(memo_keys(tmp_path / "cache", "reference-logprobs")) == 1


# ----------------------------------------------------------------------------- KTO


def test_kto_partners_and_reference_point():
    import torch

    from rlhf_spec.stages.train.unpaired import kl_partners, reference_point

    pids = ["a", "a", "b", "c", "c", "c"]
    partners = kl_partners(pids)
    assert all(pids[j] != pids[i] for i, j in enumerate(partners))
    assert kl_partners(pids) == partners  # fixed by the seed
    with pytest.raises(ValueError, match="two different prompts"):
        kl_partners(["a", "a"])
    z0 = reference_point(torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.5]))
    assert float(z0) == pytest.approx(0.75)
    assert float(reference_point(torch.tensor([-3.0]), torch.tensor([-1.0]))) == 0.0  # clamped at 0


def test_kto_from_pairs_end_to_end(tmp_path, tiny_models, hh_file, base_cache):
    spec = with_stages(tiny_models, hh_file, {"id": "kto", "kind": "train", "uses": "kto", "inputs": ["pair"],
                                              "params": {**TRAIN, "beta": 0.5, "per_device_train_batch_size": 4}})
    cache = own_cache(base_cache, tmp_path)
    st = run_spec_inprocess(spec, tmp_path, cache)
    m = st["kto"]["metrics"]
    pairs = st["pair"]["metrics"]
    assert m["train_rows"] == 2 * pairs["train"] and m["desirable"] == m["undesirable"] == pairs["train"]
    assert m["eval_rows"] == 4 and m["eval_pairs"] == 2 and m["desirable_ratio"] == 1.0
    # before training the policy is the reference: every log-ratio is 0, a tie, which counts one half
    assert m["eval_label_accuracy_before"] == 0.5 and m["eval_preference_accuracy_before"] == 0.5, m
    assert m["eval_label_accuracy"] * 8 == round(m["eval_label_accuracy"] * 8) and m["eval_preference_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert m["eval_kl"] >= 0.0 and m["seconds_per_update"] > 0 and "train_kl_last10" in m
    assert moved(st["kto"]["output"], tiny_models["policy"])
    used = manifests(cache)[st["kto"]["key"]]["used_keys"]
    assert used == memo_keys(cache, "kto-reference-logprobs") and len(used) == 1
    assert memo_keys(cache, "reference-logprobs") == []


def test_kto_on_a_kto_dataset(tmp_path, tiny_models, registry):
    spec = {"name": "kto", "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"kto": {"path": str(data_file(KTO)), "adapter": "kto", "limit": 20}},
            "stages": [{"id": "kto", "kind": "train", "uses": "kto",
                        "params": {**TRAIN, "dataset": "kto", "eval_size": 4, "max_prompt_tokens": 48, "per_device_train_batch_size": 4}},
                       {"id": "sft", "kind": "train", "uses": "sft",  # SFT on the same data imitates the desirable rows only
                        "params": {"policy": "policy", "dataset": "kto", "packing": True, "max_length": 64, "per_device_train_batch_size": 4,
                                   "epochs": 1, "learning_rate": 1e-3}}]}
    stages = run_spec_inprocess(spec, tmp_path, tmp_path / "cache")
    sft = stages["sft"]["metrics"]
    labels = json.loads(data_file(KTO).read_text())[:20]
    assert sft["train_rows"] == sum(r["label"] for r in labels) and sft["skipped_undesirable"] == 20 - sft["train_rows"]
    st = stages["kto"]
    m = st["metrics"]
    assert m["train_rows"] + m["eval_rows"] == 20 and m["eval_rows"] >= 4
    assert m["desirable"] + m["undesirable"] == m["train_rows"] and m["desirable"] > 0 and m["undesirable"] > 0
    assert m["eval_label_accuracy_before"] == 0.5 and "eval_preference_accuracy" not in m
    assert m["eval_label_accuracy"] * 2 * m["eval_rows"] == round(m["eval_label_accuracy"] * 2 * m["eval_rows"])
    assert m["updates"] == m["train_rows"] // 4
    assert moved(st["output"], tiny_models["policy"])


# ----------------------------------------------------------------------------- static checks


def test_qlora_save_merges_the_adapters_into_a_full_precision_copy(tiny_models):
    """The QLoRA save path (a 4-bit model cannot be saved as a policy) on CPU with plain LoRA: the trained
    adapters, merged into a fresh copy of the policy, give the weights of merging them in place."""
    from types import SimpleNamespace

    import torch

    from rlhf_spec.stages.train.sft import MergedQLoRA, SFTParams
    from rlhf_spec.loops.trainer import apply_lora
    from rlhf_spec.model_source import ModelSource

    src = ModelSource(name="policy", origin="spec", path=str(tiny_models["policy"]))
    p = SFTParams(policy="policy", dataset="d", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    model = apply_lora(src.load_causal_lm(), p.lora)
    torch.manual_seed(0)
    for name, w in model.named_parameters():
        if "lora_B" in name:
            w.data.normal_()  # as if trained (peft starts B at zero)
    fake = SimpleNamespace(accelerator=SimpleNamespace(unwrap_model=lambda m: m), model=model, history=[])
    merged = MergedQLoRA(fake, src, p).unwrapped().state_dict()
    want = model.merge_and_unload().state_dict()
    base = src.load_causal_lm().state_dict()
    assert merged.keys() == want.keys() == base.keys()
    assert all(torch.allclose(merged[k], want[k], atol=1e-6) for k in want)
    assert any(not torch.equal(merged[k], base[k]) for k in base if "q_proj" in k)


def test_qlora_is_a_validation_problem_without_cuda(tiny_models, registry):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    spec = {"name": "q", "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"d": {"path": "x.json", "adapter": "alpaca"}},
            "stages": [{"id": "sft", "kind": "train", "uses": "sft", "params": {"policy": "policy", "dataset": "d", "qlora": True}}]}
    probs = {p.pointer: p for p in spec_problems(spec, registry, check_files=False)}
    assert set(probs) == {"/stages/0/params/qlora", "/stages/0/params/lora"}
    assert "CUDA" in probs["/stages/0/params/qlora"].message
    spec["stages"][0]["params"]["lora"] = {"r": 4}
    assert [p.pointer for p in spec_problems(spec, registry, check_files=False)] == ["/stages/0/params/qlora"]


def test_static_checks_of_kto_and_sft_data(tiny_models, registry):
    spec = {"name": "k", "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"kto": {"path": "x.json", "adapter": "kto"},
                         "prefs": {"path": "y.json", "adapter": "sharegpt", "chosen_column": "chosen", "rejected_column": "rejected"}},
            "stages": [{"id": "kto", "kind": "train", "uses": "kto", "params": {"policy": "policy", "dataset": "kto", "per_device_train_batch_size": 1}},
                       {"id": "sft", "kind": "train", "uses": "sft", "params": {"policy": "policy", "dataset": "prefs"}},
                       {"id": "kto2", "kind": "train", "uses": "kto", "params": {"policy": "policy", "dataset": "prefs"}}]}
    probs = {p.pointer: p.message for p in spec_problems(spec, registry, check_files=False)}
    assert "at least 2" in probs["/stages/0/params/per_device_train_batch_size"]
    assert "completion" in probs["/stages/1/params/dataset"]  # preference data is not SFT data
    assert "label" in probs["/stages/2/params/dataset"]


def test_pair_trainers_read_a_preference_dataset(tmp_path, tiny_models, registry):
    """DPO and IPO straight from LLaMA-Factory's sharegpt pairs (no pairs stage): ``eval_size`` pairs are held out
    by prompt hash, the reference logprobs are one shared entry keyed by the pairs' content, and a rerun is cached."""
    spec = {"name": "pairs-from-data", "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"dpo": {"path": str(data_file("llama-factory/dpo_en_demo.json")), "adapter": "sharegpt",
                                 "chosen_column": "chosen", "rejected_column": "rejected", "limit": 12}},
            "stages": [{"id": algo, "kind": "train", "uses": algo,
                        "params": {**TRAIN, "dataset": "dpo", "eval_size": 4, "max_prompt_tokens": 48, "max_response_tokens": 24,
                                   # two train stages in one process with different accelerate settings
                                   "mixed_precision": "bf16" if algo == "ipo" else "no"}}
                       for algo in ("dpo", "ipo")]}
    cache = tmp_path / "cache"
    st = run_spec_inprocess(spec, tmp_path, cache)
    for algo in ("dpo", "ipo"):
        m = st[algo]["metrics"]
        assert m["train_pairs"] == 8 and m["test_pairs"] == 4 and "eval_preference_accuracy" in m, m
        # before any update the policy is its reference: the figures are read from its logprobs, every margin 0
        assert m["eval_preference_accuracy_before"] == 0.5 and m["eval_implicit_reward_margin_before"] == 0.0, m
        assert m["eval_loss_before"] != m["eval_loss"], m
        assert moved(st[algo]["output"], tiny_models["policy"])
    # one entry per precision: the bf16 trainer's reference pass runs under its autocast, so the two agree
    # to bf16 rounding but are not the same numbers
    keys = memo_keys(cache, "reference-logprobs")
    assert len(keys) == 2 and {k for algo in ("dpo", "ipo") for k in manifests(cache)[st[algo]["key"]]["used_keys"]} == set(keys)
    fp32, bf16 = (json.loads((entry_dir(cache, k) / "logprobs.json").read_text())
                  for k in (manifests(cache)[st[algo]["key"]]["used_keys"][0] for algo in ("dpo", "ipo")))
    diffs = [abs(a - b) for side in ("chosen", "rejected") for a, b in zip(fp32[side], bf16[side])]
    assert 0 < max(diffs) < 0.05 * max(abs(v) for v in fp32["chosen"] + fp32["rejected"]), diffs
    again = run_spec_inprocess(spec, tmp_path / "again", cache)
    assert {s["status"] for s in again.values()} == {"cached"}


def test_pair_trainer_data_problems(tiny_models):
    spec = {"name": "x", "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"dpo": {"path": str(data_file("llama-factory/dpo_en_demo.json")), "adapter": "sharegpt",
                                 "chosen_column": "chosen", "rejected_column": "rejected"}},
            "stages": [{"id": "dpo", "kind": "train", "uses": "dpo", "params": {"policy": "policy"}},
                       {"id": "rebel", "kind": "train", "uses": "rebel", "params": {"policy": "policy", "dataset": "dpo"}}]}
    errs = [p.render() for p in spec_problems(spec)]
    assert any(e.startswith("/stages/0/params/dataset: training needs preference pairs") for e in errs), errs
    assert any(e.startswith("/stages/1/params/dataset: REBEL regresses on reward differences") for e in errs), errs


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_tracker_gets_the_training_curves(tmp_path, tiny_models, registry, monkeypatch):
    """``log_with: ["tensorboard", "wandb"]`` with wandb in offline mode: both trackers get the same
    per-update rows (accelerate's trackers; nothing is written by hand)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-root"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "wandb-root").mkdir()
    spec = {"name": "tracked", "models": {"policy": {"path": str(tiny_models["policy"])}},
            "datasets": {"dpo": {"path": str(data_file("llama-factory/dpo_en_demo.json")), "adapter": "sharegpt",
                                 "chosen_column": "chosen", "rejected_column": "rejected", "limit": 8}},
            "stages": [{"id": "dpo", "kind": "train", "uses": "dpo",
                        "params": {**TRAIN, "dataset": "dpo", "max_prompt_tokens": 32, "max_response_tokens": 16,
                                   "log_with": ["tensorboard", "wandb"]}}]}
    st = run_spec_inprocess(spec, tmp_path / "run", tmp_path / "cache")
    updates = st["dpo"]["metrics"]["updates"]
    runs = list((tmp_path / "wandb-root").rglob("offline-run-*"))
    assert len(runs) == 1, runs
    # the offline run's record log (protobuf): one history record per update carries the key "train/loss"
    records = next(runs[0].glob("run-*.wandb")).read_bytes()
    assert records.count(b"train/loss") >= updates >= 2, (records.count(b"train/loss"), updates)
    assert list((tmp_path / "cache").rglob("events.out.tfevents*")), "tensorboard got nothing"
