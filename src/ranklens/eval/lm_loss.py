"""Next-token cross-entropy with a site replaced: the spliced LM loss and the fraction of loss recovered.

Definitions (the README's Definitions; App. B of the dimensional-collapse paper; footnote 8 for Delta LM loss):

- CE is the mean next-token cross-entropy over pairs (t, t+1) where both positions are ordinary tokens
  (`stat_mask`), so bos, eos and padding neither predict nor are predicted.
- `ce_spliced`: the site's activation replaced by a reconstruction at the ordinary positions; `ce_zero_ablation`:
  replaced by zero; `delta_lm_loss = ce_spliced - ce_clean`;
  `loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`.

Logits are computed a chunk of positions at a time, and the chunk is sized in bytes, not rows
(`logit_chunk_rows`): a fixed 2,048 rows was 2 GB of float32 logits at Gemma 3's 262,144-token vocabulary (and
as much again for the log-softmax), enough to get the process killed on a 24 GB machine, while at a 49k vocabulary
it was 400 MB. Peak scratch memory is now about 3 x LOGIT_BYTES (the logits in the model's dtype, their float32
copy, the log-softmax) whatever the vocabulary; tests/test_lm_loss.py measures it at 262k.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ranklens.data.tokenize import TokenBatch
from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer
from ranklens.lm.sites import Architecture, Site
from ranklens.lm.splice import RowMap, SequenceSplice, replace_site, skip_prefix
from ranklens.progress import progress_bar

LOGIT_BYTES = 64 << 20  # float32 logits per LM-head matmul (64 MiB: 256 rows at 65k, 64 rows at 262k)


def logit_chunk_rows(vocab: int, budget: int | None = None) -> int:
    """Positions per LM-head chunk so that one chunk's float32 logits [rows, vocab] fit in `budget` bytes
    (LOGIT_BYTES by default); at least one row."""
    budget = LOGIT_BYTES if budget is None else budget
    return max(1, budget // (4 * max(int(vocab), 1)))


def lm_head(model: torch.nn.Module, arch: Architecture) -> torch.nn.Module:
    """The causal LM head applied after the base model's final norm."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not arch.causal:
        raise RanklensError(f"model type {model.config.model_type!r} ({type(model).__name__}) has no causal LM "
                            "head; the spliced LM loss needs a causal language model")
    return head


def head_logits(model: torch.nn.Module, head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits of final hidden states [n, d], in float32 at least (with Gemma 2's final soft-cap where the model has
    one)."""
    logits = head(hidden)
    logits = logits.float() if logits.element_size() < 4 else logits
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def _sum_ce(model: torch.nn.Module, arch: Architecture, batch: TokenBatch) -> tuple[float, int]:
    """Sum of next-token CE and the number of counted pairs for one batch, with whatever hooks are active."""
    head = lm_head(model, arch)
    kwargs = {"use_cache": False} if arch.accepts_use_cache else {}
    out = arch.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state
    pairs = batch.stat_mask[:, :-1] & batch.stat_mask[:, 1:]
    h = hidden[:, :-1][pairs]  # [n, d]
    targets = batch.input_ids[:, 1:][pairs]
    step = logit_chunk_rows(head.weight.shape[0])
    total = 0.0
    for start in range(0, h.shape[0], step):
        logits = head_logits(model, head, h[start:start + step])
        total += float(F.cross_entropy(logits, targets[start:start + step], reduction="sum"))
        del logits  # free this chunk before the next one is formed
    return total, int(pairs.sum())


def _splice(arch: Architecture, site: Site, fn: RowMap | SequenceSplice | None, batch: TokenBatch):
    if fn is None:
        return nullcontext()
    if isinstance(fn, SequenceSplice):
        return fn.splice(arch, site, batch)
    return replace_site(arch, site, fn, batch.stat_mask)


def layer_inputs(model: torch.nn.Module, arch: Architecture, batches: Sequence[TokenBatch], site: Site | None,
                 ) -> list[torch.Tensor | None]:
    """The input of `site`'s layer per batch, for `cross_entropies(prefixes=...)`: captured once, it serves any
    number of replacements at that layer. None per batch where the whole model runs (layer 0, no site, encoders)."""
    start = site.layer if site is not None and arch.causal else 0
    if start == 0:
        return [None] * len(batches)
    device = next(model.parameters()).device
    capture = Capturer(model, [Site(start, "resid_pre")])
    return [capture(b.input_ids.to(device), b.attention_mask.to(device))[f"L{start}.resid_pre"] for b in batches]


def cross_entropies(model: torch.nn.Module, arch: Architecture, batches: Iterable[TokenBatch], site: Site | None,
                    replacements: Mapping[str, RowMap | SequenceSplice | None],
                    prefixes: Sequence[torch.Tensor | None] | None = None, progress: bool = False) -> dict[str, float]:
    """Mean CE for each named replacement of `site` (None = the clean model), over the same batches. A replacement
    is a RowMap of the site's own rows or a `SequenceSplice` (computed from another site of the same forward).

    With a site at layer L > 0, the input of layer L is captured once per batch (`layer_inputs`, or `prefixes` from
    an earlier call on the same batches) and every replacement runs only layers L.. (`skip_prefix`), which halves
    the cost of a curve at the middle layer.
    """
    device = next(model.parameters()).device
    batches = [TokenBatch(b.input_ids.to(device), b.attention_mask.to(device), b.stat_mask.to(device), b.lengths,
                          b.n_docs) for b in batches]
    start = site.layer if site is not None and arch.causal else 0
    if prefixes is None:
        prefixes = layer_inputs(model, arch, batches, site)
    result: dict[str, float] = {}
    bar = progress_bar(len(replacements) * len(batches), "LM loss", unit="batch", enabled=progress)
    with torch.inference_mode(), bar:
        for name, fn in replacements.items():
            total, count = 0.0, 0
            for batch, prefix in zip(batches, prefixes, strict=True):
                skip = nullcontext() if prefix is None else skip_prefix(arch, start, prefix)
                with skip, _splice(arch, site, fn, batch):
                    s, c = _sum_ce(model, arch, batch)
                total, count = total + s, count + c
                bar.update(1)
            if count == 0:
                raise RanklensError("no token pairs to evaluate the LM loss on; expected held-out text with at "
                                    "least two ordinary tokens per sequence")
            result[name] = total / count
    return result


def zero_ablation(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)


def spliced_metrics(ce_clean: float, ce_spliced: float, ce_zero: float) -> dict[str, float]:
    """The metric names shared by SAE, Lorsa and subspace evaluations."""
    gap = ce_zero - ce_clean
    return {"ce_clean": ce_clean, "ce_spliced": ce_spliced, "ce_zero_ablation": ce_zero,
            "delta_lm_loss": ce_spliced - ce_clean,
            "loss_recovered": (ce_zero - ce_spliced) / gap if gap != 0 else float("nan")}


def spliced_lm_loss(model: torch.nn.Module, arch: Architecture, batches: Iterable[TokenBatch], site: Site,
                    fn: RowMap | SequenceSplice, progress: bool = False) -> dict[str, float]:
    """Clean, spliced and zero-ablated CE at `site`, and the derived Delta LM loss and loss recovered."""
    ce = cross_entropies(model, arch, batches, site, {"clean": None, "spliced": fn, "zero": zero_ablation},
                         progress=progress)
    return spliced_metrics(ce["clean"], ce["spliced"], ce["zero"])
