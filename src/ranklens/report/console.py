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
