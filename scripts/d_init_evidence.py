"""Evidence for the `d_init: auto` rule: dead features and FVU of ASI SAEs against d_init on sites of different
effective rank, beside the standard init, with the spectrum statistics a rule could be stated in.

    .venv/bin/python scripts/d_init_evidence.py --out runs/d_init_evidence
    .venv/bin/python scripts/d_init_evidence.py --out runs/d_init_evidence --report TABLES.md  (the tables of docs/results/d_init_rule.md)

Per site: one activation store (`ranklens collect`), then `ranklens train sae` runs (in this process, sharing the
store and one held-out set) for every d_init of the grid (fractions of d) and the standard init, each over the
seeds. Every run directory is a normal `train sae` run, so a killed script resumes where it stopped. The JSON
(`evidence.json`) holds every run's metrics and, per site, the effective rank and the number of principal
directions reaching each cumulative-variance level, computed from the same init tokens ASI uses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ranklens.data.collect import CollectConfig, collect
from ranklens.eval.held_out import HeldOutSet
from ranklens.io import atomic_write_json, atomic_write_text
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.linalg.basis import directions_for_variance, effective_rank, principal_basis
from ranklens.lm.load import load_model
from ranklens.train.sae_job import SAETrainConfig, train_sae

SITES = [("smollm2-135m", "L3.attn_out"), ("smollm2-135m", "L15.attn_out"), ("minilm-l6", "L3.attn_out")]
FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 3 / 8, 1 / 2, 3 / 4]
VARIANCE_LEVELS = [0.5, 0.7, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999]


def spectrum_summary(store, site: str, tokens: int) -> dict:
    acc = CovarianceAccumulator(store.sites[site])
    for chunk in store.iter_tokens(site):
        acc.update(chunk[: tokens - acc.n])
        if acc.n >= tokens:
            break
    basis = principal_basis(acc)
    s = basis.singular_values
    return {"d": int(s.numel()), "tokens": acc.n, "erank": float(effective_rank(s)),
            "dims_for_variance": {str(v): directions_for_variance(s, v) for v in VARIANCE_LEVELS},
            "singular_values": s.tolist()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/d_init_evidence")
    parser.add_argument("--report", help="also write the Markdown table here")
    parser.add_argument("--tokens", type=int, default=1_000_000, help="training tokens per SAE")
    parser.add_argument("--store-tokens", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=4e-4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=50_000)
    parser.add_argument("--sites", default=",".join(f"{m}/{s}" for m, s in SITES),
                        help="comma-separated MODEL/SITE keys (default: all three)")
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                        help="comma-separated d_init / d values of the grid")
    args = parser.parse_args()
    out = Path(args.out)
    evidence: dict = {"settings": vars(args), "sites": {}}
    fractions = [float(f) for f in args.fractions.split(",")]
    evidence_path = out / "evidence.json"
    if evidence_path.exists():  # a rerun with other sites or fractions adds to what is there
        evidence["sites"] = json.loads(evidence_path.read_text())["sites"]
    for key in args.sites.split(","):
        model, site = key.split("/")
        lm = load_model(model, "auto", "cpu")
        # App. E.2's 1,024 tokens, or fewer for absolute-position models (MiniLM has 512 positions)
        context_length = min(1024, getattr(lm.model.config, "max_position_embeddings", 1024))
        store = collect(CollectConfig(model=model, sites=site, tokens=args.store_tokens, seed=0,
                                      context_length=context_length),
                        out / "stores" / f"{model}-{site}", progress=False, lm=lm)
        d = store.sites[site]
        spectrum = spectrum_summary(store, site, 100_000)
        d_inits = sorted({max(1, round(f * d)) for f in fractions})
        cells = [("standard", None)] + [("asi", v) for v in d_inits] + [("asi", "auto")]  # auto: the rule itself
        base = dict(model=model, site=site, store=str(store.directory), tokens=args.tokens, context_length=context_length,
                    batch_size=args.batch_size, expansion=8, k=50, lr=args.lr, warmup_steps=50,
                    b_dec_init="mean", init_tokens=100_000, eval_tokens=args.eval_tokens, lm_eval_tokens=0,
                    train_dtype="bfloat16", shuffle_buffer_tokens=262_144, checkpoint_every=200)
        held_out = None
        runs = evidence["sites"].get(key, {}).get("runs", {})
        for seed in range(args.seeds):  # every cell at seed 0 first, so a cut-short run still covers the grid
            for init, d_init in cells:
                cfg = SAETrainConfig(**base, init=init, d_init=d_init or "auto", seed=seed)  # standard ignores d_init
                name = f"{init}{d_init or ''}-s{seed}"
                run_dir = out / "runs" / f"{model}-{site}" / name
                if held_out is None:
                    held_out = HeldOutSet(lm, [site], store.held_out(), args.eval_tokens, 0)
                print(f"{key} {name}", file=sys.stderr, flush=True)
                metrics = train_sae(cfg, run_dir, progress=False, lm=lm, held_out=held_out)
                runs[name] = {"init": init, "d_init": metrics["d_init"] or d, "auto": d_init == "auto", "seed": seed,
                              "fvu": metrics["fvu"],
                              "dead": metrics["train_dead"], "eval_dead": metrics["eval_dead"],
                              "n_features": metrics["n_features"], "dead_window_tokens": metrics["dead_window_tokens"]}
                evidence["sites"][key] = {"spectrum": spectrum, "runs": runs}
                atomic_write_json(evidence_path, evidence)
    if args.report:
        atomic_write_text(args.report, markdown(evidence))
    print(json.dumps({k: v["spectrum"] for k, v in evidence["sites"].items()}, indent=1))
    return 0


def summary(runs: dict) -> dict[tuple[int, bool], dict[str, float]]:
    """Per (d_init, whether the auto rule chose it): means over seeds."""
    by_d: dict[tuple[int, bool], list[dict]] = {}
    for r in runs.values():
        by_d.setdefault((r["d_init"], r.get("auto", False)), []).append(r)
    return {d: {"fvu": float(np.mean([r["fvu"] for r in rs])), "fvu_std": float(np.std([r["fvu"] for r in rs])),
                "dead": float(np.mean([r["dead"] for r in rs])), "eval_dead": float(np.mean([r["eval_dead"] for r in rs])),
                "n": len(rs)} for d, rs in sorted(by_d.items())}


def markdown(evidence: dict) -> str:
    s = evidence["settings"]
    lines = [f"Settings: 8x dictionaries, k = 50, {s['tokens']:,} training tokens per SAE (batch {s['batch_size']}, "
             f"lr {s['lr']}, bf16 autocast, b_D started at the data mean), {s['seeds']} seed(s); FVU on "
             f"{s['eval_tokens']:,} held-out tokens; train dead = not fired in the last quarter of training, eval dead "
             f"= not fired on the held-out tokens. FVU is mean \u00b1 std over seeds (n per row).", ""]
    for key, site in evidence["sites"].items():
        sp = site["spectrum"]
        levels = ", ".join(f"{float(v):.1%}: {n}" for v, n in sp["dims_for_variance"].items())
        lines += [f"### {key} (d = {sp['d']}, erank {sp['erank']:.1f})", "",
                  f"Principal directions reaching each share of the variance: {levels}.", "",
                  f"The rule `d_init: auto` (99% of the variance) gives {sp['dims_for_variance']['0.99']} here.", "",
                  "| d_init | d_init / d | d_init / erank | FVU | train dead | eval dead | n |",
                  "|---|---|---|---|---|---|---|"]
        for (d_init, auto), row in summary(site["runs"]).items():
            label = f"{d_init} (standard)" if d_init == sp["d"] else f"**{d_init} (auto)**" if auto else str(d_init)
            lines.append(f"| {label} | {d_init / sp['d']:.3f} | {d_init / sp['erank']:.2f} | "
                         f"{row['fvu']:.4f} \u00b1 {row['fvu_std']:.4f} | {row['dead']:.0f} | {row['eval_dead']:.0f} | "
                         f"{row['n']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
