"""The training objective of a Lorsa layer for the shared Trainer.

Lorsa reads the attention input and is trained to predict the attention output (Lorsa paper Section 3.1: "Lorsa takes
in the same inputs of MHSA and is trained to predict MHSA outputs", an MSE objective). Per batch of whole sequences
(``ranklens.data.sequences.LorsaBatch``), over the ordinary tokens only (App. O.1 excludes bos/eos/pad):

    loss = FVU = sum ||y - y_hat||^2 / sum ||y - mean(y)||^2                  (the MSE, normalized by the batch's
                                                                              target variance, as the SAE objective)
         + alpha * AuxK                                                       (App. O.1: alpha 1/32, k_aux 512)

Every real position (bos included) is an attention key, so Lorsa sees what the MHSA saw. For a causal Lorsa on
right-padded sequences no query at a real position can see a padded key, so the objective passes no padding mask and
the attention runs SDPA's causal kernel (exact at every position that enters the loss); encoders get the mask.

AuxK (Gao et al. 2024, ``ranklens.train.auxk``): among the heads that are dead for the trainer's window, the k_aux
largest pre-ReLU z per token reconstruct the residual y - y_hat through their w_o rows; the pre-activations come from
the same attention pass as the main code (``Lorsa.encode_with_pre``), so AuxK costs no second attention pass.

Active heads (selected with z > 0 at an ordinary token, plus the AuxK heads) go to SparseAdam and to the dead tracker.
Row-sparse parameters are the per-head ones (W_V, b_V, W_O); the QK weights are shared by a group of heads and the
output bias by all, so they take dense Adam steps. Frozen QK weights (App. B.3's "fixed" setting) are not optimized.

After each step, with ``normalize_output`` the w_o rows are renormalized to unit norm by the prediction-preserving
rescaling of footnote 3 (``Lorsa.normalize_output_``), so z itself is the head's activation throughout training.
The paper applies that rescaling once to the trained model (footnote 3) and ASI starts from unit rows (App. K, step
4); the job does the former in any case before saving, so the flag only changes the optimization path.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from ranklens.data.sequences import LorsaBatch
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.train.auxk import auxk_loss
from ranklens.train.losses import fvu_loss, global_mean, total_variance
from ranklens.train.trainer import StepContext, StepResult, describe_values

__all__ = ["LorsaObjective"]

_ROW_SPARSE = ("W_V", "b_V", "W_O")  # a head is a row of each of these


class LorsaObjective(nn.Module):
    def __init__(self, lorsa: Lorsa, aux_k: int = 0, aux_coefficient: float = 1 / 32,
                 autocast_dtype: torch.dtype | None = None, normalize_output: bool = False) -> None:
        super().__init__()
        self.lorsa = lorsa
        self.aux_k = aux_k
        self.aux_coefficient = aux_coefficient
        self.autocast_dtype = autocast_dtype
        self.normalize_output = normalize_output

    @property
    def n_features(self) -> int:
        return self.lorsa.n_heads

    def param_spec(self) -> list[tuple[nn.Parameter, bool]]:
        return [(p, name in _ROW_SPARSE) for name, p in self.lorsa.named_parameters() if p.requires_grad]

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None or self.autocast_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    def _inputs(self, batch: LorsaBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """x, y in the parameters' dtype (copies of inference tensors), the attention mask to pass (None where the
        causal kernel is exact at every real position), and the loss positions."""
        p = self.lorsa.W_V
        x, y = (t.to(device=p.device, dtype=p.dtype) for t in (batch.x, batch.target))
        x, y = (t.clone() if t.is_inference() else t for t in (x, y))
        real = batch.attention_mask.to(p.device).bool()
        right_padded = bool((real[:, 1:] <= real[:, :-1]).all())
        return x, y, None if self.lorsa.cfg.causal and right_padded else real, batch.stat_mask.to(p.device).bool()

    def step_loss(self, batch: LorsaBatch, ctx: StepContext) -> StepResult:
        lorsa = self.lorsa
        x, y, mask, sel = self._inputs(batch)
        want_aux = self.aux_k > 0 and bool(ctx.dead_mask.any())
        with self._autocast(x.device):
            if want_aux:
                values, indices, pre = lorsa.encode_with_pre(x, mask)
            else:
                (values, indices), pre = lorsa.encode(x, mask), None
            y_hat = lorsa.decode(values, indices)
        values, indices, y_hat, y = values[sel], indices[sel], y_hat[sel], y[sel]  # ordinary tokens only
        layout = ctx.layout
        loss, fvu_value = fvu_loss(y, y_hat, layout)
        fired = values > 0
        active = torch.unique(indices[fired])
        metrics = {"fvu": fvu_value, "l0": global_mean(float(fired.sum()) / max(y.shape[0], 1), y.shape[0], layout)}
        if want_aux:
            pre = pre[sel]

            def dead_pre(dead: torch.Tensor) -> torch.Tensor:
                return pre.index_select(1, dead.to(pre.device))

            residual = y - y_hat.to(y.dtype)
            scale = None if layout.data == 1 else total_variance(residual.detach().float(), layout)
            aux, aux_active = auxk_loss(dead_pre, residual, ctx.dead_mask, lorsa.W_O, self.aux_k, denominator=scale)
            loss = loss + self.aux_coefficient * aux
            active = torch.unique(torch.cat([active, aux_active]))
            metrics["aux_loss"] = float(layout.data_sum_(aux.detach().clone()))
        return StepResult(loss=loss, active=active, n_tokens=int(y.shape[0]), metrics=metrics)

    def after_step(self) -> None:
        if self.normalize_output:
            self.lorsa.normalize_output_()

    def nonfinite_reason(self, batch: LorsaBatch) -> str:
        inputs = describe_values(batch.x[batch.attention_mask], "attention inputs")
        if not inputs.endswith("lower the learning rate"):
            return inputs
        return describe_values(batch.target[batch.stat_mask], "attention outputs (the targets)")

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.lorsa.state_dict(*args, **kwargs)

    def load_state_dict(self, state: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.lorsa.load_state_dict(state, strict=strict, assign=assign)
