"""Experiment 1: attention outputs have the lowest effective rank (Section 4.3; Figures 2, 3; App. C, D).

One `ranklens spectrum` job measures every layer's attention output, concatenated head outputs Z, MLP output and
residual stream, with the middle layer's stability over disjoint splits (App. C), loss recovered against kept
dimensions (App. B, Figure 3b), the W_O decomposition (Section 4.4, used by experiment 2), and the middle layer on
each corpus subset and on the other models (Figure 2, middle and right).

Verdicts: per layer, the attention output's effective-rank fraction is below the MLP output's and the residual
stream's (sign tests over layers); the same at the middle layer of every other corpus and model (sign test over
settings); fewer singular values above 1% of the largest (Figure 3a) and fewer dimensions to recover 99% of the loss
(Figure 3b) than both; and the spectrum is stable across splits (App. C: CV of the effective rank below 1%).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ranklens.report.html import Report
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, compare_values, sign_test
from ranklens.spectrum import figures
from ranklens.spectrum.job import SpectrumConfig, run_spectrum

NAME = "low_rank"
TITLE = "1. Low rank of attention outputs (Figures 2, 3; App. C, D)"
SPECTRUM_DIR = "spectrum"
MAIN_KINDS = ("attn_out", "mlp_out", "resid_post")
_SUMMARY_KEYS = ("site", "layer", "kind", "d", "n_tokens", "effective_rank", "erank_fraction", "frac_sv_above_1pct")
STABLE_CV = 0.01  # App. C: CV of the effective rank below 1% counts as stable (the paper: 1.5e-4 on 10M tokens)


def spectrum_config(plan: Plan) -> SpectrumConfig:
    """The spectrum job; batches small enough that each of the App. C splits gets at least two of them (splits are
    dealt batches round-robin), a checkpoint every minute so a killed run loses little, and the footnote-3 outlier
    exclusion (activations whose norm exceeds mean + 5 sigma are dropped), as the paper measures."""
    c = plan.cfg
    mid3 = ",".join(f"Lmid.{k}" for k in MAIN_KINDS)
    compare = [f"corpus={x}" for x in c.compare_corpora if x != c.corpus]
    compare += [f"model={m}" for m in c.compare_models if m != c.model]
    return SpectrumConfig(model=c.model, sites="L*.attn_out,L*.attn_z,L*.mlp_out,L*.resid_post", corpus=c.corpus,
                          tokens=c.spectrum_tokens, context_length=c.context_length, seed=c.seed, dtype=c.dtype,
                          batch_tokens=min(8192, max(512, c.spectrum_tokens // (2 * c.splits))),
                          device=c.device, gram_dtype="float32", exclude_outliers=True, splits=c.splits,
                          stability_sites=mid3,
                          loss_recovered=mid3, loss_tokens=c.loss_tokens, loss_points=c.loss_points,
                          decompose="mid", compare=",".join(compare) or None, compare_tokens=c.compare_tokens,
                          checkpoint_seconds=60)


def _summary(record: dict[str, Any], mid: int) -> dict[str, Any]:
    out = {k: record[k] for k in _SUMMARY_KEYS if k in record}
    if record.get("layer") == mid:
        for key in ("singular_values", "stability", "loss_recovered", "wo_decomposition"):
            if record.get(key) is not None:
                out[key] = record[key]
    return out


def step(plan: Plan) -> Step:
    cfg = spectrum_config(plan)
    out = plan.out / SPECTRUM_DIR
    command = cli_command("spectrum", cfg, out)

    def run(ctx) -> dict[str, Any]:
        result = run_spectrum(cfg, out, progress=ctx.progress, command=command, report=False)
        return {"spectrum_json": f"{SPECTRUM_DIR}/spectrum.json", "model": result["model"],
                "corpus": result["corpus"], "n_layers": result["n_layers"], "middle_layer": plan.mid,
                "n_tokens": result["n_tokens"], "model_dtype": result["model_dtype"],
                "records": [_summary(r, plan.mid) for r in result["records"]],
                "compare": [{"label": c["label"], "model": c["model"], "corpus": c["corpus"],
                             "records": [_summary(r, -1) for r in c["records"]]} for c in result.get("compare", [])]}

    return Step(NAME, TITLE, run, {"spectrum": cfg.model_dump(mode="json")}, [command])


def by_layer(records: list[dict[str, Any]]) -> dict[int, dict[str, dict[str, Any]]]:
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for r in records:
        out.setdefault(int(r["layer"]), {})[r["kind"]] = r
    return dict(sorted(out.items()))


def _middle(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The middle-layer records of a comparison setting (the only layer a comparison measures)."""
    return {r["kind"]: r for r in records}


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    layers = by_layer(result["records"])
    mid = layers.get(result["middle_layer"], {})
    out = []
    for other, name in (("mlp_out", "MLP output"), ("resid_post", "residual stream")):
        pairs = [(layer, k["attn_out"]["erank_fraction"] < k[other]["erank_fraction"])
                 for layer, k in layers.items() if "attn_out" in k and other in k]
        out.append(sign_test(f"Across layers, the attention output has a lower effective-rank fraction than the "
                             f"{name} (Figure 2, left)", [ok for _, ok in pairs], units="layers", alpha=alpha,
                             labels=[f"L{layer}" for layer, _ in pairs]).named(f"low_rank.layers.{other}"))
    settings = {f"{result['model']} / {result['corpus']}": mid}
    settings.update({c["label"]: _middle(c["records"]) for c in result.get("compare", [])})
    lowest = [(label, recs["attn_out"]["erank_fraction"] < min(recs[k]["erank_fraction"] for k in MAIN_KINDS[1:]))
              for label, recs in settings.items() if all(k in recs for k in MAIN_KINDS)]
    out.append(sign_test("At the middle layer of every corpus and model, the attention output has the lowest "
                         "effective-rank fraction of the three (Figure 2, middle and right)",
                         [ok for _, ok in lowest], units="settings", alpha=alpha, labels=[lbl for lbl, _ in lowest])
               .named("low_rank.lowest_every_setting"))
    if all(k in mid for k in MAIN_KINDS):
        others = {k: mid[k]["frac_sv_above_1pct"] for k in MAIN_KINDS[1:]}
        worst = min(others, key=others.get)
        out.append(compare_values("At the middle layer, fewer of the attention output's singular values exceed 1% "
                                  "of the largest than of the MLP output's and the residual stream's (Figure 3a)",
                                  mid["attn_out"]["frac_sv_above_1pct"], others[worst],
                                  name_a="the share for attn_out", name_b=f"the share for {worst}")
                   .named("low_rank.sv_above_1pct"))
        dims = {k: (mid[k].get("loss_recovered") or {}).get("frac_dims_99") for k in MAIN_KINDS}
        if all(v is not None for v in dims.values()):
            worst = min(MAIN_KINDS[1:], key=lambda k: dims[k])
            out.append(compare_values("At the middle layer, the attention output needs a smaller share of its "
                                      "dimensions to recover 99% of the loss than the MLP output and the residual "
                                      "stream (Figure 3b, App. B)", dims["attn_out"], dims[worst],
                                      name_a="the share of d for attn_out",
                                      name_b=f"the share of d for {worst}").named("low_rank.dims_99"))
    cvs = {r["site"]: r["stability"] for r in mid.values() if r.get("stability")}
    if cvs:
        site = max(cvs, key=lambda s: cvs[s]["erank_cv"])
        stab = cvs[site]
        out.append(compare_values(f"The effective rank is stable across {stab['n_splits']} disjoint splits of about "
                                  f"{min(stab['n_tokens']):,} tokens (App. C; here: a coefficient of variation below "
                                  f"{STABLE_CV:.0%} at every middle-layer site)", stab["erank_cv"], STABLE_CV,
                                  name_a=f"the largest CV ({site})", name_b="App. C's stability",
                                  rel_tol=0.0, percent=True).named("low_rank.split_stability"))
    return out


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    layers = by_layer(result["records"])
    mid = result["middle_layer"]
    main = [r for r in result["records"] if r["kind"] in MAIN_KINDS]
    rep.paragraph(f"{result['model']} on {result['corpus']}: {result['n_tokens']:,} tokens per site over every "
                  f"layer, activations with a norm above mean + 5 sigma excluded (footnote 3); middle layer {mid}; comparisons on {len(result.get('compare', []))} other settings "
                  f"({', '.join(c['label'] for c in result.get('compare', [])) or 'none'}). Full numbers: "
                  f"{result['spectrum_json']}.")
    rep.add_figure(figures.erank_by_layer, (main,), fig_dir / "fig2_erank_by_layer.png",
               "Fraction of effective rank per layer (cf. Figure 2, left).")
    groups = {f"{result['model']} / {result['corpus']}": [r for r in layers.get(mid, {}).values()
                                                          if r["kind"] in MAIN_KINDS]}
    groups.update({c["label"]: [r for r in c["records"] if r["kind"] in MAIN_KINDS] for c in result.get("compare", [])})
    if len(groups) > 1:
        rep.add_figure(figures.compare_bars, (groups,), fig_dir / "fig2_compare.png",
                   "Fraction of effective rank at the middle layer of each model and corpus (cf. Figure 2, middle "
                   "and right).")
    mid_main = [layers[mid][k] for k in MAIN_KINDS if k in layers.get(mid, {})]
    rep.add_figure(figures.singular_spectra, (mid_main,), fig_dir / "fig3a_singular_spectra.png",
               f"Singular values relative to the largest at layer {mid}; dashed: 1% (cf. Figure 3a).")
    rep.add_figure(figures.loss_recovered_curves, (mid_main,), fig_dir / "fig3b_loss_recovered.png",
               f"Fraction of the zero-ablation loss recovered by the top-n singular components at layer {mid} "
               "(cf. Figure 3b, App. B).")
    rows = [[r["site"], r["d"], r["effective_rank"], r["erank_fraction"], r["frac_sv_above_1pct"],
             (r.get("loss_recovered") or {}).get("n_99"), (r.get("stability") or {}).get("erank_cv")]
            for r in mid_main]
    rep.table(["site", "d", "effective rank", "erank fraction", "share of s > 1% of max", "n for 99% loss",
               "erank CV over splits"], rows, caption=f"Middle layer {mid}")
    verdict_blocks(rep, found)
