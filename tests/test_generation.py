"""The transformers backend's samplers: the candidate nucleus sampler against transformers' own top-p,
and the engine with each sampler on a tiny random model."""

from __future__ import annotations

import copy
import inspect
import zlib

import pytest
import torch

from rlhf_spec.backends import SamplingParams
from rlhf_spec.backends.nucleus import NucleusSampler, nucleus_mask
from rlhf_spec.backends.transformers import TransformersEngine, TransformersParams
from rlhf_spec.runtime import derive_seed


def _hf_kept(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores.clone()))
    return torch.isfinite(warped)


@pytest.mark.parametrize("temperature,top_p,candidates", [(0.8, 0.9, 256), (1.0, 0.5, 8), (1.5, 0.95, 16), (0.3, 0.99, 4)])
def test_kept_tokens_equal_transformers_top_p(temperature, top_p, candidates):
    g = torch.Generator().manual_seed(0)
    # peaked rows (the nucleus is among the candidates), flatter ones and flat ones (full sort)
    scores = torch.cat([torch.randn(48, 3000, generator=g) * s for s in (8.0, 2.0, 0.2)])
    sampler = NucleusSampler(temperature, top_p, torch.Generator().manual_seed(1), candidates=candidates)
    assert len(sampler._groups(scores.float() / temperature)) == 3  # every path taken: top-k, top-8k, full sort
    ours, theirs = sampler.kept(scores), _hf_kept(scores, temperature, top_p)
    # The two may disagree only on a token whose mass above lies within float32 rounding of top_p
    # (transformers sums the probabilities in ascending order, we in descending order).
    probs = torch.softmax(scores.double() / temperature, -1)
    for row, tok in (ours != theirs).nonzero().tolist():
        above = probs[row][probs[row] > probs[row, tok]].sum().item()
        assert abs(above - top_p) < 1e-5, (row, tok, above)
    assert (ours != theirs).sum() <= 2
    assert ours.sum() > 0.99 * theirs.sum()


def test_nucleus_mask_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.95, 0.03, 0.01, 0.01]])
    # mass above each token: [0, .5, .8, .95] and [0, .95, .98, .99]
    assert nucleus_mask(probs, 0.8).tolist() == [[True, True, False, False], [True, False, False, False]]
    assert nucleus_mask(probs, 0.81).tolist() == [[True, True, True, False], [True, False, False, False]]
    assert nucleus_mask(probs, 1.0).tolist() == [[True, True, True, True], [True, True, True, True]]


def test_draws_follow_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05]))
    n = 40000
    sampler = NucleusSampler(1.0, 0.8, torch.Generator().manual_seed(3), candidates=2)  # nucleus {0,1,2}: full-sort path
    counts = torch.bincount(sampler.draw(logits.repeat(n, 1)), minlength=5).float() / n
    expected = torch.tensor([0.4, 0.25, 0.2, 0.0, 0.0]) / 0.85
    assert (counts - expected).abs().max() < 0.012  # about 5 standard errors at n = 40000
    sampler = NucleusSampler(0.5, 1.0, torch.Generator().manual_seed(4))
    counts = torch.bincount(sampler.draw(logits.repeat(n, 1)), minlength=5).float() / n
    assert (counts - torch.softmax(logits / 0.5, -1)).abs().max() < 0.012


def test_processor_output_makes_greedy_pick_the_draw():
    scores = torch.randn(5, 50)
    out = NucleusSampler(0.8, 0.9, torch.Generator().manual_seed(0))(None, scores)
    assert torch.isfinite(out).sum(-1).tolist() == [1] * 5
    again = NucleusSampler(0.8, 0.9, torch.Generator().manual_seed(0)).draw(scores)
    assert out.argmax(-1).tolist() == again.tolist()


@pytest.mark.parametrize("top_p", [0.9, 1.0])
def test_row_groups_draw_as_separate_samplers(top_p):
    """Rows given their own generators draw what a sampler over those rows alone draws with that generator."""
    scores = torch.randn(7, 300) * 3
    a, b = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4, 5])
    grouped = NucleusSampler(0.7, top_p, [(a, torch.Generator().manual_seed(1)), (b, torch.Generator().manual_seed(2))],
                             candidates=4).draw(scores)
    alone_a = NucleusSampler(0.7, top_p, torch.Generator().manual_seed(1), candidates=4).draw(scores[a])
    alone_b = NucleusSampler(0.7, top_p, torch.Generator().manual_seed(2), candidates=4).draw(scores[b])
    assert grouped[a].tolist() == alone_a.tolist() and grouped[b].tolist() == alone_b.tolist()
    assert grouped[a].tolist() != NucleusSampler(0.7, top_p, torch.Generator().manual_seed(2), candidates=4).draw(scores[a]).tolist()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="temperature"):
        NucleusSampler(0.0, 0.9, torch.Generator())
    with pytest.raises(ValueError, match="top_p"):
        NucleusSampler(1.0, 1.5, torch.Generator())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_spec.testing import make_tiny_policy

    folder = make_tiny_policy(tmp_path_factory.mktemp("policy"), seed=3)
    tok = AutoTokenizer.from_pretrained(folder, padding_side="left")
    return AutoModelForCausalLM.from_pretrained(folder).eval(), tok


def _prompts(tok):
    texts = ["What is the capital of France?", "Tell me a joke.", "How do I bake bread?"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def test_engine_transformers_sampler_matches_a_plain_generate(tiny):
    model, tok = tiny
    sampling = SamplingParams(temperature=0.9, top_p=0.8, max_new_tokens=12)
    engine = TransformersEngine(model, tok, TransformersParams(batch_size=8, sort_by_length=False, cache="dynamic",
                                                              sampler="transformers"))
    ids = _prompts(tok)
    got = engine.generate(ids, sampling, 1, seed=11)
    width = max(map(len, ids))
    torch.manual_seed(derive_seed(11, zlib.crc32(repr(ids).encode())))
    plain = model.generate(input_ids=torch.tensor([[tok.pad_token_id] * (width - len(s)) + s for s in ids]),
                           attention_mask=torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids]),
                           do_sample=True, temperature=0.9, top_p=0.8, top_k=0, max_new_tokens=12,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for (c,), row in zip(got, plain[:, width:].tolist()):
        assert c.token_ids == row[: len(c.token_ids)]


def test_engine_candidate_sampler_is_seeded_per_batch(tiny):
    model, tok = tiny
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16)
    engine = TransformersEngine(model, tok, TransformersParams(batch_size=8, cache="dynamic"))
    ids = _prompts(tok)
    texts = lambda out: [[c.token_ids for c in per] for per in out]  # noqa: E731
    first = texts(engine.generate(ids, sampling, 2, seed=5))
    torch.manual_seed(1234)  # the global RNG does not matter: each batch has its own generator
    assert texts(engine.generate(ids, sampling, 2, seed=5)) == first
    assert texts(engine.generate(ids, sampling, 2, seed=6)) != first
    assert all(per[0] != per[1] for per in first)  # a prompt's n samples differ
    greedy = texts(engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=16), 1, seed=5))
    assert greedy == texts(engine.generate(ids, SamplingParams(temperature=0.0, max_new_tokens=16), 1, seed=9))


def test_prefill_buckets_by_hand():
    """The prefill cuts its prompts with the project's length batching, capped by padded tokens only."""
    from rlhf_spec.algorithms.batching import length_batches

    def buckets(lengths, bucket_tokens):
        return length_batches(lengths, len(lengths), bucket_tokens)

    # longest first: 9 (idx 1), 7 (idx 3), 4 (idx 0), 4 (idx 4), 2 (idx 2); budget 16 padded tokens
    assert buckets([4, 9, 2, 7, 4], 16) == [[1], [3, 0], [4, 2]]
    assert buckets([4, 9, 2, 7, 4], 1) == [[1], [3], [0], [4], [2]]  # a prompt over budget is a bucket of its own
    assert buckets([3, 3, 3], 1000) == [[0, 1, 2]]


def _varied_prompts(tok):
    texts = ["What is the capital of France?", "Hi", "Tell me a joke about a very long and winding road.",
             "How do I bake bread at home without yeast, and how long does it take?", "Hi"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    return ids + [ids[0][:1]]  # a one-token prompt has nothing to prefill


@pytest.mark.parametrize("cache,bucket_tokens", [("static", 8), ("static", 1000), ("dynamic", 1000)])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_writes_what_generate_writes_alone(tiny, cache, bucket_tokens, temperature):
    """Each distinct prompt prefilled once (in one-prompt buckets, or all in one padded bucket), copied to its n
    rows: the same tokens as generate running every row's padded prompt itself (float32, so the two paths agree
    to rounding)."""
    model, tok = tiny
    sampling = SamplingParams(temperature=temperature, top_p=0.9, max_new_tokens=10)
    ids = _varied_prompts(tok)
    out = {}
    for tokens in (0, bucket_tokens):
        engine = TransformersEngine(model, tok, TransformersParams(batch_size=7, cache=cache, prefill_batch_tokens=tokens))
        out[tokens] = [[c.token_ids for c in per] for per in engine.generate(ids, sampling, 3, seed=21)]
    assert out[bucket_tokens] == out[0]
    assert len({tuple(r) for per in out[0] for r in per}) > 3  # not one answer everywhere


@pytest.mark.parametrize("bucket_tokens", [10, 1000])
def test_prefill_cache_holds_each_rows_prompt_keys(tiny, bucket_tokens):
    """The assembled cache equals, at every row's real positions, the keys and values of a forward pass over the
    left-padded batch (generate's position ids); padded positions stay zero."""
    from transformers import DynamicCache

    from rlhf_spec.backends.prefill import cache_kwarg, left_padded, prefill_cache

    model, tok = tiny
    seqs = _varied_prompts(tok)[:5]
    width = max(map(len, seqs)) - 1
    cache = prefill_cache(model, seqs, tok.pad_token_id, DynamicCache(config=model.config), bucket_tokens)
    ids, mask = left_padded([s[:-1] for s in seqs], width, tok.pad_token_id, "cpu")
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True,
              **{cache_kwarg(model): ref})
    real = mask.bool()
    for got, want in zip(cache.layers, ref.layers):
        assert got.keys.shape == want.keys.shape == (len(seqs), want.keys.shape[1], width, want.keys.shape[3])
        for name in ("keys", "values"):
            g, w = getattr(got, name).transpose(1, 2), getattr(want, name).transpose(1, 2)  # (B, W, heads, dim)
            torch.testing.assert_close(g[real], w[real], atol=1e-5, rtol=1e-4)
            assert not g[~real].any()
    assert prefill_cache(model, [[5], [7]], 0, DynamicCache(config=model.config), 8) is None
    with pytest.raises(ValueError, match="no tokens"):
        prefill_cache(model, [[5], []], 0, DynamicCache(config=model.config), 8)


def test_passes_generated_together_keep_their_own_seeds(tiny):
    """Sampling passes in one call: each pass's samples come from its own seed, not from its place in the
    batch (swapping the seeds swaps the passes), the passes differ, and one pass equals ``generate``."""
    from rlhf_spec.backends import generate_passes

    model, tok = tiny
    sampling = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10)
    engine = TransformersEngine(model, tok, TransformersParams(batch_size=12))
    ids = _varied_prompts(tok)
    tokens = lambda passes: [[c.token_ids for c in per] for per in passes]  # noqa: E731
    first = tokens(generate_passes(engine, ids, sampling, [5, 9]))
    assert tokens(generate_passes(engine, ids, sampling, [9, 5])) == first[::-1]
    assert first[0] != first[1]
    assert tokens(generate_passes(engine, ids, sampling, [5])) == [[c[0].token_ids for c in engine.generate(ids, sampling, 1, 5)]]
    # generate's own sampler draws from the global RNG: one call per pass, as a backend without generate_passes
    plain = TransformersEngine(model, tok, TransformersParams(batch_size=12, sampler="transformers"))
    per_call = [[c[0].token_ids for c in plain.generate(ids, sampling, 1, s)] for s in (5, 9)]
    assert tokens(generate_passes(plain, ids, sampling, [5, 9])) == per_call


def test_a_peft_policy_takes_the_cache_by_its_base_models_keyword(tiny):
    """Online training hands the engine a LoRA-wrapped policy, whose forward takes ``**kwargs``."""
    from peft import LoraConfig, get_peft_model

    from rlhf_spec.backends.prefill import cache_kwarg

    model, _ = tiny
    wrapped = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert cache_kwarg(wrapped) == cache_kwarg(model)
    assert cache_kwarg(model) in inspect.signature(model.forward).parameters
