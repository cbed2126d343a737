"""Cache keys: the identity of what a stage reads, and the key preimage of a stage.

A key is the sha256 of the canonical, type-tagged JSON of its preimage (:func:`rlhf_spec.hashing.hash_json`):
the key format, the implementation (kind, name, distribution, version), the params as
:func:`rlhf_spec.refs.key_view` gives them, the upstream keys, the identity of every model and dataset
read (hub id and resolved commit, or content hash), the seed and the salt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..hashing import hash_json
from ..model_source import ModelSource, resolve_revision
from ..paths import looks_local, resolve
from ..refs import key_view
from .store import KEY_FORMAT


def model_identity(name: str, m, base_dir: Path, cache) -> tuple[dict, ModelSource]:
    """The identity of spec model ``name`` (a :class:`~rlhf_spec.spec.models.ModelSpec`) and where to load it.

    Local models are identified by the content hash of their folder or GGUF file (a GGUF file also
    gets a ``converted/`` folder for its dequantised copy); hub models by id and resolved commit; a
    separate tokenizer by its content hash (local) or hub id and resolved commit, which it is then
    loaded at.

    Raises:
        FileNotFoundError: a local file is missing. RuntimeError: a hub revision cannot be resolved.
    """
    ident: dict[str, Any] = {"dtype": m.dtype, "trust_remote_code": m.trust_remote_code}
    src = ModelSource(name=name, origin="spec", hub=m.hub, revision=m.revision, dtype=m.dtype,
                      trust_remote_code=m.trust_remote_code, gguf_file=m.gguf_file, tokenizer=m.tokenizer)
    if m.path:
        path = resolve(m.path, base_dir)
        src.path = str(path)
        digest = cache.hash_state.tree_digest(path / m.gguf_file if m.gguf_file else path)
        ident.update(content_sha256=digest, gguf_file=m.gguf_file)
        if m.gguf_file:
            src.converted_dir = str(cache.converted_dir(digest))
    else:
        src.revision = resolve_revision(m.hub, m.revision)
        ident.update(hub=m.hub, revision=src.revision)
    if m.tokenizer:
        if looks_local(m.tokenizer):
            src.tokenizer = str(resolve(m.tokenizer, base_dir))
            ident["tokenizer"] = cache.hash_state.tree_digest(src.tokenizer)
        else:
            src.tokenizer_revision = resolve_revision(m.tokenizer, None)
            ident["tokenizer"] = {"hub": m.tokenizer, "revision": src.tokenizer_revision}
    src.identity = ident
    return ident, src


def dataset_identity(ds, base_dir: Path, hash_state) -> dict:
    """The identity of a spec dataset: its selection options plus the file's content hash (local) or
    the hub id with its resolved commit (``revision``), which the dataset is then loaded at.

    Raises:
        FileNotFoundError: missing local file. RuntimeError: a hub revision that cannot be resolved.
    """
    ident = ds.model_dump(mode="json", exclude={"path", "revision", "negative_path"})
    if ds.path:
        ident["content_sha256"] = hash_state.tree_digest(resolve(ds.path, base_dir))
    else:
        ident["revision"] = resolve_revision(ds.hub, ds.revision, repo_type="dataset")
    if ds.negative_path:
        ident["negative_content_sha256"] = hash_state.tree_digest(resolve(ds.negative_path, base_dir))
    return ident


def stage_preimage(stage, input_keys: list[str], models: dict, datasets: dict, seed: int, salt: str) -> dict:
    """The key preimage of ``stage`` (a :class:`~rlhf_spec.graph.Stage`).

    Args:
        input_keys: the keys of its data inputs, in order.
        models: ``param path -> identity`` of every model it reads.
        datasets: ``param path -> identity`` of every dataset it reads.
        seed, salt: the spec's.
    """
    return {
        "format": KEY_FORMAT,
        "kind": stage.impl.kind,
        "uses": stage.impl.name,
        "distribution": stage.impl.distribution,
        "impl_version": stage.impl.impl_version,
        "params": key_view(stage.params),
        "inputs": list(input_keys),
        "models": models,
        "datasets": datasets,
        "seed": seed,
        "salt": salt,
    }


def key_of(preimage: dict) -> str:
    """The cache key (64 hex characters) of a preimage."""
    return hash_json(preimage)
