"""Statistics that turn measured numbers into verdicts: "holds", "does not hold" or "inconclusive".

Every function here is pure (numbers in, a ``Verdict`` out) and states the statistic it rests on. One rule decides
every statistical test (``decide``):

- **holds** when the test of the paper's claim rejects its null at level ``alpha`` (p < alpha);
- **does not hold** when the data reject the claim's effect instead: the opposite direction is significant, or, for
  a comparison of means, the improvement is smaller than a practical margin with confidence 1 - alpha (an
  equivalence-style bound, so tight equal samples do not hold rather than stay inconclusive forever);
- **inconclusive** otherwise (too few samples, too much spread, or an undefined statistic such as the correlation
  of a constant).

Tests used:

- ``welch_less``: Welch's unequal-variance t-test, one-sided, exactly as the paper's App. H runs it
  (``scipy.stats.ttest_ind(a, b, equal_var=False, alternative='less')``), for "method a gives lower values of a
  lower-is-better metric than method b" over seeds.
- ``spearman_negative``: Spearman's rank correlation with a one-sided permutation p-value (exact for n <= 7, 9,999
  seeded permutations beyond), for "dead features fall as effective rank rises" (Figure 5, App. F).
- ``sign_test``: the one-sided binomial sign test, for "a holds in most of n paired units" (layers, settings,
  dictionary sizes) when there is one measurement per unit.
- ``bonferroni_any``: several Welch tests against one baseline (a sweep), holding when the smallest
  Bonferroni-adjusted p-value does.
- ``compare_values``: a single number against another or a threshold, where no sampling distribution exists
  (a bisection result, a share of a decomposition); a relative tolerance band is inconclusive.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from scipy import stats

from ranklens.report.html import VERDICTS

ALPHA = 0.05
# Welch comparisons: an improvement smaller than 1% of the baseline's mean, with confidence 1 - alpha, is not the
# claimed effect (the paper's smallest reported gains, e.g. NMSE 0.3337 -> 0.3168 in Table 4, are ~5%).
PRACTICAL_MARGIN = 0.01
_EXACT_PERMUTATIONS_UP_TO = 7  # 7! = 5,040 pairings are enumerated; larger n is sampled
_PERMUTATIONS = 9_999


@dataclass(frozen=True)
class Verdict:
    """A claim, its verdict and the statistic it rests on (``statistic``: one readable line; ``values``: the
    numbers behind it, for results.json; ``id``: a name of the claim that stays the same across presets and models,
    e.g. ``asi.k_main.fvu.TopK``, whatever numbers the claim's text carries, so runs compare verdict by verdict)."""

    claim: str
    verdict: str
    statistic: str
    values: dict[str, Any] = field(default_factory=dict)
    id: str = ""

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r}: expected one of {VERDICTS}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def named(self, claim_id: str) -> Verdict:
        """This verdict with its claim id."""
        return replace(self, id=claim_id)


def decide(p_claim: float, p_against: float, alpha: float = ALPHA) -> str:
    """The rule: holds if p_claim < alpha; does not hold if p_against < alpha; inconclusive otherwise (and when
    p_claim is undefined)."""
    if p_claim is None or math.isnan(p_claim):
        return "inconclusive"
    if p_claim < alpha:
        return "holds"
    if p_against is not None and not math.isnan(p_against) and p_against < alpha:
        return "does not hold"
    return "inconclusive"


def _finite(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{what}: expected a flat sequence of numbers")
    return x[np.isfinite(x)]


def _fmt(x: float) -> str:
    if x is None or math.isnan(x):
        return "nan"
    if x == 0 or 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.3g}"


def _p(p: float) -> str:
    return "nan" if p is None or math.isnan(p) else (f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}")


def _describe(x: np.ndarray) -> str:
    if x.size == 0:
        return "no values"
    std = float(np.std(x, ddof=1)) if x.size > 1 else float("nan")
    return f"{_fmt(float(x.mean()))} ± {_fmt(std)} (n={x.size})"


def _welch_p(a: np.ndarray, b: np.ndarray, alternative: str) -> tuple[float, float, float]:
    """(t, df, p) of scipy's Welch test; nan where undefined (fewer than 2 values, or both samples constant and
    equal)."""
    if a.size < 2 or b.size < 2:
        return float("nan"), float("nan"), float("nan")
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's precision note on near-constant samples
        res = stats.ttest_ind(a, b, equal_var=False, alternative=alternative)
    return float(res.statistic), float(res.df), float(res.pvalue)


def welch_less(claim: str, a: Sequence[float], b: Sequence[float], *, name_a: str = "a", name_b: str = "b",
               alpha: float = ALPHA, margin: float = PRACTICAL_MARGIN) -> Verdict:
    """Claim: mean(a) < mean(b) for a lower-is-better metric (App. H: ASI against a baseline over seeds).

    p_claim is Welch's one-sided p (H1: mean(a) < mean(b)). The claim does not hold when Welch's test of
    H1: mean(b) - mean(a) < margin * |mean(b)| rejects at alpha, i.e. the improvement is, with confidence 1 - alpha,
    smaller than ``margin`` of the baseline (with margin 0: a is significantly higher).
    """
    xa, xb = _finite(a, "welch_less a"), _finite(b, "welch_less b")
    t, df, p = _welch_p(xa, xb, "less")
    delta = margin * abs(float(xb.mean())) if xb.size else 0.0
    _, _, p_against = _welch_p(xa + delta, xb, "greater")
    verdict = decide(p, p_against, alpha)
    statistic = (f"Welch one-sided t-test, H1: mean({name_a}) < mean({name_b}): {name_a} {_describe(xa)}, "
                 f"{name_b} {_describe(xb)}; t = {_fmt(t)}, df = {_fmt(df)}, p = {_p(p)}; "
                 f"p(improvement < {margin:.0%} of {name_b}) = {_p(p_against)}")
    values = {"test": "welch_one_sided_less", "a": xa.tolist(), "b": xb.tolist(), "name_a": name_a, "name_b": name_b,
              "mean_a": float(xa.mean()) if xa.size else None, "mean_b": float(xb.mean()) if xb.size else None,
              "t": t, "df": df, "p": p, "p_against": p_against, "margin": margin, "alpha": alpha}
    return Verdict(claim, verdict, statistic, values)


def bonferroni_any(claim: str, groups: dict[str, Sequence[float]], baseline: Sequence[float], *,
                   name_b: str = "baseline", alpha: float = ALPHA, margin: float = PRACTICAL_MARGIN) -> Verdict:
    """Claim: at least one group has a lower mean than the baseline (a sweep, e.g. d_init values against the
    standard init). Each group gets ``welch_less``; p-values are Bonferroni-adjusted (times the number of groups).
    Holds if the smallest adjusted p < alpha; does not hold if every group's own test does not hold."""
    if not groups:
        return Verdict(claim, "inconclusive", "no groups to compare", {"test": "welch_bonferroni"})
    tests = {name: welch_less(claim, xs, baseline, name_a=name, name_b=name_b, alpha=alpha, margin=margin)
             for name, xs in groups.items()}
    m = len(tests)
    adjusted = {name: min(1.0, m * v.values["p"]) if not math.isnan(v.values["p"]) else float("nan")
                for name, v in tests.items()}
    finite = {k: p for k, p in adjusted.items() if not math.isnan(p)}
    best = min(finite, key=finite.get) if finite else None
    if best is not None and finite[best] < alpha:
        verdict = "holds"
    elif all(v.verdict == "does not hold" for v in tests.values()):
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    parts = [f"{name}: p = {_p(v.values['p'])} (adjusted {_p(adjusted[name])}, {v.verdict})"
             for name, v in tests.items()]
    statistic = (f"Welch one-sided t-tests against {name_b} ({_describe(_finite(baseline, 'baseline'))}), "
                 f"Bonferroni over {m}: " + "; ".join(parts))
    values = {"test": "welch_bonferroni", "alpha": alpha, "best": best,
              "tests": {k: v.values for k, v in tests.items()}, "adjusted_p": adjusted}
    return Verdict(claim, verdict, statistic, values)


def _rank_correlation(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """Pearson correlation along ``axis`` (of ranks, so Spearman's rho); vectorized for permutation_test."""
    xc = x - x.mean(axis=axis, keepdims=True)
    yc = y - y.mean(axis=axis, keepdims=True)
    with np.errstate(all="ignore"):
        return (xc * yc).sum(axis=axis) / np.sqrt((xc**2).sum(axis=axis) * (yc**2).sum(axis=axis))


def spearman_negative(claim: str, x: Sequence[float], y: Sequence[float], *, name_x: str = "x", name_y: str = "y",
                      alpha: float = ALPHA, seed: int = 0) -> Verdict:
    """Claim: y falls as x rises (Spearman's rho < 0). One-sided permutation p-values over pairings, exact up to
    7 points; p_against is the test of rho > 0. A constant x or y leaves rho undefined (inconclusive)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    n = int(xs.size)
    rho = p_less = p_greater = float("nan")
    if n >= 3 and np.ptp(xs) > 0 and np.ptp(ys) > 0:
        rx, ry = stats.rankdata(xs), stats.rankdata(ys)
        rho = float(_rank_correlation(rx, ry))
        kwargs = dict(permutation_type="pairings", vectorized=True,
                      n_resamples=math.inf if n <= _EXACT_PERMUTATIONS_UP_TO else _PERMUTATIONS)
        p_less = float(stats.permutation_test((rx, ry), _rank_correlation, alternative="less",
                                              rng=np.random.default_rng(seed), **kwargs).pvalue)
        p_greater = float(stats.permutation_test((rx, ry), _rank_correlation, alternative="greater",
                                                 rng=np.random.default_rng(seed), **kwargs).pvalue)
    verdict = decide(p_less, p_greater, alpha)
    how = "exact" if n <= _EXACT_PERMUTATIONS_UP_TO else f"{_PERMUTATIONS:,} permutations"
    statistic = (f"Spearman rank correlation of {name_y} with {name_x} over {n} points: rho = {_fmt(rho)}, "
                 f"one-sided permutation p (rho < 0) = {_p(p_less)} ({how}); p (rho > 0) = {_p(p_greater)}")
    values = {"test": "spearman_permutation", "n": n, "rho": rho, "p": p_less, "p_against": p_greater,
              "x": xs.tolist(), "y": ys.tolist(), "alpha": alpha}
    return Verdict(claim, verdict, statistic, values)


def sign_test(claim: str, outcomes: Sequence[bool], *, units: str = "units", alpha: float = ALPHA,
              labels: Sequence[Any] | None = None) -> Verdict:
    """Claim: something holds in most of n independent paired units (one outcome per unit). One-sided binomial
    sign test against 1/2; p_against tests "fails in most". With n units the smallest reachable p is 2^-n, so
    fewer than 5 units can never hold at alpha = 0.05."""
    flags = [bool(o) for o in outcomes]
    n, k = len(flags), sum(flags)
    if n == 0:
        return Verdict(claim, "inconclusive", f"no {units} to compare", {"test": "sign_test", "n": 0})
    p = float(stats.binomtest(k, n, 0.5, alternative="greater").pvalue)
    p_against = float(stats.binomtest(k, n, 0.5, alternative="less").pvalue)
    failing = [str(lbl) for lbl, ok in zip(labels or [], flags, strict=False) if not ok]
    statistic = (f"in {k} of {n} {units}; one-sided sign test p = {_p(p)} (p against = {_p(p_against)})"
                 + (f"; not in: {', '.join(failing[:12])}{' ...' if len(failing) > 12 else ''}" if failing else ""))
    values = {"test": "sign_test", "k": k, "n": n, "p": p, "p_against": p_against, "alpha": alpha,
              "outcomes": flags, "labels": [str(x) for x in labels] if labels is not None else None}
    return Verdict(claim, decide(p, p_against, alpha), statistic, values)


def compare_values(claim: str, a: float, b: float, *, name_a: str = "a", name_b: str = "b",
                   rel_tol: float = 0.05, percent: bool = False) -> Verdict:
    """Claim: a < b, for single measured numbers without a sampling distribution (a bisection result, a share of
    a decomposition, a threshold). Holds if a < b - tol, does not hold if a > b + tol, inconclusive within the
    band tol = rel_tol * |b| (or when either is undefined). The statistic is a sentence ("the largest CV (L15) is
    6.09%, above the threshold of 1%"); rel_tol = 0 reads b as a threshold, ``percent`` prints both as percentages."""
    a, b = float("nan") if a is None else float(a), float("nan") if b is None else float(b)
    tol = rel_tol * abs(b)
    if math.isnan(a) or math.isnan(b):
        verdict = "inconclusive"
    elif a < b - tol:
        verdict = "holds"
    elif a > b + tol:
        verdict = "does not hold"
    else:
        verdict = "inconclusive"
    shown = (lambda x: "nan" if math.isnan(x) else f"{100 * x:.3g}%") if percent else _fmt
    relation = "below" if a < b else "above" if a > b else "equal to" if a == b else "not comparable with"
    if rel_tol == 0:
        statistic = f"{name_a} is {shown(a)}, {relation} the threshold of {shown(b)} ({name_b}; one measurement)"
    else:
        statistic = (f"{name_a} is {shown(a)}, {relation} {name_b} at {shown(b)}; a difference within "
                     f"{rel_tol:.0%} of {name_b} counts as inconclusive (one measurement each)")
    values = {"test": "compare_values", "a": a, "b": b, "name_a": name_a, "name_b": name_b, "rel_tol": rel_tol}
    return Verdict(claim, verdict, statistic, values)
