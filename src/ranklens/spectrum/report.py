"""The HTML report of a ``ranklens spectrum`` run, built from its ``spectrum.json`` (paper Section 4, App. B, C, D).

``build_spectrum_report(result, out_dir)`` draws every figure the data allows into ``out_dir/figures/*.png`` and
writes ``out_dir/report.html``. Every sentence under "Findings" is computed from the numbers in ``result``:

- per layer, whether the attention output's effective rank fraction is below the MLP output's and the residual
  stream's (``resid_post``, else ``resid_pre``); fractions are compared, so sites of different width compare fairly;
- at the middle layer (``n_layers // 2``, else the closest analysed layer), the share of singular values above 1% of
  the largest and, when measured, the share of dimensions needed to recover 99% of the loss (Section 4.3);
- the split-to-split stability of the spectra (App. C), the W^O decomposition (Section 4.4) and comparisons with other
  models or corpora (Figure 2, middle and right) when present.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ranklens.errors import RanklensError
from ranklens.report.html import Report, format_number, software_versions
from ranklens.report.plots import KIND_ORDER, kind_label, ordered_kinds
from ranklens.spectrum import figures

__all__ = ["build_spectrum_report", "decomposition_summary"]

Record = Mapping[str, Any]
ByLayer = dict[int, dict[str, Record]]

_MAIN_KINDS = ("attn_out", "mlp_out", "resid")  # "resid" resolves to resid_post, else resid_pre
_HEAD_TAIL_SHARE = 0.10  # head / tail = first / last 10% of the W^O decomposition's directions


# --------------------------------------------------------------------------- entry point


def build_spectrum_report(result: dict, out_dir: Path) -> Path:
    """Draw the figures of a spectrum result into ``out_dir/figures`` and write ``out_dir/report.html``.

    ``result`` is the parsed ``spectrum.json`` (format ``ranklens.spectrum/1``). Optional parts (stability,
    loss_recovered, wo_decomposition, compare, config, command, timings) are reported when present and omitted
    otherwise. Returns the path of the report.
    """
    records = _check_result(result)
    out_dir = Path(out_dir)
    ctx = _Context(result, records, out_dir / "figures")
    rep = Report(_title(result))
    _section_overview(rep, ctx)
    _section_findings(rep, ctx)
    _section_layers(rep, ctx)
    _section_middle_layer(rep, ctx)
    _section_decomposition(rep, ctx)
    _section_stability(rep, ctx)
    _section_comparison(rep, ctx)
    _section_records(rep, ctx)
    _section_run(rep, ctx)
    return rep.write(out_dir / "report.html")


# --------------------------------------------------------------------------- input


def _check_result(result: Any) -> list[Record]:
    if not isinstance(result, Mapping):
        raise RanklensError(f"spectrum report: expected the parsed spectrum.json (a dict), got {type(result).__name__}")
    fmt = result.get("format")
    if fmt is not None and not str(fmt).startswith("ranklens.spectrum/"):
        raise RanklensError(f"spectrum report: format is {fmt!r}; expected 'ranklens.spectrum/1'")
    records = result.get("records")
    if not isinstance(records, list) or not records:
        raise RanklensError("spectrum report: the result has no records; expected a non-empty 'records' list")
    for i, r in enumerate(records):
        if not isinstance(r, Mapping) or "kind" not in r or "layer" not in r:
            raise RanklensError(f"spectrum report: record {i} lacks 'kind' or 'layer'; expected a spectrum record")
    return records


def _by_layer(records: Sequence[Record]) -> ByLayer:
    out: ByLayer = {}
    for r in records:
        if r.get("layer") is not None:
            out.setdefault(int(r["layer"]), {})[str(r["kind"])] = r
    return dict(sorted(out.items()))


def _resid_kind(by_layer: ByLayer) -> str | None:
    for kind in ("resid_post", "resid_pre"):
        if any(kind in kinds for kinds in by_layer.values()):
            return kind
    return None


def _middle_layer(n_layers: int | None, by_layer: ByLayer) -> tuple[int | None, str]:
    """(layer, note): ``n_layers // 2`` if analysed, else the closest analysed layer (ties: the lower)."""
    if not by_layer:
        return None, ""
    mid = int(n_layers) // 2 if n_layers else (max(by_layer) + 1) // 2
    if mid in by_layer:
        return mid, ""
    closest = min(by_layer, key=lambda layer: (abs(layer - mid), layer))
    return closest, f"The middle layer {mid} was not analysed; layer {closest} is the closest that was."


@dataclass
class _Context:
    result: Mapping[str, Any]
    records: list[Record]
    fig_dir: Path
    by_layer: ByLayer = field(init=False)
    resid: str | None = field(init=False)
    middle: int | None = field(init=False)
    middle_note: str = field(init=False)

    def __post_init__(self) -> None:
        self.by_layer = _by_layer(self.records)
        self.resid = _resid_kind(self.by_layer)
        self.middle, self.middle_note = _middle_layer(self.result.get("n_layers"), self.by_layer)

    def kind(self, k: str) -> str | None:
        return self.resid if k == "resid" else k

    def middle_records(self) -> list[Record]:
        return list(self.by_layer.get(self.middle, {}).values()) if self.middle is not None else []


def _title(result: Mapping[str, Any]) -> str:
    model = result.get("model", "unknown model")
    corpus = result.get("corpus", "unknown corpus")
    n = result.get("n_tokens")
    tokens = f", {format_number(n)} tokens" if n is not None else ""
    return f"Spectrum report: {model} on {corpus}{tokens}"


# --------------------------------------------------------------------------- computations


@dataclass
class _LayerComparison:
    other: str
    layers: list[int]
    lower: list[int]
    mean_attn: float
    mean_other: float

    @property
    def exceptions(self) -> list[int]:
        return [layer for layer in self.layers if layer not in self.lower]


def _compare_layers(by_layer: ByLayer, other: str | None) -> _LayerComparison | None:
    if other is None:
        return None
    pairs = [
        (layer, float(k["attn_out"]["erank_fraction"]), float(k[other]["erank_fraction"]))
        for layer, k in by_layer.items()
        if "attn_out" in k and other in k
    ]
    if not pairs:
        return None
    return _LayerComparison(
        other=other,
        layers=[p[0] for p in pairs],
        lower=[layer for layer, a, o in pairs if a < o],
        mean_attn=sum(p[1] for p in pairs) / len(pairs),
        mean_other=sum(p[2] for p in pairs) / len(pairs),
    )


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _frac_dims_99(r: Record) -> float | None:
    lr = r.get("loss_recovered") or {}
    if lr.get("frac_dims_99") is not None:
        return float(lr["frac_dims_99"])
    if lr.get("n_99") is not None and r.get("d"):
        return int(lr["n_99"]) / int(r["d"])
    return None


def _geo_mean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def decomposition_summary(dec: Mapping[str, Sequence[float]]) -> dict[str, Any] | None:
    """Geometric means of var_O, contrib_Z, contrib_WO over the head and the tail (first / last 10%) of the
    directions where all three are positive. var_O = contrib_Z * contrib_WO per direction, so the tail/head ratios
    multiply exactly: ratio_O = ratio_Z * ratio_WO, and log(ratio_WO) / log(ratio_O) is W^O's share of the drop."""
    keys = ("var_O", "contrib_Z", "contrib_WO")
    rows = [t for t in zip(*(dec.get(k) or [] for k in keys), strict=False) if all(v is not None and v > 0 for v in t)]
    m = len(dec.get("var_O") or [])
    if len(rows) < 2:
        return None
    size = max(1, round(_HEAD_TAIL_SHARE * len(rows)))
    head, tail = rows[:size], rows[-size:]
    out: dict[str, Any] = {"m": m, "n_used": len(rows), "size": size}
    for i, k in enumerate(keys):
        h, t = _geo_mean([r[i] for r in head]), _geo_mean([r[i] for r in tail])
        out[k] = {"head": h, "tail": t, "ratio": t / h}
    log_o = math.log(out["var_O"]["ratio"])
    out["wo_share"] = math.log(out["contrib_WO"]["ratio"]) / log_o if abs(log_o) > math.log(2) else None
    return out


# --------------------------------------------------------------------------- findings (sentences from numbers)


def _layer_finding(cmp_mlp: _LayerComparison | None, cmp_res: _LayerComparison | None) -> str:
    done = [(c, name) for c, name in ((cmp_mlp, "the MLP output"), (cmp_res, "the residual stream")) if c is not None]
    if not done:
        return ("No layer has both an attention output and an MLP output or residual stream record, "
                "so the per-layer comparison cannot be made.")
    parts = [
        f"than {name} at {len(c.lower)} of {len(c.layers)} layers "
        f"(mean erank fraction {c.mean_attn:.2f} vs {c.mean_other:.2f})"
        for c, name in done
    ]
    text = "The attention output has a lower effective rank " + " and ".join(parts) + "."
    for c, name in done:
        if c.exceptions and c.lower:
            shown = ", ".join(map(str, c.exceptions[:10])) + (", ..." if len(c.exceptions) > 10 else "")
            text += f" It is not lower than {name} at layer{'s' if len(c.exceptions) > 1 else ''} {shown}."
    return text


def _middle_sv_finding(ctx: _Context) -> str | None:
    recs = ctx.by_layer.get(ctx.middle, {})
    vals = [(kind_label(k), recs[k]["frac_sv_above_1pct"]) for k in map(ctx.kind, _MAIN_KINDS)
            if k in recs and recs[k].get("frac_sv_above_1pct") is not None]
    if not vals:
        return None
    first, rest = vals[0], vals[1:]
    text = f"At the middle layer ({ctx.middle}), {_pct(first[1])} of singular values exceed 1% of the largest in the {first[0]}"
    if rest:
        text += ", versus " + " and ".join(f"{_pct(v)} for the {name}" for name, v in rest)
    return text + "."


def _target_label(recs: Sequence[Record]) -> str:
    """The recovery target as a percentage ("99%"), from the loss_recovered entries (0.99 unless they say)."""
    targets = {float((r.get("loss_recovered") or {}).get("target") or 0.99) for r in recs if r.get("loss_recovered")}
    return "/".join(f"{100 * t:g}%" for t in sorted(targets)) or "99%"


def _middle_loss_finding(ctx: _Context) -> str | None:
    recs = ctx.by_layer.get(ctx.middle, {})
    target = _target_label(list(recs.values()))
    items = []
    for k in map(ctx.kind, _MAIN_KINDS):
        r = recs.get(k)
        if r is None or not r.get("loss_recovered"):
            continue
        frac = _frac_dims_99(r)
        if frac is None:
            n_max = max(r["loss_recovered"].get("n") or [0])
            items.append(f"the {kind_label(k)} does not reach {target} with up to {n_max} dimensions")
        else:
            lr = r["loss_recovered"]
            notes = [f"{lr['n_99']} of {r['d']}"] if lr.get("n_99") is not None and r.get("d") else []
            if lr.get("ce_zero") is not None and lr.get("ce_clean") is not None:
                notes.append(f"zero ablation costs {float(lr['ce_zero']) - float(lr['ce_clean']):.3g} nats")
            of = f" ({'; '.join(notes)})" if notes else ""
            items.append(f"the {kind_label(k)} needs {_pct(frac)} of its dimensions{of}")
    if not items:
        return None
    return (f"To recover {target} of the loss lost to zero ablation at layer {ctx.middle}, "
            + items[0] + ("; " + "; ".join(items[1:]) if items[1:] else "") + ".")


def _stability_finding(records: Sequence[Record]) -> str | None:
    stab = [(r, r["stability"]) for r in records if r.get("stability")]
    if not stab:
        return None
    worst_e = max(stab, key=lambda rs: _nan_low(rs[1].get("erank_cv")))
    worst_s = max(stab, key=lambda rs: _nan_low(rs[1].get("sv_cv_max")))
    splits = sorted({int(s.get("n_splits", 0)) for _, s in stab})
    return (
        f"Stability over {'/'.join(map(str, splits))} disjoint splits of the tokens (App. C), {len(stab)} sites: "
        f"the effective rank's coefficient of variation is at most {_sci(worst_e[1].get('erank_cv'))} "
        f"({worst_e[0]['site']}), and the largest CV of any singular value is {_sci(worst_s[1].get('sv_cv_max'))} "
        f"({worst_s[0]['site']})."
    )


def _nan_low(x: Any) -> float:
    return float(x) if x is not None and not math.isnan(float(x)) else -math.inf


def _sci(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.2e}"


def _decomposition_finding(r: Record, summary: Mapping[str, Any]) -> str:
    o, z, w = summary["var_O"]["ratio"], summary["contrib_Z"]["ratio"], summary["contrib_WO"]["ratio"]
    text = (
        f"{r['site']}: from the head to the tail of O's spectrum (first vs last {summary['size']} of "
        f"{summary['n_used']} directions, geometric means), Var(O e) changes by a factor of {_sci(o)}: "
        f"the contribution of W^O (||W^O e||^2) by {_sci(w)} and the contribution of Z by {_sci(z)}"
    )
    if summary["wo_share"] is not None:
        text += f"; W^O accounts for {_pct(summary['wo_share'])} of the drop on a log scale"
    return text + "."


def _comparison_finding(groups: Mapping[str, list[Record]]) -> str | None:
    lowest = []
    for label, recs in groups.items():
        fr = {str(r["kind"]): float(r["erank_fraction"]) for r in recs}
        resid = "resid_post" if "resid_post" in fr else "resid_pre"
        others = [fr[k] for k in ("mlp_out", resid) if k in fr]
        if "attn_out" in fr and others:
            lowest.append((label, fr["attn_out"] < min(others)))
    if not lowest:
        return None
    n_yes = sum(ok for _, ok in lowest)
    text = (f"At the middle layer, the attention output has a lower effective rank fraction than both the MLP output "
            f"and the residual stream in {n_yes} of {len(lowest)} settings")
    misses = [label for label, ok in lowest if not ok]
    return text + (f" (not in: {', '.join(misses)})" if misses and n_yes else "") + "."


# --------------------------------------------------------------------------- figures


def _erank_caption(recs: Sequence[Record]) -> str:
    parts = [f"{kind_label(str(r['kind']))} {format_number(float(r['effective_rank']))}"
             for r in recs if r.get("effective_rank") is not None and r["kind"] in ("attn_out", "mlp_out", "resid_post", "resid_pre")]
    return ("Effective rank: " + "; ".join(parts) + ".") if parts else ""


# --------------------------------------------------------------------------- sections


def _section_overview(rep: Report, ctx: _Context) -> None:
    res = ctx.result
    kinds = sorted({str(r["kind"]) for r in ctx.records}, key=lambda k: KIND_ORDER.index(k)
                   if k in KIND_ORDER else 99)
    overview = {
        "model": res.get("model"),
        "family": res.get("family"),
        "corpus": res.get("corpus"),
        "layers": res.get("n_layers"),
        "d_model": res.get("d_model"),
        "model dtype": res.get("model_dtype"),
        "tokens": res.get("n_tokens"),
        "sites analysed": len(ctx.records),
        "layers analysed": len(ctx.by_layer),
        "kinds": ", ".join(kinds),
    }
    rep.key_values({k: v for k, v in overview.items() if v is not None}, caption="Run")
    rep.paragraph(
        "Effective rank (Roy & Vetterli): with s the singular values of the mean-centered activations and "
        "p = s / sum(s), erank = exp(-sum p log p); the fraction is erank / d (paper Section 4.1)."
    )


def _section_findings(rep: Report, ctx: _Context) -> None:
    rep.heading("Findings")
    cmp_mlp = _compare_layers(ctx.by_layer, "mlp_out")
    cmp_res = _compare_layers(ctx.by_layer, ctx.resid)
    lines = [_layer_finding(cmp_mlp, cmp_res)]
    if ctx.middle_note:
        lines.append(ctx.middle_note)
    lines += [_middle_sv_finding(ctx), _middle_loss_finding(ctx), _stability_finding(ctx.records)]
    for r in _decomposition_records(ctx):
        summary = decomposition_summary(r["wo_decomposition"])
        if summary is not None:
            lines.append(_decomposition_finding(r, summary))
    groups = _comparison_groups(ctx)
    if groups:
        lines.append(_comparison_finding(groups))
    rep.bullets([line for line in lines if line])


def _section_layers(rep: Report, ctx: _Context) -> None:
    rep.heading("Effective rank across layers")
    model, corpus = ctx.result.get("model", "?"), ctx.result.get("corpus", "?")
    rep.add_figure(figures.erank_by_layer, (ctx.records,), ctx.fig_dir / "erank_by_layer.png",
                f"Fraction of effective rank (erank / d) per layer and site kind, {model} on {corpus} "
                "(cf. paper Figure 2, left).")
    kinds = {str(r["kind"]) for r in ctx.records}
    if {"attn_z", "attn_out"} <= kinds:
        rep.add_figure(figures.erank_z_vs_o, (ctx.records,), ctx.fig_dir / "erank_z_vs_o.png",
                    "Effective rank of the concatenated head outputs Z and of the attention output O = Z W^O per "
                    "layer; dotted: the dimension d (cf. paper Figure 11).")
    _layer_table(rep, ctx)


def _layer_table(rep: Report, ctx: _Context) -> None:
    cols = [k for k in ("attn_out", "mlp_out", ctx.resid) if k and any(k in v for v in ctx.by_layer.values())]
    if "attn_out" not in cols or len(cols) < 2:
        return
    headers = ["layer"] + [f"{kind_label(k)} (fraction)" for k in cols]
    headers += [f"attention < {kind_label(k)}" for k in cols[1:]]
    rows = []
    for layer, recs in ctx.by_layer.items():
        fr = {k: float(recs[k]["erank_fraction"]) if k in recs else None for k in cols}
        lower = ["yes" if fr[k] is not None and fr["attn_out"] is not None and fr["attn_out"] < fr[k]
                 else ("no" if fr[k] is not None and fr["attn_out"] is not None else None) for k in cols[1:]]
        rows.append([layer] + [fr[k] for k in cols] + lower)
    rep.table(headers, rows, caption="Effective rank fraction per layer", number_format=".3f")


def _section_middle_layer(rep: Report, ctx: _Context) -> None:
    recs = ctx.middle_records()
    if not recs:
        return
    rep.heading(f"Middle layer ({ctx.middle})")
    if ctx.middle_note:
        rep.paragraph(ctx.middle_note)
    with_sv = [r for r in recs if r.get("singular_values")]
    if with_sv:
        rep.add_figure(figures.singular_spectra, (with_sv,), ctx.fig_dir / f"singular_spectra_L{ctx.middle}.png",
                    f"Singular values relative to the largest at layer {ctx.middle}; dashed: 1% of the largest "
                    f"(cf. paper Figure 3a). {_erank_caption(with_sv)}")
    if any(r.get("loss_recovered") for r in recs):
        rep.add_figure(figures.loss_recovered_curves, (recs,), ctx.fig_dir / f"loss_recovered_L{ctx.middle}.png",
                    "Fraction of the loss lost to zero ablation that is recovered when the activation is replaced by "
                    "its mean plus its projection on the top-n singular directions; stars: the smallest n that reaches "
                    f"{_target_label(recs)} (cf. paper Figure 3b, App. B).")
    _middle_table(rep, ctx, recs)


def _middle_table(rep: Report, ctx: _Context, recs: Sequence[Record]) -> None:
    has_lr = any(r.get("loss_recovered") for r in recs)
    target = _target_label(recs)
    headers = ["site", "d", "effective rank", "erank fraction", "share of s > 1% of max"]
    if has_lr:
        headers += [f"n for {target} loss", f"share of d for {target}", "CE clean", "CE zero"]
    rows = []
    for r in _sorted(recs):
        row = [r["site"], r.get("d"), r.get("effective_rank"), r.get("erank_fraction"), r.get("frac_sv_above_1pct")]
        if has_lr:
            lr = r.get("loss_recovered") or {}
            row += [lr.get("n_99"), _frac_dims_99(r), lr.get("ce_clean"), lr.get("ce_zero")]
        rows.append(row)
    rep.table(headers, rows, caption=f"Layer {ctx.middle}", number_format={
        "share of s > 1% of max": _pct, **({f"share of d for {target}": _pct} if has_lr else {})})


def _decomposition_records(ctx: _Context) -> list[Record]:
    return _sorted([r for r in ctx.records if r.get("wo_decomposition")])


def _section_decomposition(rep: Report, ctx: _Context) -> None:
    recs = _decomposition_records(ctx)
    if not recs:
        return
    rep.heading("Where the attention output's low rank comes from: W^O")
    rep.paragraph(
        "For each principal direction e of O = Z W^O, Var(O e) = Var(Z v_hat) * ||v||^2 with v = W^O e: the "
        "contribution of Z and the contribution of W^O (paper Section 4.4)."
    )
    rows = []
    for r in recs:
        rep.add_figure(figures.wo_decomposition, (r,), ctx.fig_dir / f"wo_decomposition_L{r['layer']}.png",
                    f"{r['site']}: variance of O along its principal directions (red) = contribution of Z (purple) "
                    "x contribution of W^O (blue), log scale (cf. paper Figure 4).")
        s = decomposition_summary(r["wo_decomposition"])
        if s is not None:
            rows.append([r["site"], s["size"], s["var_O"]["ratio"], s["contrib_Z"]["ratio"], s["contrib_WO"]["ratio"],
                         s["wo_share"]])
    if rows:
        rep.table(["site", "directions per end", "tail/head Var(O e)", "tail/head contrib. Z",
                   "tail/head contrib. W^O", "W^O share of log drop"], rows,
                  caption="Tail vs head of the spectrum (geometric means over the first and last 10% of directions)",
                  number_format={"W^O share of log drop": _pct})


def _section_stability(rep: Report, ctx: _Context) -> None:
    recs = _sorted([r for r in ctx.records if r.get("stability")])
    if not recs:
        return
    rep.heading("Stability across token splits")
    rows = [[r["site"], s.get("n_splits"), s.get("erank_mean"), s.get("erank_std"), s.get("erank_cv"),
             s.get("sv_cv_max"), s.get("sv_cv_mean")] for r in recs for s in [r["stability"]]]
    rep.table(["site", "splits", "erank mean", "erank std", "erank CV", "max CV of s_k", "mean CV of s_k"], rows,
              caption="Spectra recomputed on disjoint splits of the tokens (cf. paper App. C: CV of erank 1.5e-4, "
              "max CV of singular values 4.9e-3 on 10M tokens per split)",
              number_format={"erank CV": ".2e", "max CV of s_k": ".2e", "mean CV of s_k": ".2e"})


def _comparison_groups(ctx: _Context) -> dict[str, list[Record]]:
    compare = ctx.result.get("compare") or []
    if not compare:
        return {}
    main = f"{ctx.result.get('model', '?')} / {ctx.result.get('corpus', '?')}"
    groups = {main: ctx.middle_records()} if ctx.middle_records() else {}
    for i, c in enumerate(compare):
        recs = [r for r in (c.get("records") or []) if isinstance(r, Mapping) and "kind" in r and "layer" in r]
        by_layer = _by_layer(recs)
        n_layers = c.get("n_layers") or (ctx.result.get("n_layers") if c.get("model") == ctx.result.get("model") else None)
        layer, _ = _middle_layer(n_layers, by_layer)
        if layer is not None:
            groups[str(c.get("label") or f"comparison {i + 1}")] = list(by_layer[layer].values())
    return groups if len(groups) > 1 else {}


def _section_comparison(rep: Report, ctx: _Context) -> None:
    groups = _comparison_groups(ctx)
    if not groups:
        return
    rep.heading("Comparison across models and corpora")
    rep.add_figure(figures.compare_bars, (groups,), ctx.fig_dir / "compare_middle_layer.png",
                "Fraction of effective rank at the middle layer of each setting (cf. paper Figure 2, middle and right).")
    kinds = ordered_kinds({str(r["kind"]) for recs in groups.values() for r in recs})
    info = {str(c.get("label")): c for c in ctx.result.get("compare") or []}
    rows = []
    for label, recs in groups.items():
        c = info.get(label, ctx.result)
        fr = {str(r["kind"]): r.get("erank_fraction") for r in recs}
        rows.append([label, c.get("model"), c.get("corpus"), int(recs[0]["layer"])] + [fr.get(k) for k in kinds])
    rep.table(["setting", "model", "corpus", "layer"] + [kind_label(k) for k in kinds], rows,
              caption="Effective rank fraction at the middle layer", number_format=".3f")


def _section_records(rep: Report, ctx: _Context) -> None:
    rep.heading("All sites")
    has_lr = any(r.get("loss_recovered") for r in ctx.records)
    has_excl = any(r.get("n_excluded") for r in ctx.records)
    headers = ["site", "d", "tokens", "effective rank", "erank fraction", "share of s > 1% of max"]
    headers += [f"n for {_target_label(ctx.records)} loss"] if has_lr else []
    headers += ["excluded (outliers)"] if has_excl else []
    rows = []
    for r in _sorted(ctx.records):
        row = [r.get("site"), r.get("d"), r.get("n_tokens"), r.get("effective_rank"), r.get("erank_fraction"),
               r.get("frac_sv_above_1pct")]
        row += [(r.get("loss_recovered") or {}).get("n_99")] if has_lr else []
        row += [r.get("n_excluded")] if has_excl else []
        rows.append(row)
    rep.table(headers, rows, number_format={"share of s > 1% of max": _pct})


def _section_run(rep: Report, ctx: _Context) -> None:
    res = ctx.result
    rep.heading("Run details")
    if res.get("command"):
        rep.heading("Command", level=3)
        rep.code(str(res["command"]))
    if res.get("config"):
        rep.heading("Resolved config", level=3)
        rep.code(_yaml(res["config"]))
    timings = res.get("timings") or {}
    if timings:
        rows = [[str(k), float(v)] for k, v in timings.items() if v is not None]
        rows.append(["total", sum(v for _, v in rows)])
        rep.table(["step", "seconds"], rows, caption="Timings", number_format=".1f")
    if res.get("software"):
        rep.key_values(res["software"], caption="Software (recorded by the run)")
    rep.key_values(software_versions(), caption="Software (when this report was made)")


def _yaml(config: Any) -> str:
    try:
        import yaml

        return yaml.safe_dump(config, sort_keys=False, default_flow_style=False, allow_unicode=True).rstrip()
    except Exception:  # not plain data: fall back to JSON with str() for the rest
        import json

        return json.dumps(config, indent=2, default=str)


def _sorted(records: Sequence[Record]) -> list[Record]:
    order = {k: i for i, k in enumerate(KIND_ORDER)}
    return sorted(records, key=lambda r: (int(r.get("layer", -1)), order.get(str(r.get("kind")), 99), str(r.get("site"))))
