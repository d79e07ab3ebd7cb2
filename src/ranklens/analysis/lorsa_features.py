"""SAE features on Lorsa heads (Lorsa paper App. G): which features of an SAE on the Lorsa's input move a head's
attention through Q or K (G.1, by ablation), and which features of SAEs on its input and output align with the
head's w_v and w_o (G.2, by cosine).

G.1, for one head h of QK group g at an activation (a query position i where h is active): A = the attention row of
query i. Ablating feature f removes a_f(x_t) d_f from the input at every position t (a_f its activation, d_f its
decoder row). For Q only query i's query moves: q_i' = q_i - a_f(x_i) R_i W_Q d_f (R_i the rotation at i), keys
unchanged. For K every key moves: k_j' = k_j - a_f(x_j) R_j W_K d_f, the query unchanged. The impact is KL(A || A'),
and a feature's impact on a head is its largest KL over the head's activations (the paper takes the maximum over
1M tokens; here over the activations given). Both are linear in the input for a Lorsa without Q/K norms, so every
feature's A' comes from one rank-one update of the logits; tests/test_heads.py checks them against recomputing Q/K
from the ablated input.

G.2: cos(d_f, w_v^h) for the input SAE's decoder rows and cos(e_f, w_o^h) for the output SAE's encoder rows.
"""

from __future__ import annotations

import torch

from ranklens.dictionaries.lorsa import Lorsa
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.errors import RanklensError

__all__ = ["ov_alignment", "qk_impacts"]


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dim, 0 log 0 = 0."""
    live = p > 0
    return torch.where(live, p * (p.clamp_min(1e-300).log() - q.clamp_min(1e-300).log()), torch.zeros_like(p)).sum(-1)


@torch.no_grad()
def qk_impacts(lorsa: Lorsa, sae: SparseAutoencoder, x: torch.Tensor, head: int, queries: list[int]
               ) -> dict[str, dict[int, float]]:
    """{"q": {feature: largest KL}, "k": {...}} of the features of `sae` (on the Lorsa's input) for `head` at the
    query positions `queries` of one sequence x [T, d]. Features never active where they could act are left out."""
    if lorsa.cfg.qk_norm:
        raise RanklensError("App. G.1 here needs Q and K linear in the input; this Lorsa normalizes them (qk_norm)")
    x = x.to(lorsa.W_V.dtype)
    T = x.shape[0]
    g = lorsa.group_of(head)
    q, k = lorsa.qk_rows(x, g)  # [T, d_qk]
    code = sae.encode(x.to(sae.W_D.dtype))
    acts = code.to_dense().to(x.dtype)  # [T, n_features]
    D = sae.W_D.to(x.dtype)
    out: dict[str, dict[int, float]] = {"q": {}, "k": {}}
    for i in queries:
        logits = k @ q[i]  # [T]
        base = lorsa.query_probs(logits, i)
        here = (acts[i] != 0).nonzero()[:, 0]
        if here.numel():  # Q: query i moves by -a R_i W_Q d_f
            dq = lorsa.rotate(D[here] @ lorsa.W_Q[g].T, T)[:, i] * acts[i, here, None]  # [F, d_qk]
            kl = _kl(base, lorsa.query_probs(logits - dq @ k.T, i))
            _keep_max(out["q"], here, kl)
        seen = (acts[: i + 1] != 0).any(0).nonzero()[:, 0]
        if seen.numel():  # K: key j moves by -a_j R_j W_K d_f
            rk = lorsa.rotate(D[seen] @ lorsa.W_K[g].T, T)  # [F, T, d_qk]
            shift = (rk @ q[i]) * acts[:, seen].T  # [F, T]
            kl = _kl(base, lorsa.query_probs(logits - shift, i))
            _keep_max(out["k"], seen, kl)
    return out


def _keep_max(best: dict[int, float], features: torch.Tensor, values: torch.Tensor) -> None:
    for f, v in zip(features.tolist(), values.tolist(), strict=True):
        if v > best.get(f, float("-inf")):
            best[f] = v


@torch.no_grad()
def ov_alignment(lorsa: Lorsa, head: int, sae_in: SparseAutoencoder | None, sae_out: SparseAutoencoder | None,
                 top: int = 5) -> dict[str, list[dict[str, float]]]:
    """G.2: the `top` input-SAE features by |cos(d_f, w_v)| ("v") and output-SAE features by |cos(e_f, w_o)| ("o"),
    each {"feature", "cos"}."""
    found = {}
    for name, sae, rows, w in (("v", sae_in, None if sae_in is None else sae_in.W_D, lorsa.W_V[head]),
                               ("o", sae_out, None if sae_out is None else sae_out.W_E, lorsa.W_O[head])):
        if sae is None:
            continue
        if rows.shape[1] != w.shape[0]:
            raise RanklensError(f"the {name} SAE reads width {rows.shape[1]}; the Lorsa's is {w.shape[0]}")
        cos = torch.nn.functional.cosine_similarity(rows.double(), w.double()[None], dim=1)
        order = cos.abs().argsort(descending=True)[:top]
        found[name] = [{"feature": int(f), "cos": float(cos[f])} for f in order]
    return found
