"""The numbers of autointerp: the simulation score, detection and fuzzing accuracy, summaries and Welch's test.

- Simulation score (Bills et al. 2023; Lorsa paper Section 4.3, App. D): Pearson's correlation between the judge's
  predicted activations and the true ones, over every token of the scored contexts pooled together. ``top`` pools
  the held-out top contexts, ``random`` the random ones, ``all`` both (Bills' "top and random" score, the headline).
  A correlation is undefined when either side is constant (the judge predicted 0 everywhere, or the feature never
  fires in the random contexts); it is reported as ``None`` there and counted as 0 in ``all`` only when ``all``
  itself is undefined, since a constant prediction carries no information about the feature.
- Detection and fuzzing (delphi): balanced accuracy of the judge's yes/no answers, an unreadable answer counted as
  wrong, so a judge that answers at random or always the same scores 0.5.
- Welch's unequal-variance t-test, two-sided, as the Lorsa paper's Figure 3 and the dimensional-collapse paper's
  App. H run it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def correlation(pred: Sequence[float], true: Sequence[float]) -> float | None:
    """Pearson's r of two equally long sequences; None when either is constant or they have fewer than 2 values."""
    if len(pred) != len(true):
        raise ValueError(f"{len(pred)} predictions for {len(true)} true values")
    if len(pred) < 2:
        return None
    p, t = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    p, t = p - p.mean(), t - t.mean()
    denom = math.sqrt(float(p @ p) * float(t @ t))
    if denom == 0.0:
        return None
    return max(-1.0, min(1.0, float(p @ t) / denom))


def simulation_score(pred: Sequence[Sequence[float]], true: Sequence[Sequence[float]],
                     kinds: Sequence[str]) -> dict[str, float | None]:
    """Correlations over the contexts of each kind ("top", "random") pooled, and over all (``all``, 0 when
    undefined)."""
    out: dict[str, float | None] = {}
    for kind in sorted(set(kinds)):
        sel = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = correlation([v for i in sel for v in pred[i]], [v for i in sel for v in true[i]])
    r = correlation([v for p in pred for v in p], [v for t in true for v in t])
    out["all"] = 0.0 if r is None else r
    return out


def balanced_accuracy(answers: Sequence[int | None], truth: Sequence[int]) -> float | None:
    """Mean of the accuracy on the positives and on the negatives (None answers are wrong); None without both."""
    pos = [a == 1 for a, t in zip(answers, truth, strict=True) if t == 1]
    neg = [a == 0 for a, t in zip(answers, truth, strict=True) if t == 0]
    if not pos or not neg:
        return None
    return 0.5 * (sum(pos) / len(pos) + sum(neg) / len(neg))


def summary(values: Sequence[float | None]) -> dict[str, float | int | None]:
    """Mean, standard deviation (ddof 1) and count of the defined values."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "n": int(v.size)}


def welch(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, float | None]:
    """Welch's two-sided t-test of mean(a) = mean(b): t, degrees of freedom, p (None where undefined)."""
    from scipy import stats

    x = np.asarray([v for v in a if v is not None], dtype=np.float64)
    y = np.asarray([v for v in b if v is not None], dtype=np.float64)
    if x.size < 2 or y.size < 2 or (x.var() == 0 and y.var() == 0):
        return {"t": None, "df": None, "p": None}
    res = stats.ttest_ind(x, y, equal_var=False)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    return {"t": float(res.statistic), "df": float(df), "p": float(res.pvalue)}
