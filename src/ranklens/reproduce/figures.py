"""Figures of the SAE and Lorsa experiments (paper Figures 5-9), as pure functions: numbers in, PNG path out.

Like ``ranklens.spectrum.figures`` (which draws the spectrum figures of experiments 1-2), each function builds a
``matplotlib.figure.Figure`` on the Agg canvas (no pyplot state) and writes it atomically with ``save_figure``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ranklens.report.plots import KIND_COLORS, kind_label, save_figure

METHOD_COLORS = {"TopK": "#7f7f7f", "AuxK": "#1f77b4", "ASI": "#d62728", "ASI + SparseAdam": "#9467bd",
                 "random subspace": "#ff7f0e", "default": "#7f7f7f"}


@dataclass
class Panel:
    """One axes: series of (x, mean, std) points per label, optional horizontal reference lines."""

    ylabel: str
    xlabel: str
    series: Mapping[str, Sequence[tuple[float, float, float]]]
    references: Mapping[str, tuple[float, float]] = field(default_factory=dict)  # label -> (mean, std)
    logx: bool = False
    logy: bool = False


MIN_WIDTH = 8.0  # inches: a report shows a figure at most ~1,000 pixels wide; narrower ones waste it
PANEL_WIDTH = 4.8


def _figure(n_panels: int) -> tuple[Figure, list]:
    """A row of `n_panels` axes on the Agg canvas; several panels are lettered A, B, ... (their captions name
    them so)."""
    fig = Figure(figsize=(max(MIN_WIDTH, PANEL_WIDTH * n_panels), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]
    for letter, ax in zip("ABCDEFGH", axes, strict=False):
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines[["top", "right"]].set_visible(False)
        if n_panels > 1:
            ax.set_title(letter, loc="left", fontweight="bold")
    return fig, axes


def panel_letters(labels: Sequence[str] | Iterable[str]) -> str:
    """A caption's naming of lettered panels: "A: FVU; B: dead fraction" (one panel: its label alone)."""
    labels = list(labels)
    return labels[0] if len(labels) == 1 else "; ".join(f"{letter}: {label}" for letter, label in
                                                         zip("ABCDEFGH", labels, strict=False))


def _legend_below(fig: Figure, axes: Sequence) -> None:
    """One legend for every panel, below them (outside the data); a label drawn in several panels once."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncols=min(5, len(handles)),
                   fontsize=8, frameon=False)


def metric_panels(panels: Sequence[Panel], path: Path, title: str | None = None) -> Path:
    """Side-by-side panels of mean +- std against x (Figures 6, 7, 8, 9, 12, 13)."""
    if not panels or not any(p.series for p in panels):
        raise ValueError("metric_panels: nothing to draw; expected at least one series")
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        for label, points in panel.series.items():
            pts = sorted(points)
            if not pts:
                continue
            xs, means, stds = zip(*pts, strict=True)
            color = METHOD_COLORS.get(label)
            ax.errorbar(xs, means, yerr=[0 if s != s else s for s in stds], label=label, color=color, marker="o",
                        markersize=4, capsize=3, linewidth=1.4)
        for label, (mean, std) in panel.references.items():
            color = METHOD_COLORS.get(label, "black")
            ax.axhline(mean, color=color, linestyle="--", linewidth=1.0, label=f"{label}")
            if std == std and std > 0:
                ax.axhspan(mean - std, mean + std, color=color, alpha=0.12)
        if panel.logx:
            ax.set_xscale("log", base=2)
        if panel.logy:
            ax.set_yscale("log")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
    _legend_below(fig, axes)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def curve_panels(panels: Sequence[Panel], path: Path, title: str | None = None) -> Path:
    """Side-by-side panels of lines with a +-std band against x (training curves; x on a log10 axis when logx),
    panels lettered A, B, ... and one legend below them all."""
    if not panels or not any(any(pts for pts in p.series.values()) for p in panels):
        raise ValueError("curve_panels: nothing to draw; expected at least one series with points")
    fig, axes = _figure(len(panels))
    fallback = iter(["#2ca02c", "#8c564b", "#e377c2", "#17becf", "#bcbd22"])
    colors: dict[str, str] = {}
    for ax, panel in zip(axes, panels, strict=True):
        for label, points in panel.series.items():
            pts = sorted(points)
            if not pts:
                continue
            color = colors.setdefault(label, METHOD_COLORS.get(label) or next(fallback, None))
            xs, means, stds = (list(v) for v in zip(*pts, strict=True))
            ax.plot(xs, means, color=color, marker="o", markersize=3, linewidth=1.4, label=label)
            lo = [m - (0 if s != s else s) for m, s in zip(means, stds, strict=True)]
            hi = [m + (0 if s != s else s) for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
        if panel.logx:
            ax.set_xscale("log")
        if panel.logy:
            ax.set_yscale("log")
        ax.set_xlabel(panel.xlabel)
        ax.set_ylabel(panel.ylabel)
    _legend_below(fig, axes)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def dead_vs_erank(points: Sequence[Mapping], path: Path, title: str | None = None) -> Path:
    """Figure 5: dead-feature fraction per layer (A) and against the site's effective rank (B).
    Each point: site, layer, kind, effective_rank, train_dead_fraction."""
    if not points:
        raise ValueError("dead_vs_erank: no points; expected one per sweep site")
    fig, (left, right) = _figure(2)
    for kind in sorted({p["kind"] for p in points}):
        pts = sorted((p for p in points if p["kind"] == kind), key=lambda p: p["layer"])
        color = KIND_COLORS.get(kind, "black")
        left.plot([p["layer"] for p in pts], [p["train_dead_fraction"] for p in pts], marker="o", color=color,
                  label=kind_label(kind))
        right.scatter([p["effective_rank"] for p in pts], [p["train_dead_fraction"] for p in pts], color=color,
                      label=kind_label(kind))
    left.set_xlabel("layer")
    right.set_xlabel("effective rank of the site")
    for ax in (left, right):
        ax.set_ylabel("dead-feature fraction")
    _legend_below(fig, (left,))
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def grouped_bars(groups: Mapping[str, Mapping[str, tuple[float, float]]], ylabel: str, path: Path,
                 title: str | None = None) -> Path:
    """Bars of mean +- std: groups (x positions) of series (bars), e.g. metrics of Lorsa inits (Figure 9)."""
    if not groups:
        raise ValueError("grouped_bars: no groups")
    fig, (ax,) = _figure(1)
    names = list(dict.fromkeys(s for g in groups.values() for s in g))
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        vals = [g.get(name, (float("nan"), 0.0)) for g in groups.values()]
        ax.bar(xs, [v[0] for v in vals], width, yerr=[v[1] for v in vals], capsize=3, label=name,
               color=METHOD_COLORS.get(name))
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylabel(ylabel)
    fig.legend(loc="outside right upper", fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def _mean_band(runs: Sequence[Sequence[tuple[float, float]]]) -> list[tuple[float, float, float]]:
    """(x, mean, std) at each x every run has (std 0 for one run)."""
    by_x: dict[float, list[float]] = {}
    for points in runs:
        for x, y in points:
            by_x.setdefault(x, []).append(y)
    out = []
    for x, ys in sorted(by_x.items()):
        if len(ys) == len(runs):
            mean = sum(ys) / len(ys)
            std = (sum((y - mean) ** 2 for y in ys) / (len(ys) - 1)) ** 0.5 if len(ys) > 1 else 0.0
            out.append((x, mean, std))
    return out


def training_curve(runs: Sequence[tuple[Sequence[Mapping], Sequence[Mapping], int]], path: Path,
                   title: str | None = None) -> Path:
    """The training curves of one cell (its runs over seeds: (metrics.jsonl rows, curve.jsonl rows, features)
    each) against training tokens, mean and a +-std band over the runs: A, the FVU (on the held-out tokens, from
    curve.jsonl; of the training batches, from metrics.jsonl); B, the dead fraction (not fired in the training
    window, from metrics.jsonl once a run has seen a whole window; never firing on the held-out tokens, from
    curve.jsonl). One legend below the panels."""
    if not runs:
        raise ValueError("training_curve: no runs")
    windows = {r.get("dead_window_tokens") for train, _, _ in runs for r in train if r.get("dead_window_tokens")}
    window = max(windows) if windows else None
    series = {
        "FVU": {
            "training batches": _mean_band([[(r["tokens"], r["fvu"]) for r in train if r.get("fvu") is not None]
                                            for train, _, _ in runs]),
            "held-out tokens": _mean_band([[(r["tokens"], r["fvu"]) for r in curve if r.get("fvu") is not None]
                                           for _, curve, _ in runs]),
        },
        "dead fraction": {
            (f"training window ({window:,} tokens)" if window else "training window"):
                _mean_band([[(r["tokens"], r["dead"] / n) for r in train
                             if r.get("dead") is not None and (window is None or r["tokens"] >= window)]
                            for train, _, n in runs]),
            "held-out tokens": _mean_band([[(r["tokens"], r["eval_dead"] / n) for r in curve
                                            if r.get("eval_dead") is not None] for _, curve, n in runs]),
        },
    }
    if not any(pts for panel in series.values() for pts in panel.values()):
        raise ValueError("training_curve: no logged points (metrics.jsonl and curve.jsonl are empty or missing)")
    fig, axes = _figure(2)
    for ax, (ylabel, lines) in zip(axes, series.items(), strict=True):
        for (label, pts), color in zip(lines.items(), ("#7f7f7f", "#d62728"), strict=True):
            if not pts:
                continue
            xs, means, stds = (list(v) for v in zip(*pts, strict=True))
            ax.plot(xs, means, color=color, marker="o", markersize=3, linewidth=1.4, label=label)
            ax.fill_between(xs, [m - s for m, s in zip(means, stds, strict=True)],
                            [m + s for m, s in zip(means, stds, strict=True)], color=color, alpha=0.15, linewidth=0)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(ylabel)
    _legend_below(fig, axes)
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)
