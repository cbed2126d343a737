"""Shard bookkeeping: ``StageContext.run_shards`` with a trivial process function, by shards and by rows.

Every shard is selected, saved (``save_to_disk``), fsynced, hashed and journalled, then all shards
are loaded back and concatenated; the process function itself returns its rows unchanged, so
what is timed (``run_shards`` alone) is the bookkeeping. Each call starts from an empty
``partial`` folder (nothing to resume).

* 10,000 rows in 1, 16 and 256 shards: rows/s against one shard, and the marginal cost of a shard
  between 16 and 256 shards against that between 1 and 16 (equal means linear in shards).
* 2,500, 10,000 and 40,000 rows in 16 shards: the marginal cost of a row between 10,000 and 40,000
  against that between 2,500 and 10,000 (about 1 means linear in rows, whatever the fixed cost).

A marginal cost is a difference of two timings and noise can make it zero or negative; such a
figure has no ratio and ``met`` is null (``common.emit``), so it can never pass on a bad baseline.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import WORK, alternate, emit, log, median  # noqa: E402

SDIR = WORK / "shards"


def make_rows(n: int):
    import datasets

    ids = [hashlib.sha256(str(i).encode()).hexdigest()[:16] for i in range(n)]
    return datasets.Dataset.from_dict({"prompt_id": ids, "text": [f"row {i}: " + "x" * (20 + i % 200) for i in range(n)],
                                       "value": list(range(n))})


def run_once(rows, shards: int) -> dict:
    from pydantic import BaseModel

    from rlhf_spec.context import StageContext, StageInputs, StageOutput

    class P(BaseModel):
        pass

    work = SDIR / "run"
    shutil.rmtree(work, ignore_errors=True)
    (work / "out").mkdir(parents=True)
    spec = StageInputs(stage_id="shards", kind="sample", uses="bench", key="0" * 64, params=P(), seed=0)
    ctx = StageContext(spec, StageOutput(out_dir=work / "out"), work / "partial", SDIR / "cache")
    t0 = time.perf_counter()
    out = ctx.run_shards(rows, lambda r, s: r, shards)
    dt = time.perf_counter() - t0
    nonempty = len({int(pid[:8], 16) % shards for pid in rows["prompt_id"]})
    assert len(out) == len(rows) and ctx.output.counters["shards_computed"] == nonempty, ctx.output.counters
    shutil.rmtree(work, ignore_errors=True)
    return {"rows": len(rows), "seconds": dt}


def by_shards(rows, reps: int) -> None:
    """10k rows in 1, 16 and 256 shards: rows/s, and the marginal cost of a shard."""
    n = len(rows)
    log(f"shards: {n} rows in 1, 16, 256 shards")
    runs = alternate([(str(k), (lambda k=k: run_once(rows, k))) for k in (1, 16, 256)], reps)
    t = {k: median([r["seconds"] for r in v]) for k, v in runs.items()}
    settings = {"reps": reps}
    for k in ("16", "256"):
        emit(f"shards.rows_per_s_{k}_vs_1_shard", n / t[k], n / t["1"], "rows/s", n, "none (trivial process)",
             target=None, seconds=t[k], seconds_1_shard=t["1"], **settings,
             note="no target: every shard is saved, fsynced, hashed and journalled on purpose (resume), so more shards "
                  "cost more; how that cost grows is judged by shards.marginal_ms_per_shard_256_vs_16")
    m_low = (t["16"] - t["1"]) / 15 * 1000
    m_high = (t["256"] - t["16"]) / 240 * 1000
    emit("shards.marginal_ms_per_shard_256_vs_16", m_high, m_low, "ms/shard", n, "none (trivial process)", better="lower",
         target="<=1.5", seconds={k: round(v, 3) for k, v in t.items()}, **settings,
         note="cost of one more shard between 16 and 256 shards over that between 1 and 16; no ratio (met null) when "
              "either difference is not positive")


def by_rows(rows, reps: int) -> None:
    """n/4, n and 4n rows in 16 shards: the marginal cost of a row."""
    n = len(rows)
    sizes = [n // 4, n, 4 * n]
    log(f"shards: {sizes} rows in 16 shards")
    data = {m: (rows if m == n else make_rows(m)) for m in sizes}
    runs = alternate([(str(m), (lambda m=m: run_once(data[m], 16))) for m in sizes], reps)
    secs = [median([r["seconds"] for r in runs[str(m)]]) for m in sizes]
    common.emit_marginal(f"shards.marginal_cost_per_row_{sizes[2]}_vs_{sizes[1]}", sizes, secs, "row",
                         "none (trivial process)", shards=16, reps=reps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    common.setup()
    SDIR.mkdir(parents=True, exist_ok=True)
    rows = make_rows(args.rows)
    run_once(rows, 4)  # untimed: first-call imports
    by_shards(rows, args.reps)
    by_rows(rows, args.reps)
    shutil.rmtree(SDIR, ignore_errors=True)


if __name__ == "__main__":
    main()
