"""Reading the spec's datasets into normalised Hugging Face ``datasets``.

Every dataset becomes rows of:

* ``prompt_id`` (str): 16 hex characters of sha256 over the canonical prompt messages;
* ``prompt`` (list of ``{"role", "content"}``): the conversation up to the reply;
* ``chosen`` / ``rejected`` (str), for preference data: the final assistant reply.

Prompt ids are content hashes, so shards, splits and ``hash_range`` selections
depend on the prompts alone, never on row order or the number of workers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from .hashing import canonical_json
from .paths import resolve

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system", "bot": "assistant"}


def prompt_id(messages: list[dict]) -> str:
    """16-hex-character content id of a prompt (list of ``{"role", "content"}``)."""
    return hashlib.sha256(canonical_json([[m["role"], m["content"]] for m in messages])).hexdigest()[:16]


def hash_unit(pid: str) -> float:
    """Map a prompt id to [0, 1) uniformly; used for ``hash_range`` and seeded splits."""
    return int(pid[:13], 16) / float(16**13)


def parse_hh_transcript(text: str) -> list[dict]:
    """Split an hh-rlhf transcript (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``) into chat messages.

    Returns:
        messages with roles ``user``/``assistant``, stripped content, in order.

    Raises:
        ValueError: if the text has no ``Human:`` turn.
    """
    if HUMAN not in text and not text.startswith("Human:"):
        raise ValueError("not an hh-rlhf transcript: no '\\n\\nHuman:' turn")
    out: list[dict] = []
    i = 0
    role = None
    buf_start = 0
    markers = [(HUMAN, "user"), (ASSISTANT, "assistant")]
    while i < len(text):
        hit = None
        for mark, r in markers:
            if text.startswith(mark, i):
                hit = (mark, r)
                break
        if hit:
            if role is not None:
                out.append({"role": role, "content": text[buf_start:i].strip()})
            role = hit[1]
            i += len(hit[0])
            buf_start = i
        else:
            i += 1
    if role is not None:
        out.append({"role": role, "content": text[buf_start:].strip()})
    return out


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[dict], str, str]:
    """Split an hh-rlhf pair into (prompt messages, chosen reply, rejected reply).

    The prompt is the transcript up to the last ``\\n\\nAssistant:`` of the chosen text.
    """
    cut_c = chosen.rfind(ASSISTANT)
    cut_r = rejected.rfind(ASSISTANT)
    prompt = parse_hh_transcript(chosen[:cut_c])
    return prompt, chosen[cut_c + len(ASSISTANT):].strip(), rejected[cut_r + len(ASSISTANT):].strip()


def normalize_messages(value: Any) -> list[dict]:
    """A prompt value as chat messages: a string becomes one user turn; ``{from, value}`` and
    ``{role, content}`` message lists are mapped to ``{role, content}``.

    Raises:
        ValueError: for any other shape.
    """
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        out = []
        for m in value:
            role = m.get("role", m.get("from"))
            content = m.get("content", m.get("value"))
            if role is None or content is None:
                raise ValueError(f"message without role/content: {m!r}")
            out.append({"role": ROLE_ALIASES.get(str(role).lower(), str(role)), "content": str(content)})
        return out
    raise ValueError(f"cannot read a prompt from {type(value).__name__}")


def response_text(value: Any) -> str:
    """A chosen/rejected value as text: a string, a message dict, or the last assistant message of a list."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("content", value.get("value", "")))
    if isinstance(value, list) and value:
        msgs = normalize_messages(value)
        for m in reversed(msgs):
            if m["role"] == "assistant":
                return m["content"]
        return msgs[-1]["content"]
    raise ValueError(f"cannot read a response from {type(value).__name__}")


def render_transcript(messages: list[dict], response: Optional[str] = None) -> str:
    """Render chat messages as an hh-style ``\\n\\nHuman: ...\\n\\nAssistant: ...`` transcript."""
    parts = []
    for m in messages:
        tag = "Human" if m["role"] == "user" else ("Assistant" if m["role"] == "assistant" else m["role"].capitalize())
        parts.append(f"\n\n{tag}: {m['content']}")
    if response is not None:
        parts.append(f"\n\nAssistant: {response}")
    return "".join(parts)


def _local_format(path: Path) -> str:
    name = path.name.lower()
    if path.is_dir():
        return "arrow"
    for ext, fmt in ((".jsonl.gz", "json"), (".json.gz", "json"), (".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(ext):
            return fmt
    raise ValueError(f"unknown data file type: {path.name} (use json, jsonl, jsonl.gz, parquet, csv or a save_to_disk folder)")


def _first_record(path: Path) -> dict:
    fmt = _local_format(path)
    if fmt == "json":
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            head = f.read(1)
            while head and head.isspace():
                head = f.read(1)
            if head == "[":
                f.seek(0)
                data = json.load(f)
                return data[0] if data else {}
            line = head + f.readline()
            return json.loads(line)
    import datasets

    if fmt == "arrow":
        ds = datasets.load_from_disk(str(path))
    else:
        ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
    return ds[0] if len(ds) else {}


def local_column_problem(ds, base: Path) -> Optional[tuple[str, str]]:
    """Check that a local dataset has the columns its spec entry names, and name the spec field at fault.

    Returns:
        ``None`` when fine, else ``(field, message)``: ``field`` is ``path`` (unreadable file),
        ``adapter`` (hh-rlhf columns missing) or the ``*_column`` field naming a missing column.
    """
    path = resolve(ds.path, base)
    try:
        rec = _first_record(path)
    except Exception as exc:  # noqa: BLE001
        return "path", f"cannot read {ds.path}: {type(exc).__name__}: {exc}"
    if ds.adapter == "hh-rlhf":
        fields = [("adapter", "chosen"), ("adapter", "rejected")]
    else:
        fields = [(f, getattr(ds, f)) for f in ("prompt_column", "chosen_column", "rejected_column") if getattr(ds, f)]
    missing = [(f, c) for f, c in fields if c not in rec]
    if missing:
        cols = ", ".join(repr(c) for _, c in missing)
        return missing[0][0], f"{ds.path} has no column(s) {cols}; it has {', '.join(repr(k) for k in rec)}"
    return None


def _normalise_row(row: dict, ds) -> dict:
    if ds.adapter == "hh-rlhf":
        prompt, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        out = {"prompt": normalize_messages(row[ds.prompt_column])}
        if ds.chosen_column and ds.rejected_column:
            out["chosen"] = response_text(row[ds.chosen_column])
            out["rejected"] = response_text(row[ds.rejected_column])
    out["prompt_id"] = prompt_id(out["prompt"])
    return out


def load_spec_dataset(ds, base: Path):
    """Load one spec ``datasets`` entry as a normalised ``datasets.Dataset``.

    Args:
        ds: a :class:`rlhf_spec.spec.DatasetSpec`.
        base: folder that relative paths resolve against.

    Returns:
        a Dataset with ``prompt_id``, ``prompt`` and, for preference data, ``chosen``, ``rejected``.

    Raises:
        FileNotFoundError: missing local file. ValueError: unreadable rows.
        Hub errors from ``datasets.load_dataset`` when the hub cannot be reached.
    """
    import datasets

    if ds.path:
        path = resolve(ds.path, base)
        fmt = _local_format(path)
        if fmt == "arrow":
            # never write transform caches into the user's folder: it would change the dataset's
            # content digest (its identity in cache keys) on every run
            datasets.disable_caching()
            raw = datasets.load_from_disk(str(path))
        else:
            raw = datasets.load_dataset(fmt, data_files=str(path), split="train")
    else:
        raw = datasets.load_dataset(ds.hub, ds.config, revision=ds.revision, split=ds.split)
    norm = raw.map(lambda r: _normalise_row(r, ds), remove_columns=raw.column_names, desc=None)
    lo, hi = ds.hash_range
    seen: set[str] = set()
    keep = []
    for i, pid in enumerate(norm["prompt_id"]):
        u = hash_unit(pid)
        if not (lo <= u < hi):
            continue
        if ds.dedupe_prompts:
            if pid in seen:
                continue
            seen.add(pid)
        keep.append(i)
        if ds.limit and len(keep) >= ds.limit:
            break
    return norm.select(keep)


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
