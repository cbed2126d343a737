"""Multi-process stages: the runner starts workers with ``accelerate launch`` (given an
accelerate/DeepSpeed config) or ``torchrun``, and each worker rebuilds the
:class:`~rlhf_spec.context.StageContext` from a JSON job file.

``python -m rlhf_spec.launch JOB.json`` is the worker entry point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .context import InputArtifact, StageContext
from .hookspecs import StageResult
from .models import ModelSource

WORKER_ENV = "RLHF_SPEC_WORKER"


def in_worker() -> bool:
    """True inside a worker started by :func:`launch_stage`."""
    return os.environ.get(WORKER_ENV) == "1"


def context_to_job(ctx: StageContext) -> dict:
    """A JSON-able description of ``ctx`` that :func:`job_to_context` turns back into a context."""
    return {
        "stage_id": ctx.stage_id, "kind": ctx.kind, "uses": ctx.uses, "key": ctx.key,
        "params": ctx.params.model_dump(mode="json"), "seed": ctx.seed,
        "out_dir": str(ctx.out_dir), "partial_dir": str(ctx.partial_dir), "cache_root": str(ctx.cache_root),
        "inputs": [i.__dict__ for i in ctx.inputs], "models": {k: v.to_dict() for k, v in ctx.models.items()},
        "datasets": ctx.datasets, "base_dir": str(ctx.base_dir),
    }


def job_to_context(job: dict, registry) -> tuple[StageContext, object]:
    """Rebuild a context and find its implementation.

    Raises:
        RuntimeError: if the implementation is not installed in the worker's environment.
    """
    impl, reason = registry.lookup(job["kind"], job["uses"])
    if impl is None:
        raise RuntimeError(reason)
    ctx = StageContext(
        stage_id=job["stage_id"], kind=job["kind"], uses=job["uses"], key=job["key"],
        params=impl.params.model_validate(job["params"]), seed=job["seed"], out_dir=Path(job["out_dir"]),
        partial_dir=Path(job["partial_dir"]), cache_root=Path(job["cache_root"]),
        inputs=[InputArtifact(**i) for i in job["inputs"]],
        models={k: ModelSource.from_dict(v) for k, v in job["models"].items()},
        datasets=job["datasets"], base_dir=Path(job["base_dir"]),
    )
    return ctx, impl


def launch_command(num_processes: int, accelerate_config: str | None, job_path: Path, port: int = 29517) -> list[str]:
    """The command that starts ``num_processes`` workers: ``accelerate launch`` with a config file, else ``torchrun``."""
    if accelerate_config:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config,
                "--num_processes", str(num_processes), "--main_process_port", str(port), "-m", "rlhf_spec.launch", str(job_path)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_port", str(port),
            "-m", "rlhf_spec.launch", str(job_path)]


def launch_stage(ctx: StageContext) -> StageResult:
    """Run ``ctx``'s stage in ``params.num_processes`` worker processes and return rank 0's result.

    Raises:
        RuntimeError: if a worker exits non-zero (its output has been printed).
    """
    p = ctx.params
    ctx.partial_dir.mkdir(parents=True, exist_ok=True)
    job_path = ctx.partial_dir / "launch_job.json"
    result_path = ctx.partial_dir / "launch_result.json"
    result_path.unlink(missing_ok=True)
    job_path.write_text(json.dumps(context_to_job(ctx)))
    cfg = p.accelerate_config
    if cfg and not Path(cfg).is_absolute():
        cfg = str(ctx.base_dir / cfg)
    port = 29500 + int(ctx.key[:4], 16) % 1000
    env = dict(os.environ, **{WORKER_ENV: "1"})
    env.setdefault("OMP_NUM_THREADS", "1")
    ctx.progress.note(f"{p.num_processes} processes")
    proc = subprocess.run(launch_command(p.num_processes, cfg, job_path, port), env=env, cwd=str(ctx.base_dir))
    if proc.returncode != 0:
        raise RuntimeError(f"{p.num_processes}-process training exited with code {proc.returncode}")
    data = json.loads(result_path.read_text())
    return StageResult(metrics=data.get("metrics", {}), rows=data.get("rows"), output_type=data.get("output_type"))


def main(argv=None) -> int:
    """Worker entry point: rebuild the context, run the stage body, rank 0 writes the result."""
    from .plugins import registry

    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    os.environ[WORKER_ENV] = "1"
    from .runner import quiet_libraries

    quiet_libraries()
    ctx, impl = job_to_context(job, registry())
    result = impl.run(ctx) or StageResult()
    if int(os.environ.get("RANK", "0")) == 0:
        out = {"metrics": result.metrics, "rows": result.rows, "output_type": result.output_type}
        (ctx.partial_dir / "launch_result.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
