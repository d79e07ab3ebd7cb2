"""AuxK: the auxiliary loss that lets dead latents model the reconstruction error (Gao et al. 2024, "Scaling and
evaluating sparse autoencoders", Section A.2), the paper's "AuxK" baseline (Section 3.2; App. E.1 and O.1: alpha =
1/32, k_aux = 512 after a sweep over 256..2048).

Section 3.2 of the paper writes the TopK SAE objective as ``||x - x_hat||^2 + alpha * L_aux``, with L_aux "designed to
penalize latents that never activate over a training period". Following Gao et al., with e = x - x_hat the main
reconstruction's residual (treated as a constant):

1. among the *dead* features only (``dead_mask``, from ``ranklens.train.dead``), take the k_aux largest
   pre-activations of each token (k_aux capped at the number of dead features) and ReLU them;
2. reconstruct the residual from them with the decoder rows and no decoder bias: e_hat = sum_j a_j W_D[j];
3. L_aux = sum_tokens ||e_hat - e||^2 / sum_tokens ||e - mean(e)||^2, the squared error normalized by the residual's
   total variance over the batch (a ratio of sums, as for FVU), so the loss is O(1) whatever the scale of e.

Gradients reach the encoder only through the selected pre-activations and the decoder only through the selected rows;
the residual is detached here, so nothing flows back into the main reconstruction's graph. The selected features
(those whose ReLU'd value is > 0, i.e. that receive a gradient) are returned so the trainer adds them to the active
rows of ``SparseAdam`` (their rows would otherwise not be updated by the AuxK gradient at all).

Cost scales with k_aux and the number of dead features, not with n_features * d: the top-k runs on the dead columns
only (``index_select`` of pre[:, dead], or an encoder function evaluated on the dead features only), and the
reconstruction is a product over the dead features' decoder rows only: dense ([tokens, n_dead] @ [n_dead, d]) when
k_aux is at least 1/8 of the dead features, else the SAE's ``sparse_decode`` (k_aux rows per token, with a backward
over the selected rows); never a [tokens, n_features] @ [n_features, d] product.

Normalization choices in the wild, for comparison: EleutherAI sparsify divides by the total variance of the *input*
x (and down-weights the loss by min(n_dead / k_aux, 1)); OpenAI's sparse_autoencoder divides each token's squared
error by that token's squared residual norm. Pass ``denominator`` to reproduce the former (e.g. sum ||x - mean(x)||^2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ranklens.dictionaries.kernels import sparse_decode
from ranklens.dictionaries.sharded import global_topk_mask, partial_sum
from ranklens.distributed import Layout

__all__ = ["auxk_loss"]

_DENSE_SHARE = 8  # decode densely when k_aux >= n_dead / 8


def auxk_loss(
    pre_acts_or_encoder_fn: Tensor | Callable[[Tensor], Tensor],
    residual: Tensor,
    dead_mask: Tensor,
    W_D: Tensor,
    k_aux: int,
    *,
    denominator: Tensor | float | None = None,
    shards: Layout | None = None,
) -> tuple[Tensor, Tensor]:
    """The AuxK loss of a batch and the features it used.

    Args:
        pre_acts_or_encoder_fn: the encoder's pre-activations [..., n_features] (with their autograd graph), or a
            function mapping the dead features' indices (int64 [n_dead]) to their pre-activations [..., n_dead], so an
            encoder can evaluate the dead features only.
        residual: e = x - x_hat [..., d]; detached here.
        dead_mask: bool [n_features], True for dead features.
        W_D: decoder weights [n_features, d] (features on dim 0).
        k_aux: dead features used per token (paper App. E.1: 512); capped at the number of dead features; 0 disables.
        denominator: overrides the normalizer sum ||e - mean(e)||^2 (a tensor or float), e.g. with the input's total
            variance to match sparsify.
        shards: the layout of a feature-sharded SAE whose block this is (``ranklens.dictionaries.sharded``): the k_aux
            dead features are chosen over every block (each offers its best k_aux, padded, one all-gather picks the
            global ones) and the blocks' partial reconstructions are summed; ``dead_mask`` and ``W_D`` are the
            block's. Every block then computes the one-process loss.

    Returns:
        (loss, aux_indices): a scalar (0, without a graph, when no feature is dead or k_aux is 0) and the sorted unique
        int64 indices of the features that received a nonzero activation (hence a gradient).

    A batch whose residual has zero variance (a single token, or an exact reconstruction) has nothing to normalize by;
    the denominator is then taken as 1, i.e. the loss is the plain squared error.
    """
    # The arguments come from the objectives, not from users: a wrong shape is a bug and fails in torch below.
    n_features, d = W_D.shape
    e = residual.detach().reshape(-1, d)  # [tokens, d]; a constant target, as in Gao et al.
    n_tokens = e.shape[0]
    no_features = torch.empty(0, dtype=torch.int64, device=W_D.device)
    dead = dead_mask.to(W_D.device).nonzero().squeeze(1)  # [n_dead], sorted
    n_dead = dead.numel()
    total_dead = n_dead if shards is None else int(shards.shard_sum_(torch.tensor(n_dead)))
    if total_dead == 0 or k_aux == 0 or n_tokens == 0:
        return e.new_zeros((), dtype=torch.promote_types(e.dtype, torch.float32)), no_features
    k = min(k_aux, n_dead)

    if isinstance(pre_acts_or_encoder_fn, Tensor):
        pre_dead = pre_acts_or_encoder_fn.reshape(-1, n_features).index_select(1, dead.to(pre_acts_or_encoder_fn.device))
    else:
        pre_dead = pre_acts_or_encoder_fn(dead).reshape(-1, n_dead)
    values, local = pre_dead.topk(k, dim=1, sorted=False)  # [tokens, k]
    if shards is not None:  # keep the candidates that are among the k_aux best of every block
        offered = torch.nn.functional.pad(values.detach(), (0, k_aux - k), value=-torch.inf)
        keep = global_topk_mask(offered, min(k_aux, total_dead), shards)[:, :k]
        values = torch.where(keep, values, torch.zeros_like(values))
    acts = values.relu()
    features = dead.to(local.device)[local]  # [tokens, k] global feature indices
    # e_hat = sum_j acts_j * W_D[features_j], no decoder bias. When k_aux is a sizeable share of the dead features
    # (early in training k_aux = 512 of ~1,000), the code over the dead features is dense enough that three GEMMs
    # beat the sparse kernels (bench/README.md); otherwise the SAE's sparse decoder.
    if k * _DENSE_SHARE >= n_dead:
        code = torch.zeros_like(pre_dead).scatter(1, local, acts)
        e_hat = code.to(W_D.dtype) @ W_D.index_select(0, dead)
    else:
        zero_bias = torch.zeros(d, dtype=W_D.dtype, device=W_D.device)
        e_hat = sparse_decode(acts, features.to(W_D.device), W_D, zero_bias)
    if shards is not None:
        e_hat = partial_sum(e_hat, shards)
    work = torch.promote_types(torch.promote_types(e_hat.dtype, e.dtype), torch.float32)
    e_w = e.to(work)
    squared_error = (e_hat.to(work) - e_w).pow(2).sum()
    if denominator is None:
        total_variance = (e_w - e_w.mean(dim=0)).pow(2).sum()
    else:
        total_variance = torch.as_tensor(denominator, dtype=work, device=e_w.device).detach()
    # Avoid a host sync on the data: where() keeps the step graph-friendly and the rule branch-free.
    total_variance = torch.where(total_variance > 0, total_variance, torch.ones_like(total_variance))
    loss = squared_error / total_variance

    used = torch.zeros(n_features, dtype=torch.bool, device=W_D.device)
    used[features[acts > 0].to(W_D.device)] = True
    return loss, used.nonzero().squeeze(1)
