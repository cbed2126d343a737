"""The length-controlled win rate of a policy against a reference policy (AlpacaEval 2's GLM without
its instruction-difficulty term; Dubois et al. 2024, arXiv:2404.04475), and the array checks it shares
with :mod:`rlhf_spec.stats`, which reports it in :func:`rlhf_spec.stats.compare`.

Everything here is a pure function of plain lists / numpy arrays (no torch). Shapes: ``(P,)`` or
``(P, m)`` (``P`` prompts, ``m`` observations per prompt); lengths in tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import optimize, special, stats

LC_RESAMPLES = 1000  # every LC resample refits a logistic regression, so fewer
LC_PENALTY = 1e-6  # L2 penalty (mean log-loss scale), used only when the unpenalised MLE does not exist
_MAX_COEF = 15.0  # |coefficient| beyond this means the unpenalised fit ran off to infinity (separation)
_MAX_LOGIT = 30.0  # intercept clip for constant preferences: sigmoid(30) = 1 - 9e-14


class LengthControlledWinRate(NamedTuple):
    """Result of :func:`length_controlled_win_rate` (see there for the meaning of each field)."""

    win_rate: float
    intercept: float
    length_coef: float
    length_scale: float
    penalty: float
    ci_low: float | None = None
    ci_high: float | None = None


# ------------------------------------------------------------------ input checks (shared with rlhf_spec.stats)


def _as_2d(x, name: str) -> np.ndarray:
    """``x`` as a finite float array of shape ``(P, k)``; a 1-D ``(P,)`` input means ``k = 1``."""
    a = np.asarray(x, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape (P,) or (P, k), got shape {a.shape}")
    if a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {a.shape}); need at least one prompt and one sample")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def _check_pair(a, b, name_a: str, name_b: str) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays as ``(P, k)``; ValueError when the prompt counts or the ``k`` differ."""
    a, b = _as_2d(a, name_a), _as_2d(b, name_b)
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} has {a.shape[0]} prompts but {name_b} has {b.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} has k={a.shape[1]} samples per prompt but {name_b} has k={b.shape[1]}")
    return a, b


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


# ----------------------------------------------------------------------------- length control


def _fit_logistic(t: np.ndarray, y: np.ndarray, penalty: float, x0=None) -> tuple[np.ndarray, bool]:
    """Minimise mean Bernoulli log-loss with fractional targets ``y`` on ``[1, t]`` (+ L2 penalty)."""
    n, tt = len(y), t * t
    cache: dict = {}

    def probs(b):  # sigmoid(eta) and the loss terms, reused by the Hessian at the same point
        if cache.get("b") is None or not np.array_equal(cache["b"], b):
            eta = b[0] + b[1] * t
            soft = np.logaddexp(0.0, eta)
            cache.update(b=b.copy(), q=np.exp(eta - soft), loss=float(np.mean(soft - y * eta)))
        return cache["q"], cache["loss"]

    def fun(b):
        q, loss = probs(b)
        g = q - y
        return loss + 0.5 * penalty * (b @ b), np.array([g.sum(), g @ t]) / n + penalty * b

    def hess(b):
        w = probs(b)[0]
        w = w * (1.0 - w)
        h01 = w @ t
        return np.array([[w.sum(), h01], [h01, w @ tt]]) / n + penalty * np.eye(2)

    if x0 is None:
        x0 = np.array([special.logit(float(np.clip(y.mean(), 1e-6, 1 - 1e-6))), 0.0])
    res = optimize.minimize(fun, x0, jac=True, hess=hess, method="trust-exact", options={"gtol": 1e-9})
    ok = bool(res.success) and bool(np.all(np.isfinite(res.x))) and float(np.max(np.abs(res.x))) < _MAX_COEF
    return res.x, ok


def _lc_fit(y: np.ndarray, dlen: np.ndarray, x0=None) -> tuple[float, float, float, float]:
    """``(intercept, length_coef, length_scale, penalty)`` of the LC model on flat arrays."""
    scale = float(np.std(dlen, ddof=1)) if dlen.size > 1 else 0.0
    if not scale > 0.0 or np.ptp(y) == 0.0:
        # length term identically 0, or constant preference: the intercept-only MLE is
        # logit(mean y) in closed form (clipped so that constant 0/1 stays finite).
        with np.errstate(divide="ignore"):
            b0 = float(np.clip(special.logit(y.mean()), -_MAX_LOGIT, _MAX_LOGIT))
        return b0, 0.0, scale, 0.0
    t = np.tanh(dlen / scale)
    coef, ok = _fit_logistic(t, y, 0.0, x0)
    penalty = 0.0
    if not ok:  # separable data: the MLE is at infinity; a tiny ridge makes it finite
        penalty = LC_PENALTY
        coef, _ = _fit_logistic(t, y, penalty)
    return float(coef[0]), float(coef[1]), scale, penalty


def length_controlled_win_rate(
    preferences, policy_lengths, reference_lengths, ci: bool = False, confidence: float = 0.95,
    n_resamples: int = LC_RESAMPLES, seed: int = 0,
) -> LengthControlledWinRate:
    """Length-controlled win rate: the predicted preference at zero length difference.

    Fits a logistic regression of the preference ``y`` (1 policy better, 0 reference
    better, 0.5 tie; any value in [0, 1]) on an intercept and a squashed length
    difference, maximising the Bernoulli log-likelihood with fractional targets::

        Pr(policy preferred) = sigmoid(theta_0 + theta_1 * tanh(dlen / s)),
        dlen = len_policy - len_reference,   s = std(dlen)  (sample std, ddof=1)
        LC = sigmoid(theta_0)

    This is AlpacaEval 2's length-controlled GLM (Dubois et al. 2024, section on the GLM) with its
    instruction-difficulty term dropped: that term needs several models rated on
    the same instructions, and here there is one model pair. The fit uses
    ``scipy.optimize.minimize`` (trust-exact, exact Hessian), unpenalised. Only if
    the unpenalised MLE does not exist (the data are separable, detected by a failed
    fit or ``|theta| >= 15``) it is refitted with an L2 penalty ``(LC_PENALTY / 2) |theta|^2``
    on the mean log-loss (``penalty`` reports which). Degenerate inputs: if all length
    differences are equal (``s = 0``), or all preferences are equal, the slope is 0 and
    ``theta_0 = logit(mean y)``, so LC equals the plain mean preference (the intercept is
    clipped to +-30 so that a constant 0 or 1 stays finite).

    Inputs are ``(N,)`` (one observation per prompt, as in AlpacaEval) or ``(P, m)``:
    ``m`` observations per prompt, e.g. the ``k x k`` answer pairs of :func:`compare`.
    With ``ci=True`` a percentile bootstrap over rows (prompts), each resample refitting
    the model (BCa would need ``P`` extra jackknife refits), gives ``(ci_low, ci_high)``.

    Args:
        preferences: ``(P,)`` or ``(P, m)`` preferences in [0, 1].
        policy_lengths, reference_lengths: same shape, answer lengths in tokens (>= 0).
        ci, confidence, n_resamples, seed: bootstrap switch and settings.

    Returns:
        ``LengthControlledWinRate(win_rate, intercept, length_coef, length_scale, penalty,
        ci_low, ci_high)``; ``length_scale`` is ``s`` in tokens; the CI fields are ``None``
        unless ``ci``.

    Raises:
        ValueError: empty input, mismatched shapes, NaN/inf, preferences outside [0, 1],
            negative lengths, bad confidence.

    Source: Dubois, Galambosi, Liang, Hashimoto (2024), "Length-Controlled AlpacaEval",
    arXiv:2404.04475; bootstrap per Efron (1979).
    """
    y, d = _check_lc_inputs(preferences, policy_lengths, reference_lengths)
    _check_confidence(confidence)
    b0, b1, scale, penalty = _lc_fit(y.ravel(), d.ravel())
    lc = float(special.expit(b0))
    if not ci:
        return LengthControlledWinRate(lc, b0, b1, scale, penalty)
    start = np.array([b0, b1]) if penalty == 0.0 and b1 != 0.0 else None  # warm start: fewer Newton steps
    lo, hi = _lc_bootstrap(y, d, start, lc, confidence, n_resamples, seed)
    return LengthControlledWinRate(lc, b0, b1, scale, penalty, lo, hi)


def _check_lc_inputs(preferences, policy_lengths, reference_lengths) -> tuple[np.ndarray, np.ndarray]:
    """Preferences ``(P, m)`` in [0, 1] and length differences ``(P, m)``; ValueError otherwise."""
    y = _as_2d(preferences, "preferences")
    lp, lr = _check_pair(policy_lengths, reference_lengths, "policy_lengths", "reference_lengths")
    if lp.shape != y.shape:
        raise ValueError(f"lengths have shape {lp.shape} but preferences have shape {y.shape}")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("preferences must lie in [0, 1]")
    if np.any(lp < 0) or np.any(lr < 0):
        raise ValueError("lengths must be >= 0")
    return y, lp - lr


def _lc_bootstrap(y, d, start, lc, confidence, n_resamples, seed) -> tuple[float, float]:
    """Percentile bootstrap of the LC win rate over rows (prompts) of ``y`` and ``d``."""
    if y.shape[0] < 2:
        return lc, lc

    def stat(idx):
        idx = np.asarray(idx, dtype=int)
        return special.expit(_lc_fit(y[idx].ravel(), d[idx].ravel(), start)[0])

    res = stats.bootstrap(
        (np.arange(y.shape[0]),), stat, n_resamples=n_resamples, confidence_level=confidence,
        method="percentile", vectorized=False, rng=np.random.default_rng(seed),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
