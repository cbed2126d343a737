"""Loading a spec dataset through its adapter, selecting rows by prompt hash, and saving rows to the cache."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .messages import hash_unit


def load_spec_dataset(ds, base: Path):
    """Load one spec ``datasets`` entry as a normalised ``datasets.Dataset``.

    Args:
        ds: a :class:`rlhf_spec.spec.DatasetSpec`.
        base: folder that relative paths resolve against.

    Returns:
        a Dataset with the columns of ``ds.columns()``: ``prompt_id``, ``prompt`` and, for preference
        data, ``chosen``, ``rejected``; for SFT/unpaired data ``completion``, ``messages`` (and ``label``);
        only the rows inside ``hash_range``, one per duplicate (``dedupe_prompts``), at most ``limit``.

    Raises:
        FileNotFoundError: missing local file. ValueError: unreadable rows.
        Hub errors from ``datasets.load_dataset`` when the hub cannot be reached.
    """
    norm = ds.adapter_impl.normalise(ds, base)
    return norm.select(_kept_rows(norm, ds))


def local_column_problem(ds, base: Path) -> Optional[tuple[str, str]]:
    """Check that a local dataset has the columns its spec entry names, and name the spec field at fault.

    Returns:
        ``None`` when fine, else ``(field, message)``: ``field`` is ``path`` (unreadable file),
        ``adapter`` (a column the adapter reads by default is missing) or the ``*_column`` field naming
        a missing column (``encoding``/``negative_path`` for ``rt-polarity``'s text files).
    """
    return ds.adapter_impl.column_problem(ds, base)


def _kept_rows(norm, ds) -> list[int]:
    """Row indices inside ``hash_range``, one per duplicate key (with ``dedupe_prompts``), at most ``limit``."""
    lo, hi = ds.hash_range
    seen: set = set()
    keep = []
    for i, key in enumerate(_dedupe_keys(norm)):
        u = hash_unit(key[0])
        if not (lo <= u < hi):
            continue
        if ds.dedupe_prompts:
            if key in seen:
                continue
            seen.add(key)
        keep.append(i)
        if ds.limit and len(keep) >= ds.limit:
            break
    return keep


def _dedupe_keys(norm) -> list[tuple]:
    """What makes a row a duplicate: its prompt (prompts and preference data), or its prompt,
    completion and label (SFT and unpaired data, where one prompt may carry several completions)."""
    pids = list(norm["prompt_id"])
    if "completion" not in norm.column_names:
        return [(p,) for p in pids]
    labels = list(norm["label"]) if "label" in norm.column_names else [None] * len(pids)
    return list(zip(pids, norm["completion"], labels))


EMPTY_MARKER = "empty_dataset.json"


def save_rows(ds, path: Path) -> Path:
    """``ds.save_to_disk(path)``, also for a dataset with no rows (which ``datasets`` cannot load back:
    its features are written to ``empty_dataset.json`` instead).

    Raises:
        OSError: if the folder cannot be written.
    """
    path = Path(path)
    if len(ds) == 0:
        path.mkdir(parents=True, exist_ok=True)
        (path / EMPTY_MARKER).write_text(json.dumps(ds.features.to_dict()))
        return path
    ds.save_to_disk(str(path))
    return path


def load_rows(path: Path):
    """The ``datasets.Dataset`` that :func:`save_rows` wrote to ``path`` (transform caching off, so
    ``select``/``map`` never write into an immutable cache entry).

    Raises:
        FileNotFoundError: if nothing was saved there.
    """
    import datasets

    datasets.disable_caching()
    path = Path(path)
    if (path / EMPTY_MARKER).is_file():
        features = datasets.Features.from_dict(json.loads((path / EMPTY_MARKER).read_text()))
        return datasets.Dataset.from_dict({k: [] for k in features}, features=features)
    return datasets.load_from_disk(str(path))
