"""Checkpoints of a training run, one layout for every trainer.

A checkpoint is a folder ``<prefix>-<number:07d>`` under the run's checkpoint folder holding accelerate's
``save_state`` (model, optimizer, registered scheduler, every RNG state) and one JSON file of the loop's
own state (its position, the logged history, ...). It is written under a temporary name and renamed
into place; ``latest.json`` is written last and names the newest one, so a run killed at any point
either sees the previous checkpoint or the new one whole. Older checkpoints of the same prefix are
removed once the new one is committed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from ..runtime import commit_hook

__all__ = ["latest_checkpoint", "write_checkpoint", "read_checkpoint_state"]


def latest_checkpoint(ckpt_dir: Path) -> Optional[tuple[Path, dict]]:
    """The checkpoint ``ckpt_dir/latest.json`` points to, as (folder, pointer dict), or None when there is
    none yet, the pointer is unreadable, or its folder is gone (a resume then starts from scratch)."""
    ptr = ckpt_dir / "latest.json"
    if not ptr.is_file():
        return None
    try:
        pos = json.loads(ptr.read_text())
    except ValueError:
        return None
    path = ckpt_dir / pos["dir"]
    return (path, pos) if path.is_dir() else None


def write_checkpoint(accelerator, ckpt_dir: Path, prefix: str, number: int, state_file: str, state: dict,
                     pointer: dict, detail: str) -> Path:
    """Write checkpoint ``<prefix>-<number:07d>`` and make it the latest.

    Every process must call it (``save_state`` and the barriers are collectives); the main process writes
    ``state`` as ``state_file`` inside the folder, commits the folder, writes ``latest.json``
    (``{"dir": name, **pointer}``), removes the older ``<prefix>-*`` folders and passes the
    ``checkpoint`` commit point with ``detail`` (:func:`rlhf_spec.runtime.commit_hook`).

    Returns:
        the committed folder.

    Raises:
        OSError: when the disk refuses a write (the previous checkpoint stays the latest).
    """
    from ..files import atomic_write_json, commit_tree

    name = f"{prefix}-{number:07d}"
    final, tmp = ckpt_dir / name, ckpt_dir / f".{name}.tmp"
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / state_file, state)
        commit_tree(tmp, final, replace=True)
        atomic_write_json(ckpt_dir / "latest.json", {"dir": name, **pointer})
        for old in ckpt_dir.glob(f"{prefix}-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        commit_hook("checkpoint", detail)
    accelerator.wait_for_everyone()
    return final


def read_checkpoint_state(path: Path, state_file: str) -> dict:
    """The loop state saved in checkpoint folder ``path`` (``{}`` when the file is missing or unreadable)."""
    try:
        return json.loads((path / state_file).read_text())
    except (OSError, ValueError):
        return {}
