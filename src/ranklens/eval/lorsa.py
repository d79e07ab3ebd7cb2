"""Evaluation of a Lorsa on held-out text: FVU, L0 and dead heads over the evaluation tokens, and the spliced LM
loss with Lorsa's output in place of the layer's attention output (keys of ``ranklens.eval.metrics``)."""

from __future__ import annotations

import sys

import torch

from ranklens.data.corpus import HeldOutSource
from ranklens.data.sequences import lorsa_sites
from ranklens.data.tokenize import first_tokens, lm_predictions, take_tokens
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.errors import RanklensError
from ranklens.eval.held_out import eval_batches
from ranklens.eval.lm_loss import spliced_lm_loss
from ranklens.eval.metrics import ReconstructionMetrics
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel
from ranklens.lm.splice import SequenceSplice
from ranklens.progress import progress_bar


def attention_mask_for(lorsa: Lorsa, attention_mask: torch.Tensor) -> torch.Tensor | None:
    """The mask Lorsa needs for right-padded batches: none for a causal Lorsa (no real query sees a padded key)."""
    return None if lorsa.cfg.causal else attention_mask


@torch.no_grad()
def evaluate_lorsa(lorsa: Lorsa, lm: LoadedModel, layer: int, source: HeldOutSource, eval_tokens: int,
                   lm_eval_tokens: int, progress: bool = False) -> dict:
    """FVU, L0 and dead heads over `eval_tokens` held-out tokens, and the spliced LM loss over `lm_eval_tokens`;
    `source` must be text Lorsa never trained on. A head is dead when it is never among the top K with a positive z
    over the evaluation tokens."""
    arch = lm.arch
    if arch.d_model != lorsa.d_model:
        raise RanklensError(f"{lm.name} has d_model {arch.d_model} but the Lorsa expects {lorsa.d_model}")
    site_in, site_out = (arch.site(name) for name in lorsa_sites(layer))
    metrics = ReconstructionMetrics(lorsa.n_heads)
    capture = Capturer(arch, [site_in, site_out])
    dtype = lorsa.W_V.dtype
    with progress_bar(eval_tokens, "held-out Lorsa", enabled=progress) as bar:
        for batch in take_tokens(eval_batches(lm, source), eval_tokens):
            acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
            out = lorsa(acts[site_in.name].to(dtype), attention_mask_for(lorsa, batch.attention_mask.to(lm.device)))
            sel = batch.stat_mask.to(lm.device)
            values, indices = out.values[sel], out.indices[sel]
            metrics.update(acts[site_out.name][sel].to(dtype), out.out[sel], indices[values > 0])
            bar.update(batch.n_tokens)
    result = metrics.result()
    if not arch.causal:
        print(f"note: {lm.name} is not a causal LM; skipping the spliced LM loss", file=sys.stderr)
        return result
    if lm_eval_tokens > 0:
        lm_batches = first_tokens(eval_batches(lm, source), lm_eval_tokens, predictions=True)

        def replacement(x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return lorsa(x.to(dtype), attention_mask_for(lorsa, attention_mask)).out

        result.update(spliced_lm_loss(lm.model, arch, lm_batches, site_out, SequenceSplice(site_in, replacement),
                                      progress=progress),
                      lm_eval_tokens=lm_predictions(lm_batches))
    return result
