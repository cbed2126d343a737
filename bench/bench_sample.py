"""Sample stage: our generation backend against a plain ``model.generate`` loop, sorting, and generation FLOP/s.

Model: SmolLM2-135M-Instruct (the real GGUF, dequantised). Prompts: real hh-rlhf harmless-base
prompts from the quickstart's policy range (prompt-hash range 0.7-0.85), rendered with the chat
template and kept when at most ``--max-prompt-tokens`` long, as the stage does.

Part 1 (``BENCH_THREADS`` threads, float32, dynamic KV cache, ``--batch-size``), sides alternating:

* ``ours_arrival``: :class:`rlhf_spec.backends.transformers.TransformersEngine` with
  ``sort_by_length=False``, generate's own sampler (``sampler="transformers"``) and generate's own
  prefill (``prefill_batch_tokens=0``): prompt token ids from ``rlhf_spec.backends.prompt_token_ids``,
  then ``engine.generate``;
* ``plain``: a hand-written loop over the same batches in the same order: render and tokenize each
  batch, left-pad it, seed it as the backend seeds a batch, ``model.generate`` with the same
  temperature, top_p (``top_k=0``, nucleus only) and max_new_tokens, ``batch_decode``. With the same
  batches and seeds both sides write identical completions, which is checked: the headline
  ``sample.ours_vs_plain_generate`` is our wrapper's cost alone;
* ``ours_sorted``: the same engine with ``sort_by_length=True`` (``sample.sorted_vs_arrival``);
* ``ours_1x``, ``ours_2x``: ``ours_sorted`` on 1/4 and 1/2 of the prompts (marginal cost per prompt).

Part 2 (every core, ``torch.set_num_threads(os.cpu_count())``), sides alternating, on the sample
stage's workload: ``--fast-prompts`` (64) prompts of at most ``--fast-max-prompt-tokens`` (128, the
quickstart's ``max_prompt_tokens``), ``--fast-n`` (4) samples each, ``--fast-new-tokens`` (48):

* ``fast``: the backend at its fast settings, loaded by the backend's own ``load``: bfloat16 when
  the CPU multiplies bf16 matrices natively (else float32), static KV cache, each distinct prompt
  prefilled once in length buckets (``prefill_batch_tokens``, the default), the candidate nucleus
  sampler (the default), sorted, ``--fast-batch-size`` (256) rows per call;
* ``plain32``: the plain loop as users run it today: float32, dynamic cache, ``--plain-batch-size``
  (32) rows per call (8 prompts, ``num_return_sequences=4``), arrival order, same prompts and
  sampling settings;
* ``mm_fp32``, ``mm_bf16``: the best of 3 ``torch.mm`` of two ``--mm-size`` square matrices (2 n^3
  FLOPs each), in the same process on the same threads.

Then the same ``fast`` side and matmuls on one sample for each of ``--long-prompts`` (128) prompts of
up to ``--max-prompt-tokens`` (256): a prefill-bound workload, reported without a target.

Tokens are useful tokens: each completion's tokens up to and including its end-of-turn token,
counted the same way on every side. Generation FLOP/s = 2 x parameters x useful tokens / s (prefill
and tokens computed after a row has stopped are not counted, so the figure is a lower bound).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import types
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import POLICY_NAME, alternate, emit, log, rate  # noqa: E402


def useful_tokens(row: list[int], stop: set[int]) -> int:
    """Tokens of one generated row up to and including the first stop token (as the backend keeps them)."""
    k = 0
    while k < len(row) and row[k] not in stop:
        k += 1
    return min(k + 1, len(row))


def plain_loop(model, tok, prompts: list, batch_size: int, sp, seed: int, n: int = 1) -> tuple[list[str], int]:
    """A plain sampling loop: arrival order, left-padded batches, one ``generate`` per batch.

    A batch holds ``batch_size`` rows: ``batch_size // n`` prompts, each repeated ``n`` times by
    ``num_return_sequences``. Each batch is seeded with the backend's rule (a hash of its prompt
    tokens), so that with n = 1 the same batches give the same completions; the seed costs nothing.
    """
    import torch

    from rlhf_spec.runtime import derive_seed

    tok.padding_side = "left"
    stop = {tok.pad_token_id, tok.eos_token_id}
    outs, ntok, per_call = [], 0, max(1, batch_size // n)
    for start in range(0, len(prompts), per_call):
        texts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in prompts[start : start + per_call]]
        ids = tok(texts, add_special_tokens=False)["input_ids"]
        enc = tok.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        torch.manual_seed(derive_seed(seed, zlib.crc32(repr(ids).encode())))
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=sp.temperature, top_p=sp.top_p, top_k=0,
                                 max_new_tokens=sp.max_new_tokens, num_return_sequences=n, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.eos_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        outs += [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
        ntok += sum(useful_tokens(r, stop) for r in gen.tolist())
    return outs, ntok


def engine_side(engine, tok, prompts: list, sp, seed: int, outputs: dict, name: str, n: int = 1):
    """A side that runs our backend as the stage does: prompt token ids, then ``generate`` (``n`` per prompt)."""
    from rlhf_spec.backends import prompt_token_ids

    def run():
        comps = [c for per in engine.generate(prompt_token_ids(tok, prompts), sp, n, seed) for c in per]
        outputs[name] = [c.text for c in comps]
        return {"tokens": sum(len(c.token_ids) for c in comps), "prompts": len(prompts)}
    return run


def plain_side(model, tok, prompts: list, bs: int, sp, seed: int, outputs: dict, name: str, n: int = 1):
    def run():
        texts, ntok = plain_loop(model, tok, prompts, bs, sp, seed, n)
        outputs[name] = texts
        return {"tokens": ntok, "prompts": len(prompts)}
    return run


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Prompt tokens a left-padded batching of ``order`` feeds the model (rows x longest prompt per batch)."""
    total = 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        total += len(idx) * max(lengths[i] for i in idx)
    return total


def load_prompts(tok, max_prompt_tokens: int, hash_range=(0.7, 0.85)) -> tuple[list, list[int]]:
    """Prompts (chat messages) of at most ``max_prompt_tokens`` tokens, in file order, and their lengths."""
    from rlhf_spec.backends import prompt_token_ids

    rows = common.hh_dataset(hash_range)
    prompts = list(rows["prompt"])
    lens = [len(x) for x in prompt_token_ids(tok, prompts)]
    keep = [i for i, n in enumerate(lens) if n <= max_prompt_tokens]
    return [prompts[i] for i in keep], [lens[i] for i in keep]


def engine(model, tok, bs: int, sort: bool):
    from rlhf_spec.backends.transformers import TransformersEngine, TransformersParams

    # generate's own sampler and generate's own prefill, so that the plain loop with the same seeds writes the same
    # tokens through the same work: the figure is the wrapper's cost
    return TransformersEngine(model, tok, TransformersParams(batch_size=bs, sort_by_length=sort, dtype="float32", cache="dynamic",
                                                             sampler="transformers", prefill_batch_tokens=0))


def like_for_like(args, model, tok, prompts: list, lengths: list[int]) -> None:
    """Part 1: ours (arrival order) vs the plain loop, sorted vs arrival, and the marginal cost per prompt."""
    from rlhf_spec.backends import SamplingParams

    n, bs, seed = len(prompts), args.batch_size, 1234
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=args.max_new_tokens)
    arrival, sorted_, out = engine(model, tok, bs, False), engine(model, tok, bs, True), {}
    by_len = sorted(range(n), key=lambda i: -lengths[i])
    pads = {"padded_prompt_tokens_arrival": padded_tokens(lengths, list(range(n)), bs),
            "padded_prompt_tokens_sorted": padded_tokens(lengths, by_len, bs)}
    log(f"sample: {n} prompts, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f}); {pads}")
    # one short untimed call each, so that lazy initialisation is not charged to whichever side goes first
    engine_side(arrival, tok, prompts[:2], SamplingParams(max_new_tokens=2), 0, {}, "w")()
    plain_side(model, tok, prompts[:2], 2, SamplingParams(max_new_tokens=2), 0, {}, "w")()
    q = max(1, n // 4)
    log("sample: ours (arrival) vs plain generate vs ours (sorted); ours (sorted) at 1/4 and 1/2 of the prompts")
    runs = alternate([("ours_arrival", engine_side(arrival, tok, prompts, sp, seed, out, "ours_arrival")),
                      ("plain", plain_side(model, tok, prompts, bs, sp, seed, out, "plain")),
                      ("ours_sorted", engine_side(sorted_, tok, prompts, sp, seed, out, "ours_sorted")),
                      ("ours_1x", engine_side(sorted_, tok, prompts[:q], sp, seed, {}, "1x")),
                      ("ours_2x", engine_side(sorted_, tok, prompts[: 2 * q], sp, seed, {}, "2x"))], args.reps)
    same = out["ours_arrival"] == out["plain"]
    log(f"sample: ours (arrival order) and the plain loop wrote identical completions: {same}")
    settings = {"batch_size": bs, "max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                "dtype": "float32", "cache": "dynamic", "reps": args.reps, "threads": common.threads(),
                "prompt_tokens_mean": round(sum(lengths) / n, 1)}
    emit("sample.ours_vs_plain_generate", rate(runs["ours_arrival"], "tokens"), rate(runs["plain"], "tokens"),
         "useful tokens/s", n, POLICY_NAME, target=">=0.95", identical_completions=same, **settings,
         note="our backend (arrival order) vs a plain model.generate loop over the same batches in the same order, "
              "same seeds: the same completions, so the ratio is our wrapper's cost")
    emit("sample.sorted_vs_arrival", rate(runs["ours_sorted"], "prompts"), rate(runs["ours_arrival"], "prompts"), "prompts/s",
         n, POLICY_NAME, target=">=1.3", **pads, **settings,
         useful_tokens_per_s_ratio=round(rate(runs["ours_sorted"], "tokens") / rate(runs["ours_arrival"], "tokens"), 3),
         note="our backend sorted longest first vs the same backend in arrival order; prompts/s because the samples differ")
    secs = [common.seconds(runs[k]) for k in ("ours_1x", "ours_2x", "ours_sorted")]
    common.emit_marginal("sample.scaling_marginal_cost_4x_vs_2x", [q, 2 * q, n], secs, "prompt", POLICY_NAME, **settings)


def padding_ceiling(tok, bs: int, max_prompt_tokens: int) -> None:
    """How much prompt padding sorting removes as shards grow (token counts only, nothing generated)."""
    _, lens = load_prompts(tok, max_prompt_tokens, (0.0, 1.0))
    for k in (32, 128, 512):
        if k > len(lens):
            break
        ratios = []
        for start in range(0, len(lens) - k + 1, k):
            ls = lens[start : start + k]
            ratios.append(padded_tokens(ls, list(range(k)), bs) / padded_tokens(ls, sorted(range(k), key=lambda i: -ls[i]), bs))
        emit(f"sample.prompt_padding_arrival_vs_sorted_{k}_prompts", common.median(ratios), 1.0, "padded prompt tokens (ratio)",
             k, POLICY_NAME, better="higher", target=None, windows=len(ratios), batch_size=bs,
             note=f"no target: a token count, not a timing. Median over {len(ratios)} disjoint runs of {k} prompts of the "
                  "prompt tokens fed in arrival order over those fed when sorted: the most sorting can save, reached when "
                  "prefill dominates")


def mm_side(n: int, dtype_name: str, k: int = 3):
    """Best of ``k`` timings of one ``torch.mm`` of two n x n matrices (after one untimed)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)

    def run():
        torch.mm(a, b)
        best = float("inf")
        for _ in range(k):
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return {"seconds": best, "flops": 2.0 * n ** 3}
    return run


def bf16_native() -> tuple[bool, str]:
    """Whether this CPU multiplies bfloat16 matrices natively (oneDNN's check; a 512 mm timing if absent)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()), "torch.ops.mkldnn._is_mkldnn_bf16_supported()"
    except (AttributeError, RuntimeError):
        t32, t16 = (min(mm_side(512, d, 3)()["seconds"] for _ in range(2)) for d in ("float32", "bfloat16"))
        return t16 < t32, f"512x512 mm: bf16 {t16 * 1e3:.2f} ms vs fp32 {t32 * 1e3:.2f} ms"


def fast_backend(src, tok, args):
    """Our backend at its fast settings, loaded by the backend's own ``load`` (which casts the weights)."""
    import torch

    from rlhf_spec.backends.transformers import TransformersParams, load

    bf16, how = bf16_native()
    params = TransformersParams(batch_size=args.fast_batch_size, sort_by_length=True,
                                dtype="bfloat16" if bf16 else "float32", cache="static")
    log(f"sample: bf16 matmul native: {bf16} ({how}); fast backend: {params.model_dump()}")
    return load(src, params, types.SimpleNamespace(device=torch.device("cpu"))), params


def generation_vs_peak(args, fast, params, model, tok, prompts: list, name: str, n: int, with_plain: bool) -> None:
    """Part 2: the fast backend's generation FLOP/s vs torch's fp32 matmul FLOP/s (and vs today's plain loop)."""
    import torch

    from rlhf_spec.backends import SamplingParams, prompt_token_ids

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    n_params = sum(p.numel() for p in fast.model.parameters())
    prompt_tokens = sum(len(x) for x in prompt_token_ids(tok, prompts))
    sp, seed = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=args.fast_new_tokens), 1234
    sides = [("fast", engine_side(fast, tok, prompts, sp, seed, {}, "fast", n))]
    if with_plain:
        sides.append(("plain32", plain_side(model, tok, prompts, args.plain_batch_size, sp, seed, {}, "plain32", n)))
    sides += [("mm_fp32", mm_side(args.mm_size, "float32")), ("mm_bf16", mm_side(args.mm_size, "bfloat16"))]
    log(f"sample: {len(prompts)} prompts x {n} samples ({prompt_tokens} prompt tokens) on {cores} threads: fast backend"
        + (f" vs plain generate ({args.plain_batch_size} rows per call)" if with_plain else "")
        + " vs fp32 and bf16 matmul; one untimed run of each generation side first")
    first = {}
    for side, fn in sides[: 2 if with_plain else 1]:  # first-call costs (oneDNN primitives, allocation): reported, not in the figures
        t0 = time.perf_counter()
        fn()
        first[f"first_run_seconds_{side}"] = round(time.perf_counter() - t0, 2)
    runs = alternate(sides, args.fast_reps)
    torch.set_num_threads(common.threads())
    peak = {k: max(r["flops"] / r["seconds"] for r in runs[k]) / 1e9 for k in ("mm_fp32", "mm_bf16")}
    tps = rate(runs["fast"], "tokens")
    settings = {"fast_settings": params.model_dump(), "samples_per_prompt": n, "max_new_tokens": sp.max_new_tokens,
                "prompt_tokens": prompt_tokens, "threads": cores, "reps": args.fast_reps, **first,
                "threads_note": "all cores (torch.set_num_threads(os.cpu_count())) on every side"}
    prefill_s = prompt_tokens / common.seconds(runs["fast"])
    what = ("2 x parameters x useful generated tokens/s of the fast backend (prefill not counted) vs the best "
            f"{args.mm_size}x{args.mm_size} fp32 torch.mm FLOP/s (2 n^3 per mm, best of 3 per repetition, best repetition)")
    emit(name, 2.0 * n_params * tps / 1e9, peak["mm_fp32"], "GFLOP/s", f"{len(prompts)}x{n}", POLICY_NAME,
         target=">=0.35" if with_plain else None, mm_bf16_gflops=round(peak["mm_bf16"], 1), parameters=n_params,
         useful_tokens_per_s=round(tps, 2), prompt_tokens_per_s=round(prefill_s, 1),
         gflops_with_prefill=round(2.0 * n_params * (tps + prefill_s) / 1e9, 1), mm_size=args.mm_size, **settings,
         note=what if with_plain else what + ". No target: one sample per prompt after prompts of up to "
         f"{args.max_prompt_tokens} tokens, a workload bound by prefill, which the figure does not count as work "
         "(gflops_with_prefill counts it); the target is read on the sample stage's workload")
    if with_plain:
        emit("sample.fast_backend_vs_plain_generate", tps, rate(runs["plain32"], "tokens"), "useful tokens/s",
             f"{len(prompts)}x{n}", POLICY_NAME, target=">=2.0", plain_batch_size=args.plain_batch_size,
             plain_dtype="float32", plain_cache="dynamic",
             prompts_per_s_ratio=round(rate(runs["fast"], "prompts") / rate(runs["plain32"], "prompts"), 3), **settings,
             note="the backend at its fast settings vs today's plain model.generate loop (float32, dynamic cache, "
                  "arrival order, num_return_sequences for the n samples)")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--fast-prompts", type=int, default=64)
    ap.add_argument("--fast-n", type=int, default=4)
    ap.add_argument("--fast-max-prompt-tokens", type=int, default=128)
    ap.add_argument("--fast-batch-size", type=int, default=256)
    ap.add_argument("--fast-new-tokens", type=int, default=48)
    ap.add_argument("--long-prompts", type=int, default=128)
    ap.add_argument("--plain-batch-size", type=int, default=32)
    ap.add_argument("--mm-size", type=int, default=2048)
    ap.add_argument("--fast-reps", type=int, default=3)
    args = ap.parse_args(argv)
    common.setup()

    log("sample: loading SmolLM2-135M-Instruct")
    src = common.policy_source()
    tok = src.load_tokenizer(padding_side="left")
    model = src.load_causal_lm()
    prompts, lengths = load_prompts(tok, args.max_prompt_tokens)
    like_for_like(args, model, tok, prompts[: args.prompts], lengths[: args.prompts])
    padding_ceiling(tok, args.batch_size, args.max_prompt_tokens)
    if args.fast_max_prompt_tokens > args.max_prompt_tokens:
        ap.error("--fast-max-prompt-tokens may not exceed --max-prompt-tokens (part 2 reads part 1's prompts)")
    stage_prompts = [p for p, k in zip(prompts, lengths) if k <= args.fast_max_prompt_tokens]
    fast, params = fast_backend(src, tok, args)  # loaded once for both workloads
    generation_vs_peak(args, fast, params, model, tok, stage_prompts[: args.fast_prompts], "sample.generation_flops_vs_mm_fp32",
                       args.fast_n, with_plain=True)
    generation_vs_peak(args, fast, params, model, tok, prompts[: args.long_prompts],
                       "sample.generation_flops_vs_mm_fp32_one_sample_long_prompts", 1, with_plain=False)


if __name__ == "__main__":
    main()
