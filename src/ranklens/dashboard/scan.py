"""The dashboard's one pass over held-out text: every feature's statistics, and what its pages need afterwards.

``scan_sae`` and ``scan_lorsa`` run the model over the text (early-stopped at the dictionary's layer), encode each
batch with the dictionary, and feed ``FeatureStats`` (``ranklens.dashboard.stats``). They also keep:

- the token ids of every real position and the sparse code of every ordinary token (``Tokens``), so the context
  windows around the top and sampled activations are cut out afterwards without a second forward pass (memory:
  tokens x K x 8 bytes, 40 MB for 100k tokens at K = 50);
- a covariance accumulator of the space the decoder rows live in (the SAE's site; Lorsa's attention output), for
  the share of each decoder row inside the active subspace;
- for Lorsa, the attribution of each head to the original attention heads (App. F, ``HeadAttribution``).

The text is cut at exactly ``tokens`` ordinary tokens (bos/eos/pad excluded), whole sequences as context.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ranklens.analysis.lorsa_attribution import HeadAttribution
from ranklens.dashboard.stats import FeatureStats
from ranklens.data.corpus import HeldOutSource
from ranklens.data.sequences import lorsa_sites
from ranklens.data.tokenize import TokenBatch
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.eval.held_out import eval_batches
from ranklens.linalg.accumulator import CovarianceAccumulator
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel
from ranklens.lm.sites import Site, per_head_outputs


@dataclass
class Tokens:
    """The scanned text: ``ids`` [P] of every real position (sequences back to back), ``starts`` [S + 1] where each
    sequence begins in it, ``row`` [P] the ordinary token number of each position (-1 for bos/eos/pad), and the
    sparse code of every ordinary token (``values``, ``indices`` [N, K])."""

    ids: list[torch.Tensor] = field(default_factory=list)
    starts: list[int] = field(default_factory=lambda: [0])
    rows: list[torch.Tensor] = field(default_factory=list)
    codes: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    n: int = 0  # ordinary tokens so far

    def add(self, batch: TokenBatch, stat: torch.Tensor, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Record a batch (``stat`` [B, T]: the ordinary tokens kept) and its code at those tokens; returns their
        global numbers."""
        numbers = torch.full(stat.shape, -1, dtype=torch.int64)
        numbers[stat] = torch.arange(self.n, self.n + int(stat.sum()))
        for b, length in enumerate(batch.lengths.tolist()):
            self.ids.append(batch.input_ids[b, :length].to(torch.int64))
            self.rows.append(numbers[b, :length])
            self.starts.append(self.starts[-1] + length)
        self.codes.append((values.detach().float().cpu(), indices.detach().cpu().to(torch.int32)))
        first = self.n
        self.n += int(stat.sum())
        return torch.arange(first, self.n)

    def finish(self) -> Tokens:
        """Concatenate what was recorded (codes padded to one width, with zeros)."""
        width = max((v.shape[1] for v, _ in self.codes), default=0)
        values = [torch.nn.functional.pad(v, (0, width - v.shape[1])) for v, _ in self.codes]
        indices = [torch.nn.functional.pad(i, (0, width - i.shape[1])) for _, i in self.codes]
        self.values = torch.cat(values) if values else torch.zeros(0, width)
        self.indices = torch.cat(indices) if indices else torch.zeros(0, width, dtype=torch.int32)
        self.flat_ids = torch.cat(self.ids) if self.ids else torch.zeros(0, dtype=torch.int64)
        self.flat_rows = torch.cat(self.rows) if self.rows else torch.zeros(0, dtype=torch.int64)
        self.position = torch.full((self.n,), -1, dtype=torch.int64)  # ordinary token -> position in the text
        real = self.flat_rows >= 0
        self.position[self.flat_rows[real]] = torch.arange(self.flat_rows.numel())[real]
        self.seq_starts = torch.tensor(self.starts)
        return self

    def window(self, token: int, feature: int, before: int, after: int) -> dict:
        """The context of ordinary token ``token``: the token ids around it within its sequence and ``feature``'s
        activation at each (0 on bos/eos/pad)."""
        p = int(self.position[token])
        seq = int(torch.searchsorted(self.seq_starts, p, right=True)) - 1
        start, end = int(self.seq_starts[seq]), int(self.seq_starts[seq + 1])
        lo, hi = max(start, p - before), min(end, p + after + 1)
        rows = self.flat_rows[lo:hi]
        acts = torch.zeros(hi - lo)
        ok = rows >= 0
        if bool(ok.any()):
            hit = self.indices[rows[ok]] == feature
            acts[ok] = (self.values[rows[ok]] * hit).sum(-1)
        return {"ids": self.flat_ids[lo:hi].tolist(), "acts": acts.tolist(), "peak": p - lo, "doc": seq,
                "pos": p - start, "lo": lo, "seq": seq}


@dataclass
class Scan:
    stats: FeatureStats
    text: Tokens
    covariance: CovarianceAccumulator
    attribution: HeadAttribution | None = None


def _batches(lm: LoadedModel, source: HeldOutSource, tokens: int):
    """Token batches of the text, the last one's ordinary tokens cut so that exactly ``tokens`` are kept."""
    kept = 0
    for batch in eval_batches(lm, source):
        stat = batch.stat_mask.clone()
        order = stat.reshape(-1).cumsum(0).reshape(stat.shape)
        stat &= order <= tokens - kept
        yield batch, stat
        kept += int(stat.sum())
        if kept >= tokens:
            return
    raise RanklensError(f"corpus {source.corpus!r} ran out after {kept} held-out tokens of the {tokens} asked for; "
                        "lower --tokens or use a larger corpus")


def _sparse(code) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) [N, K] of any SAE code; a dense code becomes its nonzero entries (K = the most per token)."""
    if code.is_sparse:
        return code.values, code.indices
    dense = code.to_dense()
    width = max(1, int((dense > 0).sum(1).max())) if dense.numel() else 1
    return dense.topk(min(width, dense.shape[1]), dim=1)


@torch.no_grad()
def scan_sae(sae: SparseAutoencoder, lm: LoadedModel, site: Site, source: HeldOutSource, tokens: int, *,
             n_top: int, n_sample: int, seed: int, progress: bool) -> Scan:
    capture = Capturer(lm.arch, [site])
    stats, text = FeatureStats(sae.n_features, n_top, n_sample, seed), Tokens()
    acc = CovarianceAccumulator(sae.d_in)
    bar = tqdm(total=tokens, unit="tok", desc="dashboard", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for batch, stat in _batches(lm, source, tokens):
        acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))[site.name]
        rows = acts[stat.to(acts.device)]
        values, indices = _sparse(sae.encode(rows.to(sae.W_D.dtype)))
        stats.update(values, indices, text.add(batch, stat, values, indices))
        acc.update(rows)
        bar.update(rows.shape[0])
    bar.close()
    return Scan(stats, text.finish(), acc)


@torch.no_grad()
def scan_lorsa(lorsa: Lorsa, lm: LoadedModel, layer: int, source: HeldOutSource, tokens: int, *, n_top: int,
               n_sample: int, seed: int, progress: bool, attribution: bool = True) -> Scan:
    site_in, site_out = (lm.arch.site(name) for name in lorsa_sites(layer))
    site_z = Site(layer, "attn_z")
    capture = Capturer(lm.arch, [site_in, site_out, *([site_z] if attribution else [])])
    W_O_mhsa = lm.arch.output_projection(layer)[0].detach().double()
    stats, text = FeatureStats(lorsa.n_heads, n_top, n_sample, seed), Tokens()
    acc = CovarianceAccumulator(lorsa.d_model)
    attr = HeadAttribution(lorsa.n_heads, lm.arch.n_heads) if attribution else None
    bar = tqdm(total=tokens, unit="tok", desc="dashboard", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for batch, stat in _batches(lm, source, tokens):
        real = batch.attention_mask.to(lm.device)
        acts = capture(batch.input_ids.to(lm.device), real)
        out = lorsa(acts[site_in.name].to(lorsa.W_V.dtype), None if lorsa.cfg.causal else real)
        sel = stat.to(lm.device)
        values, indices = out.values[sel], out.indices[sel]
        stats.update(values, indices, text.add(batch, stat, values, indices))
        acc.update(acts[site_out.name][sel])
        if attr is not None:
            heads = per_head_outputs(acts[site_z.name][sel].double(), W_O_mhsa, lm.arch.n_heads)
            attr.update(heads, values, indices, lorsa.W_O.detach())
        bar.update(int(stat.sum()))
    bar.close()
    return Scan(stats, text.finish(), acc, attr)
