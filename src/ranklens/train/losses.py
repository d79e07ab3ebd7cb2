"""The reconstruction loss both dictionaries train on, whole-batch exact under data parallelism.

``fvu_loss``: the batch's fraction of variance unexplained, sum ||y - y_hat||^2 / sum ||y - mean(y)||^2 (Section 3.2's
reconstruction error, normalized by the batch's total variance so one learning rate serves sites whose scales differ
by orders of magnitude). Under data parallelism each replica holds a share of the batch: its loss is its own squared
error over the WHOLE batch's total variance (from the replicas' summed first and second moments, in float64), so the
replicas' gradients add up to the gradient of the one-process loss.
"""

from __future__ import annotations

import torch

from ranklens.distributed import Layout


def total_variance(y: torch.Tensor, layout: Layout) -> torch.Tensor:
    """sum ||y - mean(y)||^2 over the rows of the whole batch (all replicas); y [n, d] in float32 or wider."""
    if layout.data == 1:
        return (y - y.mean(0)).pow(2).sum()
    moments = torch.cat([y.double().sum(0), y.double().pow(2).sum()[None], torch.tensor([float(y.shape[0])],
                                                                                      dtype=torch.float64)])
    layout.data_sum_(moments)
    first, second, n = moments[:-2], moments[-2], moments[-1]
    return (second - first.pow(2).sum() / n).to(y.dtype)


def fvu_loss(target: torch.Tensor, prediction: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, float]:
    """(this replica's share of the batch's FVU, with its graph; the batch's FVU as a number)."""
    y = target.to(torch.promote_types(target.dtype, torch.float32))
    error = (prediction.to(y.dtype) - y).pow(2).sum()
    variance = total_variance(y, layout)
    loss = error / variance
    if layout.data == 1:
        return loss, float(loss.detach())
    return loss, float(layout.data_sum_(error.detach().clone()) / variance)


def global_mean(value: float, n_tokens: int, layout: Layout) -> float:
    """The whole batch's mean of a per-token mean ``value`` over this replica's ``n_tokens``."""
    if layout.data == 1:
        return value
    parts = layout.data_sum_(torch.tensor([value * n_tokens, float(n_tokens)], dtype=torch.float64))
    return float(parts[0] / parts[1])


def global_count(n: int, layout: Layout) -> int:
    """The whole batch's token count from this replica's ``n``."""
    return n if layout.data == 1 else int(layout.data_sum_(torch.tensor(n)))
