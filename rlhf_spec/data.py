"""Reading the spec's datasets into normalised Hugging Face ``datasets``.

Every dataset becomes rows of:

* ``prompt_id`` (str): 16 hex characters of sha256 over the canonical prompt messages;
* ``prompt`` (list of ``{"role", "content"}``): the conversation up to the reply;
* ``chosen`` / ``rejected`` (str), for preference data: the final assistant reply;
* ``completion`` (str, the final assistant reply) and ``messages`` (the whole conversation, every
  assistant turn included), for SFT and unpaired data (adapters ``messages``, ``prompt-completion``,
  ``alpaca``, ``sharegpt`` without chosen/rejected, ``kto``);
* ``label`` (bool, True = desirable), for KTO data.

Prompt ids are content hashes, so shards, splits and ``hash_range`` selections
depend on the prompts alone, never on row order or the number of workers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
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


def hold_out_by_prompt(prompt_ids: list[str], n: int) -> tuple[list[int], list[int]]:
    """Split row indices into (kept, held out): whole prompts are held out in order of their hash
    (:func:`hash_unit`, lowest first) until at least ``n`` rows are held out, so no prompt lands on both
    sides and the choice depends on the prompts' content alone (as the reward model's ``eval_size``).

    Returns:
        two sorted lists of row indices; ``n <= 0`` holds out nothing.
    """
    if n <= 0:
        return list(range(len(prompt_ids))), []
    rows_of: dict[str, list[int]] = {}
    for i, pid in enumerate(prompt_ids):
        rows_of.setdefault(pid, []).append(i)
    held: list[int] = []
    for pid in sorted(rows_of, key=lambda q: (hash_unit(q), q)):
        if len(held) >= n:
            break
        held += rows_of[pid]
    out = set(held)
    return [i for i in range(len(prompt_ids)) if i not in out], sorted(held)


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
            # a column of structs read from JSON has every key of every row, None where a row lacks it
            role = m.get("role") if m.get("role") is not None else m.get("from")
            content = m.get("content") if m.get("content") is not None else m.get("value")
            if role is None or content is None:
                raise ValueError(f"message without role/content: {m!r}")
            out.append({"role": ROLE_ALIASES.get(str(role).lower(), str(role)), "content": str(content)})
        return out
    raise ValueError(f"cannot read a prompt from {type(value).__name__}")


def response_text(value: Any) -> str:
    """A chosen/rejected value as text: a string, a message dict, or the last assistant message of a list."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # a struct column may hold both spellings, None where a row lacks one
        content = value.get("content") if value.get("content") is not None else value.get("value")
        return "" if content is None else str(content)
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
        ``adapter`` (a column the adapter reads by default is missing) or the ``*_column`` field naming
        a missing column.
    """
    if ds.adapter == "rt-polarity":
        return _sentence_files_problem(ds, base)
    path = resolve(ds.path, base)
    try:
        rec = _first_record(path)
    except Exception as exc:  # noqa: BLE001
        return "path", f"cannot read {ds.path}: {type(exc).__name__}: {exc}"
    if ds.adapter in ("generic", "hh-rlhf"):  # the first release's checks, plus reference_column
        if ds.adapter == "hh-rlhf":
            fields = [("adapter", "chosen"), ("adapter", "rejected")]
        else:
            fields = [(f, getattr(ds, f)) for f in ("prompt_column", "chosen_column", "rejected_column", "reference_column")
                      if getattr(ds, f)]
    else:
        fields = [(field, col) for _, col, field, required in ds.source_columns() if required]
    missing = [(f, c) for f, c in fields if c not in rec]
    if missing:
        cols = ", ".join(dict.fromkeys(repr(c) for _, c in missing))  # one column may feed two roles (gsm8k)
        return missing[0][0], f"{ds.path} has no column(s) {cols}; it has {', '.join(repr(k) for k in rec)}"
    return None


def _sentence_files_problem(ds, base: Path) -> Optional[tuple[str, str]]:
    for field in ("path", "negative_path"):
        try:
            with open(resolve(getattr(ds, field), base), encoding=ds.encoding or "utf-8") as f:
                f.read()
        except UnicodeDecodeError as exc:
            return "encoding", f"{getattr(ds, field)} is not {ds.encoding or 'utf-8'} text ({exc.reason} at byte {exc.start}); set 'encoding', e.g. 'latin-1'"
        except OSError as exc:
            return field, f"cannot read {getattr(ds, field)}: {type(exc).__name__}: {exc}"
    return None


def apply_prompt_template(messages: list[dict], template: Optional[str]) -> list[dict]:
    """The prompt with its last user turn rewritten by ``template`` (``{prompt}`` replaced by the turn's
    text; other braces are kept as they are). ``None`` returns the prompt unchanged.

    Raises:
        ValueError: if the prompt has no user turn.
    """
    if template is None:
        return messages
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        raise ValueError("prompt_template needs a user turn in the prompt; this prompt has none")
    out = [dict(m) for m in messages]
    out[users[-1]]["content"] = template.replace("{prompt}", out[users[-1]]["content"])
    return out


def _sentence_rows(ds, base: Path) -> list[dict]:
    """The rows of the ``rt-polarity`` adapter (one sentence per line in ``path`` and ``negative_path``).

    A sentence of more than ``prompt_words`` words is split into a prompt (its first words, through
    ``prompt_template``) and its rest; sentences are kept when their prompt's hash falls in
    ``hash_range``, so disjoint ranges give disjoint sentences. ``rows="prompts"``: one row per sentence,
    ordered by hash. ``rows="pairs"``: positives and negatives, each ordered by hash, are zipped; pair i
    takes the prompt of its positive sentence (even i) or its negative one (odd i), and puts the
    positive sentence's rest (chosen) over the negative one's (rejected): the chosen reply continues the
    prompt's own sentence half of the time, so a reward model must learn polarity, not coherence.
    """
    k, lo, hi = ds.prompt_words or 4, *ds.hash_range
    sides = []
    for field in ("path", "negative_path"):
        with open(resolve(getattr(ds, field), base), encoding=ds.encoding or "utf-8") as f:
            side = []
            for line in f:
                words = line.split()
                if len(words) <= k:
                    continue
                prompt = apply_prompt_template([{"role": "user", "content": " ".join(words[:k])}], ds.prompt_template)
                pid = prompt_id(prompt)
                if lo <= hash_unit(pid) < hi:
                    side.append((hash_unit(pid), pid, prompt, " ".join(words[k:])))
            sides.append(sorted(side))
    pos, neg = sides
    if ds.rows != "pairs":
        return [{"prompt_id": pid, "prompt": prompt} for _, pid, prompt, _ in sorted(pos + neg)]
    return [{"prompt_id": (p if i % 2 == 0 else n)[1], "prompt": (p if i % 2 == 0 else n)[2], "chosen": p[3], "rejected": n[3]}
            for i, (p, n) in enumerate(zip(pos, neg))]


def parse_label(value: Any) -> bool:
    """A KTO label as a bool: True/False, 1/0, or the strings true/false, yes/no, 1/0, desirable/undesirable.

    Raises:
        ValueError: for anything else (None included).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise ValueError(f"a label must be a boolean (true = desirable), got {value!r}")


_LABELS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False,
           "desirable": True, "undesirable": False}


def split_conversation(messages: list[dict]) -> dict:
    """A conversation as SFT/unpaired columns: ``prompt`` (the turns before the final assistant turn),
    ``completion`` (that turn's text) and ``messages`` (the whole conversation).

    Raises:
        ValueError: if the conversation does not end with an assistant turn, or nothing precedes it.
    """
    if not messages or messages[-1]["role"] != "assistant":
        roles = [m["role"] for m in messages]
        raise ValueError(f"a conversation for SFT/KTO must end with an assistant turn; its roles are {roles}")
    if len(messages) < 2:
        raise ValueError("a conversation for SFT/KTO needs at least one turn before the final assistant reply")
    return {"prompt": messages[:-1], "completion": messages[-1]["content"], "messages": list(messages)}


def _alpaca_prompt(instruction: Any, extra: Any) -> list[dict]:
    """Alpaca's instruction and optional input as one user turn (input after a blank line)."""
    text = str(instruction)
    if extra is not None and str(extra).strip():
        text = f"{text}\n\n{extra}"
    return [{"role": "user", "content": text}]


def _completion_row(row: dict, ds) -> dict:
    """One row of a completion adapter (``messages``, ``prompt-completion``, ``alpaca``, ``sharegpt``,
    ``kto``, ``gsm8k``) as normalised columns (``prompt``, ``completion``, ``messages``, maybe ``label`` and
    ``reference``)."""
    cols = {role: col for role, col, _, _ in ds.source_columns()}
    if ds.adapter in ("messages", "kto", "sharegpt"):
        msgs = normalize_messages(row[cols["messages"]])
        system = row.get(cols["system"]) if "system" in cols else None
        if system is not None and str(system).strip() and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": str(system)}] + msgs
        if ds.is_preference():
            out = {"prompt": msgs, "chosen": response_text(row[cols["chosen"]]), "rejected": response_text(row[cols["rejected"]])}
        else:
            out = split_conversation(msgs)
    else:
        if ds.adapter == "alpaca":
            prompt = _alpaca_prompt(row[cols["prompt"]], row.get(cols["input"]))
        else:
            prompt = normalize_messages(row[cols["prompt"]])
        if ds.adapter == "gsm8k":
            completion = gsm8k_reply(str(row[cols["completion"]]), ds.completion_template)
        else:
            completion = response_text(row[cols["completion"]])
        out = {"prompt": prompt, "completion": completion, "messages": prompt + [{"role": "assistant", "content": completion}]}
    if "label" in cols:
        out["label"] = parse_label(row[cols["label"]])
    if "reference" in cols:
        out["reference"] = _reference_text(row[cols["reference"]])
    return out


_CALCULATOR = re.compile(r"<<[^<>]*>>")
GSM8K_REPLY = "{reasoning}\n#### {answer}"


def gsm8k_reply(solution: str, template: Optional[str] = None) -> str:
    """A GSM8K worked solution (``"... 48/2 = <<48/2=24>>24 ...\n#### 72"``) rewritten as a reply.

    ``template`` (default ``"{reasoning}\n#### {answer}"``) gets ``{reasoning}``, the text before the
    last ``####`` without the calculator annotations ``<<...>>`` (Cobbe et al. 2021, "Training Verifiers
    to Solve Math Word Problems", section 2: they drive a calculator, they are not prose), and
    ``{answer}``, the text after it with thousands separators removed.

    Raises:
        ValueError: if the solution has no ``####`` line.
    """
    head, sep, tail = solution.rpartition("####")
    if not sep:
        raise ValueError(f"a GSM8K solution ends with '#### <number>'; this one does not: {solution[-80:]!r}")
    reasoning = _CALCULATOR.sub("", head).strip()
    answer = tail.strip().replace(",", "")
    return (template or GSM8K_REPLY).replace("{reasoning}", reasoning).replace("{answer}", answer)


def _reference_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _preferred_output(value: Any) -> Optional[int]:
    """AlpacaEval's ``preference`` as the preferred output (1 or 2), or None for a tie (0, 1.5) or no label."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if v in (1.0, 2.0) else None


def _normalise_row(row: dict, ds) -> dict:
    if ds.adapter == "alpaca-eval":
        won = _preferred_output(row["preference"])
        out = {"prompt": _alpaca_prompt(row["instruction"], None), "chosen": response_text(row[f"output_{won}"]),
               "rejected": response_text(row[f"output_{3 - won}"])}
    elif ds.adapter not in ("generic", "hh-rlhf"):
        out = _completion_row(row, ds)
    elif ds.adapter == "hh-rlhf":
        prompt, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
        out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    else:
        out = {"prompt": normalize_messages(row[ds.prompt_column])}
        if ds.chosen_column and ds.rejected_column:
            out["chosen"] = response_text(row[ds.chosen_column])
            out["rejected"] = response_text(row[ds.rejected_column])
        if ds.reference_column:
            out["reference"] = _reference_text(row[ds.reference_column])
    out["prompt"] = apply_prompt_template(out["prompt"], ds.prompt_template)
    out["prompt_id"] = prompt_id(out["prompt"])
    return out


def load_spec_dataset(ds, base: Path):
    """Load one spec ``datasets`` entry as a normalised ``datasets.Dataset``.

    Args:
        ds: a :class:`rlhf_spec.spec.DatasetSpec`.
        base: folder that relative paths resolve against.

    Returns:
        a Dataset with the columns of ``ds.columns()``: ``prompt_id``, ``prompt`` and, for preference
        data, ``chosen``, ``rejected``; for SFT/unpaired data ``completion``, ``messages`` (and ``label``).

    Raises:
        FileNotFoundError: missing local file. ValueError: unreadable rows.
        Hub errors from ``datasets.load_dataset`` when the hub cannot be reached.
    """
    import datasets

    if ds.adapter == "rt-polarity":
        norm = datasets.Dataset.from_list(_sentence_rows(ds, base), features=_features(ds))
        return norm.select(_kept_rows(norm, ds))
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
    if ds.adapter == "alpaca-eval":  # ties carry no preference
        raw = raw.filter(lambda r: _preferred_output(r["preference"]) is not None)
    norm = raw.map(lambda r: _normalise_row(r, ds), remove_columns=raw.column_names, desc=None, features=_features(ds))
    return norm.select(_kept_rows(norm, ds))


def _kept_rows(norm, ds) -> list[int]:
    """Row indices inside ``hash_range``, one per duplicate key (with ``dedupe_prompts``), at most ``limit``."""
    lo, hi = ds.hash_range
    seen: set = set()
    keep = []
    for i, key in enumerate(_dedupe_keys(norm, ds)):
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


def _features(ds):
    """The normalised features of a completion adapter's rows (None for ``generic`` and ``hh-rlhf``, whose
    types are inferred as in the first release). Explicit, because a raw column of the same name
    (``messages``, ``label``, ``reference``) would otherwise lend its raw type to the normalised one."""
    if ds.adapter in ("generic", "hh-rlhf"):
        return None
    import datasets

    text = datasets.Value("string")
    chat = datasets.List({"role": text, "content": text})
    cols = {"prompt": chat, "chosen": text, "rejected": text, "completion": text, "messages": chat,
            "label": datasets.Value("bool"), "prompt_id": text, "reference": text}
    return datasets.Features({c: cols[c] for c in ds.columns()})


def _dedupe_keys(norm, ds) -> list[tuple]:
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
