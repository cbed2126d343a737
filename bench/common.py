"""Shared helpers of the benchmarks: set-up, real models and data, side-by-side timing, JSON output.

Every benchmark prints one JSON line per figure on stdout::

    {"name": ..., "ours": ..., "baseline": ..., "unit": ..., "ratio": ours / baseline, "n": ..., "model": ...,
     "better": "higher" | "lower", "target": ..., "met": true | false | null, ...extra fields}

A figure without a target carries a ``note`` saying why it has none. Scaling figures compare the
marginal cost of one more row at the top size with that at the bottom size (:func:`emit_marginal`).

``better`` says how the ratio reads: for throughputs (``higher``) a ratio above 1 means we are
faster; for seconds, bytes or memory (``lower``) a ratio below 1 means we use less. Progress
messages go to stderr, so stdout holds nothing but figures.

Both sides of a figure run in one process, on the same model and inputs, alternating (the side
that goes first rotates from one repetition to the next), and the median over the repetitions is
reported. Torch runs on ``BENCH_THREADS`` intra-op threads (default 1) on both sides: on a shared
machine with more runnable processes than cores, two OpenMP threads that wait for each other at
every barrier make timings swing by an order of magnitude, while one thread per process degrades
evenly.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work"
HH = "hh-rlhf/harmless-base_test.jsonl.gz"
GGUF_DIR = "models/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM_DIR = "models/all-MiniLM-L6-v2"
POLICY_NAME = "SmolLM2-135M-Instruct"
RM_NAME = "all-MiniLM-L6-v2"


def threads() -> int:
    return int(os.environ.get("BENCH_THREADS", "1"))


def setup() -> None:
    """Quiet libraries, fix the thread count, and make the project importable from a checkout."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(threads())
    try:
        import datasets

        datasets.disable_progress_bars()
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    WORK.mkdir(parents=True, exist_ok=True)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def data_path(rel: str) -> Path:
    """A real data file: the project's ``data/`` (placed by ``make assets``), else ``../shared/data``."""
    for base in (ROOT / "data", ROOT.parent / "shared" / "data"):
        if (base / rel).is_file():
            return base / rel
    raise SystemExit(f"data file {rel} not found; run `make assets`")


# ----------------------------------------------------------------------------- models


_GGUF_DIGEST: list[str] = []


def policy_source():
    """SmolLM2-135M-Instruct from its GGUF file, dequantised once into ``bench/.work/converted/<sha256>``."""
    from rlhf_spec.files import sha256_file
    from rlhf_spec.model_source import ModelSource

    if not _GGUF_DIGEST:
        _GGUF_DIGEST.append(sha256_file(ROOT / GGUF_DIR / GGUF_FILE))
    digest = _GGUF_DIGEST[0]
    return ModelSource(name="policy", origin="spec", path=str(ROOT / GGUF_DIR), gguf_file=GGUF_FILE,
                       converted_dir=str(WORK / "converted" / digest[:16]), identity={"bench": POLICY_NAME, "gguf": digest})


def reward_source():
    """all-MiniLM-L6-v2 as a sequence classifier with one (seeded, untrained) output."""
    from rlhf_spec.model_source import ModelSource

    return ModelSource(name="reward_model", origin="spec", path=str(ROOT / MINILM_DIR), identity={"bench": RM_NAME})


def load_reward_model():
    import torch

    src = reward_source()
    tok = src.load_tokenizer()
    torch.manual_seed(0)
    return src.load_sequence_classifier(), tok


# ----------------------------------------------------------------------------- data


def hh_dataset(hash_range=(0.0, 1.0), limit: Optional[int] = None):
    """hh-rlhf harmless-base rows, normalised as the stages see them (prompt messages, chosen, rejected)."""
    from rlhf_spec.data import load_spec_dataset
    from rlhf_spec.spec import DatasetSpec

    spec = {"path": str(data_path(HH)), "adapter": "hh-rlhf", "hash_range": list(hash_range)}
    if limit:
        spec["limit"] = limit
    return load_spec_dataset(DatasetSpec.model_validate(spec), ROOT)


# ----------------------------------------------------------------------------- timing


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def alternate(sides: list[tuple[str, Callable[[], dict]]], reps: int, warmup: bool = False) -> dict[str, list[dict]]:
    """Run each side ``reps`` times, interleaved; the first side of repetition ``r`` is side ``r % k``.

    Each side is a callable returning its units of work (``{"tokens": ..., "prompts": ...}``); the
    result maps the side's name to one dict per repetition with ``seconds`` and those units. A side
    that times only part of its work itself returns that time as ``seconds``.
    With ``warmup``, every side runs once first, untimed.
    """
    if warmup:
        for name, fn in sides:
            fn()
    out: dict[str, list[dict]] = {name: [] for name, _ in sides}
    k = len(sides)
    for r in range(reps):
        for j in range(k):
            name, fn = sides[(r + j) % k]
            t0 = time.perf_counter()
            units = dict(fn() or {})
            dt = units.pop("seconds", None) or (time.perf_counter() - t0)
            out[name].append({"seconds": dt, **units})
            log(f"  rep {r + 1}/{reps} {name}: {dt:.2f}s {units}")
    return out


def seconds(runs: list[dict]) -> float:
    """Median seconds over repetitions."""
    return median([r["seconds"] for r in runs])


def rate(runs: list[dict], unit: str) -> float:
    """Median over repetitions of ``unit`` per second."""
    return median([r[unit] / r["seconds"] for r in runs])


# ----------------------------------------------------------------------------- output


def emit(name: str, ours: Optional[float], baseline: Optional[float], unit: str, n: Any, model: str,
         better: str = "higher", target: Optional[str] = None, **extra) -> dict:
    """Print one figure as a JSON line; ``ratio`` is ``ours / baseline``.

    ``target`` is a string such as ``">=1.3"`` or ``"<=1.1"``, checked against the ratio. A figure
    without a target must say why in ``note``. No ratio (and so ``met: null``, with a ``guard``
    field saying why) when the baseline is not positive or ours is negative: such a ratio means
    nothing, and a ``<=`` target would pass on it.
    """
    if not target and not extra.get("note"):
        raise ValueError(f"figure {name}: give a target or a note saying why it has none")
    ratio, guard = None, None
    if ours is not None and baseline is not None:
        if baseline <= 0 or ours < 0:
            guard = f"no ratio: baseline {baseline:.4g} and ours {ours:.4g} must be positive (noise above the measured cost)"
        else:
            ratio = ours / baseline
    met = None
    if target and ratio is not None:
        op, val = target[:2], float(target[2:])
        met = ratio >= val if op == ">=" else ratio <= val
    rec = {"name": name, "ours": _round(ours), "baseline": _round(baseline), "unit": unit,
           "ratio": _round(ratio, 3), "n": n, "model": model, "better": better, "target": target, "met": met}
    if guard:
        rec["guard"] = guard
    rec.update({k: _round(v) if isinstance(v, float) else v for k, v in extra.items()})
    print(json.dumps(rec), flush=True)
    return rec


def emit_marginal(name: str, rows: list[int], seconds: list[float], unit: str, model: str, **extra) -> dict:
    """The marginal cost per added row at the top size over that at the bottom one.

    With times ``t1, t2, t4`` at ``r1 < r2 < r4`` rows: ours = ``(t4 - t2) / (r4 - r2)``, baseline
    = ``(t2 - t1) / (r2 - r1)``, in milliseconds per row. A cost linear in rows gives about 1 (fixed
    overheads cancel out); a cost that grows faster than linearly gives more. Target ``<= 1.5``.
    When noise makes either difference zero or negative, ``met`` is null (see :func:`emit`).
    """
    (r1, r2, r4), (t1, t2, t4) = rows, seconds
    low = (t2 - t1) / (r2 - r1) * 1000
    high = (t4 - t2) / (r4 - r2) * 1000
    return emit(name, high, low, f"ms/{unit} (marginal)", rows, model, better="lower", target="<=1.5",
                seconds=[round(t, 3) for t in seconds],
                note=f"cost of one more {unit} between {r2} and {r4} {unit}s over that between {r1} and {r2} "
                     f"(median seconds); about 1 when the cost is linear, whatever the fixed overhead", **extra)


def _round(x, nd: int = 4):
    if isinstance(x, float):
        return float(f"{x:.{nd + 2}g}")
    return x


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Read from ``VmHWM`` in ``/proc/self/status``, the high-water mark of this process's own address
    space. (``getrusage`` is no good here: Linux carries ``ru_maxrss`` over ``exec``, so a child
    started with ``vfork`` reports at least its parent's peak.)
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
