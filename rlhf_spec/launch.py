"""Multi-process stages. A stage whose params have ``num_processes > 1`` runs in that many workers,
started with ``accelerate launch`` (given an accelerate/DeepSpeed config) or ``torchrun``; each worker
rebuilds the :class:`~rlhf_spec.context.StageContext` from a JSON job file and calls the stage's
``run``. The runner does this for every stage, so an implementation cannot forget it.

``python -m rlhf_spec.launch JOB.json`` is the worker entry point.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from .context import InputArtifact, StageContext, StageInputs, StageOutput
from .model_source import ModelSource
from .paths import resolve
from .records import StageResult
from .runtime import WORKER_ENV, in_worker, quiet_libraries


def execute_stage(ctx: StageContext, impl):
    """Run ``impl.run(ctx)`` here, or in ``params.num_processes`` workers when that is above 1.

    Returns:
        the stage's :class:`~rlhf_spec.records.StageResult` (rank 0's, for several processes).

    Raises:
        whatever the stage raises; RuntimeError if a worker exits non-zero.
    """
    if int(getattr(ctx.params, "num_processes", 1) or 1) > 1 and not in_worker():
        return launch_stage(ctx)
    return impl.run(ctx)


def context_to_job(ctx: StageContext) -> dict:
    """A JSON-able description of ``ctx`` that :func:`job_to_context` turns back into a context.

    The params are written as a spec writes them (a field with an alias under its alias), so the
    worker's validation accepts them again.
    """
    s = ctx.spec
    return {
        "stage_id": s.stage_id, "kind": s.kind, "uses": s.uses, "key": s.key, "pointer": s.pointer,
        "params": s.params.model_dump(mode="json", by_alias=True), "seed": s.seed, "base_dir": str(s.base_dir),
        "inputs": [i.__dict__ for i in s.inputs], "models": {k: v.to_dict() for k, v in s.models.items()},
        "datasets": dict(s.datasets), "out_dir": str(ctx.out_dir), "partial_dir": str(ctx.partial_dir),
        "cache_root": str(ctx.cache_root),
    }


def job_to_context(job: dict, registry) -> tuple[StageContext, object]:
    """Rebuild a context (params validated again, reward and backend specs resolved) and find its implementation.

    Raises:
        RuntimeError: if the implementation, or a reward or backend it names, is not installed here.
    """
    from .spec.validate import bind_components

    impl, reason = registry.lookup(job["kind"], job["uses"])
    if impl is None:
        raise RuntimeError(reason)
    params = impl.params.model_validate(job["params"])
    problems: list = []
    bind_components(params, registry, job["pointer"] + "/params", problems)
    if problems:
        raise RuntimeError("; ".join(p.render() for p in problems))
    inputs = StageInputs(stage_id=job["stage_id"], kind=job["kind"], uses=job["uses"], key=job["key"], params=params,
                         seed=job["seed"], inputs=tuple(InputArtifact(**i) for i in job["inputs"]),
                         models={k: ModelSource.from_dict(v) for k, v in job["models"].items()},
                         datasets=job["datasets"], base_dir=Path(job["base_dir"]), pointer=job["pointer"])
    return StageContext(inputs, StageOutput(out_dir=Path(job["out_dir"])), Path(job["partial_dir"]),
                        Path(job["cache_root"])), impl


def free_port() -> int:
    """A TCP port on localhost that no process listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(num_processes: int, accelerate_config: str | None, job_path: Path, port: int) -> list[str]:
    """The command that starts ``num_processes`` workers: ``accelerate launch`` with a config file, else
    ``torchrun``."""
    if accelerate_config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                "--num_processes", str(num_processes), "--main_process_port", str(port), "-m", "rlhf_spec.launch",
                str(job_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_port",
            str(port),
            "-m", "rlhf_spec.launch", str(job_path)]


def launch_stage(ctx: StageContext) -> StageResult:
    """Run ``ctx``'s stage in ``params.num_processes`` worker processes and return rank 0's result.

    Rank 0's timings, counters and the cache keys it used are merged into ``ctx.output``, so they
    reach the manifest as in a one-process run.

    Raises:
        RuntimeError: if a worker exits non-zero (its output has been printed).
    """
    p = ctx.params
    ctx.partial_dir.mkdir(parents=True, exist_ok=True)
    job_path, result_path = ctx.partial_dir / "launch_job.json", ctx.partial_dir / "launch_result.json"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(context_to_job(ctx)))
    cfg = str(resolve(p.accelerate_config, ctx.base_dir)) if getattr(p, "accelerate_config", None) else None
    env = dict(os.environ, **{WORKER_ENV: "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    # a worker killed by a signal (SIGSEGV, SIGABRT from C++) writes its Python stack to launch.log
    env.setdefault("PYTHONFAULTHANDLER", "1")
    ctx.progress.note(f"{p.num_processes} processes")
    code = _run_filtered(launch_command(p.num_processes, cfg, job_path, free_port()), env, ctx.base_dir,
                         ctx.partial_dir / "launch.log")
    if code != 0:
        raise RuntimeError(f"{p.num_processes}-process run of stage '{ctx.stage_id}' exited with code {code}: "
                           f"{worker_errors((ctx.partial_dir / 'launch.log').read_text(errors='replace'))} "
                           f"(all output in {ctx.partial_dir / 'launch.log'})")
    data = json.loads(result_path.read_text())
    for name, secs in data.get("timings", {}).items():
        ctx.output.timings[name] = ctx.output.timings.get(name, 0.0) + secs
    for name, n in data.get("counters", {}).items():
        ctx.count(name, n)
    ctx.output.used_keys.extend(k for k in data.get("used_keys", []) if k not in ctx.output.used_keys)
    return StageResult(metrics=data.get("metrics", {}), rows=data.get("rows"), output_type=data.get("output_type"))


def worker_errors(log: str) -> str:
    """The exceptions the workers raised, from their output (``[rank1]: RuntimeError: ...`` lines, or a
    bare ``...Error: ...`` line), one per distinct message; the last lines when there are none."""
    import re

    found = []
    for line in log.splitlines():
        m = re.match(r"^(?:\[rank(\d+)\]: )?([A-Za-z_.]*(?:Error|Exception|Interrupt|Diverged)): (.*)$", line.strip())
        if m and not m.group(2).startswith("torch.distributed.elastic"):
            text = f"rank {m.group(1)}: {m.group(2)}: {m.group(3)}" if m.group(1) else f"{m.group(2)}: {m.group(3)}"
            if text not in found:
                found.append(text)
    return "; ".join(found[:4]) if found else "\n".join(log.splitlines()[-20:])


def _run_filtered(cmd: list[str], env: dict, cwd: Path, log_path: Path) -> int:
    """Run the launcher, write all its output (and the workers') to ``log_path`` and pass the lines
    that are not library noise (:func:`rlhf_spec.runtime.is_noise`) on to stdout. Returns the exit code."""
    from .runtime import is_noise

    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if not is_noise(line):
                sys.stdout.write(line)
                sys.stdout.flush()
        return proc.wait()


def main(argv=None) -> int:
    """Worker entry point: rebuild the context, run the stage, rank 0 writes the result and its records."""
    from .plugins import registry

    argv = sys.argv[1:] if argv is None else argv
    os.environ[WORKER_ENV] = "1"
    quiet_libraries()
    ctx, impl = job_to_context(json.loads(Path(argv[0]).read_text()), registry())
    result = impl.run(ctx) or StageResult()
    if int(os.environ.get("RANK", "0")) == 0:
        out = {"metrics": result.metrics, "rows": result.rows, "output_type": result.output_type,
               "timings": ctx.output.timings, "counters": ctx.output.counters, "used_keys": ctx.output.used_keys}
        (ctx.partial_dir / "launch_result.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
