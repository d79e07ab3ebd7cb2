"""The judge's prompts: templates from files in ``templates/`` filled with contexts, and their answers parsed.

A template is a few-shot chat: sections ``### system``, ``### user``, ``### assistant`` (comment lines starting with
``#`` before the first section), and ``{{name}}`` slots filled here. The wording follows the Lorsa paper's App. D
(explanation and simulation from top activations and from z-patterns, after Bills et al. 2023), delphi's detection
and fuzzing, and the dimensional-collapse paper's App. N.1 rubric, in our own words.

A context is the dashboard's (``docs/dashboard.md``): ``tokens``, ``acts`` per token, ``peak``, and for a Lorsa
head ``z`` (each source token's contribution to the activation at the peak). Activations are shown as integers
0-10 relative to the feature's largest activation (Bills et al.); tokens are shown with their whitespace made
visible, so one token is always one line.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"
_SECTION = re.compile(r"^### (system|user|assistant)\s*$")
_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


@cache
def _template(name: str) -> tuple[tuple[str, str], ...]:
    turns: list[tuple[str, list[str]]] = []
    for line in (TEMPLATES / f"{name}.txt").read_text(encoding="utf-8").splitlines():
        m = _SECTION.match(line)
        if m:
            turns.append((m.group(1), []))
        elif turns:
            turns[-1][1].append(line)
    return tuple((role, "\n".join(lines).strip("\n")) for role, lines in turns)


def messages(name: str, **slots: str) -> list[dict[str, str]]:
    """The chat of template ``name`` with its ``{{slot}}``s filled; a slot left unfilled is an error."""
    out = []
    for role, text in _template(name):
        for key, value in slots.items():
            text = text.replace("{{" + key + "}}", value)
        if "{{" in text:
            raise ValueError(f"template {name}: unfilled slot in {text[text.index('{{'):][:40]!r}")
        out.append({"role": role, "content": text})
    return out


def random_explanations() -> list[str]:
    return [line.strip() for line in (TEMPLATES / "random_explanations.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]


def show(token: str | None) -> str:
    """A token on one line: newlines, tabs and carriage returns drawn; a missing token (outside the document) as ∅."""
    if token is None:
        return "∅"
    return "".join(_VISIBLE.get(c, c) for c in token) or "∅"


def scaled(values: list[float], top: float) -> list[int]:
    """Values as integers 0-10 relative to ``top`` (negatives as 0), as the judge reads and writes them."""
    if not top > 0:
        return [0 for _ in values]
    return [max(0, min(10, round(10 * v / top))) for v in values]


def trim(ctx: dict, before: int, after: int) -> dict:
    """The context cut to ``before`` tokens before its peak and ``after`` after it."""
    peak = ctx.get("peak", len(ctx["tokens"]) // 2)
    lo, hi = max(0, peak - before), min(len(ctx["tokens"]), peak + after + 1)
    out = {k: ctx[k][lo:hi] for k in ("tokens", "acts", "z") if k in ctx}
    out["peak"] = peak - lo
    return out


# --------------------------------------------------------------------------- explanation


def explain_activations(contexts: list[dict], max_act: float) -> list[dict[str, str]]:
    parts = []
    for i, ctx in enumerate(contexts, 1):
        lines = [f"{show(t)}\t{v}" for t, v in zip(ctx["tokens"], scaled(ctx["acts"], max_act), strict=True)]
        parts.append(f"Excerpt {i}:\n<START>\n" + "\n".join(lines) + "\n<END>")
    return messages("explain_activations", excerpts="\n".join(parts))


def _z_lines(ctx: dict, values: list[int] | None) -> list[str]:
    """Tokens up to the query (the peak); with ``values``, each followed by its value."""
    lines = []
    for j, t in enumerate(ctx["tokens"][:ctx["peak"] + 1]):
        line = show(t) + ("" if values is None else f"\t{values[j]}")
        lines.append(line + ("\t**query**" if j == ctx["peak"] else ""))
    return lines


def z_truth(ctx: dict) -> list[float]:
    """The z-pattern of a context up to its query token: the contribution of each source token."""
    return [float(z) for z in ctx["z"][:ctx["peak"] + 1]]


def explain_zpattern(contexts: list[dict]) -> list[dict[str, str]]:
    parts = []
    for i, ctx in enumerate(contexts, 1):
        z = z_truth(ctx)
        top = max((abs(v) for v in z), default=0.0)
        parts.append(f"Excerpt {i}:\n<START>\n" + "\n".join(_z_lines(ctx, scaled(z, top))) + "\n<END>")
    return messages("explain_zpattern", excerpts="\n".join(parts))


def clean_explanation(text: str) -> str:
    """The first non-empty line of an answer, without quotes or a leading label."""
    for line in text.strip().splitlines():
        line = line.strip().strip('"').strip()
        line = re.sub(r"^(explanation|answer)\s*:\s*", "", line, flags=re.IGNORECASE)
        if line:
            return line
    return ""


# --------------------------------------------------------------------------- simulation


def simulate_activations(explanation: str, ctx: dict) -> list[dict[str, str]]:
    return messages("simulate_activations", explanation=explanation,
                    tokens="\n".join(show(t) for t in ctx["tokens"]))


def simulate_zpattern(explanation: str, ctx: dict) -> list[dict[str, str]]:
    return messages("simulate_zpattern", explanation=explanation, tokens="\n".join(_z_lines(ctx, None)))


def simulation_budget(n_tokens: int) -> int:
    """max_tokens for a simulated excerpt: each line echoes a token (rarely more than 4 tokens) and a number."""
    return 6 * n_tokens + 8


def parse_simulation(text: str, n: int) -> tuple[list[float], int]:
    """The predicted values of ``n`` tokens from an answer of lines "token<TAB>value" (in order; a line's last
    integer is its value, clipped to 0-10), and how many of the ``n`` were missing or unreadable (taken as 0)."""
    values: list[float] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        numbers = re.findall(r"-?\d+(?:\.\d+)?", line.rsplit("\t", 1)[-1]) if "\t" in line else []
        if not numbers:
            numbers = re.findall(r"(?:^|\s)(-?\d+(?:\.\d+)?)\s*$", line)
        values.append(min(10.0, max(0.0, float(numbers[-1]))) if numbers else float("nan"))
        if len(values) == n:
            break
    missing = sum(1 for v in values if v != v) + (n - len(values))
    values = [0.0 if v != v else v for v in values] + [0.0] * (n - len(values))
    return values, missing


# --------------------------------------------------------------------------- detection, fuzzing, rubric


def _plain(ctx: dict, marks: set[int] | None = None) -> str:
    marks = marks or set()
    return "".join(f"<<{show(t)}>>" if j in marks else show(t) for j, t in enumerate(ctx["tokens"]))


def detect(explanation: str, contexts: list[dict]) -> list[dict[str, str]]:
    excerpts = "\n".join(f"{i}. {_plain(c)}" for i, c in enumerate(contexts, 1))
    return messages("detect", explanation=explanation, excerpts=excerpts)


def fuzz(explanation: str, contexts: list[dict], marks: list[set[int]]) -> list[dict[str, str]]:
    excerpts = "\n".join(f"{i}. {_plain(c, m)}" for i, (c, m) in enumerate(zip(contexts, marks, strict=True), 1))
    return messages("fuzz", explanation=explanation, excerpts=excerpts)


def rubric(contexts: list[dict]) -> list[dict[str, str]]:
    excerpts = "\n".join(f"{i}. {_plain(c, {j for j, a in enumerate(c['acts']) if a > 0})}"
                         for i, c in enumerate(contexts, 1))
    return messages("rubric", excerpts=excerpts)


def parse_answers(text: str, n: int) -> list[int | None]:
    """Answers "number: 0|1" to ``n`` numbered excerpts (None where an excerpt got no readable answer)."""
    out: list[int | None] = [None] * n
    for m in re.finditer(r"(?m)^\s*(\d+)\s*[:.)-]\s*(yes|no|[01])\b", text, flags=re.IGNORECASE):
        i, a = int(m.group(1)) - 1, m.group(2).lower()
        if 0 <= i < n and out[i] is None:
            out[i] = 1 if a in ("1", "yes") else 0
    return out


def parse_rating(text: str) -> int | None:
    """The rating 1-5 an answer starts with ("4", "Rating: 4 out of 5"), or None. A digit that opens a numbered
    line ("1. the cat ...", a judge echoing the excerpts) is not a rating: counting it would score such answers 1."""
    m = re.match(r"\s*(?:(?:rating|score)\s*[:=]?\s*)?([1-5])(?![\d)])(?!\.\s*\S)", text, flags=re.IGNORECASE)
    return int(m.group(1)) if m else None
