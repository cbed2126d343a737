"""Run every benchmark (``make bench``), one process each, one after the other.

Each benchmark prints its figures as JSON lines; they are passed through to stdout as they come,
collected into ``reports/bench.json`` with the machine and the total time, and summed up in a table
on stderr. The benchmarks run one at a time because they time things against each other on the
same cores; never run two at once.

Usage: python bench/run_all.py [--only sample,score,train,shards,runner] [--quick] [--threads N] [--with-quickstart]

Every figure carries a ``target`` (checked into ``met``) or a ``note`` saying why it has none.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ORDER = ["shards", "score", "sample", "train", "runner"]
# --quick: tiny sizes, to check that everything runs (the figures mean nothing)
QUICK = {
    "sample": ["--prompts", "8", "--batch-size", "4", "--max-new-tokens", "4", "--reps", "1", "--fast-prompts", "4",
               "--fast-batch-size", "4", "--fast-new-tokens", "4", "--fast-n", "2", "--long-prompts", "4", "--plain-batch-size", "2",
               "--mm-size", "512",
               "--fast-reps", "1"],
    "score": ["--sequences", "16", "--reps", "1"],
    "train": ["--steps", "1", "--max-prompt-tokens", "16", "--max-response-tokens", "8", "--reps", "1"],
    "shards": ["--rows", "1000", "--reps", "1"],
    "runner": ["--reps", "1", "--hash-reps", "1", "--skip-smoke"],
}


def machine() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["memory_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)


def run_one(name: str, cmd: list[str], env: dict, figures: list[dict]) -> int:
    """Run one benchmark script, passing its lines through and collecting its figures; its exit code."""
    print(f"[bench] == {name}: {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("{"):
            try:
                figures.append({"bench": name, **json.loads(line)})
            except ValueError:
                pass
        print(line, flush=True)
    return proc.wait()


def table(figures: list[dict]) -> None:
    """The figures as a table on stderr (a figure without a target shows ``note``)."""
    rows = [("figure", "ours", "baseline", "unit", "ratio", "target", "met")]
    for f in figures:
        rows.append((f["name"], fmt(f.get("ours")), fmt(f.get("baseline")), f.get("unit", ""), fmt(f.get("ratio")),
                     f.get("target") or "note", {True: "yes", False: "NO", None: "-"}[f.get("met")]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print("", file=sys.stderr)
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)), file=sys.stderr)


def main() -> int:
    ap = argparse.ArgumentParser(description="Run all benchmarks.")
    ap.add_argument("--only", default=",".join(ORDER), help="comma-separated subset of: " + ", ".join(ORDER))
    ap.add_argument("--quick", action="store_true", help="tiny sizes, to check that the scripts run")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_THREADS", "1")))
    ap.add_argument("--with-quickstart", action="store_true",
                    help="the runner benchmark also runs the quickstart fully, then cached (adds 10-20 minutes)")
    ap.add_argument("--out", default=str(ROOT / "reports" / "bench.json"))
    args = ap.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    env = dict(os.environ, BENCH_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
               PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info = machine()
    t_all = time.perf_counter()
    figures, failures, seconds = [], [], {}
    for name in names:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), *(QUICK[name] if args.quick else [])]
        if name == "runner" and args.with_quickstart:
            cmd.append("--quickstart")
        t0 = time.perf_counter()
        rc = run_one(name, cmd, env, figures)
        seconds[name] = round(time.perf_counter() - t0, 1)
        print(f"[bench] == {name}: {seconds[name]}s" + (f", FAILED (exit {rc})" if rc else ""), file=sys.stderr, flush=True)
        if rc:
            failures.append(name)
    total = round(time.perf_counter() - t_all, 1)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/run_all.py" + (" --quick" if args.quick else "") + (" --with-quickstart" if args.with_quickstart else "")
    out.write_text(json.dumps({"started": started, "command": command, "threads": args.threads, "machine": info,
                               "seconds_total": total, "seconds": seconds, "failed": failures, "figures": figures}, indent=1) + "\n")
    table(figures)
    print(f"\n[bench] total {total}s ({', '.join(f'{k} {v}s' for k, v in seconds.items())}); figures in {out}",
          file=sys.stderr, flush=True)
    if failures:
        print(f"[bench] failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
