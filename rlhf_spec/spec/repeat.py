"""``repeat`` blocks: one list of stages run for several rounds, expanded into the plain stage graph
before validation.

A block stands in the spec's ``stages`` list::

    {"repeat": {"rounds": 3, "id": "{id}_iter{round}", "initial": {"train": "policy"},
                "stages": [
                  {"id": "sample", "kind": "sample", "uses": "generate", "params": {"policy": "{prev:train}", ...}},
                  {"id": "score", "kind": "score", "uses": "reward", "inputs": ["sample"], ...},
                  {"id": "train", "kind": "train", "uses": "rebel", "inputs": ["pair"], "params": {"policy":
                  "{prev:train}"}}]}}

In round r (1-based) each block stage gets the id ``id`` formats (``sample_iter2``), and:

* an ``inputs`` entry that names a block stage means that stage of the same round;
* in any string of ``params`` or ``description``: ``{round}`` is r, ``{id:NAME}`` the id of block stage
  NAME in round r, and ``{prev:NAME}`` its id in round r - 1; in round 1 ``{prev:NAME}`` is
  ``initial[NAME]`` (a model name or a stage outside the block); ``{value:NAME}`` is round r's entry of
  ``values[NAME]`` (one entry per round, e.g. ReST's rising reward thresholds). A string that is exactly
  ``"{value:NAME}"`` becomes the value itself, with its JSON type (``"threshold": "{value:threshold}"``
  gives a number). ``{{`` and ``}}`` are literal braces.

The expanded stages are exactly what the same graph written out by hand would be, so they get the
same cache keys. A problem found in an expanded stage points into the block, with its round.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import Problem, SpecError, did_you_mean

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{(round|prev|id:[^{}]*|prev:[^{}]*|value:[^{}]*)\}")
_WHOLE_VALUE = re.compile(r"^\{value:([^{}]*)\}$")
_BLOCK_KEYS = {"rounds", "id", "initial", "values", "stages", "description"}


@dataclass
class Origin:
    """Where an expanded stage came from: the block's pointer, the stage's index in it, and the round."""

    block: str
    index: int
    round: int

    def pointer(self, rest: str = "") -> str:
        return f"{self.block}/stages/{self.index}{rest}"


def _substitute(text: str, names: dict[str, str], prev: dict[str, str], rnd: int, where: str, problems: list,
                values: Optional[dict] = None) -> Any:
    values = values or {}
    whole = _WHOLE_VALUE.match(text)
    if whole and whole.group(1) in values:
        return values[whole.group(1)][rnd - 1]

    def repl(m: re.Match) -> str:
        tok = m.group(0)
        if tok in ("{{", "}}"):
            return tok[0]
        inner = m.group(1)
        if inner == "round":
            return str(rnd)
        if inner == "prev":
            return str(rnd - 1)
        kind, _, name = inner.partition(":")
        if kind == "value":
            if name in values:
                return str(values[name][rnd - 1])
            problems.append(Problem(where, f"no per-round value '{name}' in the repeat block (round {rnd})",
                                    did_you_mean(name, list(values)) or "declare it in repeat.values, one entry per "
                                                                        "round"))
            return tok
        table = names if kind == "id" else prev
        if name in table:
            return table[name]
        if kind == "prev" and name in names:
            problems.append(Problem(where, f"round {rnd} has no previous round for '{{prev:{name}}}'",
                                    f"give repeat.initial.{name}: the model or stage round 1 starts from"))
        else:
            problems.append(Problem(where, f"no stage '{name}' in the repeat block (round {rnd})",
                                    did_you_mean(name, names)))
        return tok

    return _PLACEHOLDER.sub(repl, text)


def _walk(value: Any, fn, path: str) -> Any:
    if isinstance(value, str):
        return fn(value, path)
    if isinstance(value, list):
        return [_walk(v, fn, f"{path}/{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: _walk(v, fn, f"{path}/{k}") for k, v in value.items()}
    return value


def _check_block(block: Any, ptr: str, problems: list[Problem]) -> Optional[tuple[int, str, dict, list, dict]]:
    if not isinstance(block, dict):
        problems.append(Problem(ptr, "a repeat block must be an object with 'rounds' and 'stages'"))
        return None
    for k in block:
        if k not in _BLOCK_KEYS:
            problems.append(Problem(f"{ptr}/{k}", f"unknown key '{k}'", did_you_mean(k, _BLOCK_KEYS)))
    rounds, fmt, initial, stages = (
        block.get("rounds"),
        block.get("id", "{id}_iter{round}"),
        block.get("initial", {}),
        block.get("stages"),
    )
    if not isinstance(rounds, int) or isinstance(rounds, bool) or not 1 <= rounds <= 1000:
        problems.append(Problem(f"{ptr}/rounds", "rounds must be a whole number from 1 to 1000"))
    if not isinstance(fmt, str) or "{id}" not in fmt or "{round}" not in fmt:
        problems.append(Problem(f"{ptr}/id",
                                "the id format must contain '{id}' and '{round}' (e.g. '{id}_iter{round}')"))
    if not isinstance(initial, dict) or not all(isinstance(v, str) for v in initial.values()):
        problems.append(Problem(f"{ptr}/initial", "initial maps block stage ids to the model or stage round 1 starts "
                                                  "from"))
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) and isinstance(s.get("id"),
                                                                                                str) for s in stages):
        problems.append(Problem(f"{ptr}/stages", "stages must be a non-empty list of stages, each with an 'id'"))
        return None
    values = block.get("values", {})
    if not isinstance(values, dict):
        problems.append(Problem(f"{ptr}/values", "values maps a name to a list with one entry per round"))
        values = {}
    for name, vals in values.items():
        if not isinstance(vals, list) or (isinstance(rounds, int) and len(vals) != rounds):
            got = f"{len(vals)} entries" if isinstance(vals, list) else type(vals).__name__
            problems.append(Problem(f"{ptr}/values/{name}", f"needs one entry per round ({rounds}), got {got}"))
    for name in initial if isinstance(initial, dict) else {}:
        if name not in {s["id"] for s in stages}:
            problems.append(Problem(f"{ptr}/initial/{name}", f"no stage '{name}' in the repeat block",
                                    did_you_mean(name, [s["id"] for s in stages])))
    return (rounds, fmt, initial, stages,
            values) if problems == [] or not any(p.pointer.startswith(ptr) for p in problems) else None


def _round(stages: list, fmt: str, rnd: int, prev: dict, ptr: str, problems: list, values: dict) -> tuple[list, dict]:
    names = {s["id"]: fmt.replace("{id}", s["id"]).replace("{round}", str(rnd)) for s in stages}
    out = []
    for j, st in enumerate(stages):
        where = f"{ptr}/stages/{j}"
        new = copy.deepcopy(st)
        new["id"] = names[st["id"]]
        if isinstance(st.get("inputs"), list):
            new["inputs"] = [names.get(i, i) if isinstance(i, str) else i for i in st["inputs"]]
        for field in ("params", "description"):
            if field in st:
                new[field] = _walk(st[field], lambda s, p: _substitute(s, names, prev, rnd, p, problems, values),
                                   f"{where}/{field}")
        out.append(new)
    return out, names


def expand(data: dict) -> tuple[dict, list[Optional[Origin]]]:
    """Expand every ``repeat`` block of ``data["stages"]``.

    Returns:
        (the spec dict with plain stages, the :class:`Origin` of each expanded stage or None for a plain one).

    Raises:
        SpecError: for a malformed block or a reference that does not resolve, with the block's JSON
            pointer and the round.
    """
    stages = data.get("stages")
    if not isinstance(stages, list) or not any(isinstance(s, dict) and "repeat" in s for s in stages):
        return data, [None] * (len(stages) if isinstance(stages, list) else 0)
    problems: list[Problem] = []
    out, origins = [], []
    for i, st in enumerate(stages):
        if not (isinstance(st, dict) and "repeat" in st):
            out.append(st)
            origins.append(None)
            continue
        ptr = f"/stages/{i}/repeat"
        extra = [k for k in st if k != "repeat"]
        if extra:
            problems.append(Problem(f"/stages/{i}/{extra[0]}", f"a repeat block has only the key 'repeat', not "
                                                               f"'{extra[0]}'"))
        checked = _check_block(st["repeat"], ptr, problems)
        if checked is None:
            continue
        rounds, fmt, initial, block, values = checked
        prev = dict(initial)
        for rnd in range(1, rounds + 1):
            expanded, prev = _round(block, fmt, rnd, prev, ptr, problems, values)
            out += expanded
            origins += [Origin(ptr, j, rnd) for j in range(len(block))]
    if problems:
        raise SpecError(_unique(problems))
    return dict(data, stages=out), origins


def _unique(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if (p.pointer, p.message) not in seen:
            seen.add((p.pointer, p.message))
            out.append(p)
    return out


def locate(problems: list[Problem], origins: list[Optional[Origin]]) -> list[Problem]:
    """Rewrite problems in expanded stages (``/stages/K/...``) to point into their repeat block, naming the round."""
    out = []
    for p in problems:
        m = re.match(r"^/stages/(\d+)(/.*)?$", p.pointer)
        k = int(m.group(1)) if m else -1
        if 0 <= k < len(origins) and origins[k] is not None:
            o = origins[k]
            out.append(Problem(o.pointer(m.group(2) or ""), f"{p.message} (round {o.round})", p.hint))
        else:
            out.append(p)
    return out
