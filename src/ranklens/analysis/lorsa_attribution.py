"""Attribution of Lorsa heads to the original attention heads by oblique projection (Lorsa paper App. F.1, F.2).

At one token, let o_i [d] be the output of MHSA head i (o_i = z_i W_O,i, without the output bias; ``attn_z`` and W_O,
``per_head_outputs``) and y_h = z^h w_o^h the output of each Lorsa head h active there (z^h > 0). Both sets are
generally non-orthogonal bases, so coordinates in one of them are oblique: ``oblique_coefficients(v, B)`` gives the c
minimizing ||v - c B||, i.e. c = v B^T (B B^T)^+ (exact coordinates when v lies in span(B); otherwise those of its
orthogonal projection onto the span; a zero or dependent basis vector gets the minimum-norm share).

Two directions, both averaged over the tokens where the Lorsa head is active (App. F.1: "averaged over more than 1M
tokens"):

- ``contributions[h, i]``: the coefficient of y_h when o_i is expressed in the basis of the active Lorsa outputs
  (App. F.1: "project [the original head's output] obliquely onto the basis formed by the outputs of all Lorsa heads
  ... The resulting coefficients represent the contribution of the original head to each Lorsa head"). Since
  sum_i o_i ~ sum_h y_h, these sum to about one over i ("approximately sum to one"; ``coverage`` reports the sum).
- ``fractions[h, i]``: the share of y_h along its component on o_i when y_h is expressed in the basis of the original
  heads' outputs ("we similarly compute the fraction of each Lorsa head's output that can be attributed to each
  original attention head"): with y_h ~ sum_i d_i o_i, fraction_i = <d_i o_i, y_h> / ||y_h||^2, which sums to the
  part of ||y_h||^2 inside the span of the original outputs.

App. F.2: ``heads_needed`` is the smallest number n of original heads whose largest contributions reach 90% of the
head's total (negative contributions count as zero in the shares; the paper does not say how it treats them).
"""

from __future__ import annotations

import torch

from ranklens.errors import RanklensError

__all__ = ["HeadAttribution", "heads_needed", "oblique_coefficients"]


def oblique_coefficients(vectors: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """c [..., m, r] with vectors [..., m, d] ~ c @ basis [..., r, d] in the least-squares sense, computed in float64
    as vectors B^T pinv(B B^T)."""
    v, b = vectors.double(), basis.double()
    gram = b @ b.mT  # [..., r, r]
    return (v @ b.mT) @ torch.linalg.pinv(gram, hermitian=True)


def heads_needed(contributions: torch.Tensor, threshold: float = 0.9) -> torch.Tensor:
    """int64 [H]: the fewest original heads whose (largest, non-negative) contributions reach ``threshold`` of the
    row's total (App. F.2); 0 for a row with no positive contribution."""
    pos = contributions.clamp_min(0)
    total = pos.sum(-1, keepdim=True)
    cum = pos.sort(-1, descending=True).values.cumsum(-1) / total.clamp_min(torch.finfo(pos.dtype).tiny)
    n = (cum < threshold).sum(-1) + 1
    return torch.where(total[..., 0] > 0, n.clamp_max(contributions.shape[-1]), torch.zeros_like(n))


class HeadAttribution:
    """Streaming sums of both attributions per Lorsa head (see the module docstring)."""

    def __init__(self, n_lorsa_heads: int, n_mhsa_heads: int) -> None:
        self.contribution_sum = torch.zeros(n_lorsa_heads, n_mhsa_heads, dtype=torch.float64)
        self.fraction_sum = torch.zeros(n_lorsa_heads, n_mhsa_heads, dtype=torch.float64)
        self.active_tokens = torch.zeros(n_lorsa_heads, dtype=torch.int64)

    def update(self, head_outputs: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor,
               chunk: int = 256) -> None:
        """head_outputs [N, n, d]: each MHSA head's output at N tokens; values, indices [N, K]: Lorsa's code there;
        W_O [H, d]: Lorsa's output rows."""
        N, n, d = head_outputs.shape
        if values.shape[0] != N or indices.shape != values.shape or W_O.shape[1] != d:
            raise RanklensError(f"HeadAttribution.update: head_outputs {tuple(head_outputs.shape)}, values "
                                f"{tuple(values.shape)}, indices {tuple(indices.shape)}, W_O {tuple(W_O.shape)}; "
                                "expected [N, n, d], [N, K], [N, K], [H, d]")
        for s in range(0, N, chunk):
            O = head_outputs[s : s + chunk].double()  # [c, n, d]
            v, idx = values[s : s + chunk].double(), indices[s : s + chunk]
            live = v > 0  # [c, K]
            Y = (v * live)[..., None] * W_O[idx].double()  # [c, K, d]: outputs of the active Lorsa heads
            C = oblique_coefficients(O, Y).mT  # [c, K, n]: y_k's coefficient in the expansion of o_i
            D = oblique_coefficients(Y, O)  # [c, K, n]: y_k ~ sum_i D[k, i] o_i
            norm2 = Y.pow(2).sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
            F = D * (Y @ O.mT) / norm2  # [c, K, n]: <D_ki o_i, y_k> / ||y_k||^2
            heads = idx[live].cpu()
            self.contribution_sum.index_add_(0, heads, C[live].cpu())
            self.fraction_sum.index_add_(0, heads, F[live].cpu())
            self.active_tokens += torch.bincount(heads, minlength=self.active_tokens.numel())

    def result(self, threshold: float = 0.9) -> dict:
        """Per-head means over active tokens, App. F.2's count of original heads, and its histogram."""
        count = self.active_tokens.clamp_min(1)[:, None].double()
        contributions = self.contribution_sum / count
        fractions = self.fraction_sum / count
        needed = heads_needed(contributions, threshold)
        alive = self.active_tokens > 0
        histogram = torch.bincount(needed[alive], minlength=contributions.shape[1] + 1)
        heads = [{"head": h, "active_tokens": int(self.active_tokens[h]),
                  "contributions": [round(float(c), 6) for c in contributions[h]],
                  "coverage": round(float(contributions[h].sum()), 6), f"heads_for_{round(threshold * 100)}pct":
                  int(needed[h]), "fractions": [round(float(f), 6) for f in fractions[h]]}
                 for h in range(contributions.shape[0]) if alive[h]]
        return {"threshold": threshold, "n_mhsa_heads": contributions.shape[1], "n_lorsa_heads": contributions.shape[0],
                "heads_with_activity": int(alive.sum()),
                "heads_needed_histogram": {str(i): int(c) for i, c in enumerate(histogram.tolist()) if i > 0},
                "heads": heads}
