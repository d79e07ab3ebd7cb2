"""What every ranklens figure shares: the site kinds' names, order and colours, writing a figure to PNG atomically
(matplotlib's Agg canvas, no pyplot state), and the z-pattern heat map the Lorsa analyses and reports draw."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
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


def heatmap(matrix: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str], path: Path,
            title: str | None = None) -> Path:
    """A z-pattern: rows = heads (or query positions), columns = source tokens."""
    if not matrix or not matrix[0]:
        raise ValueError("heatmap: empty matrix")
    fig = Figure(figsize=(min(14, 1.5 + 0.35 * len(col_labels)), 1.2 + 0.3 * len(row_labels)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(matrix, aspect="auto", cmap="RdBu_r",
                      vmin=-max(abs(v) for row in matrix for v in row) or -1,
                      vmax=max(abs(v) for row in matrix for v in row) or 1)
    ax.set_yticks(range(len(row_labels)), row_labels, fontsize=7)
    ax.set_xticks(range(len(col_labels)), col_labels, rotation=90, fontsize=7)
    fig.colorbar(image, ax=ax, shrink=0.8)
    if title:
        ax.set_title(title, fontsize=10)
    with warnings.catch_warnings():  # tokens of any script label the columns; a missing glyph draws as a box
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        return save_figure(fig, path)
