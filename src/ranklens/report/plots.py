"""What every ranklens figure shares: the site kinds' names, order and colours, and writing a figure to PNG
atomically (matplotlib's Agg canvas, no pyplot state)."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from ranklens.io import atomic_write_bytes

PathLike = str | os.PathLike[str]
DPI = 120

KIND_ORDER = ("resid_pre", "attn_in", "attn_z", "attn_out", "mlp_in", "mlp_hidden", "mlp_out", "resid_post")
KIND_LABELS = {
    "resid_pre": "residual stream (pre)",
    "attn_in": "attention input",
    "attn_z": "attention Z (concat. heads)",
    "attn_out": "attention output",
    "mlp_in": "MLP input",
    "mlp_hidden": "MLP hidden",
    "mlp_out": "MLP output",
    "resid_post": "residual stream",
}
# Fixed per kind across every figure; attention output is red and drawn heavier (it is the paper's subject).
KIND_COLORS = {
    "resid_pre": "#7f7f7f",
    "attn_in": "#ff7f0e",
    "attn_z": "#9467bd",
    "attn_out": "#d62728",
    "mlp_in": "#17becf",
    "mlp_hidden": "#8c564b",
    "mlp_out": "#1f77b4",
    "resid_post": "#2ca02c",
}


def kind_label(kind: str) -> str:
    """Readable name of a site kind (``attn_out`` -> ``attention output``); unknown kinds are returned as is."""
    return KIND_LABELS.get(kind, kind)


def ordered_kinds(kinds: Sequence[str] | set[str]) -> list[str]:
    """Kinds in the canonical order of KIND_ORDER, unknown kinds last (sorted)."""
    known = [k for k in KIND_ORDER if k in kinds]
    return known + sorted(k for k in kinds if k not in KIND_ORDER)


def save_figure(fig: Figure, path: PathLike) -> Path:
    """Write `fig` as a PNG at DPI through a temporary file and a rename; the figure is cleared."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    fig.clear()
    return atomic_write_bytes(path, buf.getvalue())
