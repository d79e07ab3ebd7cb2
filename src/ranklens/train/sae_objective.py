"""The training objective of a SparseAutoencoder for the shared Trainer.

Loss: the batch's fraction of variance unexplained (``ranklens.train.losses.fvu_loss``; normalized by the batch's
total variance, as the dataset-norm normalization of LlamaScope normalizes, so one learning rate serves sites whose
scales differ by orders of magnitude), plus alpha * AuxK
(Gao et al.; App. E.1: k_aux 512, alpha 1/32) when `aux_k` > 0, plus the sparsity penalty for ReLU/JumpReLU SAEs.
Features active in the batch (top-k picks that fired, and the AuxK picks) are reported to the trainer, which
passes them to SparseAdam (App. M) and to the dead-feature tracker.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.train.auxk import auxk_loss
from ranklens.train.losses import fvu_loss, global_count, global_mean, total_variance
from ranklens.train.trainer import StepContext, StepResult, describe_values


class SAEObjective(nn.Module):
    def __init__(self, sae: SparseAutoencoder, aux_k: int = 0, aux_coefficient: float = 1 / 32,
                 autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.sae = sae
        self.aux_k = aux_k
        self.aux_coefficient = aux_coefficient
        self.autocast_dtype = autocast_dtype

    @property
    def n_features(self) -> int:
        return self.sae.n_features

    def param_spec(self) -> list[tuple[nn.Parameter, bool]]:
        row_sparse = {"W_E", "b_E", "W_D", "log_threshold"}  # a feature is a row of each of these
        return [(p, name in row_sparse) for name, p in self.sae.named_parameters()]

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def step_loss(self, batch: torch.Tensor, ctx: StepContext) -> StepResult:
        sae = self.sae
        x = batch.to(device=sae.W_D.device, dtype=sae.W_D.dtype)
        with self._autocast(x.device):
            code = sae.encode(x, k=ctx.k)
            x_hat = sae.decode(code)
        layout, n = ctx.layout, x.shape[0]
        loss, fvu = fvu_loss(x, x_hat, layout)
        active = code.active_features()
        l0 = float(code.l0) if layout.shards == 1 else float(layout.shard_sum_(torch.tensor(float(code.l0))))
        metrics = {"fvu": fvu, "l0": global_mean(l0, n, layout)}
        if sae.config.activation in ("relu", "jumprelu"):
            penalty = sae.sparsity_penalty(code) * (n / global_count(n, layout))  # a mean over the whole batch
            loss = loss + penalty
            metrics["sparsity_penalty"] = float(layout.data_sum_(penalty.detach().clone()))
        if self.aux_k > 0:
            rows = x - sae.b_D if sae.config.apply_b_dec_to_input else x

            def dead_pre(dead: torch.Tensor) -> torch.Tensor:
                return F.linear(rows, sae.W_E[dead], sae.b_E[dead])

            residual = x - x_hat.to(x.dtype)
            scale = None if layout.data == 1 else total_variance(residual.detach().float(), layout)
            aux, aux_active = auxk_loss(dead_pre, residual, ctx.dead_mask, sae.W_D, self.aux_k, denominator=scale,
                                        shards=layout if layout.shards > 1 else None)
            loss = loss + self.aux_coefficient * aux
            active = torch.unique(torch.cat([active, aux_active]))
            metrics["aux_loss"] = float(layout.data_sum_(aux.detach().clone()))
        return StepResult(loss=loss, active=active, n_tokens=n, metrics=metrics)

    def after_step(self) -> None:
        if self.sae.config.normalize_decoder:
            self.sae.normalize_decoder_()

    def nonfinite_reason(self, batch: torch.Tensor) -> str:
        return describe_values(batch, "training activations")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.sae.state_dict(*args, **kwargs)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.sae.load_state_dict(state, strict=strict, assign=assign)
