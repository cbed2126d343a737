"""Prompt ids and the text shapes adapters read: hh-rlhf transcripts, chat messages, replies, labels.

A prompt id is a content hash of the prompt's messages, so shards, splits and ``hash_range`` selections
depend on the prompts alone, never on row order or the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Optional

from ..hashing import canonical_json

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                "bot": "assistant"}


def prompt_id(messages: list[dict]) -> str:
    """16-hex-character content id of a prompt (list of ``{"role", "content"}``)."""
    return hashlib.sha256(canonical_json([[m["role"], m["content"]] for m in messages])).hexdigest()[:16]


def hash_unit(pid: str) -> float:
    """Map a prompt id to [0, 1) uniformly; used for ``hash_range`` and the unseeded split by prompt."""
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


_LABELS = {"true": True, "false": False, "yes": True, "no": False, "1": True, "0": False,
           "desirable": True, "undesirable": False}


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


def alpaca_prompt(instruction: Any, extra: Any) -> list[dict]:
    """Alpaca's instruction and optional input as one user turn (input after a blank line)."""
    text = str(instruction)
    if extra is not None and str(extra).strip():
        text = f"{text}\n\n{extra}"
    return [{"role": "user", "content": text}]


def reference_text(value: Any) -> str:
    """A reference column's value as text: a string as it is, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def preferred_output(value: Any) -> Optional[int]:
    """AlpacaEval's ``preference`` as the preferred output (1 or 2), or None for a tie (0, 1.5) or no label."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return int(v) if v in (1.0, 2.0) else None


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
