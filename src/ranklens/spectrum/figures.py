"""Figures of the spectrum analysis (paper Section 4 and Appendix D), as pure functions: records in, PNG path out.

A *record* is one entry of ``spectrum.json``'s ``records`` list (one activation site): ``site``, ``layer``, ``kind``,
``d``, ``effective_rank``, ``erank_fraction``, ``singular_values`` and optionally ``loss_recovered`` and
``wo_decomposition``. Each function checks that its input can make the figure and raises ``ValueError`` naming what
is missing otherwise; the caller decides which figures to draw.

Figures are ``matplotlib.figure.Figure`` objects rendered by the Agg canvas, never created through ``pyplot``: no
global backend is switched and no figure is kept alive by pyplot's registry (nothing to close, nothing leaks when
called in a loop or a notebook). Each PNG is written at 120 dpi through a temporary file and a rename, so a figure on
disk is always complete.
"""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

from ranklens.report.plots import KIND_COLORS, KIND_ORDER, PathLike, kind_label, ordered_kinds, save_figure

__all__ = [
    "compare_bars",
    "erank_by_layer",
    "erank_z_vs_o",
    "loss_recovered_curves",
    "singular_spectra",
    "wo_decomposition",
]

Record = Mapping[str, Any]

_OTHER_COLOR = "#555555"
# Figure 4: O = Z W^O is red, the factors purple (Z) and blue (W^O).
_DECOMP_COLORS = {"var_O": "#d62728", "contrib_Z": "#8e44ad", "contrib_WO": "#1f77b4"}




# --------------------------------------------------------------------------- input checks


def _require_records(records: Any, what: str) -> list[Record]:
    if records is None or isinstance(records, str | bytes | Mapping) or not isinstance(records, Sequence):
        raise ValueError(f"{what}: expected a list of spectrum records, got {type(records).__name__}")
    recs = list(records)
    if not recs:
        raise ValueError(f"{what}: no records given; expected at least one spectrum record")
    for i, r in enumerate(recs):
        if not isinstance(r, Mapping):
            raise ValueError(f"{what}: record {i} is a {type(r).__name__}; expected a dict from spectrum.json")
    return recs


def _site(r: Record) -> str:
    return str(r.get("site") or f"L{r.get('layer', '?')}.{r.get('kind', '?')}")


def _kind(r: Record, what: str) -> str:
    kind = r.get("kind")
    if not kind:
        m = re.fullmatch(r"L\d+\.(\w+)", str(r.get("site", "")))
        if not m:
            raise ValueError(f"{what}: record {_site(r)} has no 'kind'; expected one of {KIND_ORDER}")
        kind = m.group(1)
    return str(kind)


def _layer(r: Record, what: str) -> int:
    layer = r.get("layer")
    if layer is None:
        m = re.fullmatch(r"L(\d+)\.\w+", str(r.get("site", "")))
        if not m:
            raise ValueError(f"{what}: record {_site(r)} has no 'layer'; expected an int")
        layer = m.group(1)
    return int(layer)


def _number(r: Record, key: str, what: str) -> float:
    value = r.get(key)
    if value is None or isinstance(value, bool):
        raise ValueError(f"{what}: record {_site(r)} has no numeric '{key}'")
    return float(value)


def _vector(values: Any, name: str, what: str) -> np.ndarray:
    if values is None or isinstance(values, str | bytes) or len(values) == 0:
        raise ValueError(f"{what}: '{name}' is missing or empty; expected a list of floats")
    return np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)


def _positive_or_nan(x: np.ndarray) -> np.ndarray:
    """For log axes: non-positive values (numerical zeros) become NaN, i.e. gaps instead of -inf."""
    out = x.copy()
    out[~(out > 0)] = np.nan
    return out




def _color(kind: str) -> str:
    return KIND_COLORS.get(kind, _OTHER_COLOR)


def _line_style(kind: str) -> dict[str, Any]:
    prominent = kind == "attn_out"
    return {
        "color": _color(kind),
        "linewidth": 2.6 if prominent else 1.5,
        "marker": "o",
        "markersize": 4.5 if prominent else 3.2,
        "zorder": 3 if prominent else 2,
    }


# --------------------------------------------------------------------------- drawing helpers


def _new_figure(size: tuple[float, float] = (9.0, 4.4)) -> tuple[Figure, Any]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.grid(True, which="major", alpha=0.3, linewidth=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    return fig, ax


def _common_layer(recs: list[Record], what: str) -> int | None:
    """The layer all records share, or None (records from several layers, or without one)."""
    try:
        layers = {_layer(r, what) for r in recs}
    except ValueError:
        return None
    return layers.pop() if len(layers) == 1 else None


def _curve_label(r: Record, same_layer: bool, what: str) -> str:
    kind = _kind(r, what)
    return kind_label(kind) if same_layer else f"{_site(r)} ({kind_label(kind)})"


def _legend_outside(ax: Any, *handles_labels: Any) -> None:
    """The legend to the right of the axes, off the data (constrained layout makes room for it)."""
    ax.figure.legend(*(handles_labels or ax.get_legend_handles_labels()), loc="outside right upper", fontsize=8,
                     frameon=False)


# --------------------------------------------------------------------------- Figure 2 (left)


def erank_by_layer(records: Sequence[Record], path: PathLike, title: str | None = None) -> Path:
    """Effective rank fraction (erank / d) per layer, one line per site kind (paper Figure 2, left)."""
    what = "erank_by_layer"
    recs = _require_records(records, what)
    series: dict[str, dict[int, float]] = {}
    for r in recs:
        kind, layer = _kind(r, what), _layer(r, what)
        per_layer = series.setdefault(kind, {})
        if layer in per_layer:
            raise ValueError(f"{what}: two records for layer {layer}, kind {kind}; expected one per site")
        per_layer[layer] = _number(r, "erank_fraction", what)
    fig, ax = _new_figure()
    for kind in ordered_kinds(series):
        layers = sorted(series[kind])
        ax.plot(layers, [series[kind][x] for x in layers], label=kind_label(kind), **_line_style(kind))
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank / d")
    ax.set_ylim(0, 1.02)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title or "Fraction of effective rank across layers")
    _legend_outside(ax)  # lines span the width
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Figure 2 (middle, right)


def compare_bars(groups: Mapping[str, Sequence[Record]], path: PathLike, title: str | None = None) -> Path:
    """Grouped bars of the effective rank fraction: one group per label (model, corpus), one bar per kind
    (paper Figure 2, middle and right). Each group holds at most one record per kind (one layer)."""
    what = "compare_bars"
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"{what}: expected a non-empty dict of label -> records, got {groups!r:.80}")
    values: dict[str, dict[str, float]] = {}
    for label, recs in groups.items():
        recs = _require_records(recs, f"{what} (group {label!r})")
        per_kind: dict[str, float] = {}
        for r in recs:
            kind = _kind(r, what)
            if kind in per_kind:
                raise ValueError(f"{what}: group {label!r} has two records of kind {kind}; expected one layer per group")
            per_kind[kind] = _number(r, "erank_fraction", what)
        values[str(label)] = per_kind
    kinds = ordered_kinds({k for v in values.values() for k in v})
    labels = list(values)
    width = 0.8 / len(kinds)
    annotate = len(labels) * len(kinds) <= 40
    fig, ax = _new_figure((min(14.0, max(8.0, 4.0 + 0.45 * len(labels) * len(kinds))), 4.4))
    ax.grid(False, axis="x")
    top = 0.0
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i, lab in enumerate(labels) if kind in values[lab]]
        ys = [values[lab][kind] for lab in labels if kind in values[lab]]
        top = max([top, *ys])
        bars = ax.bar(xs, ys, width * 0.92, color=_color(kind), label=kind_label(kind), zorder=3,
                      edgecolor="black" if kind == "attn_out" else "none", linewidth=0.8)
        if annotate:
            ax.bar_label(bars, labels=[f"{y:.2f}" for y in ys], fontsize=7, padding=1.5)
    ax.set_xticks(range(len(labels)), [textwrap.fill(lab, 18) for lab in labels])
    ax.set_ylabel("effective rank / d")
    ax.set_ylim(0, max(1.1, top + 0.08))
    ax.set_title(title or "Fraction of effective rank by setting")
    _legend_outside(ax)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Figure 3a


def singular_spectra(records: Sequence[Record], path: PathLike, title: str | None = None) -> Path:
    """Relative singular values s_k / s_1 (log scale) against k / d, one curve per record (paper Figure 3a,
    Figure 10), with the 1% threshold of Section 4.3 as a dashed line."""
    what = "singular_spectra"
    recs = _require_records(records, what)
    layer = _common_layer(recs, what)
    fig, ax = _new_figure()
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    for r in sorted(recs, key=lambda r: (order.get(_kind(r, what), 99), _site(r))):
        s = _vector(r.get("singular_values"), f"{_site(r)}.singular_values", what)
        top = np.nanmax(s) if np.isfinite(s).any() else float("nan")
        if not top > 0:
            raise ValueError(f"{what}: record {_site(r)} has no positive singular value; cannot normalize")
        d = len(s)
        x = np.arange(1, d + 1) / d
        kind = _kind(r, what)
        label = _curve_label(r, layer is not None, what)
        frac = r.get("frac_sv_above_1pct")
        if frac is not None:
            label += f": {100 * float(frac):.1f}% above 1%"
        style = _line_style(kind)
        style.pop("marker")
        style.pop("markersize")
        ax.plot(x, _positive_or_nan(s / top), label=label, **style)
    ax.axhline(1e-2, color="black", linestyle="--", linewidth=1.0, label="1% of the largest")
    ax.set_yscale("log")
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("component index / d")
    ax.set_ylabel("singular value / largest")
    ax.set_title(title or ("Singular value spectra" + (f", layer {layer}" if layer is not None else "")))
    _legend_outside(ax)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Figure 3b


def _target(lr: Mapping[str, Any]) -> float:
    """The recovery target of a loss_recovered entry (``target``, 0.99 when absent, as in the paper)."""
    return float(lr.get("target") or 0.99)


def _pct_label(x: float) -> str:
    return f"{100 * x:g}%"


def _n99(lr: Mapping[str, Any], n: np.ndarray, frac: np.ndarray) -> int | None:
    if "n_99" in lr:
        return None if lr["n_99"] is None else int(lr["n_99"])
    reached = np.nonzero(frac >= _target(lr))[0]
    return int(n[reached[0]]) if len(reached) else None


def loss_recovered_curves(records: Sequence[Record], path: PathLike, title: str | None = None) -> Path:
    """Fraction of LM loss recovered by the top-n singular components against n / d (paper Figure 3b, App. B),
    with the 99% line (the entry's ``target`` if given) and each curve's ``n_99`` marked by a star. Records without
    ``loss_recovered`` are skipped."""
    what = "loss_recovered_curves"
    recs = [r for r in _require_records(records, what) if r.get("loss_recovered")]
    if not recs:
        raise ValueError(f"{what}: none of the {len(records)} records has a 'loss_recovered' entry")
    layer = _common_layer(recs, what)
    fig, ax = _new_figure()
    lows, highs, targets = [], [], set()
    for r in recs:
        lr = r["loss_recovered"]
        n = _vector(lr.get("n"), f"{_site(r)}.loss_recovered.n", what)
        frac = _vector(lr.get("fraction"), f"{_site(r)}.loss_recovered.fraction", what)
        if len(n) != len(frac):
            raise ValueError(f"{what}: {_site(r)}: loss_recovered has {len(n)} n and {len(frac)} fractions; expected equal")
        d = float(r.get("d") or (np.nanmax(n) if np.isfinite(n).any() else 0))
        if not d > 0:
            raise ValueError(f"{what}: record {_site(r)} has no positive 'd'")
        kind = _kind(r, what)
        style = _line_style(kind)
        style["markersize"] = 3.0
        n99, target = _n99(lr, n, frac), _target(lr)
        targets.add(target)
        label = _curve_label(r, layer is not None, what)
        label += (f": {_pct_label(target)} at {100 * n99 / d:.1f}% of d (n={n99})" if n99 is not None
                  else f": {_pct_label(target)} not reached")
        ax.plot(n / d, frac, label=label, **style)
        if n99 is not None:
            y99 = float(np.interp(n99, n, frac))
            ax.plot([n99 / d], [y99], marker="*", markersize=13, color=_color(kind), markeredgecolor="black",
                    markeredgewidth=0.7, linestyle="none", zorder=5, clip_on=False)
        lows.append(np.nanmin(frac))
        highs.append(np.nanmax(frac))
    for target in sorted(targets):
        ax.axhline(target, color="black", linestyle="--", linewidth=1.0, label=f"{_pct_label(target)} recovered")
    bottom = min(0.0, min(lows)) - 0.03
    ax.set_ylim(max(bottom, -1.0), max(1.03, max(highs) + 0.02))
    ax.set_xlim(0, 1.0)
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("kept singular components / d")
    ax.set_ylabel("fraction of loss recovered")
    ax.set_title(title or ("Fraction of loss recovered" + (f", layer {layer}" if layer is not None else "")))
    _legend_outside(ax)
    if bottom < -1.0:
        ax.text(0.01, 0.01, "y axis clipped at -1", transform=ax.transAxes, fontsize=7, color="#555555")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Figure 4


def wo_decomposition(record: Record, path: PathLike, title: str | None = None) -> Path:
    """Variance of the attention output O = Z W^O along its principal directions, split into the contribution of
    Z, Var(Z v_hat), and of W^O, ||v||^2 with v = W^O e (paper Figure 4): red = O = product of purple and blue."""
    what = "wo_decomposition"
    if not isinstance(record, Mapping):
        raise ValueError(f"{what}: expected one spectrum record (a dict), got {type(record).__name__}")
    dec = record.get("wo_decomposition")
    if not dec:
        raise ValueError(f"{what}: record {_site(record)} has no 'wo_decomposition' entry")
    series = {k: _vector(dec.get(k), f"wo_decomposition.{k}", what) for k in ("var_O", "contrib_Z", "contrib_WO")}
    lengths = {k: len(v) for k, v in series.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{what}: {_site(record)}: var_O, contrib_Z, contrib_WO differ in length {lengths}")
    x = np.arange(1, len(series["var_O"]) + 1)
    labels = {
        "var_O": r"O: $\mathrm{Var}(O\hat{e})$ (product)",
        "contrib_Z": r"contribution of Z: $\mathrm{Var}(Z\hat{v})$",
        "contrib_WO": r"contribution of $W^O$: $\Vert v\Vert^2$, $v = W^O\hat{e}$",
    }
    fig, ax = _new_figure()
    for key in ("contrib_Z", "contrib_WO", "var_O"):
        ax.plot(x, _positive_or_nan(series[key]), color=_DECOMP_COLORS[key], label=labels[key],
                linewidth=2.2 if key == "var_O" else 1.5, zorder=3 if key == "var_O" else 2)
    ax.set_yscale("log")
    ax.set_xlim(1, len(x))
    ax.set_xlabel(r"principal direction $\hat{e}$ of O (component index)")
    ax.set_ylabel("variance along the direction")
    ax.set_title(title or f"{_site(record)}: decomposition of the attention output spectrum")
    handles, labs = ax.get_legend_handles_labels()
    order = [labs.index(labels[k]) for k in ("var_O", "contrib_Z", "contrib_WO")]
    _legend_outside(ax, [handles[i] for i in order], [labs[i] for i in order])
    return save_figure(fig, path)


# --------------------------------------------------------------------------- Figure 11


def erank_z_vs_o(records: Sequence[Record], path: PathLike, title: str | None = None) -> Path:
    """Effective rank (absolute) of the concatenated head outputs Z (``attn_z``) and of the attention output
    (``attn_out``) per layer (paper Figure 11), with each space's dimension d as a dotted line."""
    what = "erank_z_vs_o"
    recs = _require_records(records, what)
    series: dict[str, dict[int, float]] = {"attn_z": {}, "attn_out": {}}
    dims: dict[str, set[int]] = {"attn_z": set(), "attn_out": set()}
    for r in recs:
        kind = _kind(r, what)
        if kind not in series:
            continue
        layer = _layer(r, what)
        if layer in series[kind]:
            raise ValueError(f"{what}: two records for layer {layer}, kind {kind}; expected one per site")
        series[kind][layer] = _number(r, "effective_rank", what)
        if r.get("d"):
            dims[kind].add(int(r["d"]))
    missing = [k for k, v in series.items() if not v]
    if missing:
        raise ValueError(f"{what}: no records of kind {' or '.join(missing)}; expected both attn_z and attn_out")
    fig, ax = _new_figure()
    for kind in ("attn_z", "attn_out"):
        layers = sorted(series[kind])
        ax.plot(layers, [series[kind][x] for x in layers], label=kind_label(kind), **_line_style(kind))
    all_dims = sorted(dims["attn_z"] | dims["attn_out"])
    for d in all_dims:
        owners = [k for k in ("attn_z", "attn_out") if d in dims[k]]
        color = _color(owners[0]) if len(owners) == 1 else "black"
        ax.axhline(d, color=color, linestyle=":", linewidth=1.0,
                   label=f"d = {d}" + ("" if len(owners) == 2 else f" ({kind_label(owners[0])})"))
    top = max([max(v.values()) for v in series.values()] + all_dims)
    ax.set_ylim(0, top * 1.08 if math.isfinite(top) and top > 0 else 1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("effective rank")
    ax.set_title(title or r"Effective rank of Z and of the attention output $O = Z W^O$")
    _legend_outside(ax)
    return save_figure(fig, path)
