"""Short plain-text tables printed at the end of a job: the few numbers a person reads first, rounded.

The full-precision values stay in the job's JSON files; these tables only point at them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# (metric key, header, format) of a trained or evaluated dictionary, in reading order.
DICTIONARY_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("fvu", "FVU", "{:.4f}"),
    ("l0", "L0", "{:.1f}"),
    ("train_dead_fraction", "dead (train)", "{:.1%}"),
    ("eval_dead_fraction", "dead (held-out)", "{:.1%}"),
    ("delta_lm_loss", "delta LM loss", "{:+.4f}"),
    ("loss_recovered", "loss recovered", "{:.1%}"),
    ("tokens", "tokens", "{:,}"),
)


def format_value(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]], label: str = "") -> str:
    """A fixed-width table of `rows` (each a mapping holding the column keys, plus ``label`` when given); a column
    no row holds is left out."""
    columns = [c for c in columns if any(c[0] in r for r in rows)]
    if label:
        columns = [(label, "", "{}"), *columns]
    cells = [[header for _, header, _ in columns]]
    cells += [[format_value(r.get(key), fmt) for key, _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    return "\n".join(lines)


def dictionary_table(metrics: Mapping[str, Any] | Sequence[Mapping[str, Any]], label: str = "") -> str:
    """The end-of-job table of one or more trained/evaluated dictionaries (SAE or Lorsa metrics)."""
    rows = [metrics] if isinstance(metrics, Mapping) else list(metrics)
    return table(rows, DICTIONARY_COLUMNS, label)


# (record key, header, format) of a spectrum site, in reading order.
SPECTRUM_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("effective_rank", "effective rank", "{:.1f}"),
    ("d", "d", "{:,}"),
    ("erank_fraction", "erank / d", "{:.3f}"),
    ("frac_sv_above_1pct", "SVs above 1%", "{:.1%}"),
    ("n_99", "dims for 99% loss", "{:,}"),
    ("n_tokens", "tokens", "{:,}"),
)
VERDICT_WORDS = ("holds", "does not hold", "inconclusive")


def spectrum_table(result: Mapping[str, Any], max_rows: int = 12) -> str:
    """The end-of-job table of a spectrum (spectrum.json): every site when there are at most ``max_rows``, else
    the middle layer's, with a line saying how many there are in all."""
    records = list(result.get("records") or [])
    shown = records
    if len(records) > max_rows:
        layers = sorted({r["layer"] for r in records})
        middle = layers[len(layers) // 2]
        shown = [r for r in records if r["layer"] == middle][:max_rows]
    rows = [{**r, "n_99": (r.get("loss_recovered") or {}).get("n_99")} for r in shown]
    text = table(rows, SPECTRUM_COLUMNS, label="site")
    if len(shown) < len(records):
        text += f"\n(layer {shown[0]['layer']} of {len(records)} sites; every site in spectrum.json)"
    return text


def verdict_counts_table(results: Mapping[str, Any]) -> str:
    """The end-of-job table of `reproduce` (results.json): the verdict counts per experiment and in all, and how
    many verdicts differ from the reference run's when it was compared."""
    rows, total = [], dict.fromkeys(VERDICT_WORDS, 0)
    for name, step in results.get("steps", {}).items():
        verdicts = step.get("verdicts") or []
        if not verdicts:
            continue
        counts = {w: sum(v["verdict"] == w for v in verdicts) for w in VERDICT_WORDS}
        rows.append({"experiment": str(step.get("title", name)).split(" (")[0], **counts})
        total = {w: total[w] + counts[w] for w in VERDICT_WORDS}
    rows.append({"experiment": "total", **total})
    text = table(rows, [(w, w, "{}") for w in VERDICT_WORDS], label="experiment")
    ref = results.get("reference")
    if ref and ref.get("compared"):
        text += (f"\n{len(ref['differing'])} of {ref['compared']} verdicts differ from the {ref['preset']} run in "
                 f"{ref['path']} (listed at the top of the report)")
    return text
