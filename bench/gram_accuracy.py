"""Accuracy of the spectrum job's float32 Gram path against float64, on real activations, for every reported number.

Runs `ranklens spectrum` twice on the same tokens (the embedded SmolLM2 in its default bf16, the embedded corpus),
once with ``--gram-dtype float64`` and once with ``float32`` (chunk Gram matrices in float32, merged in float64), with
the loss recovered by the top-n components (App. B) at the middle layer's attention output, and compares per site:
the effective rank (relative error), the share of singular values above 1% of the largest (absolute difference),
the cumulative variance (largest absolute difference over n), the singular values above 1% and above 0.1% of the
largest (largest relative error), and the loss-recovered curve (largest absolute difference of the fraction, and n_99).
The numbers go to bench/results/gram_accuracy.json and are quoted in the README's Definitions. Usage:
python bench/gram_accuracy.py [--tokens 65536] [--sites L*.attn_out,L*.mlp_out,L*.resid_post,L*.attn_z]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ranklens.spectrum.config import SpectrumConfig
from ranklens.spectrum.job import run_spectrum


def relative_errors(fast: list[float], ref: list[float], above: float) -> float:
    top = ref[0]
    return max((abs(f - r) / r for f, r in zip(fast, ref, strict=False) if r > above * top), default=0.0)


def compare(fast: dict, ref: dict) -> dict:
    out = {"effective_rank": ref["effective_rank"],
           "effective_rank_rel_err": abs(fast["effective_rank"] - ref["effective_rank"]) / ref["effective_rank"],
           "frac_sv_above_1pct_abs_diff": abs(fast["frac_sv_above_1pct"] - ref["frac_sv_above_1pct"]),
           "cumulative_variance_max_abs_diff": max(abs(a - b) for a, b in zip(fast["cumulative_variance"],
                                                                                ref["cumulative_variance"], strict=False)),
           "sv_above_1pct_max_rel_err": relative_errors(fast["singular_values"], ref["singular_values"], 1e-2),
           "sv_above_0.1pct_max_rel_err": relative_errors(fast["singular_values"], ref["singular_values"], 1e-3)}
    if "loss_recovered" in ref:
        a, b = fast["loss_recovered"], ref["loss_recovered"]
        shared = set(a["n"]) & set(b["n"])
        fa, fb = dict(zip(a["n"], a["fraction"], strict=False)), dict(zip(b["n"], b["fraction"], strict=False))
        out["loss_recovered_max_abs_diff"] = max(abs(fa[n] - fb[n]) for n in shared)
        out["n_99"] = [a["n_99"], b["n_99"]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sites", default="L*.attn_out,L*.attn_z,L*.mlp_out,L*.resid_post")
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--loss-tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="auto", help="the model's dtype (auto: bf16 where the CPU has it)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gram_accuracy.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float64", "float32"):
            cfg = SpectrumConfig(model=args.model, dtype=args.dtype, sites=args.sites, tokens=args.tokens, gram_dtype=dtype,
                                 loss_recovered="Lmid.attn_out", loss_tokens=args.loss_tokens)
            results[dtype] = run_spectrum(cfg, Path(tmp) / dtype, progress=False, report=False)
    ref = {r["site"]: r for r in results["float64"]["records"]}
    per_site = {r["site"]: compare(r, ref[r["site"]]) for r in results["float32"]["records"]}
    keys = sorted({k for v in per_site.values() for k in v if k.endswith(("_err", "_diff"))})
    worst = {k: max(v[k] for v in per_site.values() if k in v) for k in keys}
    worst_site = {k: max((s for s in per_site if k in per_site[s]), key=lambda s: per_site[s][k]) for k in keys}
    report = {"model": args.model, "sites": args.sites, "tokens": results["float64"]["n_tokens"],
              "model_dtype": results["float64"]["model_dtype"], "worst": worst, "worst_site": worst_site, "per_site": per_site,
              "accumulate_s": {k: r["timings"]["accumulate"] for k, r in results.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("tokens", "model_dtype", "worst", "worst_site", "accumulate_s")}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
