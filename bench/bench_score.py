"""Score stage: our scoring path against the batching loop a user would write, and older baselines.

Model: all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification`` with one (seeded) output, read in
the ``pair`` format, as the quickstart's reward model reads its inputs. Inputs: real hh-rlhf
harmless-base (prompt, response) pairs, the chosen and the rejected reply of each prompt, so
two responses share every prompt as samples do. The sides run alternately:

* ``ours``: :func:`rlhf_spec.rewards.classifier.score_pairs` as the score stage calls it (length
  buckets, capped at ``CPU_BATCH_TOKENS`` padded tokens on CPU);
* ``pad_to_longest`` (the headline's baseline): batches of ``batch_size`` pairs in arrival order,
  each right-padded to its own longest sequence, one forward pass per batch: the loop a user
  writes with a tokenizer's ``padding=True``;
* ``one_at_a_time``: per pair, tokenize it and run the model on a batch of one, as REBEL's
  ``rank.py`` scores each response with its own forward pass;
* ``fixed_padded``: batches of ``batch_size`` in arrival order, each padded to ``max_length``;
* ``ours_uncapped``: ``score_pairs`` with ``max_batch_tokens=0``, i.e. length buckets of
  ``batch_size`` rows whatever their width (how the stage batched before the CPU token cap).

Every side tokenizes with the same function (``encode_for_reward``), so every side scores the same
token ids; the time includes tokenization. Scaling: ours on 1/4, 1/2 and all of the pairs, timed
alternately, as the marginal cost of one more sequence (see ``common.emit_marginal``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import RM_NAME, alternate, emit, log, rate  # noqa: E402


def pad_rows(chunk: list[dict], width: int, pad: int) -> dict:
    """Right-pad encoded pairs to ``width`` tokens, written out by hand as a user's loop would."""
    import torch

    batch = {"input_ids": torch.full((len(chunk), width), pad, dtype=torch.long),
             "attention_mask": torch.zeros((len(chunk), width), dtype=torch.long),
             "token_type_ids": torch.zeros((len(chunk), width), dtype=torch.long)}
    for i, it in enumerate(chunk):
        k = len(it["input_ids"])
        batch["input_ids"][i, :k] = torch.tensor(it["input_ids"])
        batch["attention_mask"][i, :k] = 1
        if "token_type_ids" in it:
            batch["token_type_ids"][i, :k] = torch.tensor(it["token_type_ids"])
    return batch


def arrival_loop(model, tok, prompts, responses, fmt: str, ml: int, bs: int, fixed: bool) -> dict:
    """Tokenize everything, then batches of ``bs`` in arrival order, padded to ``ml`` (``fixed``) or
    to the batch's longest sequence."""
    import torch

    from rlhf_spec.rewards.classifier import encode_for_reward, reward_forward

    items = encode_for_reward(tok, prompts, responses, fmt, ml)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    scores = []
    with torch.no_grad():
        for s in range(0, len(items), bs):
            chunk = items[s : s + bs]
            width = ml if fixed else max(len(it["input_ids"]) for it in chunk)
            scores += reward_forward(model, pad_rows(chunk, width, pad)).tolist()
    return {"sequences": len(items), "scores": scores}


def padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def load_pairs(n: int):
    rows = common.hh_dataset((0.0, 1.0), limit=(n + 1) // 2)
    prompts, responses = [], []
    for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"]):
        prompts += [p, p]
        responses += [c, r]
    return prompts[:n], responses[:n]


def check_same_scores(model, tok, prompts, responses, fmt, ml, bs) -> float:
    """Largest gap between ours and the pad-to-longest loop on the first 16 pairs (float rounding only)."""
    from rlhf_spec.rewards.classifier import score_pairs

    a = score_pairs(model, tok, prompts[:16], responses[:16], fmt, ml, bs, bucket=True)
    b = arrival_loop(model, tok, prompts[:16], responses[:16], fmt, ml, bs, fixed=False)["scores"]
    return max(abs(x - y) for x, y in zip(a, b))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    common.setup()
    import torch

    from rlhf_spec.algorithms.batching import length_batches
    from rlhf_spec.rewards.classifier import CPU_BATCH_TOKENS, collate, encode_for_reward, reward_forward, score_pairs

    log("score: loading all-MiniLM-L6-v2")
    model, tok = common.load_reward_model()
    fmt, ml, bs = "pair", args.max_length, args.batch_size
    prompts, responses = load_pairs(args.sequences)
    n = len(prompts)
    lengths = [len(it["input_ids"]) for it in encode_for_reward(tok, prompts, responses, fmt, ml)]
    log(f"score: {n} sequences, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f})")
    max_diff = check_same_scores(model, tok, prompts, responses, fmt, ml, bs)
    log(f"score: max |ours - pad to longest| over 16 scores = {max_diff:.2e}")

    def ours(k=n, cap=None):
        def run():
            score_pairs(model, tok, prompts[:k], responses[:k], fmt, ml, bs, bucket=True, progress=None, max_batch_tokens=cap)
            return {"sequences": k}
        return run

    def one_at_a_time():
        with torch.no_grad():
            for p, r in zip(prompts, responses):
                reward_forward(model, collate(tok, encode_for_reward(tok, [p], [r], fmt, ml)))
        return {"sequences": n}

    def loop(fixed: bool):
        return lambda: {"sequences": arrival_loop(model, tok, prompts, responses, fmt, ml, bs, fixed)["sequences"]}

    q = max(1, n // 4)
    log("score: ours vs pad to longest vs one at a time vs fixed padding vs uncapped buckets; ours at 1/4 and 1/2")
    runs = alternate([("ours", ours()), ("pad_to_longest", loop(False)), ("one_at_a_time", one_at_a_time),
                      ("fixed_padded", loop(True)), ("ours_uncapped", ours(cap=0)),
                      ("ours_1x", ours(q)), ("ours_2x", ours(2 * q))], args.reps)
    arrival = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
    counts = {"real_tokens": sum(lengths), "padded_tokens_ours": padded_tokens(length_batches(lengths, bs, CPU_BATCH_TOKENS), lengths),
              "padded_tokens_pad_to_longest": padded_tokens(arrival, lengths), "padded_tokens_fixed": ml * n}
    log(f"score: padded tokens {counts}")
    settings = {"format": fmt, "max_length": ml, "batch_size": bs, "reps": args.reps, "threads": common.threads(),
                "tokens_mean": round(sum(lengths) / n, 1)}
    emit_figures(runs, n, q, counts, max_diff, settings)


def emit_figures(runs: dict, n: int, q: int, counts: dict, max_diff: float, settings: dict) -> None:
    from rlhf_spec.rewards.classifier import CPU_BATCH_TOKENS

    ours = rate(runs["ours"], "sequences")
    emit("score.ours_vs_pad_to_longest", ours, rate(runs["pad_to_longest"], "sequences"), "sequences/s", n, RM_NAME,
         target=">=1.5", max_abs_score_diff=max_diff, **counts, **settings,
         note="baseline: arrival order, batches of batch_size padded to their longest sequence, same tokenization")
    emit("score.ours_vs_one_at_a_time", ours, rate(runs["one_at_a_time"], "sequences"), "sequences/s", n, RM_NAME,
         target=">=3.0", note="REBEL rank.py's way: one forward pass per pair, no padding (the 3x target comes from "
                              "GPUs; on CPU a forward pass costs about the same per token at any batch size)", **settings)
    emit("score.ours_vs_fixed_padded", ours, rate(runs["fixed_padded"], "sequences"), "sequences/s", n, RM_NAME,
         target=">=1.0", note="arrival order, every batch padded to max_length", **counts, **settings)
    emit("score.ours_vs_uncapped_buckets", ours, rate(runs["ours_uncapped"], "sequences"), "sequences/s", n, RM_NAME,
         target=">=1.0",
         note=f"buckets capped at {CPU_BATCH_TOKENS} padded tokens on CPU against buckets of batch_size rows (the behaviour before the cap)",
         **settings)
    secs = [common.seconds(runs[k]) for k in ("ours_1x", "ours_2x", "ours")]
    common.emit_marginal("score.scaling_marginal_cost_4x_vs_2x", [q, 2 * q, n], secs, "sequence", RM_NAME, **settings)


if __name__ == "__main__":
    main()
