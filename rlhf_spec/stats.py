"""Statistics the ``evaluate`` stage reports when it compares a policy with a reference policy.

Setting: ``P`` held-out prompts; the policy and the reference each answer every
prompt ``k >= 1`` times (the same ``k`` for both). A judge (a reward model or any
scalar scorer) gives every answer a score, so one judge yields two ``(P, k)``
score arrays. With several judges, call these functions once per judge.
Answer lengths are ``(P, k)`` arrays in tokens.

Everything here is a pure function of plain lists / numpy arrays (no torch):

* :func:`win_rate` -- share of (policy, reference) answer pairs the policy wins, ties 1/2;
* :func:`bootstrap_mean_ci` -- bootstrap interval of a mean over prompts (Efron 1979, via
  :func:`scipy.stats.bootstrap`), used for the win rate and the reward difference;
* :func:`wilson_interval` -- Wilson (1927) score interval, accepting fractional wins;
* :func:`reward_difference` -- paired mean reward difference with its bootstrap interval;
* :func:`length_controlled_win_rate` -- AlpacaEval 2 style length-controlled win rate
  (Dubois et al. 2024, arXiv:2404.04475);
* :func:`compare` -- all of the above as one JSON-able dict.

Intervals are resampled over *prompts* (the independent unit): answers to the same
prompt are correlated, so resampling answers would make intervals too narrow.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

from .length_control import (  # noqa: F401 - LC_RESAMPLES and the length-controlled win rate are re-exported
    LC_RESAMPLES,
    LengthControlledWinRate,
    _as_2d,
    _check_confidence,
    _check_pair,
    length_controlled_win_rate,
)

__all__ = [
    "LengthControlledWinRate",
    "RewardDifference",
    "WinRate",
    "bootstrap_mean_ci",
    "compare",
    "compare_preferences",
    "length_controlled_win_rate",
    "reward_difference",
    "wilson_interval",
    "win_rate",
]

DEFAULT_RESAMPLES = 4000  # bootstrap resamples for means (Monte Carlo error of the 2.5% quantile is small)
_MAX_CELLS = 4_000_000  # cap on resamples x prompts held in memory at once by the bootstrap


class WinRate(NamedTuple):
    """Overall win rate (a float in [0, 1]) and the per-prompt win values, shape ``(P,)``."""

    value: float
    per_prompt: np.ndarray


class RewardDifference(NamedTuple):
    """Mean reward of each side, their paired difference and its bootstrap interval (reward units)."""

    mean_policy: float
    mean_reference: float
    delta: float
    ci_low: float
    ci_high: float
    per_prompt: np.ndarray


# ----------------------------------------------------------------------------- win rate


def _pair_preferences(policy: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``(P, k, k)`` array: 1 where policy answer a beats reference answer b, 1/2 on ties, else 0."""
    diff = policy[:, :, None] - reference[:, None, :]
    return (diff > 0) + 0.5 * (diff == 0)


def win_rate(policy_scores, reference_scores) -> WinRate:
    """Win rate of the policy over the reference, ties counting one half.

    For prompt ``i`` with policy scores ``p_i1..p_ik`` and reference scores
    ``r_i1..r_ik`` the per-prompt win value compares *all* ``k x k`` cross pairs::

        w_i = (1 / k^2) * sum_a sum_b [ 1(p_ia > r_ib) + 0.5 * 1(p_ia == r_ib) ]

    and the win rate is ``W = (1 / P) * sum_i w_i``.

    Why all cross pairs rather than ``k`` matched pairs (``p_ia`` vs ``r_ia``): the
    samples of one side are exchangeable (drawn independently, the index ``a`` means
    nothing), so both estimate the same quantity ``Pr(p > r) + 0.5 Pr(p = r)`` per
    prompt, but the cross-pair average is a two-sample U-statistic (Mann-Whitney),
    which has the lowest variance among unbiased estimators using these samples;
    matched pairs throw away ``k^2 - k`` comparisons. For ``k = 1`` both coincide.

    Args:
        policy_scores: ``(P, k)`` or ``(P,)`` (``k = 1``) judge scores of the policy answers.
        reference_scores: same shape, judge scores of the reference answers.

    Returns:
        ``WinRate(value, per_prompt)``: ``value`` in [0, 1] and ``per_prompt`` of shape ``(P,)``.

    Raises:
        ValueError: empty input, NaN/inf scores, shapes other than ``(P,)``/``(P, k)``,
            different numbers of prompts, or different ``k`` for the two sides.

    Source: Mann & Whitney (1947) U statistic / the AUC ``Pr(X > Y) + 0.5 Pr(X = Y)``;
    ties-as-half follows AlpacaEval's win rate (Dubois et al. 2024).
    """
    p, r = _check_pair(policy_scores, reference_scores, "policy_scores", "reference_scores")
    per_prompt = _pair_preferences(p, r).mean(axis=(1, 2))
    return WinRate(float(per_prompt.mean()), per_prompt)


# ----------------------------------------------------------------------------- intervals


def bootstrap_mean_ci(
    values, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0, method: str = "BCa"
) -> tuple[float, float]:
    """Bootstrap confidence interval of the mean of per-prompt values.

    Resamples the ``P`` prompts with replacement ``n_resamples`` times, recomputes
    ``mean(values[resample])`` each time, and turns that distribution into an
    interval with :func:`scipy.stats.bootstrap`. Default ``method="BCa"``
    (bias-corrected and accelerated): it is second-order accurate and adapts to the
    skew a bounded statistic (a win rate near 0 or 1) has, where the plain
    percentile interval is only first-order accurate; ``"percentile"`` and
    ``"basic"`` are accepted too. The seed makes the interval reproducible.
    Degenerate inputs (one prompt, or all values equal) have a bootstrap
    distribution that is a single point, so ``(mean, mean)`` is returned.

    Args:
        values: ``(P,)`` per-prompt values (win values in [0, 1], reward differences, ...).
        confidence: two-sided confidence level in (0, 1).
        n_resamples: bootstrap resamples (>= 1); 4000 by default.
        seed: seed of the ``numpy.random.default_rng`` that draws the resamples.
        method: ``"BCa"``, ``"percentile"`` or ``"basic"``.

    Returns:
        ``(low, high)`` in the units of ``values``.

    Raises:
        ValueError: empty ``values``, not 1-D, NaN/inf, bad confidence or ``n_resamples``.

    Source: Efron (1979) "Bootstrap methods: another look at the jackknife"; BCa:
    Efron (1987) JASA 82:171; Efron & Tibshirani (1993) ch. 14.
    """
    v = np.asarray(values, dtype=float)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D array, got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("values contain NaN or infinite values")
    _check_confidence(confidence)
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    if v.size < 2 or np.ptp(v) == 0.0:
        m = float(v.mean())
        return m, m
    res = stats.bootstrap(
        (v,), np.mean, n_resamples=n_resamples, confidence_level=confidence, method=method,
        vectorized=True, batch=max(1, min(n_resamples, _MAX_CELLS // v.size)), rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def wilson_interval(wins: float, n: float, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion, accepting fractional wins.

    With ``p = wins / n`` and ``z = Phi^-1(1 - (1 - confidence) / 2)``::

        centre = (p + z^2 / (2n)) / (1 + z^2 / n)
        half   = z / (1 + z^2 / n) * sqrt(p (1 - p) / n + z^2 / (4 n^2))
        interval = [centre - half, centre + half]   (clipped to [0, 1])

    The formula is implemented directly (``scipy.stats.binomtest`` wants integer
    counts). Applied to win rates, each prompt is treated as one Bernoulli trial
    with ``wins = sum_i w_i``; this is only approximate when ties or ``k > 1`` make
    the per-prompt values fractional (their variance is then below ``p(1 - p)``, so
    the interval is conservative); the bootstrap interval has no such assumption.

    Args:
        wins: number of successes, ``0 <= wins <= n`` (fractional allowed; ties count 1/2).
        n: number of trials (prompts), ``> 0``.
        confidence: two-sided confidence level in (0, 1).

    Returns:
        ``(low, high)`` proportions in [0, 1].

    Raises:
        ValueError: ``n <= 0``, ``wins`` outside ``[0, n]``, NaN, or bad confidence.

    Source: Wilson (1927) "Probable inference, the law of succession, and
    statistical inference", JASA 22:209; Agresti & Coull (1998).
    """
    _check_confidence(confidence)
    if not (math.isfinite(n) and n > 0):
        raise ValueError(f"n must be a positive number of trials, got {n}")
    if not (math.isfinite(wins) and 0.0 <= wins <= n):
        raise ValueError(f"wins must be in [0, n={n}], got {wins}")
    p = wins / n
    z = float(stats.norm.ppf(1.0 - (1.0 - confidence) / 2.0))
    z2n = z * z / n
    centre = (p + z2n / 2.0) / (1.0 + z2n)
    half = z / (1.0 + z2n) * math.sqrt(p * (1.0 - p) / n + z2n / (4.0 * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def reward_difference(
    policy_scores, reference_scores, confidence: float = 0.95, n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0, method: str = "BCa",
) -> RewardDifference:
    """Paired mean reward difference (policy minus reference) with a bootstrap interval.

    Per prompt ``d_i = mean_a p_ia - mean_b r_ib`` (each side averaged over its
    ``k`` samples; the pairing is by prompt), and ``delta = (1 / P) sum_i d_i``,
    which equals ``mean(policy) - mean(reference)`` because ``k`` is the same for
    every prompt. The interval is :func:`bootstrap_mean_ci` of the ``d_i``, i.e. a
    bootstrap over prompts that keeps each prompt's pair together.

    Args:
        policy_scores, reference_scores: ``(P, k)`` or ``(P,)`` judge scores (reward units).
        confidence, n_resamples, seed, method: as in :func:`bootstrap_mean_ci`.

    Returns:
        ``RewardDifference(mean_policy, mean_reference, delta, ci_low, ci_high, per_prompt)``
        in reward units; ``per_prompt`` is ``(P,)``.

    Raises:
        ValueError: as :func:`win_rate` (shapes, empty input, ``k`` mismatch) and
            :func:`bootstrap_mean_ci` (confidence, resamples).

    Source: paired-sample mean difference; bootstrap per Efron (1979).
    """
    p, r = _check_pair(policy_scores, reference_scores, "policy_scores", "reference_scores")
    d = p.mean(axis=1) - r.mean(axis=1)
    lo, hi = bootstrap_mean_ci(d, confidence, n_resamples, seed, method)
    return RewardDifference(float(p.mean()), float(r.mean()), float(d.mean()), lo, hi, d)


# ----------------------------------------------------------------------------- all together


def compare(
    policy_scores, reference_scores, policy_lengths, reference_lengths, confidence: float = 0.95, seed: int = 0,
    n_resamples: int = DEFAULT_RESAMPLES, lc_ci: bool = True, lc_resamples: int = LC_RESAMPLES,
) -> dict:
    """All comparison statistics for one judge, as a JSON-able dict of Python floats/ints.

    Keys: ``win_rate`` (:func:`win_rate`, all ``k x k`` pairs, ties 1/2) with
    ``win_rate_ci_low/high`` (BCa bootstrap over prompts, :func:`bootstrap_mean_ci`) and
    ``win_rate_wilson_low/high`` (:func:`wilson_interval` with ``wins = sum_i w_i``,
    ``n = P``); ``reward_mean_policy``, ``reward_mean_reference`` with ``*_ci_low/high`` (BCa
    bootstrap of the per-prompt means over prompts), ``reward_delta``,
    ``reward_delta_ci_low/high`` (:func:`reward_difference`); ``lc_win_rate``,
    ``lc_intercept``, ``lc_length_coef``, ``lc_win_rate_ci_low/high`` (
    :func:`length_controlled_win_rate` fitted on all ``P k^2`` answer pairs, each with
    its own length difference, bootstrapped over prompts; ``None`` when ``lc_ci`` is
    false); ``prompts`` (P), ``samples_per_prompt`` (k), ``length_mean_policy``,
    ``length_mean_reference`` (tokens), ``confidence``.

    Args:
        policy_scores, reference_scores: ``(P, k)`` or ``(P,)`` scores from one judge.
        policy_lengths, reference_lengths: same shape, answer lengths in tokens.
        confidence: two-sided level of every interval; seed: bootstrap seed.
        n_resamples: resamples of the mean intervals; lc_ci / lc_resamples: LC interval.

    Raises:
        ValueError: mismatched shapes, empty input, ``k`` mismatch, NaN/inf, negative lengths.

    Sources: see the functions above (Efron 1979/1987, Wilson 1927, Dubois et al. 2024).
    """
    p, r = _check_pair(policy_scores, reference_scores, "policy_scores", "reference_scores")
    lp, lr = _check_pair(policy_lengths, reference_lengths, "policy_lengths", "reference_lengths")
    if lp.shape != p.shape:
        raise ValueError(f"lengths have shape {lp.shape} but scores have shape {p.shape}")
    P, k = p.shape
    wr = win_rate(p, r)
    lo, hi = bootstrap_mean_ci(wr.per_prompt, confidence, n_resamples, seed)
    wlo, whi = wilson_interval(float(wr.per_prompt.sum()), P, confidence)
    rd = reward_difference(p, r, confidence, n_resamples, seed)
    mp_lo, mp_hi = bootstrap_mean_ci(p.mean(axis=1), confidence, n_resamples, seed)
    mr_lo, mr_hi = bootstrap_mean_ci(r.mean(axis=1), confidence, n_resamples, seed)
    prefs = _pair_preferences(p, r).reshape(P, k * k)
    pair_lp = np.broadcast_to(lp[:, :, None], (P, k, k)).reshape(P, k * k)
    pair_lr = np.broadcast_to(lr[:, None, :], (P, k, k)).reshape(P, k * k)
    lc = length_controlled_win_rate(prefs, pair_lp, pair_lr, lc_ci, confidence, lc_resamples, seed)
    return {
        "win_rate": wr.value, "win_rate_ci_low": lo, "win_rate_ci_high": hi,
        "win_rate_wilson_low": wlo, "win_rate_wilson_high": whi,
        "reward_mean_policy": rd.mean_policy, "reward_mean_reference": rd.mean_reference,
        "reward_mean_policy_ci_low": mp_lo, "reward_mean_policy_ci_high": mp_hi,
        "reward_mean_reference_ci_low": mr_lo, "reward_mean_reference_ci_high": mr_hi,
        "reward_delta": rd.delta, "reward_delta_ci_low": rd.ci_low, "reward_delta_ci_high": rd.ci_high,
        "lc_win_rate": lc.win_rate, "lc_intercept": lc.intercept, "lc_length_coef": lc.length_coef,
        "lc_win_rate_ci_low": lc.ci_low, "lc_win_rate_ci_high": lc.ci_high,
        "prompts": int(P), "samples_per_prompt": int(k),
        "length_mean_policy": float(lp.mean()), "length_mean_reference": float(lr.mean()),
        "confidence": float(confidence),
    }


def compare_preferences(preferences, policy_lengths, reference_lengths, confidence: float = 0.95, seed: int = 0,
                        n_resamples: int = DEFAULT_RESAMPLES, lc_resamples: int = LC_RESAMPLES) -> dict:
    """The statistics of :func:`compare` for a pairwise judge, which gives P(policy answer preferred)
    for matched pairs (policy answer j against reference answer j of a prompt) instead of scores.

    The win rate is the mean over prompts of each prompt's mean preference (a probability counts as
    a fractional win); its intervals and the length-controlled win rate are computed as in
    :func:`compare`. There are no reward means (``None``).

    Args:
        preferences: ``(P, k)`` probabilities in [0, 1].
        policy_lengths, reference_lengths: ``(P, k)`` answer lengths in tokens.

    Raises:
        ValueError: mismatched shapes, empty input, values outside [0, 1], NaN/inf.
    """
    y = _as_2d(preferences, "preferences")
    lp, lr = _check_pair(policy_lengths, reference_lengths, "policy_lengths", "reference_lengths")
    if lp.shape != y.shape:
        raise ValueError(f"lengths have shape {lp.shape} but preferences have shape {y.shape}")
    if ((y < 0) | (y > 1)).any():
        raise ValueError("preferences must be probabilities in [0, 1]")
    P, k = y.shape
    per_prompt = y.mean(axis=1)
    lo, hi = bootstrap_mean_ci(per_prompt, confidence, n_resamples, seed)
    wlo, whi = wilson_interval(float(per_prompt.sum()), P, confidence)
    lc = length_controlled_win_rate(y, lp, lr, True, confidence, lc_resamples, seed)
    return {
        "win_rate": float(per_prompt.mean()), "win_rate_ci_low": lo, "win_rate_ci_high": hi,
        "win_rate_wilson_low": wlo, "win_rate_wilson_high": whi,
        "reward_mean_policy": None, "reward_mean_reference": None, "reward_mean_policy_ci_low": None,
        "reward_mean_policy_ci_high": None, "reward_mean_reference_ci_low": None, "reward_mean_reference_ci_high": None,
        "reward_delta": None,
        "reward_delta_ci_low": None, "reward_delta_ci_high": None,
        "lc_win_rate": lc.win_rate, "lc_intercept": lc.intercept, "lc_length_coef": lc.length_coef,
        "lc_win_rate_ci_low": lc.ci_low, "lc_win_rate_ci_high": lc.ci_high,
        "prompts": int(P), "samples_per_prompt": int(k),
        "length_mean_policy": float(lp.mean()), "length_mean_reference": float(lr.mean()),
        "confidence": float(confidence),
    }
