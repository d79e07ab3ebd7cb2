"""A TopK SAE whose features are spread over the ranks of a torchrun job, for dictionaries too large for one device
(the paper's million-feature runs: 2 x 1M x 4,096 parameters plus Adam's two moments).

Each of S ranks of a replica (``ranklens.distributed.Layout``) holds a contiguous block of F / S features: their
encoder and decoder rows, encoder biases, optimizer state and firing counters; b_D is replicated. The forward is the
unsharded one, exactly:

- every block computes its own pre-activations and their local top k (``kernels.topk_encode``, with its sparse
  backward); a token's global top k lies among the blocks' local top k, so one all-gather of k candidates per block
  and a selection give the global top k, each block keeping the entries that fall in it;
- every block decodes its own entries and the partial reconstructions are summed over the blocks (an all-reduce
  whose backward hands each block the gradient of the whole reconstruction, which every block computes alike).

Ties at the k-th value across blocks are broken by block order, which may differ from a single ``topk`` over all
features; with continuous activations such ties do not occur.
"""

from __future__ import annotations

import torch

from ranklens.dictionaries import kernels
from ranklens.dictionaries.sae import Code, SparseAutoencoder
from ranklens.distributed import Layout
from ranklens.errors import RanklensError


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum of every block's partial reconstruction. Backward: the gradient unchanged (every block
    computes the same loss from the same sum, so each partial's gradient is the sum's)."""

    @staticmethod
    def forward(ctx, partial: torch.Tensor, layout: Layout) -> torch.Tensor:
        return layout.shard_sum_(partial.clone())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def global_topk_mask(values: torch.Tensor, k: int, layout: Layout) -> torch.Tensor:
    """bool [N, m]: which of this block's m candidate values per token are among the k largest of all blocks'
    candidates (every block offers the same number m)."""
    if layout.shards == 1:
        return torch.ones_like(values, dtype=torch.bool)
    m = values.shape[1]
    all_values = torch.cat(layout.shard_gather(values.detach().contiguous()), dim=1)  # [N, S m]
    keep = torch.zeros_like(all_values, dtype=torch.bool)
    keep.scatter_(1, all_values.topk(min(k, all_values.shape[1]), dim=1).indices, True)
    return keep[:, layout.shard_rank * m:(layout.shard_rank + 1) * m]


def partial_sum(partial: torch.Tensor, layout: Layout) -> torch.Tensor:
    return partial if layout.shards == 1 else _SumOverShards.apply(partial, layout)


class ShardedSAE(SparseAutoencoder):
    """Block [offset, offset + n_features) of a TopK SAE of ``total`` features (see the module docstring)."""

    def __init__(self, full: SparseAutoencoder, layout: Layout) -> None:
        c = full.config
        if c.activation != "topk":
            raise RanklensError(f"--shards needs a TopK SAE; got activation {c.activation!r}")
        if full.n_features % layout.shards:
            raise RanklensError(f"{full.n_features} features do not split into --shards {layout.shards} equal blocks; "
                                "expected a multiple")
        block = full.n_features // layout.shards
        if block < c.k:
            raise RanklensError(f"a block of {block} features is smaller than k = {c.k}; use fewer --shards")
        super().__init__(c.model_copy(update={"n_features": block}), device=full.W_D.device)
        self.layout, self.total, self.offset = layout, full.n_features, layout.shard_rank * block
        rows = slice(self.offset, self.offset + block)
        with torch.no_grad():
            for name in ("W_E", "b_E", "W_D"):
                getattr(self, name).copy_(getattr(full, name)[rows])
            self.b_D.copy_(full.b_D)

    def encode(self, x: torch.Tensor, *, k: int | None = None) -> Code:
        k = self.config.k if k is None else k
        rows = self._rows(x, "encode")
        values, indices = kernels.topk_encode(rows, self.W_E, self.b_E, k)  # this block's candidates
        keep = global_topk_mask(values, k, self.layout)
        return Code(self.n_features, values=values * keep, indices=indices)

    def decode(self, code: Code) -> torch.Tensor:
        zero = torch.zeros_like(self.b_D)
        partial = kernels.sparse_decode(code.values, code.indices, self.W_D, zero)
        return partial_sum(partial, self.layout) + self.b_D

    @torch.no_grad()
    def gather(self) -> SparseAutoencoder:
        """The whole SAE (every block's rows, in order) on every rank of the replica."""
        full = SparseAutoencoder(self.config.model_copy(update={"n_features": self.total}), device=self.W_D.device)
        for name in ("W_E", "b_E", "W_D"):
            getattr(full, name).copy_(torch.cat(self.layout.shard_gather(getattr(self, name).detach())))
        full.b_D.copy_(self.b_D)
        return full
