"""Rule-based rewards: ``math-answer``, ``length`` and ``format``. They load no model (``length``
with ``unit: "tokens"`` loads a tokenizer only) and score every completion independently of the others.

* ``math-answer``: the completion's final numeric answer against the row's reference answer.
* ``length``: ``per_unit * max(0, count - free)`` for a count of tokens, words or characters.
* ``format``: ``match_score`` if a regular expression matches the completion, else ``miss_score``.

The answer extractor and the number parser are pure functions (:func:`extract_answer`,
:func:`parse_number`, :func:`answers_match`) so they can be tested and reused on their own.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..errors import Problem
from ..hookspecs import hookimpl
from ..records import POLICY, REWARD_MODEL, ModelRef, RewardBatch, RewardImpl, RewardOutput

# ----------------------------------------------------------------------------- numbers in text

# An integer with proper thousands groups ("1,234,567") or a plain run of digits.
_INT = r"(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)"
_DEC = rf"(?:{_INT}(?:\.\d+)?|\.\d+)"
_TEX_FRAC = rf"\\[dt]?frac\{{\s*{_DEC}\s*\}}\{{\s*{_DEC}\s*\}}"
# One number token as it appears in prose or LaTeX: optional sign and dollar sign, a decimal, a
# fraction "a/b" or "\frac{a}{b}", an optional percent sign. Not preceded by a letter, digit or dot,
# so "x2", the "4" of "3-4" read as "-4", or the tail of "1.2.3" are not taken as numbers.
_NUMBER = rf"(?<![\w.])[-\u2212]?(?:\\?\$\s?)?[-\u2212]?(?:{_TEX_FRAC}|{_DEC}(?:\s?/\s?{_DEC})?)(?:\s?\\?%)?"
_NUMBER_RE = re.compile(_NUMBER)
_GSM8K_RE = re.compile(rf"####\s*({_NUMBER})")
_ANSWER_IS_RE = re.compile(rf"answer\s*(?:is\b|:|=)[\s:*_]*({_NUMBER})", re.IGNORECASE)
_BOXED = "\\boxed"

_PLAIN_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[-+]?\.\d+")
_FRAC_RE = re.compile(r"([-+]?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}")


def _last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` whose braces balance (nested braces allowed); an unclosed
    or empty box (a truncated completion) is skipped in favour of the one before it."""
    start = text.rfind(_BOXED)
    while start != -1:
        i = start + len(_BOXED)
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    inner = text[i + 1: j].strip()
                    if inner:
                        return inner
                    break
        start = text.rfind(_BOXED, 0, start)
    return None


def extract_answer(text: str) -> Optional[str]:
    """The final answer of a solution text, as a string, or ``None`` if it holds none.

    Rules, first that applies wins:

    1. the content of the last ``\\boxed{...}`` with balanced braces (the MATH dataset's convention,
       Hendrycks et al. 2021), returned whole even if it is not a number;
    2. the number after the last ``####`` (GSM8K's gold format, Cobbe et al. 2021);
    3. the number after the last ``answer is`` / ``answer:`` / ``answer =`` (any case);
    4. the last number anywhere in the text.

    A number here is an optionally signed decimal with optional ``$``, thousands commas, ``%``, or
    a fraction ``a/b`` / ``\\frac{a}{b}``. The result is meant for :func:`parse_number`.
    """
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_GSM8K_RE, _ANSWER_IS_RE):
        found = pattern.findall(text)
        if found:
            return found[-1].strip()
    found = _NUMBER_RE.findall(text)
    return found[-1].strip() if found else None


def _plain(s: str) -> Optional[float]:
    """A signed decimal with optional thousands commas (only well-formed groups), else None."""
    if not _PLAIN_RE.fullmatch(s):
        return None
    return float(s.replace(",", ""))


def parse_number(text: Optional[str]) -> Optional[float]:
    """Read one number from an answer string, or ``None`` when it is not exactly one number.

    Normalisation, in order: LaTeX spacing (``\\!``, ``\\,``, ``{,}``) and ``$`` / ``\\$`` removed,
    Unicode minus read as ``-``, trailing ``.`` and ``%`` / ``\\%`` removed (so ``"50%"`` is 50, not
    0.5), spaces around ``/`` and after a sign dropped. Then it accepts a decimal (``"-1,234.5"``,
    ``".75"``; commas only as well-formed thousands groups, so ``"1,5"`` is rejected), a fraction
    ``"a/b"`` or ``"\\frac{a}{b}"`` (``\\dfrac``, ``\\tfrac``; zero denominator rejected). Anything
    else (units, words, several numbers, ``nan``) gives ``None``.
    """
    if text is None:
        return None
    s = text.strip()
    for old, new in (("\\!", ""), ("\\,", ""), ("{,}", ","), ("\\$", ""), ("$", ""), ("\u2212", "-"), ("\\%", "%")):
        s = s.replace(old, new)
    s = s.strip().rstrip(".").strip()
    if s.endswith("%"):
        s = s[:-1].strip().rstrip(".").strip()
    s = re.sub(r"\s*/\s*", "/", s)
    s = re.sub(r"^([-+])\s+", r"\1", s)
    tex = _FRAC_RE.fullmatch(s)
    if tex:
        sign, num, den = tex.group(1), tex.group(2).strip(), tex.group(3).strip()
        s = f"{sign}{num}/{den}"
    if s.count("/") == 1:
        a, b = (_plain(part) for part in s.split("/"))
        if a is None or b is None or b == 0 or s.split("/")[1].startswith(("-", "+")):
            return None
        value = a / b
    else:
        value = _plain(s)
    return value if value is not None and math.isfinite(value) else None


def answers_match(pred: Union[str, float, None], ref: Union[str, float, None]) -> bool:
    """Whether two answers are the same number: ``abs(a - b) <= 1e-6 * max(1, abs(b))``.

    ``pred`` and ``ref`` are answer strings (read with :func:`parse_number`, not extracted from a
    longer text) or numbers; anything unreadable, or ``None``, does not match.
    """
    a = parse_number(pred) if isinstance(pred, str) else pred
    b = parse_number(ref) if isinstance(ref, str) else ref
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return False
    return abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b)))


# ----------------------------------------------------------------------------- math-answer


class MathAnswerParams(BaseModel):
    """Params of ``math-answer``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    reference_column: str = Field("reference", min_length=1,
                                  description="Row column holding the reference answer: a solution text (GSM8K's '... "
                                              "#### 72'), an answer string or a number.")
    correct: float = Field(1.0, description="Score when the completion's answer equals the reference.")
    incorrect: float = Field(0.0, description="Score when it is a number that differs from the reference.")
    unparseable: float = Field(0.0, description="Score when no number can be read from the completion.")


def reference_value(value, column: str, row: int) -> float:
    """The number of one reference cell: a number as is, a text through :func:`extract_answer` and
    :func:`parse_number`.

    Raises:
        ValueError: naming the column and row, when the cell is empty, a bool, or holds no number.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    number = parse_number(extract_answer(value)) if isinstance(value, str) else None
    if number is None:
        raise ValueError(f"math-answer: reference column '{column}', row {row}: no number can be read from {value!r}")
    return number


class MathAnswerReward:
    """A loaded ``math-answer`` reward (stateless)."""

    def __init__(self, params: MathAnswerParams):
        self.p = params

    def score(self, batch: RewardBatch) -> RewardOutput:
        """``correct`` / ``incorrect`` per completion, ``unparseable`` when it holds no number.

        Counts: ``correct`` and ``unparseable`` completions.

        Raises:
            ValueError: the reference column is missing from the batch, or a reference holds no number.
        """
        col = self.p.reference_column
        if col not in batch.columns:
            raise ValueError(f"math-answer: the rows have no column '{col}' (reference_column); "
                             f"columns: {sorted(batch.columns) or 'none'}")
        refs = batch.columns[col]
        scores, correct, unparseable = [], 0, 0
        for i, completion in enumerate(batch.completions):
            ref = reference_value(refs[i], col, i)
            pred = parse_number(extract_answer(completion))
            if pred is None:
                unparseable += 1
                scores.append(self.p.unparseable)
            elif answers_match(pred, ref):
                correct += 1
                scores.append(self.p.correct)
            else:
                scores.append(self.p.incorrect)
        return RewardOutput(scores=scores, counts={"correct": correct, "unparseable": unparseable})


def load_math_answer(params: MathAnswerParams, ctx=None) -> MathAnswerReward:
    """Build the reward; it needs nothing from ``ctx``."""
    return MathAnswerReward(params)


# ----------------------------------------------------------------------------- length


class LengthParams(BaseModel):
    """Params of ``length``: ``score = per_unit * max(0, count - free)``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    unit: Literal["tokens", "words", "characters"] = Field(
        ..., description="What is counted: tokens of 'tokenizer' (no special tokens), whitespace-separated words, or "
                         "characters (Unicode code points).")
    per_unit: float = Field(..., description="Reward per counted unit beyond 'free'; negative for a length penalty.")
    free: int = Field(0, ge=0, description="Units that cost (or earn) nothing.")
    tokenizer: Optional[Annotated[str, ModelRef(artifacts=(POLICY, REWARD_MODEL))]] = Field(
        None, description="With unit 'tokens': a /models name or a policy/reward-model stage id whose tokenizer counts "
                          "tokens.")


def count_units(text: str, unit: str, tokenizer=None) -> int:
    """Length of ``text``: ``len(text.split())`` words, ``len(text)`` characters, or the number of ids
    ``tokenizer(text, add_special_tokens=False)`` gives (the completion re-encoded, so it can differ
    by a token or two from the ids the policy sampled)."""
    if unit == "words":
        return len(text.split())
    if unit == "characters":
        return len(text)
    if unit == "tokens":
        if tokenizer is None:
            raise ValueError("length: unit 'tokens' needs a tokenizer")
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    raise ValueError(f"length: unknown unit {unit!r}")


class LengthReward:
    """A loaded ``length`` reward."""

    def __init__(self, params: LengthParams, tokenizer=None):
        self.p, self.tokenizer = params, tokenizer

    def score(self, batch: RewardBatch) -> RewardOutput:
        """``per_unit * max(0, count - free)`` per completion; counts ``over_free`` completions."""
        scores, over = [], 0
        for text in batch.completions:
            extra = max(0, count_units(text, self.p.unit, self.tokenizer) - self.p.free)
            over += extra > 0
            scores.append(self.p.per_unit * extra)
        return RewardOutput(scores=scores, counts={"over_free": over})


def load_length(params: LengthParams, ctx=None) -> LengthReward:
    """Build the reward; with unit 'tokens' it loads the tokenizer of ``params.tokenizer`` through ``ctx``.

    Raises:
        ValueError: unit 'tokens' without a tokenizer or without a context to load it.
    """
    if params.unit != "tokens":
        return LengthReward(params)
    if params.tokenizer is None or ctx is None:
        raise ValueError("length: unit 'tokens' needs the 'tokenizer' param and a context to load it")
    return LengthReward(params, ctx.model("tokenizer").load_tokenizer())


def check_length(params: LengthParams, spec=None) -> list[Problem]:
    """Validation: 'tokens' needs a tokenizer; a tokenizer with another unit would only add a needless
    model dependency (and cache-key part), so it is reported too."""
    if params.unit == "tokens" and params.tokenizer is None:
        return [Problem("/tokenizer", "unit 'tokens' needs a tokenizer",
                        "set 'tokenizer' to a /models name or a stage that outputs a policy or reward model")]
    if params.unit != "tokens" and params.tokenizer is not None:
        return [Problem("/tokenizer", f"a tokenizer is only used with unit 'tokens' (unit is '{params.unit}')",
                        "remove 'tokenizer' or set unit to 'tokens'")]
    return []


# ----------------------------------------------------------------------------- format

_FLAGS = {"ignorecase": re.IGNORECASE, "multiline": re.MULTILINE, "dotall": re.DOTALL}


class FormatParams(BaseModel):
    """Params of ``format``: a Python regular expression (module ``re``) the completion must match."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    pattern: str = Field(..., min_length=1, description="Python regular expression (re syntax).")
    mode: Literal["search", "fullmatch"] = Field("search", description="'search': anywhere in the completion; "
                                                                       "'fullmatch': the whole completion.")
    flags: list[Literal["ignorecase", "multiline", "dotall"]] = Field(default_factory=list, description="re flags.")
    match_score: float = Field(1.0, description="Score of a completion that matches.")
    miss_score: float = Field(0.0, description="Score of one that does not.")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"not a valid regular expression: {e}") from None
        return v


class FormatReward:
    """A loaded ``format`` reward: the compiled pattern."""

    def __init__(self, params: FormatParams):
        self.p = params
        flags = 0
        for name in params.flags:
            flags |= _FLAGS[name]
        self.regex = re.compile(params.pattern, flags)
        self.match = self.regex.fullmatch if params.mode == "fullmatch" else self.regex.search

    def score(self, batch: RewardBatch) -> RewardOutput:
        """``match_score`` or ``miss_score`` per completion; counts ``matched`` completions."""
        hits = [self.match(text) is not None for text in batch.completions]
        return RewardOutput(scores=[self.p.match_score if h else self.p.miss_score for h in hits],
                            counts={"matched": sum(hits)})


def load_format(params: FormatParams, ctx=None) -> FormatReward:
    """Compile the pattern; needs nothing from ``ctx``."""
    return FormatReward(params)


# ----------------------------------------------------------------------------- registration


def required_columns(params: BaseModel) -> list[str]:
    """Row columns a rule reward reads, following its params: ``[reference_column]`` for
    ``math-answer`` (which is why its record declares no fixed ``columns``), none for the others."""
    if isinstance(params, MathAnswerParams):
        return [params.reference_column]
    return []


@hookimpl
def rlhf_spec_register_rewards(register):
    register(RewardImpl(
        name="math-answer", params=MathAnswerParams, load=load_math_answer, version="1",
        description="final numeric answer (\\boxed, ####, 'answer is', last number) equals the row's reference answer",
        columns=required_columns, components=()))
    register(RewardImpl(
        name="length", params=LengthParams, load=load_length, version="1", check=check_length,
        description="per_unit * max(0, count - free), counting tokens, words or characters"))
    register(
        RewardImpl(
            name="format",
            params=FormatParams,
            load=load_format,
            version="1",
            description="match_score if a regular expression matches the completion (search or fullmatch), else "
                        "miss_score",
        )
    )
