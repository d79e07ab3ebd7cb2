"""Experiment 7: what ASI does in the dead subspace (App. N.2; Tables 9, 10).

The dead subspace of the middle layer's attention output is spanned by its right singular directions whose singular
value is below 1% of the largest (the threshold of Section 4.3's "singular values exceeding 1% of the maximum"),
estimated from the training store over the tokens behind the ASI basis. For every seed of the TopK and ASI cells of
experiment 4 (same size, k and hyperparameters), on the held-out tokens:

- the cosine of each alive feature's decoder row with the dead subspace, binned as in Table 9 (alive: fired at least
  once on the held-out tokens), read two ways, since the paper does not say which: as the norm of the row's
  projection onto the subspace, ||P w|| / ||w|| (the cosine with the subspace itself), and as the largest cosine with
  one of the subspace's basis directions, max_j |<w, v_j>| / ||w||. Their scales differ: a direction drawn at random
  has a projection norm of about sqrt(m / d) but a largest single cosine of about sqrt(2 ln(2m) / d), so Table 9's
  magnitudes (no alive feature at 0.15 or more, almost all below 0.05 on Llama-3.1-8B, d = 4,096) fit the second
  reading unless the paper's features avoid the subspace almost entirely;
- the reconstruction error projected onto the dead subspace (Table 10): its mean squared norm per token, and the
  same divided by the activations' variance in the subspace (the FVU within it, comparable across scales).

Verdicts: ASI's reconstruction error in the dead subspace is lower than TopK's (Welch over seeds; Table 10 reports
0.00334 against 0.00350), and alive features rarely align with the dead subspace (Table 9: no alive feature of either
SAE has a cosine of 0.15 or more; here: under 1% of them, in both).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ranklens.dictionaries.load import load_sae
from ranklens.eval.jobs import RUN_SAE_DIR as SAE_DIR
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.linalg.basis import principal_basis
from ranklens.report.html import Report
from ranklens.reproduce.experiments.sae_runs import fmt_mean_std, names, values
from ranklens.reproduce.pipeline import Step
from ranklens.reproduce.plan import Plan
from ranklens.reproduce.report_parts import verdict_blocks
from ranklens.reproduce.verdicts import Verdict, compare_values, welch_less

NAME = "dead_subspace"
TITLE = "7. What ASI does in the dead subspace (App. N.2, Tables 9 and 10)"
BINS = (0.0, 0.05, 0.1, 0.15, 1.0 + 1e-9)  # Table 9's intervals; the last is [0.15, 1]
DEAD_SV_REL = 0.01  # Section 4.3: singular values below 1% of the largest
ALIGNED_SHARE = 0.01  # "rarely": fewer than 1% of alive features with cosine >= 0.15


def dead_subspace(store, site: str, tokens: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """[d, m] orthonormal basis of the directions with singular value below 1% of the largest, over the store's
    first `tokens` tokens of `site` (the ASI basis's tokens)."""
    acc = CovarianceAccumulator(store.sites[site])
    for chunk in store.iter_tokens(site):
        acc.update(chunk[: tokens - acc.n])
        if acc.n >= tokens:
            break
    basis = principal_basis(acc)
    s = basis.singular_values
    dead = s < DEAD_SV_REL * s[0]
    m, d = int(dead.sum()), int(s.numel())
    return basis.eigenvectors[:, dead].float(), {
        "d": d, "dim": m, "tokens": acc.n,
        # what a random direction would score under each reading (see the module docstring)
        "random_cos": math.sqrt(m / d), "random_cos_max": math.sqrt(2 * math.log(2 * m) / d) if m else 0.0}


@torch.no_grad()
def analyse(sae, rows: list[torch.Tensor], v_dead: torch.Tensor) -> dict[str, Any]:
    """Alive features' cosines with span(v_dead) (Table 9) and the reconstruction error inside it (Table 10)."""
    fired = torch.zeros(sae.n_features, dtype=torch.int64)
    err = err_total = sq = 0.0
    n = 0
    sum_proj = torch.zeros(v_dead.shape[1], dtype=torch.float64)
    for chunk in rows:
        x = chunk.to(sae.W_D.dtype)
        x_hat, code = sae(x)
        active = code.indices[code.active_mask()] if code.is_sparse else code.active_mask().nonzero()[:, 1]
        fired += torch.bincount(active.reshape(-1).cpu(), minlength=sae.n_features)
        e = (x - x_hat).double()
        err += float((e @ v_dead.double()).pow(2).sum())
        err_total += float(e.pow(2).sum())
        px = x.double() @ v_dead.double()
        sum_proj += px.sum(0)
        sq += float(px.pow(2).sum())
        n += x.shape[0]
    w = sae.W_D.detach().double()[fired > 0]
    coefficients = (w @ v_dead.double()) / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cos = coefficients.norm(dim=1)  # cosine with the subspace
    cos_max = coefficients.abs().max(dim=1).values if v_dead.shape[1] else torch.zeros_like(cos)  # best basis vector
    bins = torch.tensor(BINS, dtype=torch.float64)
    variance = sq - float(sum_proj.pow(2).sum()) / max(n, 1)

    def share(c: torch.Tensor) -> float:
        return float((c >= BINS[3]).double().mean()) if w.shape[0] else float("nan")

    return {"alive": int(w.shape[0]),
            "cos_bins": [int(c) for c in torch.histogram(cos.clamp(max=1.0), bins=bins).hist.tolist()],
            "cos_max_bins": [int(c) for c in torch.histogram(cos_max.clamp(max=1.0), bins=bins).hist.tolist()],
            "aligned_share": share(cos), "aligned_share_max": share(cos_max),
            "dead_mse": err / max(n, 1), "dead_fvu": err / variance if variance > 0 else float("nan"),
            "dead_error_share": err / err_total if err_total > 0 else float("nan"), "tokens": n}


def step(plan: Plan) -> Step:
    groups = {"TopK": plan.cells("TopK"), "ASI": plan.cells("ASI")}
    layout = {"site": plan.main_site, "groups": {m: names(cs) for m, cs in groups.items()}}

    def run(ctx) -> dict[str, Any]:
        runs = ctx.train_all([c for cs in groups.values() for c in cs])  # experiment 4's runs, reused
        v_dead, info = dead_subspace(ctx.store(), plan.main_site, plan.cfg.init_tokens)
        rows = ctx.held_out(plan.main_site).activations(plan.main_site)
        analyses = {c.name: analyse(load_sae(plan.sae_dir(c) / SAE_DIR), rows, v_dead)
                    for cs in groups.values() for c in cs}
        return {"layout": layout, "subspace": info,
                "runs": {n: {"dir": f"sae/{n}", "metrics": {**runs[n], **analyses[n]}} for n in analyses}}

    return Step(NAME, TITLE, run, {"layout": layout, "reads": "asi", "dead_sv_rel": DEAD_SV_REL, "bins": BINS})


def verdicts(result: dict[str, Any], alpha: float) -> list[Verdict]:
    g = result["layout"]["groups"]
    out = [welch_less("ASI's reconstruction error inside the dead subspace is lower than TopK's (Table 10)",
                      values(result, g["ASI"], "dead_mse"), values(result, g["TopK"], "dead_mse"), name_a="ASI",
                      name_b="TopK", alpha=alpha).named("dead_subspace.dead_mse")]
    for key, reading in (("aligned_share", "cosine with the subspace (projection norm)"),
                         ("aligned_share_max", "largest cosine with one of its basis directions")):
        shares = {m: max(values(result, ns, key), default=float("nan")) for m, ns in g.items()}
        worst = max(shares, key=lambda m: shares[m] if shares[m] == shares[m] else -1.0)
        out.append(compare_values(f"Alive features of both SAEs rarely align with the dead subspace: under 1% have a "
                                  f"{reading} of 0.15 or more (Table 9)", shares[worst], ALIGNED_SHARE,
                                  name_a=f"the largest share ({worst})", name_b="Table 9's 'rarely'",
                                  rel_tol=0.0, percent=True).named(f"dead_subspace.{key}"))
    return out


def section(rep: Report, record: dict[str, Any], found: list[Verdict], fig_dir: Path) -> None:
    result = record["result"]
    g = result["layout"]["groups"]
    sub = result["subspace"]
    rep.paragraph(f"{result['layout']['site']}: the dead subspace has {sub['dim']} of {sub['d']} dimensions "
                  f"(singular values below 1% of the largest over {sub['tokens']:,} tokens). Table 9 does not say "
                  "how a feature's cosine with a subspace is taken; both readings are below. A random direction "
                  f"would score about {sub.get('random_cos', float('nan')):.3f} as a projection norm and "
                  f"{sub.get('random_cos_max', float('nan')):.3f} as the largest cosine with one basis direction; "
                  "Table 9's magnitudes (nothing at 0.15 or more, almost everything below 0.05 at d = 4,096) are of "
                  "the second kind unless the paper's features avoid the subspace almost entirely.")
    labels = ["[0, 0.05)", "[0.05, 0.1)", "[0.1, 0.15)", "[0.15, 1]"]
    for key, caption in (("cos_bins", "projection norm ||P w|| / ||w||"),
                         ("cos_max_bins", "largest cosine with one basis direction")):
        rows = []
        for method, run_names in g.items():
            for n in run_names:
                m = result["runs"][n]["metrics"]
                if key in m:
                    rows.append([method, m.get("d_init") or "\u2014", n.rsplit("-", 1)[-1], m["alive"], *m[key]])
        rep.table(["method", "d_init", "seed", "alive features", *labels], rows,
                  caption=f"Alive features by cosine with the dead subspace, read as the {caption} (cf. Table 9)")
    rep.table(["method", "MSE in dead subspace (per token)", "FVU within the dead subspace",
               "share of the error in the dead subspace"],
              [[method] + [fmt_mean_std(values(result, ns, key)) for key in ("dead_mse", "dead_fvu",
                                                                             "dead_error_share")]
               for method, ns in g.items()], caption="Reconstruction error projected onto the dead subspace, mean "
                                                     "\u00b1 std over seeds (cf. Table 10)")
    verdict_blocks(rep, found)
