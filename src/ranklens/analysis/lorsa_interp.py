"""Interpreting a trained Lorsa (Lorsa paper Section 4.1, App. F): z patterns, top activations, attribution to the
original heads. Results are plain JSON-ready dicts (a dashboard reads them as they are).

- ``z_pattern_record``: the z pattern of one head on a text, z_i = sum_j A_ij v_j (Section 4.1), with every source
  token's contribution A_ij v_j, the head's z and whether it was among the top K at each position.
- ``interpret``: one pass over held-out text feeding ``TopActivations`` (the 16 highest activations per head, with
  context windows) and ``HeadAttribution`` (App. F.1/F.2).

Activations are z with unit w_o (a saved Lorsa is rescaled so by footnote 3), taken among the top-K heads of each
ordinary token (bos/eos/pad excluded).
"""

from __future__ import annotations

import torch

from ranklens.analysis.lorsa_attribution import HeadAttribution
from ranklens.analysis.top_activations import TopActivations, context_windows
from ranklens.data.corpus import HeldOutSource
from ranklens.data.tokenize import SpecialTokens, take_tokens
from ranklens.dictionaries.lorsa import Lorsa
from ranklens.errors import RanklensError
from ranklens.eval.held_out import eval_batches
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel
from ranklens.lm.sites import per_head_outputs
from ranklens.progress import progress_bar

__all__ = ["interpret", "z_pattern_of_ids", "z_pattern_record"]


def _tokens(lm: LoadedModel, ids: list[int]) -> list[str]:
    return [lm.tokenizer.decode([i]) for i in ids]


def _mask_for(lorsa: Lorsa, attention_mask: torch.Tensor) -> torch.Tensor | None:
    return None if lorsa.cfg.causal else attention_mask  # right-padded: a causal query never sees a padded key


@torch.no_grad()
def z_pattern_record(lorsa: Lorsa, lm: LoadedModel, layer: int, text: str, head: int,
                     context_length: int = 1024) -> dict:
    """The z pattern of `head` on `text` (framed like training sequences: bos first, truncated to context_length).

    ``pattern[i][j]`` = A_ij v_j, the contribution of source token j to z_i (zero for j > i in a causal model);
    ``z[i]`` = sum_j pattern[i][j] (pre-ReLU); ``activation[i]`` = the head's value in the sparse code (0 unless it
    is among the top K with z > 0 at i)."""
    if not isinstance(head, int) or not 0 <= head < lorsa.n_heads:
        raise RanklensError(f"--head {head!r} is out of range; expected 0..{lorsa.n_heads - 1}")
    special = SpecialTokens.from_tokenizer(lm.tokenizer)
    body = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not body:
        raise RanklensError("--text is empty after tokenization; expected some text")
    ids = [*special.prefix, *body][: context_length - len(special.suffix)] + list(special.suffix)
    return z_pattern_of_ids(lorsa, lm, layer, ids, head)


@torch.no_grad()
def z_pattern_of_ids(lorsa: Lorsa, lm: LoadedModel, layer: int, ids: list[int], head: int) -> dict:
    """``z_pattern_record`` of a sequence already tokenized and framed."""
    site = f"L{layer}.attn_in"
    x = Capturer(lm.arch, [site])(torch.tensor([ids], device=lm.device))[site].to(lorsa.W_V.dtype)
    pattern = lorsa.z_pattern(x[0], head)  # [T, T]
    out = lorsa(x)
    picked = (out.indices[0] == head) & (out.values[0] > 0)  # [T, K]
    activation = (out.values[0] * picked).sum(-1)
    return {"layer": layer, "head": head, "qk_group": lorsa.group_of(head), "token_ids": ids,
            "tokens": _tokens(lm, ids), "z": [float(v) for v in pattern.sum(-1)],
            "activation": [float(v) for v in activation],
            "pattern": [[float(v) for v in row] for row in pattern]}


@torch.no_grad()
def interpret(lorsa: Lorsa, lm: LoadedModel, layer: int, source: HeldOutSource, tokens: int, n_top: int = 16,
              window: tuple[int, int] = (12, 4), attribution: bool = True, progress: bool = False) -> dict:
    """Top activations of every head over `tokens` ordinary tokens of `source` (and their attribution to the MHSA
    heads): {"top_activations": ..., "attribution": ... or None}."""
    arch = lm.arch
    sites = [f"L{layer}.attn_in"] + ([f"L{layer}.attn_z"] if attribution else [])
    capture = Capturer(lm.arch, sites)
    W_O_mhsa = arch.output_projection(layer)[0].detach()
    top = TopActivations(lorsa.n_heads, n_top, window[0] + 1 + window[1])
    attr = HeadAttribution(lorsa.n_heads, arch.n_heads) if attribution else None
    seen, sequences = 0, 0
    bar = progress_bar(tokens, "lorsa-top", enabled=progress)
    for batch in take_tokens(eval_batches(lm, source), tokens):
        ids, real = batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device)
        acts = capture(ids, real)
        out = lorsa(acts[sites[0]].to(lorsa.W_V.dtype), _mask_for(lorsa, real))
        sel = batch.stat_mask.to(lm.device)
        B, T = ids.shape
        loc = torch.stack(torch.meshgrid(torch.arange(B) + sequences, torch.arange(T), indexing="ij"), -1)
        ctx = context_windows(batch.input_ids.masked_fill(~batch.attention_mask.bool(), -1), *window)
        top.update(out.values[sel], out.indices[sel], loc[sel.cpu()], ctx[sel.cpu()])
        if attr is not None:
            heads = per_head_outputs(acts[sites[1]][sel].to(torch.float64), W_O_mhsa.double(), arch.n_heads)
            attr.update(heads, out.values[sel], out.indices[sel], lorsa.W_O.detach())
        seen += batch.n_tokens
        sequences += B
        bar.update(batch.n_tokens)
    bar.close()
    vocab = lm.tokenizer
    heads = []
    for h in range(lorsa.n_heads):
        entries = top.feature(h)
        for e in entries:
            e["tokens"] = [vocab.decode([t]) if t >= 0 else None for t in e["context_ids"]]
            e["token_index"] = window[0]
        heads.append({"head": h, "qk_group": lorsa.group_of(h), "top": entries})
    return {"top_activations": {"layer": layer, "tokens": seen, "n_top": n_top, "window": list(window),
                                "heads_never_active": sum(1 for h in heads if not h["top"]), "heads": heads},
            "attribution": None if attr is None else {"layer": layer, "tokens": seen, **attr.result()}}
