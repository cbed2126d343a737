"""Tests of rlhf_spec.stats against hand-computed values and reference libraries (statsmodels)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import statsmodels.api as sm
from scipy.special import expit
from statsmodels.stats.proportion import proportion_confint

from rlhf_spec import stats as S

# ----------------------------------------------------------------------------- win rate


def test_win_rate_ties_and_k2_by_hand():
    # prompt 0: policy (3, 1) vs reference (1, 2); the 4 cross pairs:
    #   3>1 win 1, 3>2 win 1, 1=1 tie 0.5, 1<2 loss 0           -> 2.5 / 4 = 0.625
    # prompt 1: policy (0, 0) vs reference (0, 5):
    #   0=0 tie 0.5, 0<5 loss 0, 0=0 tie 0.5, 0<5 loss 0         -> 1.0 / 4 = 0.25
    # overall: (0.625 + 0.25) / 2 = 0.4375
    # (matched pairs would give prompt 0: 3>1, 1<2 -> 0.5, so this also pins the cross-pair choice)
    res = S.win_rate([[3, 1], [0, 0]], [[1, 2], [0, 5]])
    assert res.value == pytest.approx(0.4375, abs=1e-15)
    np.testing.assert_allclose(res.per_prompt, [0.625, 0.25], atol=1e-15)
    assert res.per_prompt.shape == (2,)


def test_win_rate_k1_accepts_1d_lists():
    # 1=1 tie, 2>1 win, 3<4 loss -> (0.5 + 1 + 0) / 3
    res = S.win_rate([1.0, 2.0, 3.0], [1.0, 1.0, 4.0])
    assert res.value == pytest.approx(0.5)
    np.testing.assert_allclose(res.per_prompt, [0.5, 1.0, 0.0])
    # swapping sides gives 1 - win rate
    assert S.win_rate([1.0, 1.0, 4.0], [1.0, 2.0, 3.0]).value == pytest.approx(0.5)
    assert S.win_rate([[5, 6]], [[1, 2]]).value == 1.0


@pytest.mark.parametrize(
    "pol, ref, match",
    [
        (np.zeros((3, 2)), np.zeros((3, 3)), "k=2"),  # k mismatch
        (np.zeros((3, 2)), np.zeros((4, 2)), "prompts"),  # P mismatch
        (np.zeros((0, 2)), np.zeros((0, 2)), "empty"),
        ([], [], "empty"),
        (np.zeros((2, 2, 2)), np.zeros((2, 2, 2)), "shape"),
        ([1.0, float("nan")], [1.0, 2.0], "NaN"),
    ],
)
def test_win_rate_rejects_bad_shapes(pol, ref, match):
    with pytest.raises(ValueError, match=match):
        S.win_rate(pol, ref)


# ----------------------------------------------------------------------------- Wilson


@pytest.mark.parametrize("wins, n", [(0, 10), (7, 10), (10, 10), (1, 3), (45, 100), (333, 1000)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_statsmodels(wins, n, confidence):
    lo, hi = S.wilson_interval(wins, n, confidence)
    ref_lo, ref_hi = proportion_confint(wins, n, alpha=1 - confidence, method="wilson")
    assert lo == pytest.approx(ref_lo, abs=1e-12)
    assert hi == pytest.approx(ref_hi, abs=1e-12)


def test_wilson_by_hand():
    # 7 wins of 10 at 95%: z = 1.959964, z^2 = 3.841459, p = 0.7
    # centre = (0.7 + 3.841459/20) / (1 + 0.3841459) = 0.892073 / 1.384146 = 0.644493
    # half   = 1.959964 / 1.384146 * sqrt(0.21/10 + 3.841459/400) = 1.416005 * 0.174939 = 0.247714
    lo, hi = S.wilson_interval(7, 10)
    assert lo == pytest.approx(0.644493 - 0.247714, abs=2e-6)
    assert hi == pytest.approx(0.644493 + 0.247714, abs=2e-6)


def test_wilson_fractional_wins():
    lo, hi = S.wilson_interval(2.5, 5)  # p = 0.5 exactly: symmetric around 0.5
    assert lo + hi == pytest.approx(1.0)
    lo2, hi2 = S.wilson_interval(2, 5)
    lo3, hi3 = S.wilson_interval(3, 5)
    assert lo2 < lo < lo3 and hi2 < hi < hi3
    with pytest.raises(ValueError):
        S.wilson_interval(6, 5)
    with pytest.raises(ValueError):
        S.wilson_interval(0, 0)
    with pytest.raises(ValueError):
        S.wilson_interval(1, 5, confidence=1.0)


# ----------------------------------------------------------------------------- bootstrap


def _half_width(ci):
    return (ci[1] - ci[0]) / 2


def test_bootstrap_contains_estimate_and_is_reproducible():
    rng = np.random.default_rng(1)
    v = rng.uniform(0, 1, 120)
    ci = S.bootstrap_mean_ci(v, seed=3)
    assert ci[0] < v.mean() < ci[1]
    assert S.bootstrap_mean_ci(v, seed=3) == ci
    assert S.bootstrap_mean_ci(v, seed=4) != ci
    pci = S.bootstrap_mean_ci(v, seed=3, method="percentile")
    assert pci[0] < v.mean() < pci[1]


def test_bootstrap_shrinks_like_inverse_sqrt_n():
    rng = np.random.default_rng(2)
    small = S.bootstrap_mean_ci(rng.uniform(0, 1, 50), n_resamples=3000)
    large = S.bootstrap_mean_ci(rng.uniform(0, 1, 800), n_resamples=3000)
    ratio = _half_width(small) / _half_width(large)
    assert 2.8 < ratio < 5.7, ratio  # sqrt(800 / 50) = 4


def test_bootstrap_agrees_with_normal_approximation_for_large_p():
    rng = np.random.default_rng(3)
    v = rng.beta(2, 3, 3000)
    lo, hi = S.bootstrap_mean_ci(v)
    half = 1.959964 * v.std(ddof=1) / math.sqrt(v.size)
    assert lo == pytest.approx(v.mean() - half, abs=0.1 * half)
    assert hi == pytest.approx(v.mean() + half, abs=0.1 * half)


def test_bootstrap_degenerate_and_errors():
    assert S.bootstrap_mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    assert S.bootstrap_mean_ci([0.25]) == (0.25, 0.25)
    with pytest.raises(ValueError):
        S.bootstrap_mean_ci([])
    with pytest.raises(ValueError):
        S.bootstrap_mean_ci([[1.0, 2.0]])


# ----------------------------------------------------------------------------- reward difference


def test_reward_difference_by_hand():
    pol = [[1.0, 3.0], [0.0, 0.0], [2.0, 2.0]]  # per-prompt means 2, 0, 2 -> mean 4/3
    ref = [[0.0, 1.0], [1.0, 1.0], [2.0, 4.0]]  # per-prompt means 0.5, 1, 3 -> mean 1.5
    rd = S.reward_difference(pol, ref)
    assert rd.mean_policy == pytest.approx(4 / 3)
    assert rd.mean_reference == pytest.approx(1.5)
    np.testing.assert_allclose(rd.per_prompt, [1.5, -1.0, -1.0])
    assert rd.delta == pytest.approx(-1 / 6)
    assert rd.ci_low <= rd.delta <= rd.ci_high
    with pytest.raises(ValueError, match="k="):
        S.reward_difference(pol, [[0.0], [1.0], [2.0]])


# ----------------------------------------------------------------------------- length control


def _synthetic_lc(rng, n, slope, intercept, mean_dlen=100.0):
    d = rng.normal(mean_dlen, 200.0, n)
    t = np.tanh(d / d.std(ddof=1))
    p = expit(intercept + slope * t)
    # fractional labels: a tie (0.5) one time in five, else Bernoulli(p)
    y = np.where(rng.uniform(size=n) < 0.2, 0.5, (rng.uniform(size=n) < p).astype(float))
    ref_len = rng.integers(1000, 1400, n).astype(float)  # tokens; large enough that ref_len + d >= 0
    return y, ref_len + d, ref_len, t


def test_lc_coefficients_match_statsmodels_glm():
    rng = np.random.default_rng(4)
    y, lp, lr, t = _synthetic_lc(rng, 600, slope=1.5, intercept=0.3)
    lc = S.length_controlled_win_rate(y, lp, lr)
    glm = sm.GLM(y, sm.add_constant(t), family=sm.families.Binomial()).fit(tol=1e-12)
    assert lc.penalty == 0.0
    assert lc.intercept == pytest.approx(glm.params[0], abs=1e-5)
    assert lc.length_coef == pytest.approx(glm.params[1], abs=1e-5)
    assert lc.win_rate == pytest.approx(expit(glm.params[0]), abs=1e-6)
    assert lc.length_scale == pytest.approx(np.std(lp - lr, ddof=1))


def test_lc_removes_a_pure_length_effect():
    # the policy wins (noisily) exactly when it is longer, and it is usually longer:
    # the raw win rate is high, but at equal length it is a coin flip
    rng = np.random.default_rng(5)
    y, lp, lr, _ = _synthetic_lc(rng, 3000, slope=4.0, intercept=0.0, mean_dlen=250.0)
    raw = y.mean()
    lc = S.length_controlled_win_rate(y, lp, lr)
    assert raw > 0.7
    assert abs(lc.win_rate - 0.5) < 0.05
    assert lc.length_coef > 1.5  # below 4: the length-independent ties attenuate the slope


def test_lc_equals_raw_when_length_is_irrelevant():
    rng = np.random.default_rng(6)
    y, lp, lr, _ = _synthetic_lc(rng, 3000, slope=0.0, intercept=0.8, mean_dlen=150.0)
    lc = S.length_controlled_win_rate(y, lp, lr)
    assert abs(lc.win_rate - y.mean()) < 0.03
    assert abs(lc.length_coef) < 0.4


def test_lc_symmetry_swapping_sides():
    rng = np.random.default_rng(7)
    y, lp, lr, _ = _synthetic_lc(rng, 400, slope=1.0, intercept=0.5)
    a = S.length_controlled_win_rate(y, lp, lr)
    b = S.length_controlled_win_rate(1 - y, lr, lp)
    assert a.win_rate + b.win_rate == pytest.approx(1.0, abs=1e-7)
    # 1 - sigmoid(b0 + b1 t) = sigmoid(-b0 + b1 (-t)): the intercept flips sign, the slope does not
    assert a.intercept == pytest.approx(-b.intercept, abs=1e-5)
    assert a.length_coef == pytest.approx(b.length_coef, abs=1e-5)


def test_lc_degenerate_inputs():
    # all lengths equal: no length term, LC is the plain mean preference
    y = np.array([1.0, 0.0, 0.5, 1.0, 1.0])
    lc = S.length_controlled_win_rate(y, [7] * 5, [7] * 5)
    assert lc.win_rate == pytest.approx(y.mean(), abs=1e-12)
    assert lc.length_coef == 0.0 and lc.length_scale == 0.0
    # equal length differences (std 0) but unequal lengths: same
    assert S.length_controlled_win_rate(y, [9, 8, 7, 6, 5], [4, 3, 2, 1, 0]).win_rate == pytest.approx(0.7)
    # identical preferences: finite, equal to that preference
    lens = [10, 50, 30, 80, 20]
    for c in (0.0, 0.5, 1.0):
        r = S.length_controlled_win_rate([c] * 5, lens, [40] * 5)
        assert math.isfinite(r.intercept) and math.isfinite(r.length_coef)
        assert r.win_rate == pytest.approx(c, abs=1e-9)
    # separable data (the policy wins exactly when longer): finite thanks to the penalty
    d = np.array([-30.0, -10.0, 5.0, 20.0, 40.0, -5.0])
    r = S.length_controlled_win_rate((d > 0).astype(float), 100 + d, [100] * 6)
    assert r.penalty > 0 and math.isfinite(r.length_coef) and 0.0 < r.win_rate < 1.0


def test_lc_input_errors():
    with pytest.raises(ValueError, match="\\[0, 1\\]"):
        S.length_controlled_win_rate([1.5, 0], [1, 2], [1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        S.length_controlled_win_rate([1, 0], [-1, 2], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        S.length_controlled_win_rate([1, 0, 1], [1, 2], [1, 1])


def test_lc_bootstrap_interval():
    rng = np.random.default_rng(8)
    y, lp, lr, _ = _synthetic_lc(rng, 150, slope=1.0, intercept=0.4)
    a = S.length_controlled_win_rate(y, lp, lr, ci=True, n_resamples=300, seed=1)
    assert a.ci_low < a.win_rate < a.ci_high
    assert 0.03 < a.ci_high - a.ci_low < 0.4
    b = S.length_controlled_win_rate(y, lp, lr, ci=True, n_resamples=300, seed=1)
    assert (a.ci_low, a.ci_high) == (b.ci_low, b.ci_high)
    assert S.length_controlled_win_rate(y, lp, lr).ci_low is None


# ----------------------------------------------------------------------------- compare

KEYS = {
    "win_rate", "win_rate_ci_low", "win_rate_ci_high", "win_rate_wilson_low", "win_rate_wilson_high",
    "reward_mean_policy", "reward_mean_reference", "reward_delta", "reward_delta_ci_low", "reward_delta_ci_high",
    "reward_mean_policy_ci_low", "reward_mean_policy_ci_high", "reward_mean_reference_ci_low", "reward_mean_reference_ci_high",
    "lc_win_rate", "lc_intercept", "lc_length_coef", "lc_win_rate_ci_low", "lc_win_rate_ci_high",
    "prompts", "samples_per_prompt", "length_mean_policy", "length_mean_reference", "confidence",
}


def test_compare_k3():
    rng = np.random.default_rng(9)
    P, k = 60, 3
    pol, ref = rng.normal(0.4, 1, (P, k)), rng.normal(0, 1, (P, k))
    lp, lr = rng.integers(20, 300, (P, k)), rng.integers(20, 300, (P, k))
    out = S.compare(pol, ref, lp, lr, seed=0, lc_resamples=200)
    assert set(out) == KEYS
    json.dumps(out, allow_nan=False)
    assert all(type(v) in (float, int) for v in out.values())
    wr = S.win_rate(pol, ref)
    assert out["win_rate"] == wr.value
    assert (out["win_rate_ci_low"], out["win_rate_ci_high"]) == S.bootstrap_mean_ci(wr.per_prompt, seed=0)
    assert (out["win_rate_wilson_low"], out["win_rate_wilson_high"]) == S.wilson_interval(wr.per_prompt.sum(), P)
    assert out["win_rate_ci_low"] < out["win_rate"] < out["win_rate_ci_high"]
    assert out["reward_delta"] == pytest.approx(pol.mean() - ref.mean())
    assert out["reward_delta_ci_low"] < out["reward_delta"] < out["reward_delta_ci_high"]
    # each mean's interval is the bootstrap interval of the per-prompt means (scipy's BCa, checked above)
    assert (out["reward_mean_policy_ci_low"], out["reward_mean_policy_ci_high"]) == S.bootstrap_mean_ci(pol.mean(axis=1), seed=0)
    assert (out["reward_mean_reference_ci_low"], out["reward_mean_reference_ci_high"]) == S.bootstrap_mean_ci(ref.mean(axis=1), seed=0)
    assert out["reward_mean_policy_ci_low"] < pol.mean() < out["reward_mean_policy_ci_high"]
    assert out["lc_win_rate_ci_low"] < out["lc_win_rate"] < out["lc_win_rate_ci_high"]
    assert (out["prompts"], out["samples_per_prompt"]) == (P, k)
    assert out["length_mean_policy"] == pytest.approx(lp.mean())
    assert out["length_mean_reference"] == pytest.approx(lr.mean())
    # the LC model is fitted on all k*k answer pairs: same data as the explicit pair expansion
    prefs = (pol[:, :, None] > ref[:, None, :]).astype(float).reshape(P, k * k)
    lc = S.length_controlled_win_rate(prefs, np.repeat(lp, k, axis=1), np.tile(lr, (1, k)))
    assert out["lc_win_rate"] == pytest.approx(lc.win_rate, abs=1e-12)


def test_compare_k1_and_errors():
    pol, ref = [1.0, 2.0, 3.0, 0.5], [1.0, 1.0, 4.0, 0.0]
    out = S.compare(pol, ref, [10, 20, 30, 40], [10, 20, 30, 40], lc_ci=False)
    assert out["win_rate"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    assert out["lc_win_rate"] == pytest.approx(out["win_rate"])  # equal lengths: LC = raw
    assert out["lc_win_rate_ci_low"] is None and out["samples_per_prompt"] == 1
    with pytest.raises(ValueError, match="shape"):
        S.compare(pol, ref, [[1, 2]] * 4, [[1, 2]] * 4)
    with pytest.raises(ValueError, match="prompts"):
        S.compare(pol, ref[:3], [1] * 4, [1] * 4)
