"""Helpers for testing rlhf-spec and its plugins: tiny real models and the plugin contract.

* :func:`make_tiny_policy` / :func:`make_tiny_reward_model` build random-initialised
  transformers models with a real (small, trained in-process) tokenizer and a chat
  template, saved as ``save_pretrained`` folders. They load and run in well under a second.
* :func:`check_contract` checks what every plugin must satisfy (a stage, a reward or a backend):
  the params model exports a JSON Schema and rejects unknown keys, and cache keys are stable
  across processes.
* :func:`registry_with` loads the installed plugins plus plugin modules of the test's own, and
  :func:`installed_record` gives one record as the registry holds it (distribution filled in), for
  :func:`check_contract` and :func:`make_context`;
* :func:`make_context` / :func:`execute` call a stage's ``run`` directly, as the runner does;
* :func:`run_spec` runs a spec through the real command line in a subprocess;
  :func:`check_resume` kills such a run (SIGKILL) at every N-th commit point until it finishes, and
  checks it ends with the keys and metrics of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Iterable, Optional

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "[CLS]", "[SEP]"]

_DEFAULT_TEXT = [
    "How do I bake bread at home? Mix flour, water, salt and yeast, knead, rest and bake.",
    "What is the capital of France? The capital of France is Paris.",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side.",
    "I can't help with that request, but I can suggest something safer instead.",
    "Human: hello there. Assistant: hi, how can I help you today?",
]


def make_tokenizer(texts: Optional[Iterable[str]] = None, vocab_size: int = 256):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in-process, with a chat template.

    Special tokens: ``<pad>`` (pad), ``<|end|>`` (end of turn, EOS), role markers, ``[CLS]``/``[SEP]``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(texts or _DEFAULT_TEXT) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|end|>",
                                   cls_token="[CLS]", sep_token="[SEP]")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_policy(folder: str | os.PathLike, seed: int = 0, texts: Optional[Iterable[str]] = None) -> Path:
    """Save a random-initialised 2-layer ``LlamaForCausalLM`` (hidden 32) and its tokenizer to ``folder``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer(texts)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_tiny_reward_model(folder: str | os.PathLike, seed: int = 0, texts: Optional[Iterable[str]] = None) -> Path:
    """Save a random-initialised 2-layer ``BertModel`` backbone (hidden 32) and its tokenizer to ``folder``.

    Load it with ``AutoModelForSequenceClassification(num_labels=1)`` for a fresh scalar head.
    """
    import torch
    from transformers import BertConfig, BertModel

    tok = make_tokenizer(texts)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4,
                     max_position_embeddings=512, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(folder)
    tok.chat_template = None
    tok.save_pretrained(folder)
    return Path(folder)


def hh_rows(path: str | os.PathLike, n: int) -> list[dict]:
    """The first ``n`` rows of an hh-rlhf jsonl(.gz) file."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            out.append(json.loads(line))
            if len(out) >= n:
                break
    return out


def check_contract(record, example_params: dict, spec_for_key: Optional[dict] = None) -> None:
    """Assert the plugin contract for one registered record (:class:`~rlhf_spec.StageImpl`,
    :class:`~rlhf_spec.RewardImpl` or :class:`~rlhf_spec.BackendImpl`).

    * the params model exports a JSON Schema and accepts ``example_params``;
    * it rejects an unknown key (``extra="forbid"``);
    * if ``spec_for_key`` (a whole spec dict using the record) is given, ``rlhf-spec plan --json``
      in two fresh processes (with different hash seeds) gives the same keys.

    Raises:
        AssertionError: naming the part of the contract that fails.
    """
    from pydantic import ValidationError

    name = f"{getattr(record, 'kind', '') or type(record).__name__}/{record.name}"
    schema = record.params.model_json_schema()
    assert schema.get("type") == "object", f"{name}: params schema is not an object"
    record.params.model_validate(example_params)
    try:
        record.params.model_validate({**example_params, "surely_not_a_param": 1})
    except ValidationError:
        pass
    else:
        raise AssertionError(f"{name}: params model accepts unknown keys; use extra='forbid'")
    if spec_for_key is not None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            sp = write_json(Path(d) / "spec.json", spec_for_key)
            keys = []
            for seed in ("1", "2"):
                out = subprocess.run([sys.executable, "-m", "rlhf_spec", "plan", str(sp), "--json", "--cache-dir",
                                      str(Path(d) / "c")],
                                     capture_output=True, text=True, check=True, env=dict(os.environ,
                                                                                          PYTHONHASHSEED=seed))
                keys.append([r["key"] for r in json.loads(out.stdout)])
            assert keys[0] == keys[1], f"{name}: cache keys differ between processes"


check_stage_contract = check_contract  # the name of earlier releases


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON to ``path`` and return the path."""
    path = Path(path)
    path.write_text(json.dumps(obj, indent=1))
    return path


def run_spec(spec: dict, folder: str | os.PathLike, *args: str, env: Optional[dict] = None,
             timeout: float = 900) -> tuple[subprocess.CompletedProcess, Optional[dict]]:
    """Run ``rlhf-spec run`` on ``spec`` in a real subprocess, with its cache and report in ``folder``.

    Returns:
        (the completed process, the run report as a dict, or None if none was written).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sp = write_json(folder / "spec.json", spec)
    report = folder / "report.json"
    report.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "rlhf_spec", "run", str(sp), "--cache-dir", str(folder / "cache"),
                           "--report", str(report), *args], capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    return proc, (json.loads(report.read_text()) if report.exists() else None)


def check_resume(spec: dict, folder: str | os.PathLike, every: int = 2, max_attempts: int = 60) -> dict:
    """Kill a run of ``spec`` with SIGKILL at every ``every``-th commit point (a cache entry, a shard,
    a checkpoint: ``RLHF_SPEC_KILL_AT_COMMIT``), restart it until it completes, and check the result
    equals an uninterrupted run's: the same keys and the same metrics of every stage (timings and
    resume counters aside).

    Returns:
        ``{"kills": n, "attempts": n, "report": final report}``.

    Raises:
        AssertionError: if a run fails, never completes, or ends differently.
    """
    folder = Path(folder)
    fresh, fresh_rep = run_spec(spec, folder / "fresh")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    kills = 0
    for attempt in range(1, max_attempts + 1):  # noqa: B007 - read after the loop
        proc, rep = run_spec(spec, folder / "killed", env={"RLHF_SPEC_KILL_AT_COMMIT": str(every)})
        if proc.returncode == -9:
            kills += 1
            continue
        assert proc.returncode == 0, proc.stderr[-3000:]
        break
    else:
        raise AssertionError(f"the run never completed in {max_attempts} attempts")
    want = {s["id"]: s for s in fresh_rep["stages"]}
    for s in rep["stages"]:
        assert s["key"] == want[s["id"]]["key"], f"stage {s['id']}: key differs after resume"
        a, b = _comparable(s["metrics"]), _comparable(want[s["id"]]["metrics"])
        assert a == b, f"stage {s['id']}: metrics differ after resume: {a} vs {b}"
    return {"kills": kills, "attempts": attempt, "report": rep}


def _comparable(metrics: dict) -> dict:
    skip = ("seconds_", "shards_", "resumed_from", "tokens_per_second")
    return {k: v for k, v in metrics.items() if not k.startswith(skip) and k not in ("tokens_per_second",)}


def registry_with(*plugins, entry_points: bool = True):
    """A registry of the installed plugins plus ``plugins`` (modules or objects with ``@hookimpl``
    functions, registered as distribution ``"<in-process>"``), as :func:`make_context`'s ``registry``
    and :func:`installed_record`'s take it.

    Args:
        plugins: plugin modules not installed as distributions (the package under test, from source).
        entry_points: False leaves the installed plugins (built-ins included) out.

    Returns:
        the registry. A plugin that fails to load or register does not raise here: see
        :func:`installed_record`, whose error names it.
    """
    from .plugins import load_registry

    return load_registry(extra=plugins, entry_points=entry_points)


def installed_record(kind: str, name: str, registry=None):
    """The record registered as ``name``: a stage of ``kind`` (``"sample"``, ..., ``"train"``), a reward
    (``kind="reward"``) or a generation backend (``kind="backend"``), as the runner sees it (its
    ``distribution``, ``dist_version`` and ``source_digest`` filled in).

    Args:
        registry: from :func:`registry_with`; default: the installed plugins.

    Raises:
        LookupError: if nothing is registered under that name (the message lists what is installed,
            a "did you mean" and plugins that failed to load).
    """
    from .plugins import registry as installed

    reg = registry if registry is not None else installed()
    if kind in ("reward", "backend"):
        rec, reason = reg.lookup_component(kind, name)
    else:
        rec, reason = reg.lookup(kind, name)
    if rec is None:
        raise LookupError(reason)
    return rec


def make_context(params, folder: str | os.PathLike, kind: str = "train", uses: str = "", stage_id: str = "stage",
                 inputs: Iterable = (), models: Optional[dict] = None, datasets: Optional[dict] = None, seed: int = 0,
                 registry=None):
    """A real :class:`~rlhf_spec.StageContext` for calling a stage's ``run`` directly in a test.

    Reward and backend specs inside ``params`` are resolved against ``registry`` (default: the
    installed plugins; :func:`registry_with` adds the plugin under test). The output goes to
    ``folder/out``, work in progress to ``folder/partial``.

    Args:
        params: the stage's validated params model instance.
        inputs: :class:`~rlhf_spec.InputArtifact` records of upstream entries.
        models: ``param path -> ModelSource``; datasets: ``param path -> DatasetSpec dict``
            (``{"path": "prompts.jsonl"}``).

    Raises:
        RuntimeError: if a reward or backend named in ``params`` is not installed.
    """
    import uuid

    from .context import StageContext, StageInputs, StageOutput
    from .plugins import registry as installed
    from .spec.validate import bind_components

    problems: list = []
    bind_components(params, registry or installed(), "/stages/0/params", problems)
    if problems:
        raise RuntimeError("; ".join(p.render() for p in problems))
    folder = Path(folder)
    (folder / "out").mkdir(parents=True, exist_ok=True)
    spec = StageInputs(stage_id=stage_id, kind=kind, uses=uses, key=uuid.uuid4().hex * 2, params=params, seed=seed,
                       inputs=tuple(inputs), models=dict(models or {}), datasets=dict(datasets or {}), base_dir=folder,
                       pointer="/stages/0")
    return StageContext(spec, StageOutput(out_dir=folder / "out"), folder / "partial", folder / "cache")


def execute(ctx, run) -> "object":
    """Run a stage body as the runner does: in ``params.num_processes`` worker processes when above 1.

    ``run`` is the stage's ``run`` function or its :class:`~rlhf_spec.StageImpl`.
    """
    from .launch import execute_stage

    impl = run if hasattr(run, "run") else type("_Impl", (), {"run": staticmethod(run)})()
    return execute_stage(ctx, impl)
