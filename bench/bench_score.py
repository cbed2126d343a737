"""Score stage: our scoring path against one sequence at a time and against fixed padded batches.

Model: all-MiniLM-L6-v2 as ``AutoModelForSequenceClassification`` with one (seeded) output, read in
the ``pair`` format, as the quickstart's reward model reads its inputs. Inputs: real hh-rlhf
harmless-base (prompt, response) pairs, the chosen and the rejected reply of each prompt, so
two responses share every prompt as samples do. Three sides run alternately:

* ``ours``: :func:`rlhf_spec.rewards.score_pairs` as the score stage calls it (length buckets);
* ``one_at_a_time``: per pair, tokenize it and run the model on a batch of one, as REBEL's
  ``rank.py`` scores each response with its own forward pass;
* ``fixed_padded``: tokenize everything, then batches of ``batch_size`` in arrival order, each
  padded to ``max_length``;
* ``ours_uncapped``: ``score_pairs`` with ``max_batch_tokens=0``, i.e. length buckets of
  ``batch_size`` rows whatever their width (how the stage batched before the CPU token cap).

All three tokenize with the same function (``encode_for_reward``), so every side scores the same
token ids; the time includes tokenization. Scaling: ours on the first 1/4, 1/2 and all pairs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import RM_NAME, alternate, emit, log, rate  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sequences", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    common.setup()
    import torch

    from rlhf_spec.rewards import CPU_BATCH_TOKENS, collate, encode_for_reward, length_batches, reward_forward, score_pairs

    log("score: loading all-MiniLM-L6-v2")
    model, tok = common.load_reward_model()
    fmt, ml, bs = "pair", args.max_length, args.batch_size
    rows = common.hh_dataset((0.0, 1.0), limit=(args.sequences + 1) // 2)
    prompts, responses = [], []
    for p, c, r in zip(rows["prompt"], rows["chosen"], rows["rejected"]):
        prompts += [p, p]
        responses += [c, r]
    prompts, responses = prompts[: args.sequences], responses[: args.sequences]
    n = len(prompts)
    lengths = [len(it["input_ids"]) for it in encode_for_reward(tok, prompts, responses, fmt, ml)]
    log(f"score: {n} sequences, {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / n:.0f})")

    def ours(k=n, cap=None):
        def run():
            score_pairs(model, tok, prompts[:k], responses[:k], fmt, ml, bs, bucket=True, progress=None, max_batch_tokens=cap)
            return {"sequences": k}
        return run

    def one_at_a_time():
        with torch.no_grad():
            for p, r in zip(prompts, responses):
                item = encode_for_reward(tok, [p], [r], fmt, ml)
                reward_forward(model, collate(tok, item))
        return {"sequences": n}

    def fixed_padded():
        items = encode_for_reward(tok, prompts, responses, fmt, ml)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        with torch.no_grad():
            for s in range(0, n, bs):
                chunk = items[s : s + bs]
                batch = {"input_ids": torch.full((len(chunk), ml), pad, dtype=torch.long),
                         "attention_mask": torch.zeros((len(chunk), ml), dtype=torch.long),
                         "token_type_ids": torch.zeros((len(chunk), ml), dtype=torch.long)}
                for i, it in enumerate(chunk):
                    k = len(it["input_ids"])
                    batch["input_ids"][i, :k] = torch.tensor(it["input_ids"])
                    batch["attention_mask"][i, :k] = 1
                    if "token_type_ids" in it:
                        batch["token_type_ids"][i, :k] = torch.tensor(it["token_type_ids"])
                reward_forward(model, batch)
        return {"sequences": n}

    # same scores whichever way they are batched (float rounding aside)
    a = score_pairs(model, tok, prompts[:16], responses[:16], fmt, ml, bs, bucket=True)
    b = [float(reward_forward(model, collate(tok, encode_for_reward(tok, [p], [r], fmt, ml)))[0])
         for p, r in zip(prompts[:16], responses[:16])]
    max_diff = max(abs(x - y) for x, y in zip(a, b))
    log(f"score: max |bucketed - one at a time| over 16 scores = {max_diff:.2e}")

    batches = length_batches(lengths, bs, CPU_BATCH_TOKENS)
    padded_ours = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    log(f"score: ours forms {len(batches)} batches, {padded_ours} padded tokens for {sum(lengths)} real ones")

    log("score: ours vs one at a time vs fixed padded batches")
    runs = alternate([("ours", ours()), ("one_at_a_time", one_at_a_time), ("fixed_padded", fixed_padded),
                      ("ours_uncapped", ours(cap=0))], args.reps)
    settings = {"format": fmt, "max_length": ml, "batch_size": bs, "reps": args.reps, "threads": common.threads(),
                "tokens_mean": round(sum(lengths) / n, 1)}
    emit("score.ours_vs_one_at_a_time", rate(runs["ours"], "sequences"), rate(runs["one_at_a_time"], "sequences"),
         "sequences/s", n, RM_NAME, target=">=3.0", max_abs_score_diff=max_diff, **settings)
    emit("score.ours_vs_fixed_padded", rate(runs["ours"], "sequences"), rate(runs["fixed_padded"], "sequences"),
         "sequences/s", n, RM_NAME, target=">=1.0", padded_tokens_ours=padded_ours,
         padded_tokens_fixed=ml * n, real_tokens=sum(lengths), **settings)

    emit("score.ours_vs_uncapped_buckets", rate(runs["ours"], "sequences"), rate(runs["ours_uncapped"], "sequences"),
         "sequences/s", n, RM_NAME, target=">=1.0",
         note=f"buckets capped at {CPU_BATCH_TOKENS} padded tokens on CPU against buckets of batch_size rows (the behaviour before the cap)",
         **settings)

    log("score: scaling (ours at 1x, 2x, 4x sequences)")
    q = max(1, n // 4)
    scale = alternate([("1x", ours(q)), ("2x", ours(2 * q))], args.reps)
    scale["4x"] = runs["ours"]
    base = rate(scale["1x"], "sequences")
    for mult, k in (("2x", 2 * q), ("4x", n)):
        emit(f"score.scaling_{mult}_vs_1x", rate(scale[mult], "sequences"), base, "sequences/s", k, RM_NAME,
             target=">=0.8", note=f"throughput at {k} sequences over {q}; flat or higher means cost grows at most linearly",
             **settings)


if __name__ == "__main__":
    main()
