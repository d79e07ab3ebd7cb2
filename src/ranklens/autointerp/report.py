"""Console summaries of `autointerp score` and `autointerp compare`: each score beside its random-explanation floor."""

from __future__ import annotations

from typing import Any


def _ms(s: dict[str, Any] | None) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    std = s.get("std")
    return f"{s['mean']:.3f} ± {std:.3f}" if std is not None else f"{s['mean']:.3f}"


def _usage(u: dict[str, Any]) -> str:
    cost = f", cost {u['cost']:.4f}" if u.get("cost") else ""
    return (f"judge: {u['answered']} answered ({u['requests']} HTTP requests), {u['cached']} from the cache; "
            f"{u['prompt_tokens']:,} prompt + {u['completion_tokens']:,} completion tokens{cost}")


def describe_scores(result: dict[str, Any]) -> str:
    lines = [f"judge: {result['judge']}", f"{'method':<14}{'score (mean ± std)':>22}{'random floor':>22}{'n':>5}"]
    for m in result["methods"]:
        s = result["summary"][m]
        lines.append(f"{m:<14}{_ms(s):>22}{_ms(s.get('floor')):>22}{s['n']:>5}")
    lines.append(_usage(result["usage"]))
    return "\n".join(lines)


def _p(test: dict[str, Any]) -> str:
    return "n/a" if test.get("p") is None else f"{test['p']:.3g}"


def describe_compare(result: dict[str, Any]) -> str:
    a, b = result["runs"]["a"], result["runs"]["b"]
    lines = [f"judge: {result['judge']}", f"A: {a['title']} ({a['n_features']} features)",
             f"B: {b['title']} ({b['n_features']} features)",
             f"{'score':<14}{'A':>18}{'A floor':>18}{'B':>18}{'B floor':>18}{'Welch p':>10}"]
    for m in result["methods"]:
        sa, sb = a["summary"][m], b["summary"][m]
        lines.append(f"{m:<14}{_ms(sa):>18}{_ms(sa['floor']):>18}{_ms(sb):>18}{_ms(sb['floor']):>18}"
                     f"{_p(result['tests'][m]):>10}")
    if "rubric" in a:
        lines.append(f"{'rubric (1-5)':<14}{_ms(a['rubric']):>18}{'':>18}{_ms(b['rubric']):>18}{'':>18}"
                     f"{_p(result['tests']['rubric']):>10}")
        for key, side in (("A", a), ("B", b)):
            counts = ", ".join(f"{s}: {c}" for s, c in side["rubric"]["counts"].items())
            lines.append(f"  rubric counts {key}: {counts}; unreadable {side['rubric']['unreadable']}")
    lines.append(_usage(result["usage"]))
    return "\n".join(lines)
