"""What the judging ``evaluate`` stages (``reward-winrate``, ``reward-accuracy``) share: the ``judges``
field and its primary judge, the held-out rows of a pairs input, the row columns a reward reads,
scoring several sides of the same rows in one reward call, and markdown table cells."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import AfterValidator

from ..errors import Problem
from ..records import RewardBatch, RewardSpec


def check_judge_names(judges: dict) -> dict:
    """Pydantic validator: judge names become metric prefixes (``<name>.win_rate``) and column names.

    Raises:
        ValueError: for a name with characters other than letters, digits, '_' and '-'.
    """
    for k in judges:
        if not k.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"judge name {k!r} may use letters, digits, '_' and '-' only")
    return judges


#: The type of a stage's ``judges`` param: rewards by name, each a ``{"uses", "params"}`` object.
Judges = Annotated[dict[str, RewardSpec], AfterValidator(check_judge_names)]


def primary_problems(primary: Optional[str], judges: dict) -> list[Problem]:
    """A problem at ``/primary`` when it names no judge (with a did-you-mean), else none."""
    if primary is None or primary in judges:
        return []
    from ..errors import did_you_mean

    return [Problem("/primary", f"no judge named '{primary}'", did_you_mean(primary, judges))]


def heldout_pairs(ctx, param: str):
    """The rows of the stage's pairs input (input 0) whose ``split`` is ``"test"``.

    Raises:
        ValueError: when there are none, naming ``params.<param>`` as the alternative.
    """
    rows = ctx.input_dataset(0)
    rows = rows.select([i for i, s in enumerate(rows["split"]) if s == "test"])
    if len(rows) == 0:
        raise ValueError(f"the pairs input has no 'test' rows; set test_size on the pair stage or give params.{param}")
    return rows


def score_sides(reward, prompts: list, sides: list[list[str]], columns: dict) -> list[list[float]]:
    """Score S lists of N replies to the same N prompts in one reward call, so that a batch-normalised
    reward (``combine``'s z-score, Llama 2's whitening) puts every side on one scale.

    Args:
        reward: a loaded reward (:class:`~rlhf_spec.context.CheckedReward`).
        prompts: (N,) chat-message prompts. sides: S lists of (N,) replies. columns: row columns, each (N,).

    Returns:
        S lists of N scores, in the reward's units.

    Raises:
        RewardError: from the reward's checks (wrong count, non-finite scores).
    """
    n, s = len(prompts), len(sides)
    batch = RewardBatch(list(prompts) * s, [reply for side in sides for reply in side],
                        {c: list(v) * s for c, v in columns.items()})
    scores = list(reward.score(batch).scores)
    return [scores[i * n:(i + 1) * n] for i in range(s)]


def row_columns(rows, repeat: int = 1) -> dict[str, list]:
    """The columns of ``rows`` (a datasets.Dataset of N rows) that a reward receives
    (:meth:`~rlhf_spec.records.RewardBatch.data_columns`, such as a math reference answer), each value
    repeated ``repeat`` times in place: ``{name: (N * repeat,) list}``, the ``columns`` of
    :meth:`~rlhf_spec.records.RewardBatch.from_rows` for ``repeat`` completions per row."""
    return {c: [v for v in rows[c] for _ in range(repeat)] for c in RewardBatch.data_columns(rows.column_names)}


def cell(s: str, n: int = 160) -> str:
    """``s`` as one markdown table cell: whitespace collapsed, pipes escaped, cut to ``n`` characters."""
    s = " ".join(str(s).split()).replace("|", "\\|")
    return (s[:n] + "...") if len(s) > n else s


def num(v) -> str:
    """A figure for a table: three decimals, or "-" for None."""
    return "-" if v is None else f"{v:.3f}"
