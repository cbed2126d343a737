"""Process-level concerns in one place: the device, dtypes, seeds, and quieting library noise."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings

WORKER_ENV = "RLHF_SPEC_WORKER"


def local_device():
    """This process's device: ``cuda:LOCAL_RANK`` when a CUDA GPU is present (``LOCAL_RANK`` is set by
    launchers, 0 otherwise), else ``cpu``. Every stage, reward and backend places models with it."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def torch_dtype(name: str = "auto"):
    """torch dtype for a spec dtype name; ``"auto"`` is bfloat16 on a CUDA GPU and float32 on CPU.

    Raises:
        KeyError: for an unknown name.
    """
    import torch

    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def derive_seed(*parts: int) -> int:
    """A seed in [0, 2**31 - 1) from integers, mixing them so nearby inputs give unrelated seeds.

    Used for every seed the stages derive (per sampling pass, per shard, per stage), so one rule
    holds everywhere (docs/spec.md, "Seeds").
    """
    import hashlib

    data = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "big") % (2**31 - 1)


def sampling_seed(spec_seed: int, pass_index: int, seed_stride: int) -> int:
    """The seed of sampling pass ``pass_index``: ``spec_seed + pass_index * seed_stride``.

    With the REBEL tutorial's ``seed_stride`` of 50 and seed 0, pass p is seeded ``p * 50``, as its
    ``generate.py`` seeds vLLM. Every backend receives this seed for every request of the pass.
    """
    return spec_seed + pass_index * seed_stride


def seed_everything(seed: int, key: str) -> int:
    """Seed Python, NumPy and torch from the spec seed and the stage key, so a stage's randomness
    (a fresh reward head, dropout, sampling) never depends on what ran before it in the process.

    Returns:
        the derived seed.
    """
    import random

    derived = (seed * 1_000_003 + int(key[:8], 16)) % (2**31 - 1)
    random.seed(derived)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(derived)
    import torch

    torch.manual_seed(derived)
    return derived


class _DropMessages(logging.Filter):
    """Drops log records whose message contains one of ``needles``."""

    def __init__(self, *needles: str):
        super().__init__()
        self.needles = needles

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(n in msg for n in self.needles)


# Messages that say nothing the user can act on: DeepSpeed's accelerator detection on a machine
# without CUDA, and accelerate removing the tied lm_head copy from every checkpoint it saves.
_NOISE = {
    "DeepSpeed": ("Setting accelerator to CPU",),
    "accelerate.utils.other": ("Removed shared tensor",),
}


#: Lines of worker output that say nothing the user can act on; the full output stays in the stage's
#: ``partial/<key>/launch.log``. (DeepSpeed prints its CPU communication op build with a bare print,
#: and calls torch.distributed functions that torch has deprecated.)
NOISE_LINES = re.compile(
    r"Setting accelerator to CPU|Removed shared tensor|DeepSpeed \S+ built successfully"
    r"|FutureWarning: `torch\.distributed\.|^\s*return func\(\*args, \*\*kwargs\)\s*$"
)


def is_noise(line: str) -> bool:
    """True for a line of library output that :data:`NOISE_LINES` leaves out of the user's terminal."""
    return bool(NOISE_LINES.search(line))


def quiet_libraries() -> None:
    """Silence the progress bars and the noise of datasets, transformers, accelerate and DeepSpeed;
    rlhf-spec draws its own progress. Warnings that matter still show."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF dequantisation bar
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    # transformers 5 renamed the property that peft and accelerate still read; nothing for a user to change
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    for name, needles in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(*needles))
    with contextlib.suppress(ImportError):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    with contextlib.suppress(ImportError):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def in_worker() -> bool:
    """True inside a worker process started by :func:`rlhf_spec.launch.launch_stage`."""
    return os.environ.get(WORKER_ENV) == "1"


KILL_AT_COMMIT_ENV = "RLHF_SPEC_KILL_AT_COMMIT"
COMMIT_LOG_ENV = "RLHF_SPEC_COMMIT_LOG"
_commits = [0]


def commit_hook(kind: str, detail: str = "") -> None:
    """Mark a commit point (a cache entry, a shard, a training checkpoint was made durable).

    Two environment variables make crashes reproducible for tests of resume: with
    ``RLHF_SPEC_COMMIT_LOG=path`` a line ``<pid> <n> <kind> <detail>`` is appended per commit point,
    and with ``RLHF_SPEC_KILL_AT_COMMIT=N`` the process kills itself with SIGKILL right after its
    N-th commit point, as a power cut or the OOM killer would (``N:INT`` sends SIGINT instead, as
    Ctrl-C in the terminal would; ``after:KIND:PREFIX`` kills right after the commit point of that kind
    whose detail starts with PREFIX, e.g. ``after:entry:3fa9`` after the entry whose key starts 3fa9).
    """
    _commits[0] += 1
    _mark(kind, detail, str(_commits[0]), counted=True)


def kill_point(kind: str, detail: str = "") -> None:
    """Mark a point inside a step where nothing is made durable (e.g. an online stage's rollout or
    update): logged like :func:`commit_hook` with ``-`` for n, and a kill target only through
    ``RLHF_SPEC_KILL_AT_COMMIT=after:KIND:PREFIX``, so that ``N`` still counts durable points only."""
    _mark(kind, detail, "-", counted=False)


def _mark(kind: str, detail: str, n: str, counted: bool) -> None:
    log = os.environ.get(COMMIT_LOG_ENV)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{os.getpid()} {n} {kind} {detail}\n")
            f.flush()
            os.fsync(f.fileno())
    at = os.environ.get(KILL_AT_COMMIT_ENV)
    if at:
        import signal

        what, _, sig = at.partition(":")
        if (what == "after" and f"{kind}:{detail}".startswith(sig)) or (
            counted and what.isdigit() and _commits[0] == int(what)
        ):
            os.kill(os.getpid(), signal.SIGINT if sig.upper() == "INT" else signal.SIGKILL)
