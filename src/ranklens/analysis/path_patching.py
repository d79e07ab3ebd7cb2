"""Scoring attention heads on a probe: path patching (Lorsa paper Section 5), attribution (App. E.1) and how much of
a head's attention or z pattern falls on the task's source positions.

**Path patching.** Ablate one head's output at layer l and let the change reach the logits only through residual
connections and MLPs: every later attention layer keeps its clean output. With later attention frozen, nothing
moves between positions any more, so the metric at a row depends only on that row's residual stream: the exact
path-patched metric is the model's own blocks l..L-1 run on that single position (a length-1 sequence whose layer-l
input is the clean residual and whose attention outputs are the clean ones, layer l's minus the head's change).
That is what ``PathPatcher`` runs, many (head, row) pairs per forward; it equals a full re-run of the model with the
head's output replaced at every position and the later attention outputs pinned to their clean values
(tests/test_heads.py checks it against that brute force). A head's score is the mean over the probe's rows of
metric(clean) - metric(ablated), so positive means the head raises the metric.

Ablation: an MHSA head's output O_h = z_h W_O,h^T is replaced by its mean over the probe's ordinary positions (mean
ablation, Wang et al. 2023); a Lorsa head is set to zero (its off state: a head outside the top K contributes
nothing), so it changes only the rows where it is active. A Lorsa layer is the model's attention output written as
the Lorsa's heads plus its error term; ablating a head subtracts its output from the model's own attention output,
so the clean run stays the model's.

**Attribution** (App. E.1): attr_h = sum over ordinary positions of (O_h - O_h^ablated) . dL/d(attn_out_l), the
gradient of the mean row metric taken through the whole model (every path, later attention included): the
first-order estimate of the same ablation's total effect, from one backward pass for every head of every layer.

**Pattern share**: at each row, the share of a head's attention (MHSA: the softmax weights) or of its z pattern's
absolute mass (Lorsa: |A_ij v_j|, over the rows where the head is active) that falls on the task's source positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch

from ranklens.analysis.probes import Probe, ProbeBatch
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.eval.lm_loss import head_logits, lm_head, logit_chunk_rows
from ranklens.lm.attention import MHSAWeights, attention_probs, mhsa_weights
from ranklens.lm.load import LoadedModel
from ranklens.lm.sites import Site
from ranklens.lm.splice import on_site, replace_site, skip_prefix
from ranklens.progress import progress_bar

__all__ = ["HeadScores", "LorsaLayer", "ProbeRun", "row_metric", "score_heads"]

SEQUENCES_PER_CHUNK = 16


def row_metric(logits: torch.Tensor, target: torch.Tensor, foil: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The metric of each row from its float32 logits [n, V]: the target's logit, logit(target) - logit(foil), or
    the target's log-probability."""
    picked = logits.gather(-1, target[:, None])[:, 0]
    if kind == "logit":
        return picked
    if kind == "logit_diff":
        return picked - logits.gather(-1, foil[:, None])[:, 0]
    if kind == "logprob":
        return picked - torch.logsumexp(logits, dim=-1)
    raise ValueError(f"unknown metric {kind!r}")


@dataclass
class LorsaLayer:
    """A trained Lorsa standing in for the attention of `layer` (heads = Lorsa heads + the Lorsa's error)."""

    lorsa: Lorsa
    layer: int


@dataclass
class HeadScores:
    """Scores of the heads of one layer. path_patching / attribution [H]; pattern_share [H] (NaN where a head was
    never active at a row); active_rows [H]: rows where the head's output was ablated (every row for MHSA)."""

    layer: int
    path_patching: torch.Tensor
    attribution: torch.Tensor
    pattern_share: torch.Tensor
    active_rows: torch.Tensor
    best_row: torch.Tensor | None = None  # Lorsa: the row of each head's largest activation (-1: never active)
    activations: torch.Tensor | None = None  # Lorsa: (row, head, value) of every activation at a row, [n, 3]


@dataclass
class ProbeRun:
    """Everything scored on one probe: the model's own accuracy and metric at its rows, the check that the
    position-wise forward reproduces the full forward, and the scores of each MHSA layer and Lorsa."""

    n_rows: int
    accuracy: float
    metric: float
    position_wise_error: float
    mhsa: list[HeadScores] = field(default_factory=list)
    lorsa: list[HeadScores] = field(default_factory=list)


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """Parameters need no gradient for an attribution (only the activations do)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _chunks(probe: Probe) -> Iterator[tuple[torch.Tensor, ProbeBatch, torch.Tensor]]:
    """(input_ids, the batch's rows restricted to those sequences with local sequence indices, their row ids in the
    probe's row order), SEQUENCES_PER_CHUNK sequences at a time."""
    offset = 0
    for batch in probe.batches:
        N = batch.input_ids.shape[0]
        for s in range(0, N, SEQUENCES_PER_CHUNK):
            e = min(N, s + SEQUENCES_PER_CHUNK)
            keep = (batch.rows[:, 0] >= s) & (batch.rows[:, 0] < e)
            rows = batch.rows[keep].clone()
            rows[:, 0] -= s
            sub = ProbeBatch(batch.input_ids[s:e], rows, batch.target[keep],
                             None if batch.foil is None else batch.foil[keep], batch.sources[keep])
            yield batch.input_ids[s:e], sub, offset + keep.nonzero()[:, 0]
        offset += batch.rows.shape[0]


class _LayerSums:
    """Per-layer sums over a probe's chunks (float64): of the ablation-independent parts of the attribution and
    of the head outputs (for the mean), plus the head outputs and pattern shares at the rows."""

    def __init__(self, n_heads: int, d: int, n_rows: int) -> None:
        self.out_sum = torch.zeros(n_heads, d, dtype=torch.float64)
        self.out_grad = torch.zeros(n_heads, dtype=torch.float64)  # sum_pos O_h . g
        self.grad_sum = torch.zeros(d, dtype=torch.float64)  # sum_pos g
        self.count = 0
        self.share_sum = torch.zeros(n_heads, dtype=torch.float64)
        self.share_count = torch.zeros(n_heads, dtype=torch.float64)
        self.rows_out: torch.Tensor | None = None  # MHSA: each head's output at the rows, [H, R, d]
        self.lorsa_pairs: list[torch.Tensor] = []  # Lorsa: (row, head, value) triples
        self.n_rows = n_rows


def _mhsa_reduce(sums: _LayerSums, w: MHSAWeights, attn_in: torch.Tensor, attn_z: torch.Tensor, grad: torch.Tensor,
                 ordinary: torch.Tensor, chunk: ProbeBatch, row_ids: torch.Tensor) -> None:
    H, dh = w.n_heads, w.d_head
    W_O = w.W_O.to(attn_z.dtype).reshape(w.d_model, H, dh)
    z = attn_z.reshape(*attn_z.shape[:2], H, dh)  # [n, T, H, dh]
    heads = torch.einsum("nthk,dhk->nthd", z, W_O)  # O_h at every position
    sel = heads[ordinary].double()  # [P, H, d]
    g = grad[ordinary].double()  # [P, d]
    sums.out_sum += sel.sum(0).cpu()
    sums.out_grad += torch.einsum("phd,pd->h", sel, g).cpu()
    sums.grad_sum += g.sum(0).cpu()
    sums.count += sel.shape[0]
    b, p = chunk.rows[:, 0], chunk.rows[:, 1]
    if sums.rows_out is None:
        sums.rows_out = torch.zeros(H, sums.n_rows, w.d_model, dtype=heads.dtype)  # the model's own precision
    sums.rows_out[:, row_ids] = heads[b, p].transpose(0, 1).cpu()
    probs = attention_probs(w, attn_in)  # [n, H, T, T]
    share = (probs[b, :, p, :] * chunk.sources[:, None, :].to(probs.dtype)).sum(-1)  # [R_c, H]
    sums.share_sum += share.double().sum(0).cpu()
    sums.share_count += share.shape[0]


def _lorsa_reduce(sums: _LayerSums, lorsa: Lorsa, attn_in: torch.Tensor, grad: torch.Tensor,
                  ordinary: torch.Tensor, chunk: ProbeBatch, row_ids: torch.Tensor) -> None:
    x = attn_in.to(lorsa.W_V.dtype)
    out = lorsa(x)  # no padding in a probe
    values = out.values * ordinary[..., None]  # the prefix's outputs are never ablated
    g = grad.to(lorsa.W_O.dtype)
    # sum_pos value * (w_o . g), gathered for the selected heads only
    contrib = (values * torch.einsum("ntd,ntkd->ntk", g, lorsa.W_O[out.indices])).double()
    sums.out_grad.index_add_(0, out.indices.reshape(-1).cpu(), contrib.reshape(-1).cpu())
    b, p = chunk.rows[:, 0], chunk.rows[:, 1]
    vals, idx = values[b, p], out.indices[b, p]  # [R_c, K]
    live = vals > 0
    r_local = torch.arange(b.shape[0], device=idx.device)[:, None].expand_as(idx)[live].cpu()
    sums.lorsa_pairs.append(torch.stack([row_ids[r_local].double(), idx[live].double().cpu(), vals[live].double().cpu()], 1))
    for r in range(b.shape[0]):  # z-pattern share of each active head at each row
        heads = idx[r][live[r]]
        if heads.numel() == 0:
            continue
        zrows = lorsa.z_rows(x[b[r]], heads, torch.full_like(heads, int(p[r]))).abs().double()  # [m, T]
        share = (zrows * chunk.sources[r].double()).sum(-1) / zrows.sum(-1).clamp_min(1e-30)
        sums.share_sum.index_add_(0, heads.cpu(), share.cpu())
        sums.share_count.index_add_(0, heads.cpu(), torch.ones_like(share).cpu())


class PathPatcher:
    """Runs the model's blocks from `layer` on single positions (see the module docstring): the metric of each row
    with layer `layer`'s attention output replaced, every later one pinned to its clean value."""

    def __init__(self, lm: LoadedModel, layer: int, resid_pre: torch.Tensor, attn_out: dict[int, torch.Tensor],
                 target: torch.Tensor, foil: torch.Tensor | None, kind: str) -> None:
        self.lm, self.layer, self.resid_pre, self.attn_out = lm, layer, resid_pre, attn_out
        self.target, self.foil, self.kind = target, foil, kind
        self.head = lm_head(lm.model, lm.arch)
        self.step = max(1, min(1024, logit_chunk_rows(self.head.weight.shape[0])))

    @torch.no_grad()
    def metric(self, rows: torch.Tensor, layer_out: torch.Tensor) -> torch.Tensor:
        """Metric at probe rows `rows` [n] when layer `layer`'s attention output there is `layer_out` [n, d]."""
        parts = [self._metric(rows[s:s + self.step], layer_out[s:s + self.step])
                 for s in range(0, rows.shape[0], self.step)]
        return torch.cat(parts) if parts else torch.zeros(0)

    def _metric(self, rows: torch.Tensor, layer_out: torch.Tensor) -> torch.Tensor:
        arch, dev, dtype = self.lm.arch, self.lm.device, self.lm.dtype
        n = rows.shape[0]
        everywhere = torch.ones(n, 1, dtype=torch.bool, device=dev)
        resid = self.resid_pre[rows].to(dev, dtype)
        with ExitStack() as stack:
            if self.layer > 0:
                stack.enter_context(skip_prefix(arch, self.layer, resid[:, None]))
            else:
                stack.enter_context(replace_site(arch, Site(0, "resid_pre"), lambda _, r=resid: r, everywhere))
            for l, clean in self.attn_out.items():
                value = (layer_out if l == self.layer else clean[rows]).to(dev, dtype)
                stack.enter_context(replace_site(arch, Site(l, "attn_out"), lambda _, v=value: v, everywhere))
            kwargs = {"use_cache": False} if arch.accepts_use_cache else {}
            out = arch.base_model(input_ids=torch.zeros(n, 1, dtype=torch.long, device=dev),
                                  attention_mask=torch.ones(n, 1, dtype=torch.long, device=dev), **kwargs)
        hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[:, 0]
        target = self.target[rows].to(dev)
        foil = None if self.foil is None else self.foil[rows].to(dev)
        if self.kind == "logprob":  # needs every logit
            return row_metric(head_logits(self.lm.model, self.head, hidden), target, foil, self.kind).double().cpu()
        # A logit (difference) needs only the target's and the foil's rows of the unembedding: the same numbers as
        # the full LM head's columns, at a vocabulary-th of its cost.
        picked = target[:, None] if foil is None else torch.stack([target, foil], 1)  # [n, m]
        logits = torch.einsum("nd,nmd->nm", hidden, self.head.weight[picked].to(hidden.dtype))
        if getattr(self.head, "bias", None) is not None:
            logits = logits + self.head.bias[picked]
        logits = head_logits(self.lm.model, torch.nn.Identity(), logits)  # float32 at least, soft-capped
        metric = logits[:, 0] if foil is None else logits[:, 0] - logits[:, 1]
        return metric.double().cpu()


@dataclass
class _ChunkPass:
    """One forward and backward over a chunk: the sites read, the gradient of the probe's mean row metric at each
    patched layer's attention output, and the metric and top-1 prediction at the chunk's rows."""

    seen: dict[tuple[int, str], torch.Tensor]
    grads: dict[int, torch.Tensor]
    metric: torch.Tensor
    prediction: torch.Tensor


def _chunk_pass(lm: LoadedModel, ids: torch.Tensor, chunk: ProbeBatch, kind: str, n_rows: int,
                grad_layers: list[int], first: int) -> _ChunkPass:
    arch = lm.arch
    seen: dict[tuple[int, str], torch.Tensor] = {}
    zeros: dict[int, torch.Tensor] = {}

    def keep(key: tuple[int, str]):
        def fn(x: torch.Tensor) -> None:
            seen[key] = x.detach()
        return fn

    def add_zero(layer: int):  # d(metric)/d(attn_out) without cutting any path through it
        def fn(x: torch.Tensor) -> torch.Tensor:
            zeros[layer] = torch.zeros_like(x, requires_grad=True)
            seen[(layer, "attn_out")] = x.detach()
            return x + zeros[layer]
        return fn

    handles = []
    for l in range(first, arch.n_layers):
        if l in grad_layers:
            handles += [on_site(arch, Site(l, kind), keep((l, kind))) for kind in ("resid_pre", "attn_in", "attn_z")]
            handles.append(on_site(arch, Site(l, "attn_out"), add_zero(l)))
        else:
            handles.append(on_site(arch, Site(l, "attn_out"), keep((l, "attn_out"))))
    b, p = chunk.rows[:, 0], chunk.rows[:, 1]
    try:
        with _frozen(lm.model), torch.enable_grad():
            kwargs = {"use_cache": False} if arch.accepts_use_cache else {}
            out = arch.base_model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            hidden = (out[0] if isinstance(out, tuple) else out.last_hidden_state)[b, p]
            logits = head_logits(lm.model, lm_head(lm.model, arch), hidden)
            metric = row_metric(logits, chunk.target, chunk.foil, kind)
            (metric.sum() / n_rows).backward()
    finally:
        for h in handles:
            h.remove()
    return _ChunkPass(seen, {l: z.grad for l, z in zeros.items()}, metric.detach(), logits.argmax(-1))


def score_heads(lm: LoadedModel, probe: Probe, layers: list[int], lorsas: list[LorsaLayer] = (),
                prefix_length: int = 1, progress: bool = False) -> ProbeRun:
    """Path patching, attribution and pattern share of every MHSA head of `layers` and of every head of each Lorsa
    on `probe`. Positions before `prefix_length` (the bos) are not ordinary: never ablated, not in the means.
    ``progress``: a bar over the probe's chunks, then the layers path-patched."""
    arch, dev = lm.arch, lm.device
    R, d = probe.n_rows, arch.d_model
    grad_layers = sorted(set(layers) | {ll.layer for ll in lorsas})
    first = grad_layers[0]
    weights = {l: mhsa_weights(arch, l) for l in layers}
    mhsa = {l: _LayerSums(arch.n_heads, d, R) for l in layers}
    lsums = [_LayerSums(ll.lorsa.n_heads, d, R) for ll in lorsas]
    resid_rows = {l: torch.zeros(R, d, dtype=torch.float64) for l in grad_layers}
    out_rows = {l: torch.zeros(R, d, dtype=torch.float64) for l in range(first, arch.n_layers)}
    target = torch.cat([b.target for b in probe.batches])
    foil = torch.cat([b.foil for b in probe.batches]) if probe.batches[0].foil is not None else None
    model_metric = torch.zeros(R, dtype=torch.float64)
    correct = torch.zeros(R, dtype=torch.bool)
    chunks = list(_chunks(probe))
    bar = progress_bar(len(chunks) + len(layers) + len(lorsas), probe.task, unit="step", enabled=progress)
    for ids, chunk, row_ids in chunks:
        bar.update(1)
        ids, chunk = ids.to(dev), chunk.to(dev)
        cp = _chunk_pass(lm, ids, chunk, probe.metric, R, grad_layers, first)
        b, p = chunk.rows[:, 0], chunk.rows[:, 1]
        model_metric[row_ids] = cp.metric.double().cpu()
        correct[row_ids] = (cp.prediction == chunk.target).cpu()
        for l in out_rows:
            out_rows[l][row_ids] = cp.seen[(l, "attn_out")][b, p].double().cpu()
        for l in grad_layers:
            resid_rows[l][row_ids] = cp.seen[(l, "resid_pre")][b, p].double().cpu()
        ordinary = torch.ones(ids.shape, dtype=torch.bool, device=dev)
        ordinary[:, :prefix_length] = False
        with torch.no_grad():
            for l in layers:
                _mhsa_reduce(mhsa[l], weights[l], cp.seen[(l, "attn_in")], cp.seen[(l, "attn_z")], cp.grads[l],
                             ordinary, chunk, row_ids)
            for ll, sums in zip(lorsas, lsums, strict=True):
                _lorsa_reduce(sums, ll.lorsa, cp.seen[(ll.layer, "attn_in")], cp.grads[ll.layer], ordinary, chunk,
                              row_ids)
    run = ProbeRun(R, float(correct.float().mean()), float(model_metric.mean()), 0.0)
    all_rows, errors = torch.arange(R), []

    def patcher_at(layer: int) -> tuple[PathPatcher, torch.Tensor]:
        patcher = PathPatcher(lm, layer, resid_rows[layer], {k: v for k, v in out_rows.items() if k >= layer},
                              target, foil, probe.metric)
        clean = patcher.metric(all_rows, out_rows[layer])
        errors.append(float((clean - model_metric).abs().max()))
        return patcher, clean

    for l in layers:
        run.mhsa.append(_mhsa_scores(l, mhsa[l], *patcher_at(l), out_rows[l]))
        bar.update(1)
    for ll, sums in zip(lorsas, lsums, strict=True):
        run.lorsa.append(_lorsa_scores(ll, sums, *patcher_at(ll.layer), out_rows[ll.layer]))
        bar.update(1)
    bar.close()
    run.position_wise_error = max(errors, default=0.0)
    return run


def _mhsa_scores(layer: int, sums: _LayerSums, patcher: PathPatcher, clean: torch.Tensor,
                 layer_out: torch.Tensor) -> HeadScores:
    H, R = sums.rows_out.shape[:2]
    mean = sums.out_sum / max(sums.count, 1)  # [H, d]
    attribution = sums.out_grad - mean @ sums.grad_sum
    delta = sums.rows_out.double() - mean[:, None, :]  # [H, R, d]
    rows = torch.arange(R).repeat(H)
    ablated = patcher.metric(rows, (layer_out[None] - delta).reshape(H * R, -1)).reshape(H, R)
    effect = (clean[None] - ablated).mean(1)
    share = sums.share_sum / sums.share_count.clamp_min(1)
    return HeadScores(layer, effect, attribution, share, torch.full((H,), R))


def _lorsa_scores(ll: LorsaLayer, sums: _LayerSums, patcher: PathPatcher, clean: torch.Tensor,
                  layer_out: torch.Tensor) -> HeadScores:
    H, R = ll.lorsa.n_heads, clean.shape[0]
    pairs = torch.cat(sums.lorsa_pairs) if sums.lorsa_pairs else torch.zeros(0, 3, dtype=torch.float64)
    rows, heads, values = pairs[:, 0].long(), pairs[:, 1].long(), pairs[:, 2]
    W_O = ll.lorsa.W_O.detach().double().cpu()
    ablated = patcher.metric(rows, layer_out[rows] - values[:, None] * W_O[heads])
    effect = torch.zeros(H, dtype=torch.float64).index_add_(0, heads, clean[rows] - ablated) / R
    active = torch.zeros(H, dtype=torch.long).index_add_(0, heads, torch.ones_like(heads))
    share = torch.where(sums.share_count > 0, sums.share_sum / sums.share_count.clamp_min(1),
                        torch.full((H,), float("nan"), dtype=torch.float64))
    top = torch.zeros(H, dtype=torch.float64).scatter_reduce_(0, heads, values, "amax")
    best = torch.full((H,), -1, dtype=torch.long)
    at_top = values == top[heads]
    best[heads[at_top]] = rows[at_top]
    return HeadScores(ll.layer, effect, sums.out_grad.clone(), share, active, best, pairs)
