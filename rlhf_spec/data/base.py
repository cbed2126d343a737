"""The dataset-adapter record (the fifth plugin surface) and the reading every adapter shares.

A spec's ``datasets`` entry names an adapter; the adapter turns the source's rows into the normalised
columns of :meth:`DatasetAdapter.columns`. Built-in adapters (:mod:`rlhf_spec.data.adapters`) register
through the same hook as a plugin's: ``rlhf_spec_register_datasets(register)``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..paths import resolve
from ..records import _Record
from .messages import apply_prompt_template, prompt_id

#: What an adapter's rows can be: prompts (``prompt_id``, ``prompt``), preference pairs (plus ``chosen``,
#: ``rejected``) or completions for SFT and unpaired training (plus ``completion``, ``messages``).
FIT = ("prompts", "pairs", "completions")


@dataclass(frozen=True, kw_only=True)
class DatasetAdapter(_Record):
    """A dataset adapter, as a plugin registers it: subclass it (a frozen, keyword-only dataclass whose
    fields default to the adapter's name and traits), override :meth:`build_row` (and
    :meth:`source_columns`, :meth:`produces`, :meth:`check` where they differ), and ``register(MyAdapter())``
    from ``rlhf_spec_register_datasets``.

    Attributes:
        name: the value of a dataset's ``adapter``.
        fit_for: the row shapes it can give, from :data:`FIT`; :meth:`produces` picks one per dataset.
        fields: the optional dataset fields it reads (``chosen_column``, ``prompt_template``, ...); setting
            any other optional field on a dataset that uses it is an error, so a typo'd adapter is noticed.
        description: one paragraph for the JSON Schema and ``rlhf-spec plugins``.
        version: bump when the rows it builds change.
    """

    name: str
    fit_for: tuple[str, ...] = ("prompts",)
    fields: tuple[str, ...] = ()

    def origin(self) -> str:
        """``"dataset adapter 'name' (distribution version)"``, for error messages."""
        where = f"{self.distribution or 'unknown distribution'} {self.dist_version}".rstrip()
        return f"dataset adapter '{self.name}' ({where})"

    # ------------------------------------------------------------------ what a dataset entry gives

    def source_columns(self, ds) -> list[tuple[str, str, str, bool]]:
        """The raw columns read for dataset ``ds``: ``(role, column, spec field that names it, required)``;
        the field is ``adapter`` where the column is the adapter's default."""
        return []

    def produces(self, ds) -> str:
        """What the rows of ``ds`` are: one of :attr:`fit_for` (default: the first)."""
        return self.fit_for[0]

    def check(self, ds) -> Optional[str]:
        """A rule between ``ds``'s fields that this adapter needs, as the error message; None when fine."""
        return None

    def columns(self, ds) -> tuple[str, ...]:
        """Normalised columns of ``ds``'s rows: ``prompt_id``, ``prompt``, ``reference`` when a source column
        feeds it; then ``chosen``, ``rejected`` (pairs) or ``completion``, ``messages`` and ``label`` when a
        label column is read (completions)."""
        roles = [role for role, *_ in self.source_columns(ds)]
        cols = ["prompt_id", "prompt"] + (["reference"] if "reference" in roles else [])
        kind = self.produces(ds)
        if kind == "pairs":
            return tuple(cols + ["chosen", "rejected"])
        if kind == "completions":
            cols += ["completion", "messages"] + (["label"] if "label" in roles else [])
        return tuple(cols)

    def required_columns(self, ds) -> list[tuple[str, str]]:
        """``(spec field, column)`` of each raw column a local file must have."""
        return [(field, col) for _, col, field, required in self.source_columns(ds) if required]

    def features(self, ds):
        """The ``datasets.Features`` of the normalised rows. Explicit, because a raw column of the same
        name (``messages``, ``label``, ``reference``) would otherwise lend its raw type to the normalised one."""
        import datasets

        text = datasets.Value("string")
        chat = datasets.List({"role": text, "content": text})
        types = {"prompt": chat, "chosen": text, "rejected": text, "completion": text, "messages": chat,
                 "label": datasets.Value("bool"), "prompt_id": text, "reference": text}
        return datasets.Features({c: types[c] for c in self.columns(ds)})

    # ------------------------------------------------------------------ reading

    def build_row(self, row: dict, ds) -> dict:
        """One raw row as normalised columns (``prompt`` and the rest; the prompt template and
        ``prompt_id`` are applied afterwards by :meth:`normalise`).

        Raises:
            ValueError: for a row it cannot read.
        """
        raise NotImplementedError(f"dataset adapter '{self.name}' defines no build_row")

    def select_raw(self, raw):
        """The raw rows to read (all by default; an adapter may drop rows that carry nothing, such as ties)."""
        return raw

    def normalise(self, ds, base: Path):
        """Every row of ``ds``'s source as a normalised ``datasets.Dataset``, before ``hash_range``,
        ``dedupe_prompts`` and ``limit`` (:func:`rlhf_spec.data.load_spec_dataset` applies those).

        Raises:
            FileNotFoundError, ValueError: an unreadable file or row; hub errors of ``datasets.load_dataset``.
        """
        raw = self.select_raw(read_raw(ds, base))

        def normalise_row(row: dict) -> dict:
            out = self.build_row(row, ds)
            out["prompt"] = apply_prompt_template(out["prompt"], ds.prompt_template)
            out["prompt_id"] = prompt_id(out["prompt"])
            return out

        return raw.map(normalise_row, remove_columns=raw.column_names, desc=None, features=self.features(ds))

    def column_problem(self, ds, base: Path) -> Optional[tuple[str, str]]:
        """Check that ``ds``'s local file has the columns this adapter reads.

        Returns:
            ``None`` when fine, else ``(field, message)``: ``path`` (unreadable file), ``adapter`` (a column
            the adapter reads by default is missing) or the ``*_column`` field naming a missing column.
        """
        try:
            rec = first_record(resolve(ds.path, base))
        except Exception as exc:  # noqa: BLE001
            return "path", f"cannot read {ds.path}: {type(exc).__name__}: {exc}"
        missing = [(f, c) for f, c in self.required_columns(ds) if c not in rec]
        if missing:
            cols = ", ".join(dict.fromkeys(repr(c) for _, c in missing))  # one column may feed two roles (gsm8k)
            return missing[0][0], f"{ds.path} has no column(s) {cols}; it has {', '.join(repr(k) for k in rec)}"
        return None


def pick(ds, field: str, default: str) -> tuple[str, str]:
    """``(column, spec field)`` of an optional column field: its value, else ``default`` named by ``adapter``."""
    value = getattr(ds, field)
    return (value, field) if value is not None else (default, "adapter")


def local_format(path: Path) -> str:
    """The ``datasets`` builder of a local file (``json``, ``parquet``, ``csv``), or ``arrow`` for a folder.

    Raises:
        ValueError: for any other file type.
    """
    name = path.name.lower()
    if path.is_dir():
        return "arrow"
    for ext, fmt in ((".jsonl.gz", "json"), (".json.gz", "json"), (".jsonl", "json"), (".json", "json"),
                     (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(ext):
            return fmt
    raise ValueError(f"unknown data file type: {path.name} "
                     "(use json, jsonl, jsonl.gz, parquet, csv or a save_to_disk folder)")


def first_record(path: Path) -> dict:
    """The first row of a local data file or folder, as a dict (empty for an empty file).

    Raises:
        OSError, ValueError: an unreadable or malformed file.
    """
    fmt = local_format(path)
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


def read_raw(ds, base: Path) -> Any:
    """The raw rows of ``ds`` (a local file or folder, or a hub dataset at its revision) as a ``datasets.Dataset``.

    Raises:
        FileNotFoundError: missing local file. Hub errors from ``datasets.load_dataset``.
    """
    import datasets

    if ds.path:
        path = resolve(ds.path, base)
        fmt = local_format(path)
        if fmt == "arrow":
            # never write transform caches into the user's folder: it would change the dataset's
            # content digest (its identity in cache keys) on every run
            datasets.disable_caching()
            return datasets.load_from_disk(str(path))
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    return datasets.load_dataset(ds.hub, ds.config, revision=ds.revision, split=ds.split)
