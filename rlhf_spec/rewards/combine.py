"""The ``combine`` reward: one score from several named component rewards.

Two rules:

* ``weighted-sum`` (default): ``score = sum_i w_i * norm_i(r_i)`` (:func:`weighted_sum`), with an
  optional normalisation per component (none, z-score over the batch, or a fixed mean/std).
* ``llama2``: the safety/helpfulness rule of Llama 2 (:func:`llama2_combine`).

The arithmetic lives in pure functions; :func:`load` only loads the components (through
``ctx.reward("components.<name>")``) and feeds their scores to them.

Batch-dependent scores: ``normalize: {method: "batch"}`` and the llama2 rule's ``whiten`` make a
row's score depend on the other rows scored in the same call (the scoring stage's batch).
"""

from __future__ import annotations

import difflib
import math
from typing import Literal, Optional, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import Problem
from ..hookspecs import hookimpl
from ..records import RewardBatch, RewardImpl, RewardOutput, RewardSpec

_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
_CLIP = 1e-6  # probabilities are clipped to [_CLIP, 1 - _CLIP] before the logit


class Normalization(BaseModel):
    """How one component's scores are rescaled before weighting."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    method: Literal["none", "batch", "fixed"] = Field(
        ..., description="'none'; 'batch': z-score over the scored batch; 'fixed': (r - mean) / std.")
    mean: Optional[float] = Field(None, description="With 'fixed': the mean; omit both to use the component reward's "
                                                    "statistics.")
    std: Optional[float] = Field(None, gt=0, description="With 'fixed': the standard deviation (> 0).")

    @model_validator(mode="after")
    def _mean_std(self):
        given = (self.mean is not None) + (self.std is not None)
        if self.method != "fixed" and given:
            raise ValueError("mean and std are only used with method 'fixed'")
        if given == 1:
            raise ValueError("give both mean and std, or neither (then the component reward's statistics are used)")
        return self


class Llama2Params(BaseModel):
    """Params of the ``llama2`` rule (see :func:`llama2_combine`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    safety: str = Field(..., description="Name of the safety component (R_s).")
    helpfulness: str = Field(..., description="Name of the helpfulness component (R_h).")
    threshold: float = Field(0.15, gt=0, lt=1, description="R_s probability below which the safety reward is used.")
    unsafe_column: Optional[str] = Field(None, min_length=1, description="Bool row column: true for prompts tagged "
                                                                         "unsafe (IS_SAFETY(p)).")
    scores: Literal["logits", "probabilities"] = Field(
        "logits", description="'logits': components are raw reward-model logits, mapped to probabilities with a "
                              "sigmoid; 'probabilities': already in [0, 1].")
    whiten: bool = Field(True, description="Z-score the logits over the batch (WHITEN).")


class CombineParams(BaseModel):
    """Params of ``combine``."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    components: dict[str, RewardSpec] = Field(..., min_length=1, description="Component rewards by name (letters, "
                                                                             "digits, '_', '-').")
    rule: Literal["weighted-sum", "llama2"] = Field("weighted-sum", description="How the components are combined.")
    weights: dict[str, float] = Field(default_factory=dict, description="weighted-sum: weight per component; a missing "
                                                                        "one is 1.0.")
    normalize: dict[str, Normalization] = Field(default_factory=dict, description="weighted-sum: normalisation per "
                                                                                  "component; a missing one is 'none'.")
    llama2: Optional[Llama2Params] = Field(None, description="The llama2 rule's params.")

    @field_validator("components")
    @classmethod
    def _names(cls, v: dict) -> dict:
        for name in v:
            if not name or not set(name) <= _NAME_CHARS:
                raise ValueError(f"component name {name!r} may only hold letters, digits, '_' and '-'")
        return v


# ----------------------------------------------------------------------------- pure arithmetic


def zscore(values: Sequence[float]) -> list[float]:
    """``(v - mean) / std`` with the population std (divide by N). When all values are equal (std 0)
    the centred values (all 0.0) are returned. An empty input gives an empty list."""
    vals = [float(v) for v in values]
    if not vals:
        return []
    mean = math.fsum(vals) / len(vals)
    if max(vals) == min(vals):
        return [0.0] * len(vals)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / len(vals))
    return [(v - mean) / std for v in vals]


def _statistics(stats, name: str) -> tuple[float, float]:
    """(mean, std) from a reward's ``statistics`` dict; ValueError naming the component if unusable."""
    try:
        mean, std = float(stats["mean"]), float(stats["std"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"component '{name}': normalisation 'fixed' without mean/std needs the component reward's "
                         f"statistics {{'mean', 'std'}}, and it has {stats!r}; set mean and std") from None
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise ValueError(f"component '{name}': its statistics need a finite mean and a std > 0, got {stats!r}")
    return mean, std


def normalize_values(values: Sequence[float], norm: Optional[Normalization], stats=None, name: str = "") -> list[float]:
    """One component's scores after its normalisation: unchanged ('none' or no entry), :func:`zscore`
    ('batch'), or ``(v - mean) / std`` ('fixed', with the given mean/std, else ``stats``)."""
    if norm is None or norm.method == "none":
        return [float(v) for v in values]
    if norm.method == "batch":
        return zscore(values)
    mean, std = (norm.mean, norm.std) if norm.mean is not None else _statistics(stats, name)
    return [(float(v) - mean) / std for v in values]


def weighted_sum(components: dict[str, Sequence[float]], weights: dict[str, float],
                 normalize: dict, statistics: Optional[dict] = None) -> list[float]:
    """``score[j] = sum_i w_i * norm_i(r_i)[j]`` over the components ``i`` in ``components``.

    Args:
        components: name -> N raw scores.
        weights: name -> weight; a missing component gets 1.0.
        normalize: name -> :class:`Normalization` (or its dict form); a missing one means 'none'.
        statistics: name -> ``{"mean", "std"}`` of the component reward, used by 'fixed' entries
            that give no mean/std.

    Raises:
        ValueError: components of different lengths, a weight/normalisation naming no component, or
            'fixed' without mean/std and without usable statistics (the message names the component).
    """
    unknown = sorted((set(weights) | set(normalize)) - set(components))
    if unknown:
        raise ValueError(f"weights/normalize name no component: {unknown}; components: {sorted(components)}")
    lengths = {name: len(v) for name, v in components.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"components have different lengths: {lengths}")
    n = next(iter(lengths.values()), 0)
    total = [0.0] * n
    for name, values in components.items():
        norm = normalize.get(name)
        if isinstance(norm, dict):
            norm = Normalization.model_validate(norm)
        scaled = normalize_values(values, norm, (statistics or {}).get(name), name)
        w = float(weights.get(name, 1.0))
        total = [t + w * s for t, s in zip(total, scaled)]
    return total


def sigmoid(x: float) -> float:
    """``1 / (1 + exp(-x))``, computed without overflow."""
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def logit(p: float) -> float:
    """``log(p / (1 - p))`` of ``p`` clipped to ``[1e-6, 1 - 1e-6]`` (so at most about +-13.8)."""
    p = min(max(float(p), _CLIP), 1.0 - _CLIP)
    return math.log(p / (1.0 - p))


def _llama2_pick(safety, helpfulness, unsafe, threshold, scores_are_logits):
    """(R_c as probabilities, used-safety flags) per row; see :func:`llama2_combine`."""
    if len(safety) != len(helpfulness) or (unsafe is not None and len(unsafe) != len(safety)):
        raise ValueError(f"llama2: lengths differ: safety {len(safety)}, helpfulness {len(helpfulness)}, "
                         f"unsafe {None if unsafe is None else len(unsafe)}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"llama2: threshold must be in (0, 1), got {threshold}")
    to_prob = sigmoid if scores_are_logits else float
    p_s, p_h = [to_prob(v) for v in safety], [to_prob(v) for v in helpfulness]
    if not scores_are_logits:
        bad = [v for v in p_s + p_h if not 0.0 <= v <= 1.0]
        if bad:
            raise ValueError(f"llama2: scores are 'probabilities' but a component returned {bad[0]} (outside [0, 1]); "
                             "use scores: 'logits' for raw reward-model outputs")
    used = [bool(unsafe[i]) if unsafe is not None else False for i in range(len(p_s))]
    used = [u or p_s[i] < threshold for i, u in enumerate(used)]
    return [p_s[i] if used[i] else p_h[i] for i in range(len(p_s))], used


def llama2_combine(safety: Sequence[float], helpfulness: Sequence[float], unsafe: Optional[Sequence[bool]] = None,
                   threshold: float = 0.15, scores_are_logits: bool = True, whiten: bool = True) -> list[float]:
    """Llama 2's combined reward (Touvron et al. 2023, "Llama 2: Open Foundation and Fine-Tuned Chat
    Models", Section 3.2.3 "Iterative Fine-Tuning", the PPO paragraph; R_s and R_h are the safety and
    helpfulness reward models of Section 3.2.2), per row::

        R_c(g | p) = R_s(g | p)   if IS_SAFETY(p) or R_s(g | p) < 0.15
                     R_h(g | p)   otherwise
        R~_c(g | p) = WHITEN(LOGIT(R_c(g | p)))

    In the paper R_s and R_h are probabilities (sigmoid outputs); with ``scores_are_logits`` (the
    default) the inputs are raw reward-model logits and are mapped with a sigmoid first, so the
    threshold (``threshold``, default 0.15) compares a probability. LOGIT is the inverse sigmoid on
    the probability clipped to ``[1e-6, 1 - 1e-6]``; WHITEN is :func:`zscore` over the given rows
    (population std; all-equal rows give 0.0), applied after the logit and only when ``whiten``.
    IS_SAFETY(p) is ``unsafe[i]`` (None: no prompt is tagged). The paper then subtracts the KL
    penalty ``beta * D_KL``; that belongs to the trainer, not to this reward.

    Raises:
        ValueError: lengths differ, threshold outside (0, 1), or 'probabilities' outside [0, 1].
    """
    chosen, _ = _llama2_pick(safety, helpfulness, unsafe, threshold, scores_are_logits)
    logits = [logit(p) for p in chosen]
    return zscore(logits) if whiten else logits


# ----------------------------------------------------------------------------- the loaded reward


def _as_bool(value, column: str, row: int) -> bool:
    """A row's unsafe tag: a bool, or 0/1; anything else is a ValueError naming column and row."""
    if isinstance(value, bool) or value in (0, 1):
        return bool(value)
    raise ValueError(f"llama2: unsafe_column '{column}', row {row}: expected true/false, got {value!r}")


class CombineReward:
    """A loaded ``combine`` reward: its loaded components and their statistics."""

    def __init__(self, params: CombineParams, components: dict, statistics: dict, pointer: str = ""):
        self.p, self.rewards, self.statistics_of, self.pointer = params, components, statistics, pointer

    def _llama2(self, raw: dict, batch: RewardBatch) -> tuple[list[float], int]:
        """(scores, rows that used the safety reward) under the llama2 rule."""
        lp = self.p.llama2
        unsafe = None
        if lp.unsafe_column:
            if lp.unsafe_column not in batch.columns:
                raise ValueError(f"llama2: the rows have no column '{lp.unsafe_column}' (unsafe_column)")
            unsafe = [_as_bool(v, lp.unsafe_column, i) for i, v in enumerate(batch.columns[lp.unsafe_column])]
        logits = lp.scores == "logits"
        args = (raw[lp.safety], raw[lp.helpfulness], unsafe, lp.threshold, logits)
        _, used = _llama2_pick(*args)
        return llama2_combine(*args, whiten=lp.whiten), sum(used)

    def score(self, batch: RewardBatch) -> RewardOutput:
        """The combination; ``components`` holds each component's raw scores (and its own components as
        ``"<name>/<sub>"``); ``counts`` are the components' counts summed by key (plus
        ``llama2_safety_used`` under the llama2 rule).

        Raises:
            ValueError: prefixed with this reward's JSON pointer (see :func:`weighted_sum`,
                :func:`llama2_combine`, missing or non-bool unsafe column).
        """
        raw, parts, counts = {}, {}, {}
        for name, reward in self.rewards.items():
            out = reward.score(batch)
            raw[name] = [float(v) for v in out.scores]
            parts[name] = raw[name]
            for sub, values in out.components.items():
                parts[f"{name}/{sub}"] = [float(v) for v in values]
            for key, n in out.counts.items():
                counts[key] = counts.get(key, 0) + int(n)
        try:
            if self.p.rule == "llama2":
                scores, used = self._llama2(raw, batch)
                counts["llama2_safety_used"] = counts.get("llama2_safety_used", 0) + used
            else:
                scores = weighted_sum(raw, self.p.weights, self.p.normalize, self.statistics_of)
        except ValueError as e:
            raise ValueError(f"{self.pointer}: {e}" if self.pointer else str(e)) from None
        return RewardOutput(scores=scores, components=parts, counts=counts)


def load(params: CombineParams, ctx) -> CombineReward:
    """Load every component through ``ctx.reward("components.<name>")`` and collect the statistics
    that 'fixed' normalisations without mean/std need.

    Raises:
        ValueError: naming ``ctx.pointer``: the params fail :func:`check`, or a component that a
            'fixed' normalisation reads has no usable ``statistics`` (``{"mean": float, "std": float}``).
    """
    problems = check(params)
    if problems:  # validation normally reports these first
        raise ValueError(f"{ctx.pointer}: " + "; ".join(p.render() for p in problems))
    rewards = {name: ctx.reward(f"components.{name}") for name in params.components}
    stats = {name: getattr(r, "statistics", None) for name, r in rewards.items()}
    if params.rule == "weighted-sum":
        for name, norm in params.normalize.items():
            if norm.method == "fixed" and norm.mean is None:
                try:
                    _statistics(stats.get(name), name)
                except ValueError as e:
                    raise ValueError(f"{ctx.pointer}/normalize/{name}: {e}") from None
    return CombineReward(params, rewards, stats, ctx.pointer)


# ----------------------------------------------------------------------------- validation


def _escape(name: str) -> str:
    """A JSON-pointer reference token (RFC 6901: ``~`` as ``~0``, ``/`` as ``~1``)."""
    return name.replace("~", "~0").replace("/", "~1")


def _unknown(pointer: str, name: str, names: list[str]) -> Problem:
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"components: {', '.join(names)}"
    return Problem(pointer, f"no component named '{name}'", hint)


def check(params: CombineParams, spec=None) -> list[Problem]:
    """Validation (pointers relative to the params): every weight, normalisation and llama2
    ``safety``/``helpfulness`` must name a component (with a difflib "did you mean" hint); the llama2
    rule needs ``llama2`` params and takes no weights/normalize; ``llama2`` params need that rule.
    'fixed' without mean/std passes: the statistics come from the component when it is loaded."""
    names = list(params.components)
    problems = [_unknown(f"/weights/{_escape(w)}", w, names) for w in params.weights if w not in names]
    problems += [_unknown(f"/normalize/{_escape(k)}", k, names) for k in params.normalize if k not in names]
    if params.llama2 is not None:
        for field in ("safety", "helpfulness"):
            value = getattr(params.llama2, field)
            if value not in names:
                problems.append(_unknown(f"/llama2/{field}", value, names))
    if params.rule == "llama2":
        if params.llama2 is None:
            problems.append(Problem("/llama2", "rule 'llama2' needs llama2 params",
                                    'add "llama2": {"safety": <component>, "helpfulness": <component>}'))
        for field in ("weights", "normalize"):
            if getattr(params, field):
                problems.append(Problem(f"/{field}", f"{field} are not used by rule 'llama2'", f"remove {field}"))
    elif params.llama2 is not None:
        problems.append(Problem("/llama2", "llama2 params are only used with rule 'llama2'",
                                "set rule to 'llama2' or remove llama2"))
    return problems


def required_columns(params: CombineParams) -> list[str]:
    """Row columns the combination reads: the llama2 ``unsafe_column`` (rule llama2), plus those of
    resolved components (their records' ``required_columns``)."""
    cols = []
    if params.rule == "llama2" and params.llama2 is not None and params.llama2.unsafe_column:
        cols.append(params.llama2.unsafe_column)
    for spec in params.components.values():
        try:
            impl, parsed = spec.impl, spec.parsed
        except RuntimeError:  # not resolved by validation yet
            continue
        cols += impl.required_columns(parsed)
    return list(dict.fromkeys(cols))


@hookimpl
def rlhf_spec_register_rewards(register):
    register(RewardImpl(
        name="combine", params=CombineParams, load=load, version="1", check=check, columns=required_columns,
        description="named component rewards combined by a weighted sum (optionally normalised) or Llama 2's "
                    "safety/helpfulness rule"))
