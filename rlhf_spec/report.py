"""The run report: one JSON document per run with every stage's status, time, output and metrics."""

from __future__ import annotations

import datetime as _dt
import socket
import time
from pathlib import Path
from typing import Any

from .cache import atomic_write_json

HEADLINE = ("eval_accuracy", "eval_pairs", "win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate",
            "reward_mean_policy", "reward_mean_reference", "kl_k1", "kl_k3", "reward_mean", "pairs", "samples",
            "updates", "train_loss_last10")


def summary(outcomes: list) -> dict:
    """Headline metrics (``stage.metric``) and where the time went (seconds per stage)."""
    out: dict[str, Any] = {}
    for o in outcomes:
        for k in HEADLINE:
            if k in o.metrics:
                out[f"{o.id}.{k}"] = o.metrics[k]
    out["seconds_by_stage"] = {o.id: round(o.seconds, 2) for o in outcomes}
    return out


def stage_row(outcome) -> dict:
    """One stage of the run report: the outcome's fields; ``computed_seconds`` (the seconds a cached stage's
    entry took when it was computed, from its manifest) only where the runner read one."""
    return {k: v for k, v in outcome.__dict__.items() if not (k == "computed_seconds" and v is None)}


def build_report(runner, started: float, outcomes: list, status: str = "ok", error: str = "") -> dict:
    """The JSON run report: spec, status, error, timing, host, cache folder, warnings, summary and
    per stage id, kind, uses, key, status, seconds, output, metrics (see :func:`stage_row`)."""
    return {
        "spec": runner.pipeline.spec.name,
        "source": runner.pipeline.source,
        "status": status,
        "error": error,
        "started": _dt.datetime.fromtimestamp(started, _dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.time() - started, 3),
        "host": socket.gethostname(),
        "cache_dir": str(runner.cache.root),
        "warnings": list(runner.cache.warnings),
        "summary": summary(outcomes),
        "stages": [stage_row(o) for o in outcomes],
    }


def write_report(path: Path, report: dict) -> Path:
    """Write the run report atomically and return its path.

    Raises:
        CacheError: if it cannot be written.
    """
    atomic_write_json(Path(path), report)
    return Path(path)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _seconds(stage: dict) -> str:
    """This run's seconds, and for a cached stage the seconds it took when it was computed."""
    text = f"{stage['seconds']:.1f}"
    if stage.get("computed_seconds") is not None:
        text += f" (computed in {stage['computed_seconds']:.1f})"
    return text


def print_summary(con, report: dict) -> None:
    """Print the per-stage table, each stage's headline metrics and the warnings on a rich console."""
    from rich.table import Table

    t = Table(title=f"{report['spec']}: {report['status']} in {report['seconds']:.1f} s")
    for col in ("stage", "kind", "uses", "status", "seconds", "key", "rows", "output"):
        t.add_column(col, overflow="fold")
    for o in report["stages"]:
        style = {"ran": "yellow", "cached": "green", "reused": "green"}.get(o["status"], "red")
        t.add_row(o["id"], o["kind"], o["uses"], f"[{style}]{o['status']}[/]", _seconds(o), o["key"][:12],
                  "" if o["rows"] is None else str(o["rows"]), o["output"])
    con.print(t)
    for o in report["stages"]:
        headline = {k: v for k, v in o["metrics"].items()
                    if isinstance(v, (int, float)) and not k.startswith("seconds_")}
        if headline:
            con.print(f"  {o['id']}: " + ", ".join(f"{k}={_fmt(v)}" for k, v in list(headline.items())[:10]))
    for w in report.get("warnings", []):
        con.print(f"[yellow]warning:[/] {w}")
