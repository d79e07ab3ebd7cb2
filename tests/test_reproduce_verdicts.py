"""The verdict statistics on synthetic inputs whose answer is known."""

import numpy as np
import pytest

from ranklens.reproduce.verdicts import (
    Verdict,
    bonferroni_any,
    compare_values,
    decide,
    sign_test,
    spearman_negative,
    welch_less,
)


def _normal(mean, std, n, seed):
    return (mean + std * np.random.default_rng(seed).standard_normal(n)).tolist()


def test_decide_rule():
    assert decide(0.01, 0.9) == "holds"
    assert decide(0.5, 0.01) == "does not hold"
    assert decide(0.2, 0.3) == "inconclusive"
    assert decide(float("nan"), 0.0) == "inconclusive"


def test_welch_known_difference_holds_and_matches_scipy_call_of_app_h():
    from scipy import stats

    a, b = _normal(0.30, 0.01, 15, 0), _normal(0.35, 0.01, 15, 1)
    v = welch_less("a is lower", a, b, name_a="ASI", name_b="TopK")
    assert v.verdict == "holds"
    assert v.values["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False, alternative="less").pvalue)
    assert "Welch" in v.statistic and "ASI" in v.statistic and f"{v.values['p']:.1e}" in v.statistic


def test_welch_opposite_difference_does_not_hold():
    v = welch_less("a is lower", _normal(0.40, 0.01, 5, 0), _normal(0.30, 0.01, 5, 1))
    assert v.verdict == "does not hold"


def test_welch_equal_samples_are_never_a_hold():
    same = _normal(1.0, 0.1, 3, 0)
    assert welch_less("lower", same, same).verdict == "inconclusive"  # wide: cannot exclude a 1% gain
    tight_a, tight_b = _normal(1.0, 1e-4, 5, 0), _normal(1.0, 1e-4, 5, 1)
    assert welch_less("lower", tight_a, tight_b).verdict == "does not hold"  # gain < 1% with confidence
    assert welch_less("lower", [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]).verdict == "inconclusive"  # undefined t


def test_welch_constant_samples_with_different_means():
    assert welch_less("fewer dead", [0, 0, 0], [5, 5, 5]).verdict == "holds"
    assert welch_less("fewer dead", [5, 5, 5], [0, 0, 0]).verdict == "does not hold"


def test_welch_needs_two_values_per_side():
    assert welch_less("lower", [0.1], [0.5, 0.6]).verdict == "inconclusive"


def test_bonferroni_any():
    base = _normal(1.0, 0.01, 5, 0)
    groups = {"32": _normal(1.0, 0.01, 5, 1), "64": _normal(0.8, 0.01, 5, 2)}
    v = bonferroni_any("some d_init is lower", groups, base)
    assert v.verdict == "holds" and v.values["best"] == "64"
    assert v.values["adjusted_p"]["64"] == pytest.approx(2 * v.values["tests"]["64"]["p"])
    worse = {"32": _normal(1.2, 0.01, 5, 3), "64": _normal(1.3, 0.01, 5, 4)}
    assert bonferroni_any("some d_init is lower", worse, base).verdict == "does not hold"


def test_spearman_monotone_decreasing_holds_increasing_does_not():
    x = np.arange(15.0)
    assert spearman_negative("falls", x, 100 - x**2).verdict == "holds"
    v = spearman_negative("falls", x, x**3)
    assert v.verdict == "does not hold" and v.values["rho"] == pytest.approx(1.0)


def test_spearman_exact_small_n_and_undefined():
    v = spearman_negative("falls", [1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert v.values["rho"] == pytest.approx(-1.0) and v.values["p"] < 0.01  # exact: 1/120 plus ties tolerance
    assert v.verdict == "holds"
    assert spearman_negative("falls", [1, 2, 3, 4], [1, 1, 1, 1]).verdict == "inconclusive"  # constant y
    noise = np.random.default_rng(0).standard_normal((2, 12))
    assert spearman_negative("falls", noise[0], noise[1]).verdict == "inconclusive"


def test_sign_test():
    assert sign_test("lower", [True] * 30).verdict == "holds"
    assert sign_test("lower", [True] * 4).verdict == "inconclusive"  # p = 1/16 > 0.05
    v = sign_test("lower", [False] * 9 + [True], labels=range(10))
    assert v.verdict == "does not hold" and "not in: 0, 1" in v.statistic


def test_compare_values():
    assert compare_values("a < b", 0.13, 0.40).verdict == "holds"
    assert compare_values("a < b", 0.50, 0.40).verdict == "does not hold"
    assert compare_values("a < b", 0.41, 0.40).verdict == "inconclusive"
    assert compare_values("a < b", None, 0.40).verdict == "inconclusive"


def test_compare_values_states_the_comparison_in_a_sentence():
    threshold = compare_values("cv < 1%", 0.0609, 0.01, name_a="the largest CV", name_b="App. C", rel_tol=0,
                               percent=True)
    assert threshold.verdict == "does not hold"
    assert threshold.statistic == "the largest CV is 6.09%, above the threshold of 1% (App. C; one measurement)"
    banded = compare_values("a < b", 0.13, 0.40, name_a="ours", name_b="the paper's")
    assert banded.statistic.startswith("ours is 0.13, below the paper's at 0.4; a difference within 5% of")


def test_verdict_rejects_unknown_words():
    with pytest.raises(ValueError):
        Verdict("c", "maybe", "s")
