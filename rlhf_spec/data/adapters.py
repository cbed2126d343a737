"""The built-in dataset adapters, one class each, registered through the ``rlhf_spec_register_datasets`` hook
(entry point ``datasets`` in rlhf-spec's own ``pyproject.toml``), as a plugin's adapters are.

Each class gives its name, the row shapes it is fit for, the spec fields it reads, the raw columns it
reads and its row builder; :class:`~rlhf_spec.data.base.DatasetAdapter` derives the normalised columns.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..hookspecs import hookimpl
from ..paths import resolve
from .base import DatasetAdapter, pick
from .messages import (
    alpaca_prompt,
    apply_prompt_template,
    gsm8k_reply,
    hash_unit,
    normalize_messages,
    parse_label,
    preferred_output,
    prompt_id,
    reference_text,
    response_text,
    split_conversation,
    split_hh_pair,
)

_SPEC = dict(frozen=True, kw_only=True)


def _reference(ds) -> list[tuple[str, str, str, bool]]:
    return [("reference", ds.reference_column, "reference_column", True)] if ds.reference_column is not None else []


def _label(ds, always: bool = False) -> list[tuple[str, str, str, bool]]:
    return [("label", *pick(ds, "label_column", "label"), True)] if always or ds.label_column is not None else []


def _chosen_rejected(ds) -> list[tuple[str, str, str, bool]]:
    if ds.chosen_column and ds.rejected_column:
        return [("chosen", ds.chosen_column, "chosen_column", True),
                ("rejected", ds.rejected_column, "rejected_column", True)]
    return []


def _renamed_prompt(ds, default: str) -> tuple[str, str]:
    """The prompt column of an adapter whose default is not ``prompt``: ``prompt_column`` unless left at 'prompt'."""
    return (ds.prompt_column, "prompt_column") if ds.prompt_column != "prompt" else (default, "adapter")


@dataclass(**_SPEC)
class Generic(DatasetAdapter):
    """``generic``: a prompt column and, for preference data, chosen and rejected columns."""

    name: str = "generic"
    fit_for: tuple[str, ...] = ("prompts", "pairs")
    fields: tuple[str, ...] = ("chosen_column", "rejected_column", "reference_column", "prompt_template")
    description: str = ("read prompt_column (a string is one user turn; a list of {role, content} or {from, value} "
                        "messages is kept) and, for preference data, chosen_column/rejected_column.")

    def source_columns(self, ds):
        prompt = [("prompt", ds.prompt_column, "prompt_column", True)]
        return _reference(ds) + prompt + _label(ds) + _chosen_rejected(ds)

    def produces(self, ds) -> str:
        return "pairs" if ds.chosen_column and ds.rejected_column else "prompts"

    def required_columns(self, ds):
        # the first release's checks, plus reference_column (a lone chosen_column is checked too)
        return [(f, getattr(ds, f)) for f in ("prompt_column", "chosen_column", "rejected_column", "reference_column")
                if getattr(ds, f)]

    def features(self, ds):
        return None  # inferred, as in the first release

    def build_row(self, row, ds):
        out = {"prompt": normalize_messages(row[ds.prompt_column])}
        if ds.chosen_column and ds.rejected_column:
            out["chosen"] = response_text(row[ds.chosen_column])
            out["rejected"] = response_text(row[ds.rejected_column])
        if ds.reference_column:
            out["reference"] = reference_text(row[ds.reference_column])
        return out


@dataclass(**_SPEC)
class HhRlhf(DatasetAdapter):
    """``hh-rlhf``: Anthropic HH-RLHF's transcripts in ``chosen``/``rejected`` (Bai et al. 2022)."""

    name: str = "hh-rlhf"
    fit_for: tuple[str, ...] = ("pairs",)
    # the column fields are ignored, as in the first release
    fields: tuple[str, ...] = ("chosen_column", "rejected_column", "prompt_template")
    description: str = "parse '\\n\\nHuman:'/'\\n\\nAssistant:' transcripts in chosen/rejected."

    def source_columns(self, ds):
        return [("chosen", "chosen", "adapter", True), ("rejected", "rejected", "adapter", True)]

    def features(self, ds):
        return None  # inferred, as in the first release

    def build_row(self, row, ds):
        prompt, chosen, rejected = split_hh_pair(row["chosen"], row["rejected"])
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@dataclass(**_SPEC)
class _Conversation(DatasetAdapter):
    """A conversation per row: its final assistant turn is the completion (or, with chosen and rejected
    columns, the whole conversation is the prompt of a pair)."""

    fit_for: tuple[str, ...] = ("completions",)

    def build_row(self, row, ds):
        cols = {role: col for role, col, _, _ in self.source_columns(ds)}
        msgs = normalize_messages(row[cols["messages"]])
        system = row.get(cols["system"]) if "system" in cols else None
        if system is not None and str(system).strip() and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": str(system)}] + msgs
        if self.produces(ds) == "pairs":
            out = {"prompt": msgs, "chosen": response_text(row[cols["chosen"]]),
                   "rejected": response_text(row[cols["rejected"]])}
        else:
            out = split_conversation(msgs)
        return _label_and_reference(out, row, cols)


@dataclass(**_SPEC)
class Messages(_Conversation):
    """``messages``: a whole conversation of ``{role, content}`` turns per row."""

    name: str = "messages"
    fields: tuple[str, ...] = ("messages_column", "label_column", "reference_column", "prompt_template")
    description: str = ("messages_column (default 'messages') holds the whole conversation; the final assistant turn "
                        "is the completion.")

    def source_columns(self, ds):
        return _reference(ds) + [("messages", *pick(ds, "messages_column", "messages"), True)] + _label(ds)


@dataclass(**_SPEC)
class ShareGPT(_Conversation):
    """``sharegpt``: LLaMA-Factory's ShareGPT format, SFT conversations or preference pairs."""

    name: str = "sharegpt"
    fit_for: tuple[str, ...] = ("completions", "pairs")
    fields: tuple[str, ...] = ("messages_column", "system_column", "chosen_column", "rejected_column",
                               "reference_column", "prompt_template")
    description: str = ("LLaMA-Factory's conversations (messages_column, default 'conversations') of {from, value} "
                        "turns, an optional system column; with chosen_column and rejected_column set it is "
                        "preference data (the conversation is the prompt).")

    def source_columns(self, ds):
        conversation = [("messages", *pick(ds, "messages_column", "conversations"), True),
                        ("system", *pick(ds, "system_column", "system"), False)]
        return _reference(ds) + conversation + _label(ds) + _chosen_rejected(ds)

    def produces(self, ds) -> str:
        return "pairs" if ds.chosen_column and ds.rejected_column else "completions"

    def check(self, ds) -> Optional[str]:
        if bool(ds.chosen_column) != bool(ds.rejected_column):
            return ("adapter 'sharegpt': give both chosen_column and rejected_column (preference data) or neither "
                    "(SFT data)")
        return None


@dataclass(**_SPEC)
class Kto(_Conversation):
    """``kto``: a conversation and a desirable/undesirable label per row (Ethayarajh et al. 2024)."""

    name: str = "kto"
    fields: tuple[str, ...] = ("messages_column", "label_column", "reference_column", "prompt_template")
    description: str = ("messages (messages_column, default 'messages') whose final assistant turn is the "
                        "completion, and a boolean label (label_column, default 'label').")

    def source_columns(self, ds):
        return _reference(ds) + [("messages", *pick(ds, "messages_column", "messages"), True)] + _label(ds, always=True)


@dataclass(**_SPEC)
class PromptCompletion(DatasetAdapter):
    """``prompt-completion``: a prompt column and a completion column."""

    name: str = "prompt-completion"
    fit_for: tuple[str, ...] = ("completions",)
    fields: tuple[str, ...] = ("completion_column", "label_column", "reference_column", "prompt_template")
    description: str = "prompt_column (string or messages) and completion_column (default 'completion')."

    def source_columns(self, ds):
        return (_reference(ds) + [("prompt", ds.prompt_column, "prompt_column", True),
                                  ("completion", *pick(ds, "completion_column", "completion"), True)] + _label(ds))

    def prompt(self, row: dict, cols: dict, ds) -> list[dict]:
        """The prompt messages of a raw row."""
        return normalize_messages(row[cols["prompt"]])

    def completion(self, row: dict, cols: dict, ds) -> str:
        """The reply text of a raw row."""
        return response_text(row[cols["completion"]])

    def build_row(self, row, ds):
        cols = {role: col for role, col, _, _ in self.source_columns(ds)}
        prompt, completion = self.prompt(row, cols, ds), self.completion(row, cols, ds)
        out = {"prompt": prompt, "completion": completion,
               "messages": prompt + [{"role": "assistant", "content": completion}]}
        return _label_and_reference(out, row, cols)


@dataclass(**_SPEC)
class Alpaca(PromptCompletion):
    """``alpaca``: Stanford Alpaca's instruction, optional input and output."""

    name: str = "alpaca"
    fields: tuple[str, ...] = ("completion_column", "input_column", "reference_column", "prompt_template")
    description: str = ("instruction (prompt_column; the default 'prompt' means 'instruction') plus optional input "
                        "(input_column, default 'input', appended after a blank line) as the user turn, output "
                        "(completion_column, default 'output') as the reply.")

    def source_columns(self, ds):
        return (_reference(ds) + [("prompt", *_renamed_prompt(ds, "instruction"), True),
                                  ("input", *pick(ds, "input_column", "input"), False),
                                  ("completion", *pick(ds, "completion_column", "output"), True)] + _label(ds))

    def prompt(self, row, cols, ds):
        return alpaca_prompt(row[cols["prompt"]], row.get(cols["input"]))


@dataclass(**_SPEC)
class Gsm8k(PromptCompletion):
    """``gsm8k``: GSM8K's question and worked solution (Cobbe et al. 2021), the solution also as ``reference``."""

    name: str = "gsm8k"
    fields: tuple[str, ...] = ("completion_column", "completion_template", "prompt_template")
    description: str = ("GSM8K's question (prompt_column; the default 'prompt' means 'question') as the user turn "
                        "and its worked solution (completion_column, default 'answer') twice: verbatim in "
                        "'reference' (for the math-answer reward) and, through completion_template, as the reply to "
                        "train on.")

    def source_columns(self, ds):
        # the worked solution is also the reference that math-answer reads
        return (_reference(ds) + [("prompt", *_renamed_prompt(ds, "question"), True),
                                  ("completion", *pick(ds, "completion_column", "answer"), True),
                                  ("reference", *pick(ds, "completion_column", "answer"), True)] + _label(ds))

    def completion(self, row, cols, ds):
        return gsm8k_reply(str(row[cols["completion"]]), ds.completion_template)


@dataclass(**_SPEC)
class AlpacaEval(DatasetAdapter):
    """``alpaca-eval``: AlpacaEval's pairwise annotations (Li et al. 2023) as preference pairs."""

    name: str = "alpaca-eval"
    fit_for: tuple[str, ...] = ("pairs",)
    fields: tuple[str, ...] = ("prompt_template",)
    description: str = ("AlpacaEval's pairwise annotations (instruction, output_1, output_2, preference): the "
                        "output the annotator preferred (preference 1 or 2) is chosen, the other rejected; ties (0 "
                        "or 1.5) are dropped.")

    def source_columns(self, ds):
        return [("prompt", "instruction", "adapter", True), ("output_1", "output_1", "adapter", True),
                ("output_2", "output_2", "adapter", True), ("preference", "preference", "adapter", True)]

    def select_raw(self, raw):
        return raw.filter(lambda r: preferred_output(r["preference"]) is not None)  # ties carry no preference

    def build_row(self, row, ds):
        won = preferred_output(row["preference"])
        return {"prompt": alpaca_prompt(row["instruction"], None), "chosen": response_text(row[f"output_{won}"]),
                "rejected": response_text(row[f"output_{3 - won}"])}


@dataclass(**_SPEC)
class RtPolarity(DatasetAdapter):
    """``rt-polarity``: two text files of one sentence per line (Pang and Lee 2005's movie-review polarity data)."""

    name: str = "rt-polarity"
    fit_for: tuple[str, ...] = ("prompts", "pairs")
    fields: tuple[str, ...] = ("negative_path", "encoding", "rows", "prompt_words", "prompt_template")
    description: str = ("two text files of one sentence per line (positive in path, negative in negative_path); "
                        "prompts are each sentence's first prompt_words words, pairs put a positive sentence's rest "
                        "over a negative one's.")

    def produces(self, ds) -> str:
        return "pairs" if ds.rows == "pairs" else "prompts"

    def check(self, ds) -> Optional[str]:
        if not (ds.path and ds.negative_path):
            return "adapter 'rt-polarity' reads two local files: set 'path' (positive sentences) and 'negative_path'"
        return None

    def normalise(self, ds, base: Path):
        """A positive sentence of more than ``prompt_words`` words is split into a prompt (its first words,
        through ``prompt_template``) and its rest; sentences are kept when their prompt's hash falls in
        ``hash_range``, so disjoint ranges give disjoint sentences. ``rows="prompts"``: one row per sentence,
        ordered by hash. ``rows="pairs"``: positives and negatives, each ordered by hash, are zipped; pair i
        takes the prompt of its positive sentence (even i) or its negative one (odd i), and puts the
        positive sentence's rest (chosen) over the negative one's (rejected): the chosen reply continues the
        prompt's own sentence half of the time, so a reward model must learn polarity, not coherence.
        """
        import datasets

        k, lo, hi = ds.prompt_words or 4, *ds.hash_range
        sides = []
        for field in ("path", "negative_path"):
            with open(resolve(getattr(ds, field), base), encoding=ds.encoding or "utf-8") as f:
                side = []
                for line in f:
                    words = line.split()
                    if len(words) <= k:
                        continue
                    head = [{"role": "user", "content": " ".join(words[:k])}]
                    prompt = apply_prompt_template(head, ds.prompt_template)
                    pid = prompt_id(prompt)
                    if lo <= hash_unit(pid) < hi:
                        side.append((hash_unit(pid), pid, prompt, " ".join(words[k:])))
                sides.append(sorted(side))
        pos, neg = sides
        if ds.rows != "pairs":
            rows = [{"prompt_id": pid, "prompt": prompt} for _, pid, prompt, _ in sorted(pos + neg)]
        else:
            rows = [{"prompt_id": (p if i % 2 == 0 else n)[1], "prompt": (p if i % 2 == 0 else n)[2], "chosen": p[3],
                     "rejected": n[3]} for i, (p, n) in enumerate(zip(pos, neg))]
        return datasets.Dataset.from_list(rows, features=self.features(ds))

    def column_problem(self, ds, base: Path) -> Optional[tuple[str, str]]:
        for field in ("path", "negative_path"):
            try:
                with open(resolve(getattr(ds, field), base), encoding=ds.encoding or "utf-8") as f:
                    f.read()
            except UnicodeDecodeError as exc:
                return "encoding", (f"{getattr(ds, field)} is not {ds.encoding or 'utf-8'} text ({exc.reason} at byte "
                                    f"{exc.start}); set 'encoding', e.g. 'latin-1'")
            except OSError as exc:
                return field, f"cannot read {getattr(ds, field)}: {type(exc).__name__}: {exc}"
        return None


def _label_and_reference(out: dict, row: dict, cols: dict) -> dict:
    """``out`` with the ``label`` and ``reference`` columns a row carries (when the adapter reads them)."""
    if "label" in cols:
        out["label"] = parse_label(row[cols["label"]])
    if "reference" in cols:
        out["reference"] = reference_text(row[cols["reference"]])
    return out


#: The built-in adapters, in the order the JSON Schema lists them.
BUILTIN = (Generic(), HhRlhf(), Messages(), PromptCompletion(), Alpaca(), ShareGPT(), Kto(), RtPolarity(), AlpacaEval(),
           Gsm8k())


@hookimpl
def rlhf_spec_register_datasets(register):
    """Register the built-in dataset adapters (:data:`BUILTIN`)."""
    for adapter in BUILTIN:
        register(adapter)
