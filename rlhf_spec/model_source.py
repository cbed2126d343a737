"""Model sources: where a model comes from, its identity for cache keys, and loading it.

A :class:`ModelSource` is either a spec ``models`` entry (hub id or local folder,
optionally a GGUF file) or the output folder of an earlier stage. It is plain
data (JSON-serialisable), so a worker process started by ``accelerate launch``
can rebuild it.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from .files import commit_tree, fsync_tree
from .runtime import torch_dtype

HEX40 = re.compile(r"^[0-9a-f]{40}$")


def resolve_revision(repo_id: str, revision: Optional[str], repo_type: str = "model") -> str:
    """Resolve a hub revision (branch, tag or commit) to a 40-hex commit.

    A pinned commit is returned as is. Otherwise the hub is asked (unless ``HF_HUB_OFFLINE`` is
    set); when it cannot be reached, the local hub cache's ``refs`` are read.

    Raises:
        RuntimeError: the hub says the repository or revision does not exist, or is gated (the
            message says which and what to do); or the hub cannot be reached and the local cache
            does not have the revision (the message says to pin a commit).
    """
    rev = revision or "main"
    if HEX40.match(rev):
        return rev
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        sha = _ask_hub(repo_id, rev, repo_type)
        if sha:
            return sha
    folder = Path(constants.HF_HUB_CACHE) / f"{repo_type}s--{repo_id.replace('/', '--')}" / "refs" / rev
    if folder.is_file():
        return folder.read_text().strip()
    raise RuntimeError(
        f"cannot resolve revision '{rev}' of {repo_type} '{repo_id}' (the hub cannot be reached and it is not in the "
        "local hub cache); pin a 40-character commit in the spec's 'revision'"
    )


def _ask_hub(repo_id: str, rev: str, repo_type: str) -> Optional[str]:
    """The commit of ``rev`` from the hub; None when the hub cannot be reached (network errors).

    Raises:
        RuntimeError: for a repository or revision the hub says does not exist, or a gated one.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    api = HfApi()
    try:
        info = (api.dataset_info if repo_type == "dataset" else api.model_info)(repo_id, revision=rev, timeout=10)
    except GatedRepoError:
        raise RuntimeError(
            f"{repo_type} '{repo_id}' is gated: accept its terms on the hub and log in "
            "(HF_TOKEN or `hf auth login`) before running"
        ) from None
    except RepositoryNotFoundError:
        raise RuntimeError(
            f"{repo_type} '{repo_id}' does not exist on the hub (or is private and no token "
            "with access is set); check the id"
        ) from None
    except RevisionNotFoundError:
        raise RuntimeError(
            f"{repo_type} '{repo_id}' has no revision '{rev}'; check the branch, tag or commit"
        ) from None
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", 500) < 500:
            raise RuntimeError(f"the hub refused {repo_type} '{repo_id}' revision '{rev}': {exc}") from None
        return None  # a server error: try the local cache
    except _transport_errors():
        return None  # the hub cannot be reached: try the local cache
    return info.sha


def _transport_errors() -> tuple:
    """The exception types of an unreachable hub: OSError, and the HTTP client's transport errors."""
    import importlib

    out: list = [OSError, TimeoutError]
    for mod in ("httpx2", "httpx", "requests"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        err = getattr(m, "TransportError", None) or getattr(m, "ConnectionError", None)
        if err is not None:
            out.append(err)
    return tuple(out)



@dataclass
class ModelSource:
    """Where to load one model from.

    Attributes:
        name: the spec name (``models`` key) or producing stage id.
        origin: ``"spec"`` or ``"stage"``.
        hub, revision: hub repo id and revision (spec models only).
        path: local folder (spec model path, or a stage output's ``model`` folder).
        gguf_file: GGUF file inside ``path``.
        dtype: spec dtype name.
        trust_remote_code: as the spec allows for this model only.
        tokenizer: separate tokenizer source (a hub id or a folder).
        tokenizer_revision: the tokenizer's hub commit, resolved by the runner (hub tokenizers only).
        converted_dir: cache folder for a dequantised copy of a GGUF model (filled by the runner).
        identity: the dict that goes into cache keys.
    """

    name: str
    origin: str
    hub: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None
    gguf_file: Optional[str] = None
    dtype: str = "auto"
    trust_remote_code: bool = False
    tokenizer: Optional[str] = None
    tokenizer_revision: Optional[str] = None
    converted_dir: Optional[str] = None
    identity: Optional[dict] = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSource":
        return cls(**d)

    # -- loading -------------------------------------------------------------------------

    def _location(self) -> tuple[str, dict]:
        """(name_or_path, extra kwargs) for ``from_pretrained``."""
        if self.converted_dir and (Path(self.converted_dir) / "config.json").exists():
            return self.converted_dir, {}
        if self.path:
            kw: dict[str, Any] = {}
            if self.gguf_file:
                kw["gguf_file"] = self.gguf_file
            return self.path, kw
        return self.hub, {"revision": self.revision} if self.revision else {}

    def tokenizer_location(self) -> tuple[str, dict]:
        """(name_or_path, kwargs) the tokenizer loads from: the separate ``tokenizer`` source pinned to
        its resolved commit, else the model's own location."""
        if self.tokenizer:
            return self.tokenizer, ({"revision": self.tokenizer_revision} if self.tokenizer_revision else {})
        return self._location()

    def load_tokenizer(self, padding_side: Optional[str] = None):
        """Load the tokenizer (with a pad token; the EOS token if the tokenizer has none).

        Raises:
            OSError / ValueError from transformers when the files are missing or unreadable.
        """
        from transformers import AutoTokenizer

        loc, kw = self.tokenizer_location()
        tok = AutoTokenizer.from_pretrained(loc, trust_remote_code=self.trust_remote_code, **kw)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if padding_side:
            tok.padding_side = padding_side
        return tok

    def _prepare_gguf(self) -> None:
        """Dequantise a GGUF model once into ``converted_dir`` so later loads take milliseconds."""
        if not (self.gguf_file and self.converted_dir) or (Path(self.converted_dir) / "config.json").exists():
            return
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.path, gguf_file=self.gguf_file, dtype="float32")
        detach_quantizer(model)
        tok = self.load_tokenizer()
        final = Path(self.converted_dir)
        tmp = final.parent / f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            fsync_tree(tmp)
            commit_tree(tmp, final)  # False when another process converted it first: its copy is kept
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already once committed

    def load_causal_lm(self, dtype=None, device=None):
        """Load a causal LM (``AutoModelForCausalLM``) in eval mode.

        Args:
            dtype: torch dtype; default from the spec's ``dtype``.
            device: torch device; default CPU.

        Raises:
            OSError / ValueError from transformers.
        """
        from transformers import AutoModelForCausalLM

        self._prepare_gguf()
        loc, kw = self._location()
        model = AutoModelForCausalLM.from_pretrained(
            loc, dtype=dtype or torch_dtype(self.dtype), trust_remote_code=self.trust_remote_code, **kw
        )
        detach_quantizer(model)
        if device is not None:
            model.to(device)
        return model.eval()

    def load_sequence_classifier(self, num_labels: int = 1, dtype=None, device=None):
        """Load ``AutoModelForSequenceClassification`` with ``num_labels`` outputs (a scalar reward head by default).

        A backbone without a classification head gets a freshly initialised one.

        Raises:
            OSError / ValueError from transformers.
        """
        from transformers import AutoModelForSequenceClassification

        loc, kw = self._location()
        model = AutoModelForSequenceClassification.from_pretrained(
            loc, num_labels=num_labels, dtype=dtype or torch_dtype(self.dtype),
            trust_remote_code=self.trust_remote_code, **kw
        )
        if device is not None:
            model.to(device)
        return model.eval()


def detach_quantizer(model) -> None:
    """Forget the GGUF quantizer of a dequantised model so ``save_pretrained`` writes plain weights.

    transformers dequantises GGUF tensors to float on load but keeps the quantizer
    attached, which makes the model refuse to serialise.
    """
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        try:
            del model.config.quantization_config
        except AttributeError:
            pass
