"""Train stage (REBEL): our stage's training loop against a minimal hand-written PyTorch loop.

Model: SmolLM2-135M-Instruct (float32, all weights trained). Data: real hh-rlhf harmless-base
pairs (prompt, chosen, rejected), left-truncated to ``--max-prompt-tokens`` prompt tokens and
``--max-response-tokens`` response tokens, with fixed made-up rewards (the loss's cost does not
depend on their values).

* ``ours``: the ``train``/``rebel`` stage itself (``rlhf_spec.stages.train.preference.run_rebel``) driven
  through a :class:`rlhf_spec.context.StageContext`: the accelerate-based ``Trainer``,
  ``pair_logprobs``, ``REBELLoss`` with its logging statistics and KL estimate, TensorBoard
  logging. The time is the stage's own ``train`` timer, so loading the policy, the (cached)
  reference log-probabilities and saving the model are not counted.
* ``baseline``: the same batches in the same order through a loop written out by hand: pad,
  forward, ``log_softmax`` and ``gather`` (as the REBEL scripts do), the squared-error loss,
  ``backward``, ``torch.optim.AdamW`` step. No scheduler, no logging.

Both sides start each repetition from a freshly loaded model and a fresh optimizer (so both pay
for allocating AdamW's state in their first step). Tokens are the real (unpadded) tokens of
every chosen and rejected sequence processed. Peak memory: each side runs two updates once more
in its own subprocess, which reports its peak RSS (``VmHWM``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import POLICY_NAME, WORK, alternate, emit, log, median  # noqa: E402

TDIR = WORK / "train"
SEED = 0
ETA = 1.0
TEMP = 0.8
LR = 1e-5


def params(args, updates: int = 0):
    """The stage's params; ``updates`` > 0 stops after that many updates (``total_episodes``)."""
    from rlhf_spec.stages.train.preference import RebelParams

    extra = {"total_episodes": updates * args.batch_pairs} if updates else {}
    return RebelParams.model_validate({
        "policy": "policy", "eta": ETA, "learning_rate": LR, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 1e-6,
        "scheduler": "cosine", "warmup_ratio": 0.1, "per_device_train_batch_size": args.batch_pairs,
        "gradient_accumulation_steps": 1, "epochs": 1.0, "logprob_temperature": TEMP,
        "max_prompt_tokens": args.max_prompt_tokens, "max_response_tokens": args.max_response_tokens,
        "save_every": 1_000_000, "logprob_batch_size": 8, **extra,
    })


def make_pairs(args) -> Path:
    """Save ``steps * batch_pairs`` real hh-rlhf pairs as a pairs-stage output folder; return it."""
    import datasets

    n = args.steps * args.batch_pairs
    folder = TDIR / f"pairs-{n}"
    if (folder / "data").is_dir():
        return folder
    rows = common.hh_dataset((0.0, 1.0), limit=n)
    data = {"prompt_id": list(rows["prompt_id"]), "prompt": list(rows["prompt"]), "chosen": list(rows["chosen"]),
            "rejected": list(rows["rejected"]), "split": ["train"] * n,
            "chosen_reward": [0.5 + 0.01 * i for i in range(n)], "rejected_reward": [-0.5 - 0.01 * i for i in range(n)]}
    tmp = TDIR / f".pairs-{n}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    datasets.Dataset.from_dict(data).save_to_disk(str(tmp / "data"))
    tmp.rename(folder)
    return folder


def ref_file(args, pairs_dir: Path) -> Path:
    return TDIR / f"ref-{pairs_dir.name}-{args.max_prompt_tokens}-{args.max_response_tokens}.json"


def stage_context(args, pairs_dir: Path, tag: str, updates: int = 0):
    from rlhf_spec.context import InputArtifact, StageContext, StageInputs, StageOutput
    from rlhf_spec.hashing import hash_json

    key = hash_json({"bench": "rebel", "tag": tag, "t": time.time()})
    run_dir = TDIR / "runs" / key[:12]
    out, part = run_dir / "out", run_dir / "partial"
    out.mkdir(parents=True)
    part.mkdir(parents=True)
    pairs_key = hash_json({"bench-pairs": pairs_dir.name, "max_prompt": args.max_prompt_tokens})
    spec = StageInputs(stage_id="rebel", kind="train", uses="rebel", key=key, params=params(args, updates), seed=SEED,
                       inputs=(InputArtifact("pair", "pairs", pairs_key, str(pairs_dir)),),
                       models={"policy": common.policy_source()}, base_dir=common.ROOT)
    return StageContext(spec, StageOutput(out_dir=out), part, TDIR / "cache"), run_dir


def run_ours(args, pairs_dir: Path, updates: int = 0) -> dict:
    """One run of the REBEL stage; returns the seconds of its ``train`` timer and the updates done.

    ``updates`` > 0 stops after that many updates (same pairs, so the same reference log-probs).
    """
    from rlhf_spec.stages.train.preference import run_rebel

    ctx, run_dir = stage_context(args, pairs_dir, "ours", updates)
    try:
        result = run_rebel(ctx)
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds": ctx.output.timings["train"], "updates": result.metrics["updates"]}


class Baseline:
    """The hand-written loop: the pairs' token ids, fixed reference log-probs and the batch order."""

    def __init__(self, args, pairs_dir: Path, ref_file: Path):
        import datasets
        import torch

        from rlhf_spec.algorithms.batching import tokenize_pairs

        self.args = args
        src = common.policy_source()
        self.tok = src.load_tokenizer()
        self.tok.padding_side = "right"
        rows = datasets.load_from_disk(str(pairs_dir / "data"))
        self.items = tokenize_pairs(self.tok, rows, args.max_prompt_tokens, args.max_response_tokens)
        self.rc = torch.tensor(rows["chosen_reward"], dtype=torch.float32)
        self.rr = torch.tensor(rows["rejected_reward"], dtype=torch.float32)
        if ref_file.is_file():
            ref = json.loads(ref_file.read_text())
        else:
            model = src.load_causal_lm()
            with torch.no_grad():
                c, r = self.logps(model, list(range(len(self.items))))
            ref = {"chosen": c.tolist(), "rejected": r.tolist()}
            ref_file.write_text(json.dumps(ref))
            del model
        self.ref_c, self.ref_r = torch.tensor(ref["chosen"]), torch.tensor(ref["rejected"])
        # the Trainer's order: a permutation seeded with the stage's training seed, cut into micro-batches
        g = torch.Generator().manual_seed(SEED + 555134)
        perm = torch.randperm(len(self.items), generator=g).tolist()
        b = args.batch_pairs
        self.batches = [perm[i : i + b] for i in range(0, len(perm) - b + 1, b)]
        self.tokens = sum(len(it["chosen_ids"]) + len(it["rejected_ids"]) for it in self.items)

    def logps(self, model, idx):
        import torch
        import torch.nn.functional as F

        seqs = [self.items[i]["chosen_ids"] for i in idx] + [self.items[i]["rejected_ids"] for i in idx]
        starts = [self.items[i]["prompt_len"] for i in idx] * 2
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        mask = torch.zeros((len(seqs), width), dtype=torch.float32)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
            mask[i, st : len(s)] = 1.0
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1] / (TEMP + 1e-7)
        logp = torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None]).squeeze(-1)
        seq = (logp * mask[:, 1:]).sum(-1)
        return seq[: len(idx)], seq[len(idx) :]

    def load(self):
        import torch

        model = common.policy_source().load_causal_lm()
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-6)
        return model, opt

    def train(self, model, opt, updates: int = 0) -> None:
        for mb in self.batches[: updates or None]:
            pc, pr = self.logps(model, mb)
            margin = (pc - self.ref_c[mb]) - (pr - self.ref_r[mb])
            loss = ((margin - ETA * (self.rc[mb] - self.rr[mb])) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()


def child(args) -> None:
    """Run one side for two updates and print its peak RSS (MiB) as JSON.

    Two updates reach the peak: the first allocates the gradients and AdamW's state, and every
    later update needs the same memory again.
    """
    pairs_dir = make_pairs(args)
    updates = min(2, args.steps)
    if args.child == "ours":
        secs = run_ours(args, pairs_dir, updates=updates)["seconds"]
    else:
        base = Baseline(args, pairs_dir, ref_file(args, pairs_dir))
        model, opt = base.load()
        t0 = time.perf_counter()
        base.train(model, opt, updates=updates)
        secs = time.perf_counter() - t0
    print(json.dumps({"side": args.child, "peak_rss_mb": common.peak_rss_mb(), "train_seconds": secs}), flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer updates per repetition")
    ap.add_argument("--batch-pairs", type=int, default=2)
    ap.add_argument("--max-prompt-tokens", type=int, default=64)
    ap.add_argument("--max-response-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--child", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    common.setup()
    if args.child:
        return child(args)
    shutil.rmtree(TDIR, ignore_errors=True)  # nothing carried over from an earlier run
    TDIR.mkdir(parents=True)

    pairs_dir = make_pairs(args)
    base = Baseline(args, pairs_dir, ref_file(args, pairs_dir))
    log(f"train: {len(base.items)} pairs, {base.tokens} tokens per pass, {len(base.batches)} updates of "
        f"{args.batch_pairs} pairs")
    # Untimed warm-up of each side (one update): first-call costs (lazy imports, the allocator
    # growing the heap) would otherwise land on whichever side runs first. It also computes the
    # stage's reference log-probs, a shared cache entry the timed runs then read.
    run_ours(args, pairs_dir, updates=1)
    base.train(*base.load(), updates=1)

    def ours():
        r = run_ours(args, pairs_dir)
        assert r["updates"] == len(base.batches), r
        return {"tokens": base.tokens, "stage_seconds": r["seconds"]}

    def baseline():
        model, opt = base.load()
        t0 = time.perf_counter()
        base.train(model, opt)
        return {"tokens": base.tokens, "stage_seconds": time.perf_counter() - t0}

    log("train: REBEL stage vs hand-written loop")
    runs = alternate([("ours", ours), ("baseline", baseline)], args.reps)
    tps = {k: median([r["tokens"] / r["stage_seconds"] for r in v]) for k, v in runs.items()}
    settings = {"steps": args.steps, "batch_pairs": args.batch_pairs, "max_prompt_tokens": args.max_prompt_tokens,
                "max_response_tokens": args.max_response_tokens, "reps": args.reps, "threads": common.threads()}
    emit("train.rebel_ours_vs_plain_loop", tps["ours"], tps["baseline"], "tokens/s", len(base.items), POLICY_NAME,
         target=">=0.95", **settings)

    log("train: peak RSS, each side in its own process")
    rss = {}
    for side in ("baseline", "ours"):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--steps", str(args.steps),
               "--batch-pairs", str(args.batch_pairs), "--max-prompt-tokens", str(args.max_prompt_tokens),
               "--max-response-tokens", str(args.max_response_tokens)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rec = json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("{")][-1])
        rss[side] = rec["peak_rss_mb"]
        log(f"  {side}: peak RSS {rss[side]:.0f} MiB")
    emit("train.rebel_peak_rss_ours_vs_plain_loop", rss["ours"], rss["baseline"], "MiB", len(base.items), POLICY_NAME,
         better="lower", target="<=1.1", rss_updates=min(2, args.steps), **settings)


if __name__ == "__main__":
    main()
