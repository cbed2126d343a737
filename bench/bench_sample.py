"""Sample stage: our generation path against a plain ``model.generate`` loop, and sorted against arrival order.

Model: SmolLM2-135M-Instruct (the real GGUF, dequantised to float32). Prompts: real hh-rlhf
harmless-base prompts from the quickstart's policy range (prompt-hash range 0.7-0.85), rendered
with the chat template and kept when at most ``--max-prompt-tokens`` long, exactly as the stage
does. Three sides run alternately on the same prompts and sampling settings:

* ``ours``: :func:`rlhf_spec.generation.generate_completions` called as the sample stage calls it
  (length-sorted batches, precomputed prompt lengths);
* ``ours_arrival``: the same with ``sort_by_length=False``;
* ``plain``: a hand-written loop: tokenize each batch of ``batch_size`` prompts in arrival order
  (left-padded), ``model.generate`` with the same temperature, top_p, max_new_tokens and seeds,
  ``batch_decode``. Neither side sets ``top_k`` in effect (see docs/benchmarks.md), so both get
  transformers' default and the same logits processors; with the same batches and seeds,
  ``ours_arrival`` and ``plain`` write identical completions, which is checked.

With sampling, completions stop at different times and the three sides draw different random
numbers, so raw "generated tokens" differ a little between sides. Two measures are fair: useful
tokens per second (each completion's tokens up to and including its end-of-turn token, counted the
same way on every side) and prompts per second (same prompts, same settings). The sorting figure
uses prompts/s; the plain-loop figure uses useful tokens/s.

Scaling: the ``ours`` path on the first 1/4, 1/2 and all of the prompts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import POLICY_NAME, alternate, emit, log, rate  # noqa: E402


def useful_tokens(row: list[int], stop: set[int]) -> int:
    """Tokens of one generated row up to and including the first stop token (as the stage counts them)."""
    k = 0
    while k < len(row) and row[k] not in stop:
        k += 1
    return min(k + 1, len(row))


def plain_loop(model, tok, texts: list[str], batch_size: int, temperature: float, top_p: float, max_new_tokens: int,
               seed: int) -> tuple[list[str], int]:
    """A plain sampling loop: arrival order, left-padded batches, one ``generate`` per batch."""
    import torch

    tok.padding_side = "left"
    eos = tok.eos_token_id
    stop = {tok.pad_token_id, eos}
    outs, ntok = [], 0
    for b, start in enumerate(range(0, len(texts), batch_size)):
        enc = tok(texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + b)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, temperature=temperature, top_p=top_p,
                                 max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, eos_token_id=eos)
        gen = out[:, enc["input_ids"].shape[1]:]
        outs += tok.batch_decode(gen, skip_special_tokens=True)
        ntok += sum(useful_tokens(r, stop) for r in gen.tolist())
    return outs, ntok


def padded_tokens(lengths: list[int], order: list[int], batch_size: int) -> int:
    """Prompt tokens a left-padded batching of ``order`` feeds the model (rows x longest prompt per batch)."""
    total = 0
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        total += len(idx) * max(lengths[i] for i in idx)
    return total


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--scaling-reps", type=int, default=3)
    args = ap.parse_args(argv)
    common.setup()

    from rlhf_spec.generation import SamplingParams, chat_prompt_texts, generate_completions, prompt_lengths

    log("sample: loading SmolLM2-135M-Instruct")
    src = common.policy_source()
    tok = src.load_tokenizer(padding_side="left")
    model = src.load_causal_lm()

    rows = common.hh_dataset((0.7, 0.85))
    texts_all = chat_prompt_texts(tok, list(rows["prompt"]))
    lens_all = prompt_lengths(tok, texts_all)
    keep = [i for i, n in enumerate(lens_all) if n <= args.max_prompt_tokens][: args.prompts]
    texts = [texts_all[i] for i in keep]
    lengths = [lens_all[i] for i in keep]
    n = len(texts)
    sp = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=args.max_new_tokens)
    bs, seed = args.batch_size, 1234
    arrival = list(range(n))
    by_len = sorted(arrival, key=lambda i: -lengths[i])
    pad_arrival, pad_sorted = padded_tokens(lengths, arrival, bs), padded_tokens(lengths, by_len, bs)
    log(f"sample: {n} prompts, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f}); "
        f"padded prompt tokens: arrival {pad_arrival}, sorted {pad_sorted}")

    outputs: dict[str, list[str]] = {}

    def ours(k=n, sort=True, name=None):
        def run():
            comps, ntok = generate_completions(model, tok, texts[:k], sp, bs, seed, sort, progress=None, lengths=lengths[:k])
            if name:
                outputs[name] = comps
            return {"tokens": sum(ntok), "prompts": k}
        return run

    def plain():
        comps, ntok = plain_loop(model, tok, texts, bs, sp.temperature, sp.top_p, sp.max_new_tokens, seed)
        outputs["plain"] = [c.strip() for c in comps]
        return {"tokens": ntok, "prompts": n}

    # one short untimed call so that lazy initialisation is not charged to whichever side goes first
    generate_completions(model, tok, texts[:2], SamplingParams(max_new_tokens=2), 2, 0, True)

    log("sample: ours (sorted) vs ours (arrival order) vs plain generate loop")
    runs = alternate([("ours", ours()), ("ours_arrival", ours(sort=False, name="ours_arrival")), ("plain", plain)], args.reps)
    # same batches, same seeds, same sampling settings: the plain loop must write the very same completions
    same = outputs["ours_arrival"] == outputs["plain"]
    log(f"sample: ours (arrival order) and the plain loop wrote identical completions: {same}")
    settings = {"batch_size": bs, "max_new_tokens": sp.max_new_tokens, "temperature": sp.temperature, "top_p": sp.top_p,
                "reps": args.reps, "threads": common.threads(), "prompt_tokens_mean": round(sum(lengths) / n, 1)}
    emit("sample.ours_vs_plain_loop", rate(runs["ours"], "tokens"), rate(runs["plain"], "tokens"), "useful tokens/s", n,
         POLICY_NAME, target=">=1.0", **settings)
    emit("sample.ours_arrival_vs_plain_loop", rate(runs["ours_arrival"], "tokens"), rate(runs["plain"], "tokens"),
         "useful tokens/s", n, POLICY_NAME, target=">=0.95", identical_completions=same,
         note="same batches and seeds as the plain loop, so the same completions: our wrapper's overhead", **settings)
    emit("sample.sorted_vs_arrival", rate(runs["ours"], "prompts"), rate(runs["ours_arrival"], "prompts"), "prompts/s", n,
         POLICY_NAME, target=">=1.3", useful_tokens_per_s_ratio=rate(runs["ours"], "tokens") / rate(runs["ours_arrival"], "tokens"),
         padded_prompt_tokens_arrival=pad_arrival, padded_prompt_tokens_sorted=pad_sorted,
         padded_prompt_tokens_ratio=round(pad_arrival / pad_sorted, 3), **settings)

    # How much prompt padding sorting removes as shards grow (token counts only, nothing generated):
    # the prefill work of arrival order over that of sorted order, on all hh-rlhf prompts within the cap.
    every = common.hh_dataset((0.0, 1.0))
    ev_texts = chat_prompt_texts(tok, list(every["prompt"]))
    ev_lens = [x for x in prompt_lengths(tok, ev_texts) if x <= args.max_prompt_tokens]
    for k in (32, 128, 512):
        if k > len(ev_lens):
            break
        ratios = []
        for start in range(0, len(ev_lens) - k + 1, k):
            ls = ev_lens[start : start + k]
            ratios.append(padded_tokens(ls, list(range(k)), bs) / padded_tokens(ls, sorted(range(k), key=lambda i: -ls[i]), bs))
        emit(f"sample.prompt_padding_arrival_vs_sorted_{k}_prompts", common.median(ratios), 1.0, "padded prompt tokens (ratio)", k,
             POLICY_NAME, better="higher", target=None, windows=len(ratios), batch_size=bs,
             note=f"median over {len(ratios)} disjoint runs of {k} prompts: prompt tokens fed in arrival order over those "
                  "fed when sorted; the most sorting can save, reached when prefill dominates")

    log("sample: scaling (ours at 1x, 2x, 4x prompts)")
    q = max(1, n // 4)
    scale = alternate([("1x", ours(q)), ("2x", ours(2 * q))], args.scaling_reps)
    scale["4x"] = runs["ours"]
    base = rate(scale["1x"], "prompts")
    for mult in ("2x", "4x"):
        k = {"2x": 2 * q, "4x": n}[mult]
        emit(f"sample.scaling_{mult}_vs_1x", rate(scale[mult], "prompts"), base, "prompts/s", k, POLICY_NAME,
             target=">=0.8", note=f"throughput at {k} prompts over {q} prompts; flat or higher means cost grows at most linearly",
             **settings)


if __name__ == "__main__":
    main()
