"""The ``flesch-readability`` reward: the Flesch reading ease of a reply.

    FRE = 206.835 - 1.015 * (words / sentences) - 84.6 * (syllables / words)

(Flesch 1948, "A new readability yardstick", Journal of Applied Psychology 32(3)). Higher is easier
to read: about 60-70 is plain English, below 30 is very hard. The reward is ``scale * FRE``; an empty
reply scores ``empty_score``. Words are runs of letters (with inner apostrophes); sentences end at
``.``, ``!`` or ``?`` (at least one per non-empty reply); syllables are counted with the usual
heuristic: groups of vowels (``y`` included), minus a silent final ``e``, at least one per word.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from rlhf_spec import RewardBatch, RewardImpl, RewardOutput

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")
_SENTENCE_END = re.compile(r"[.!?]+")
_VOWELS = re.compile(r"[aeiouy]+")


def syllables(word: str) -> int:
    """Syllables of one English word by the vowel-group heuristic (at least 1)."""
    w = word.lower()
    n = len(_VOWELS.findall(w))
    if w.endswith("e") and not w.endswith(("le", "ee", "ye")) and n > 1:
        n -= 1
    return max(1, n)


def reading_ease(text: str) -> tuple[float, int]:
    """``(Flesch reading ease, word count)`` of ``text``; ``(0.0, 0)`` when it has no words."""
    words = _WORD.findall(text)
    if not words:
        return 0.0, 0
    sentences = max(1, len([s for s in _SENTENCE_END.split(text) if _WORD.search(s)]))
    syl = sum(syllables(w) for w in words)
    return 206.835 - 1.015 * (len(words) / sentences) - 84.6 * (syl / len(words)), len(words)


class ReadabilityParams(BaseModel):
    """Params of the ``flesch-readability`` reward."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    scale: float = Field(0.01, description="The reward is scale * Flesch reading ease (0.01: about 0.6 for plain "
                                           "English).")
    empty_score: float = Field(0.0, description="Score of a reply without words.")


class Readability:
    """The loaded reward: no model, a pure function of the text."""

    def __init__(self, params: ReadabilityParams):
        self.p = params

    def score(self, batch: RewardBatch) -> RewardOutput:
        scores, empty = [], 0
        for text in batch.completions:
            fre, n = reading_ease(text)
            empty += n == 0
            scores.append(self.p.empty_score if n == 0 else self.p.scale * fre)
        return RewardOutput(scores=scores, counts={"empty": int(empty)})


def load(params: ReadabilityParams, ctx) -> Readability:
    return Readability(params)


def register_reward(register) -> None:
    register(RewardImpl(name="flesch-readability", params=ReadabilityParams, load=load, version="1",
                        description="Flesch reading ease of the reply (scaled); a rule reward, no model"))
