"""Runner overhead: a fully cached rerun against the full run, content hashing, and what the cache holds.

(a) ``rlhf-spec run specs/smoke_cpu.json`` into a fresh cache folder (the full run), then the same
    command again, three times (the cached reruns; median), all in this invocation. For scale,
    ``rlhf-spec validate`` of the same spec is timed too: interpreter start, imports and spec
    validation, no cache work. The quickstart's cached rerun against its full run is measured the
    same way only with ``--quickstart`` (its full run takes 10-20 minutes); otherwise that figure is
    emitted with no values. No report from an earlier run is ever read.
(b) ``rlhf_spec.files.sha256_file`` against ``sha256sum`` on the same file (the 98 MB GGUF),
    alternating, after one untimed read that brings the file into the page cache.
(c) After the smoke runs: bytes on disk under the cache folder against the bytes its entries and
    converted models hold (manifest sizes); bytes stored twice (same content in two files that
    are not hard links of each other); for model folders, bytes against the size of the
    parameters they store; for dataset entries, bytes against their Arrow tables.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import ROOT, WORK, alternate, emit, log, median  # noqa: E402

SMOKE = "specs/smoke_cpu.json"
QUICKSTART = "specs/quickstart_cpu.json"


def cli(*args: str, check: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    env = dict(os.environ, OMP_NUM_THREADS=str(common.threads()), TOKENIZERS_PARALLELISM="false")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "rlhf_spec", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if check and r.returncode != 0:
        raise RuntimeError(f"rlhf-spec {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return dt, r


def statuses(report: Path) -> list[str]:
    return [s["status"] for s in json.loads(report.read_text())["stages"]]


def timed_run(spec: str, cache: Path, report: Path) -> tuple[float, list[str]]:
    """``rlhf-spec run spec`` into ``cache``; its seconds and the stages' statuses from the report it
    writes now (an older report at that path is removed first, so it is never read)."""
    report.unlink(missing_ok=True)
    dt, _ = cli("run", spec, "--cache-dir", str(cache), "--report", str(report))
    return dt, statuses(report)


def full_then_cached(spec: str, tag: str, reps: int, extra_sides=()) -> tuple[float, dict, Path, int]:
    """Run ``spec`` into a fresh cache folder of this benchmark, then rerun it cached ``reps`` times
    (alternating with ``extra_sides``). Returns the full run's seconds, the alternated runs, the cache
    folder and the number of stages.

    Raises:
        RuntimeError: if the full run did not run every stage or a rerun recomputed one.
    """
    cache = WORK / f"{tag}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    full_s, st = timed_run(spec, cache, WORK / f"{tag}-full.json")
    log(f"  full run: {full_s:.1f}s, stages {st}")
    if any(s != "ran" for s in st):
        raise RuntimeError(f"the {tag} run into a fresh cache did not run every stage: {st}")

    def cached():
        _, again = timed_run(spec, cache, WORK / f"{tag}-cached.json")
        return {"cached_stages": sum(s == "cached" for s in again)}

    runs = alternate([("cached_rerun", cached), *extra_sides], reps)
    if any(r["cached_stages"] != len(st) for r in runs["cached_rerun"]):
        raise RuntimeError(f"a rerun of {spec} recomputed a stage")
    return full_s, runs, cache, len(st)


def runner_overhead(reps: int) -> Path:
    log("runner: full smoke run into a fresh cache (a few minutes)")

    def validate():
        cli("validate", SMOKE)
        return {}

    full_s, runs, cache, n_stages = full_then_cached(SMOKE, "smoke", reps, [("validate", validate)])
    cached_s, validate_s = median([r["seconds"] for r in runs["cached_rerun"]]), median([r["seconds"] for r in runs["validate"]])
    emit("runner.smoke_cached_rerun_vs_full_run", cached_s, full_s, "s", n_stages, "smoke_cpu.json", better="lower",
         target="<=0.1", reps=reps, threads=common.threads(),
         note="both timed in this run: one full run into a fresh cache (includes the GGUF conversion), then the median of cached reruns")
    emit("runner.smoke_cached_rerun_vs_validate", cached_s, validate_s, "s", n_stages, "smoke_cpu.json", better="lower",
         target=None, reps=reps,
         note="no target: a breakdown, not a comparison with a peer. validate = interpreter start, imports, plugin discovery "
              "and spec validation; the rest of a cached rerun is keys, verification and the report")
    return cache


def quickstart(reps: int, run_it: bool) -> None:
    """The quickstart's cached rerun against its full run, both timed in this invocation, or nothing."""
    if not run_it:
        emit("runner.quickstart_cached_rerun_vs_full_run", None, None, "s", None, "quickstart_cpu.json", better="lower",
             target="<=0.1", note="not measured: needs a full quickstart run (make quickstart); "
                                  "bench/run_all.py --with-quickstart times one into the benchmark's own cache (10-20 min)")
        return
    log("runner: full quickstart run into a fresh cache (10-20 minutes)")
    full_s, runs, cache, n_stages = full_then_cached(QUICKSTART, "quickstart", reps)
    emit("runner.quickstart_cached_rerun_vs_full_run", median([r["seconds"] for r in runs["cached_rerun"]]), full_s, "s",
         n_stages, "quickstart_cpu.json", better="lower", target="<=0.1", reps=reps, threads=common.threads(),
         note="both timed in this run: one full run into a fresh cache of this benchmark, then the median of cached reruns")
    shutil.rmtree(cache, ignore_errors=True)


# ----------------------------------------------------------------------------- (b)


def hashing(reps: int) -> None:
    from rlhf_spec.files import sha256_file

    path = (ROOT / common.GGUF_DIR / common.GGUF_FILE).resolve()
    size = path.stat().st_size
    if shutil.which("sha256sum") is None:
        emit("runner.sha256_file_vs_sha256sum", None, None, "MB/s", size, path.name, note="sha256sum not installed")
        return
    ref = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True).stdout.split()[0]
    if sha256_file(path) != ref:
        raise RuntimeError("sha256_file disagrees with sha256sum")

    def ours():
        sha256_file(path)
        return {"mb": size / 1e6}

    def coreutils():
        subprocess.run(["sha256sum", str(path)], capture_output=True, check=True)
        return {"mb": size / 1e6}

    log(f"hashing: {size / 1e6:.0f} MB, sha256_file vs sha256sum")
    runs = alternate([("sha256_file", ours), ("sha256sum", coreutils)], reps)
    emit("runner.sha256_file_vs_sha256sum", common.rate(runs["sha256_file"], "mb"), common.rate(runs["sha256sum"], "mb"),
         "MB/s", size, path.name, target=">=0.9", reps=reps, note="file in the page cache; sha256sum's time includes starting it")


# ----------------------------------------------------------------------------- (c)


def safetensors_param_bytes(path: Path) -> int:
    """Bytes of the tensors a .safetensors file declares in its header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")


def duplicate_bytes(cache: Path, files: list[Path], disk: int) -> None:
    """Files of 4 KiB or more whose content is stored more than once (not as hard links)."""
    groups: dict[tuple[int, str], list[Path]] = {}
    sizes: dict[int, list[Path]] = {}
    for p in files:
        sizes.setdefault(p.stat().st_size, []).append(p)
    for size, ps in sizes.items():
        if len(ps) < 2 or size < 4096:
            continue
        for p in ps:
            h = hashlib.sha256(p.read_bytes()).hexdigest()
            groups.setdefault((size, h), []).append(p)
    dup, dup_paths = 0, []
    for (size, _), ps in groups.items():
        inodes = {(p.stat().st_dev, p.stat().st_ino) for p in ps}
        if len(inodes) > 1:
            dup += size * (len(inodes) - 1)
            dup_paths.append(sorted(str(p.relative_to(cache)) for p in ps))
    emit("runner.cache_duplicate_bytes", dup / 1e6, disk / 1e6, "MB", len(files), "smoke_cpu.json", better="lower",
         target="<=0.01", duplicated=dup_paths[:10], note="files of 4 KiB or more stored more than once, over all bytes on disk")


def cache_size(cache: Path) -> None:
    files = [p for p in cache.rglob("*") if p.is_file() and not p.is_symlink()]
    seen_inodes, disk = set(), 0
    by_area: dict[str, int] = {}
    for p in files:
        st = p.stat()
        if (st.st_dev, st.st_ino) in seen_inodes:
            continue
        seen_inodes.add((st.st_dev, st.st_ino))
        disk += st.st_size
        area = p.relative_to(cache).parts[0]
        by_area[area] = by_area.get(area, 0) + st.st_size
    manifest_bytes = 0
    model_files, entries = [], 0
    for man_path in (cache / "entries").glob("*/*/manifest.json"):
        man = json.loads(man_path.read_text())
        entries += 1
        manifest_bytes += int(man.get("bytes", 0)) + man_path.stat().st_size
        model_files += list(man_path.parent.glob("model/*.safetensors"))
    converted = sum(p.stat().st_size for p in (cache / "converted").rglob("*") if p.is_file())
    content = manifest_bytes + converted
    emit("runner.cache_disk_vs_content", disk / 1e6, content / 1e6, "MB", entries, "smoke_cpu.json", better="lower",
         target="<=1.05", by_area_mb={k: round(v / 1e6, 3) for k, v in sorted(by_area.items())},
         note="bytes under the cache folder (each inode once) vs bytes its committed entries and converted models hold")

    duplicate_bytes(cache, files, disk)

    # dataset entries: bytes of their data/ folders against the Arrow tables they hold
    import datasets

    data_dirs = [d for d in (cache / "entries").glob("*/*/data") if d.is_dir()]
    data_disk = sum(q.stat().st_size for d in data_dirs for q in d.rglob("*") if q.is_file())
    table_bytes = sum(datasets.load_from_disk(str(d)).data.nbytes for d in data_dirs)
    emit("runner.cache_dataset_bytes_vs_table", data_disk / 1e6, table_bytes / 1e6, "MB", len(data_dirs), "smoke_cpu.json",
         better="lower", target=None, overhead_kb_per_entry=round((data_disk - table_bytes) / 1e3 / max(1, len(data_dirs)), 2),
         note="no target: the ratio depends on table size, not on us. Dataset entries' data/ folders vs the in-memory "
              "Arrow tables they hold; the difference is a few KB of metadata and Arrow framing per entry "
              "(overhead_kb_per_entry), which weighs a lot next to the smoke run's 8-row tables")

    model_files += list((cache / "converted").glob("*/*.safetensors"))
    folders = {p.parent for p in model_files}
    folder_bytes = sum(q.stat().st_size for d in folders for q in d.rglob("*") if q.is_file())
    params = sum(safetensors_param_bytes(p) for p in model_files)
    emit("runner.cache_model_bytes_vs_parameters", folder_bytes / 1e6, params / 1e6, "MB", len(folders), "smoke_cpu.json",
         better="lower", target="<=1.05",
         note="model folders in the cache (entries and converted) vs the bytes of the parameters they store")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hash-reps", type=int, default=5)
    ap.add_argument("--skip-smoke", action="store_true", help="no smoke run (and so no cache figures): hashing only")
    ap.add_argument("--keep-cache", action="store_true", help="keep the smoke run's cache folder (about 1.2 GB) afterwards")
    ap.add_argument("--quickstart", action="store_true", help="also run the quickstart fully, then cached (10-20 minutes)")
    args = ap.parse_args(argv)
    common.setup()
    hashing(args.hash_reps)
    quickstart(args.reps, args.quickstart)
    if args.skip_smoke:
        log("runner: --skip-smoke: no smoke run, so no cached-rerun or cache-size figures")
        return
    cache = runner_overhead(args.reps)  # the cache figures describe this run's cache folder only
    cache_size(cache)
    if not args.keep_cache:
        shutil.rmtree(cache, ignore_errors=True)

if __name__ == "__main__":
    main()
