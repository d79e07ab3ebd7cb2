"""Operand plots (Lorsa paper Section 5.2, Figure 5, App. E.3): a Lorsa head's activation over the 100 x 100 grid of
the template " op1 + op2 =", and which operand heuristic it follows.

The grid's cell (op1, op2) is the head's value in the sparse code (0 unless it is among the top K with z > 0) at the
position the arithmetic probe scores: the last prompt token, whose next token starts the sum. The heuristic summary
is a two-way analysis of variance of the grid: the share of its variance that op1 alone, op2 alone and their
interaction explain; then, for the operand that explains more, whether its tens (a range of values, like the paper's
"op1 in 27-43") or its last digit (like "op1 % 10 in [4, 5, 6]") explain more of the head's mean activation against
that operand, and the values (the longest runs, at most three) or digits where that mean is above half its range.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ranklens.analysis.probes import ProbeTokenizer, arithmetic_tokens
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel
from ranklens.report.plots import save_figure

__all__ = ["operand_figure", "operand_grid", "operand_heuristic"]

N_OPERANDS = 100
BATCH = 512


@torch.no_grad()
def operand_grid(lm: LoadedModel, lorsa: Lorsa, layer: int, heads: Sequence[int],
                 n: int = N_OPERANDS) -> torch.Tensor:
    """The activation of each head in `heads` at the scored position of " op1 + op2 =" for op1, op2 in 0..n-1:
    [len(heads), n, n] (op1 along dim 1)."""
    heads_t = torch.as_tensor(list(heads), dtype=torch.long)
    grid = torch.zeros(len(heads_t), n, n, dtype=torch.float64)
    tok = ProbeTokenizer(lm.tokenizer)
    by_length: dict[int, list[tuple[int, int, list[int]]]] = {}
    for op1 in range(n):
        for op2 in range(n):
            ids = arithmetic_tokens(tok, op1, op2)
            by_length.setdefault(len(ids), []).append((op1, op2, ids))
    site = f"L{layer}.attn_in"
    capture = Capturer(lm.arch, [site])
    dev = lm.device
    for group in by_length.values():
        for s in range(0, len(group), BATCH):
            part = group[s:s + BATCH]
            ids = torch.tensor([p[2] for p in part], device=dev)
            x = capture(ids)[site].to(lorsa.W_V.dtype)
            out = lorsa(x)
            values, indices = out.values[:, -1], out.indices[:, -1]  # [b, K]
            act = (values[:, None, :] * (indices[:, None, :] == heads_t.to(dev)[None, :, None])).sum(-1)  # [b, h]
            op1 = torch.tensor([p[0] for p in part])
            op2 = torch.tensor([p[1] for p in part])
            grid[:, op1, op2] = act.double().cpu().T
    return grid


def _range_text(values: torch.Tensor, mask: torch.Tensor, most: int = 3) -> str:
    """The runs of consecutive operand values where `mask` holds, longest first (at most `most`), as 'a-b, c-d'."""
    runs, start = [], None
    for v in range(len(mask) + 1):
        on = v < len(mask) and bool(mask[v])
        if on and start is None:
            start = v
        if not on and start is not None:
            runs.append((start, v - 1))
            start = None
    runs = sorted(sorted(runs, key=lambda r: r[0] - r[1])[:most])
    return ", ".join(f"{int(values[a])}-{int(values[b])}" if a != b else f"{int(values[a])}" for a, b in runs)


def _r2(m: torch.Tensor, groups: torch.Tensor) -> float:
    """Share of the variance of m explained by its group means."""
    total = ((m - m.mean()) ** 2).sum()
    if total <= 0:
        return 0.0
    means = torch.zeros(int(groups.max()) + 1, dtype=m.dtype).index_add_(0, groups, m)
    means /= torch.bincount(groups).to(m.dtype)
    return float(1 - ((m - means[groups]) ** 2).sum() / total)


def operand_heuristic(grid: torch.Tensor) -> dict:
    """The summary of one head's grid [n, n] (see the module docstring)."""
    g = grid.double()
    n1, n2 = g.shape
    mean = g.mean()
    total = float(((g - mean) ** 2).sum())
    out = {"max_activation": float(g.max()), "active_fraction": float((g > 0).double().mean())}
    if total <= 0:
        return {**out, "op1_share": 0.0, "op2_share": 0.0, "interaction_share": 0.0, "operand": None, "kind": None,
                "r2_tens": 0.0, "r2_units": 0.0, "description": "constant on the grid"}
    m1, m2 = g.mean(1), g.mean(0)
    ss1, ss2 = float(n2 * ((m1 - mean) ** 2).sum()), float(n1 * ((m2 - mean) ** 2).sum())
    operand, m = ("op1", m1) if ss1 >= ss2 else ("op2", m2)
    values = torch.arange(len(m))
    r2_tens, r2_units = _r2(m, values // 10), _r2(m, values % 10)
    high = m >= m.min() + 0.5 * (m.max() - m.min())
    if r2_units > r2_tens:
        units = torch.zeros(10, dtype=m.dtype).index_add_(0, values % 10, m) / torch.bincount(values % 10)
        digits = (units >= units.min() + 0.5 * (units.max() - units.min())).nonzero()[:, 0].tolist()
        kind, text = "last digit", f"{operand} % 10 in {digits}"
    else:
        kind, text = "range", f"{operand} in {_range_text(values, high)}"
    return {**out, "op1_share": ss1 / total, "op2_share": ss2 / total, "interaction_share": 1 - (ss1 + ss2) / total,
            "operand": operand, "kind": kind, "r2_tens": r2_tens, "r2_units": r2_units, "description": text}


def operand_figure(grids: torch.Tensor, titles: Sequence[str], path: str | Path) -> Path:
    """One heat map per head (op2 across, op1 down, like the paper's Figure 5), written as a PNG."""
    if grids.ndim != 3 or len(titles) != grids.shape[0] or grids.shape[0] == 0:
        raise RanklensError(f"operand_figure: {grids.shape[0]} grids and {len(titles)} titles; expected the same, >= 1")
    n = grids.shape[0]
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig = Figure(figsize=(3.4 * cols, 3.3 * rows))
    for i in range(n):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(grids[i].numpy(), origin="upper", cmap="viridis", interpolation="nearest")
        ax.set_title(titles[i], fontsize=8)
        ax.set_xlabel("op2", fontsize=8)
        ax.set_ylabel("op1", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    fig.tight_layout()
    return save_figure(fig, path)
