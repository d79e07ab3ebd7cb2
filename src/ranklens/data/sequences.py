"""Training batches for Lorsa: the attention input and output of whole sequences, from a store or on the fly.

Lorsa attends across positions, so unlike an SAE it trains on whole sequences (Lorsa paper Section 3.2: prompts
truncated to a context size; dimensional-collapse paper App. O.1: bos/eos/pad excluded from the training activations).
A batch is a run of consecutive sequences, right-padded, closed as soon as it holds ``batch_tokens`` ordinary tokens
(App. O.1's batch size counts tokens). Every real position (bos included) is an attention key; only ordinary tokens
(``stat_mask``) enter the loss, the metrics and the dead-head tracking.

Positions: each sequence starts at position 0 (bos) and is right-padded, which is how the model saw it (the
collector and the on-the-fly capture run the model on right-padded batches with positions ``arange(T)``), so the
default positions are the model's.

Both are sources in the sense of ``ranklens.data.sources`` (with ``total_steps``, ``held_out`` and ``head()``) and
``BatchSource``s of the shared Trainer (``source(start_step)`` yields the batches from that step on,
so a resumed run sees exactly the batches an uninterrupted one does) and know their number of steps up front from
the sequence lengths alone (no activations read, no forward pass):

- ``StoreSequences``: a store holding ``L{layer}.attn_in`` and ``L{layer}.attn_out``; the store's seeded sequence
  order (shards and sequences shuffled), re-shuffled with ``seed + epoch`` for each further epoch. A batch never
  spans two epochs (an epoch's last, incomplete batch is dropped).
- ``StreamSequences``: the corpus in its seeded document order, tokenized (App. E.2), each batch captured from the
  model when it is needed (one early-stopped forward for both sites).

Steps: as many whole batches as fit in ``tokens`` ordinary tokens (so a run trains on at most ``tokens``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch

from ranklens.data.corpus import HeldOutSource, iter_documents, splits_documents
from ranklens.data.store import ActivationStore
from ranklens.data.tokenize import SpecialTokens, token_sequences
from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel

__all__ = ["LorsaBatch", "StoreSequences", "StreamSequences", "group_by_tokens", "lorsa_sites"]

Item = TypeVar("Item")


def lorsa_sites(layer: int) -> tuple[str, str]:
    """The input and target sites of a Lorsa of ``layer``: ``(L{layer}.attn_in, L{layer}.attn_out)``."""
    return f"L{layer}.attn_in", f"L{layer}.attn_out"


@dataclass
class LorsaBatch:
    """Right-padded whole sequences: x [B, T, d] (attn_in), target [B, T, d] (attn_out), attention_mask [B, T] bool
    (real positions, bos included), stat_mask [B, T] bool (ordinary tokens)."""

    x: torch.Tensor
    target: torch.Tensor
    attention_mask: torch.Tensor
    stat_mask: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.stat_mask.sum())


def group_by_tokens(items: Iterable[Item], tokens_of: Callable[[Item], int], batch_tokens: int,
                    ) -> Iterator[list[Item]]:
    """Consecutive items in groups closed once they hold at least ``batch_tokens`` tokens; an incomplete last group
    is dropped."""
    group: list[Item] = []
    held = 0
    for item in items:
        group.append(item)
        held += tokens_of(item)
        if held >= batch_tokens:
            yield group
            group, held = [], 0


def _steps_within(group_tokens: Iterable[int], tokens: int) -> int:
    """How many leading groups fit in ``tokens`` tokens."""
    steps, seen = 0, 0
    for n in group_tokens:
        if seen + n > tokens:
            break
        steps, seen = steps + 1, seen + n
    return steps


def _pad(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack [T_i, ...] tensors right-padded with zeros to [len(rows), width, ...]."""
    out = rows[0].new_zeros(len(rows), width, *rows[0].shape[1:])
    for r, t in enumerate(rows):
        out[r, : t.shape[0]] = t
    return out


class StoreSequences:
    """Batches of whole sequences from an activation store (see the module docstring)."""

    def __init__(self, store: ActivationStore, layer: int, batch_tokens: int, seed: int, tokens: int) -> None:
        self.store, self.seed, self.batch_tokens = store, seed, batch_tokens
        self.sites = lorsa_sites(layer)
        missing = [s for s in self.sites if s not in store.sites]
        if missing:
            raise RanklensError(f"store {str(store.directory)!r} lacks sites {missing}; a Lorsa of layer {layer} "
                                f"needs {', '.join(self.sites)} (it holds {sorted(store.sites)})")
        if store.n_tokens < batch_tokens:
            raise RanklensError(f"store {str(store.directory)!r} holds {store.n_tokens} tokens, fewer than one batch "
                                f"of {batch_tokens}")
        self._epoch_groups: list[list[int]] = []  # per epoch: the sequence count of each batch (cheap, cached)
        self.total_steps = _steps_within(self._group_tokens(), tokens)
        self.held_out = store.held_out()

    def _cheap_groups(self, epoch: int) -> list[list[int]]:
        """The stat-token counts of the sequences of each batch of an epoch (reads no activations)."""
        while len(self._epoch_groups) <= epoch:
            e = len(self._epoch_groups)
            counts = (int(sb.stat_mask.sum()) for sb in self.store.sequences([], 1, seed=self.seed + e))
            self._epoch_groups.append([list(g) for g in group_by_tokens(counts, int, self.batch_tokens)])
        return self._epoch_groups[epoch]

    def _group_tokens(self) -> Iterator[int]:
        for epoch in itertools.count():
            yield from (sum(g) for g in self._cheap_groups(epoch))

    def head(self) -> Iterator[LorsaBatch]:
        return self(0)

    def __call__(self, start_step: int) -> Iterator[LorsaBatch]:
        epoch, step = 0, 0
        while step + len(self._cheap_groups(epoch)) <= start_step:
            step += len(self._cheap_groups(epoch))
            epoch += 1
        skip_groups = start_step - step
        while True:
            groups = self._cheap_groups(epoch)
            skip_sequences = sum(len(g) for g in groups[:skip_groups])
            sequences = itertools.islice(self.store.sequences(list(self.sites), 1, seed=self.seed + epoch),
                                         skip_sequences, None)
            for group in groups[skip_groups:]:
                yield self._collate([next(sequences) for _ in group])
            epoch, skip_groups = epoch + 1, 0

    def _collate(self, seqs) -> LorsaBatch:
        site_in, site_out = self.sites
        lengths = [int(sb.lengths[0]) for sb in seqs]
        width = max(lengths)
        x = _pad([sb.acts[site_in][0, :n] for sb, n in zip(seqs, lengths, strict=True)], width)
        y = _pad([sb.acts[site_out][0, :n] for sb, n in zip(seqs, lengths, strict=True)], width)
        stat = _pad([sb.stat_mask[0, :n] for sb, n in zip(seqs, lengths, strict=True)], width)
        real = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
        return LorsaBatch(x, y, real, stat)


class StreamSequences:
    """Batches of whole sequences captured from the model as training goes (see the module docstring)."""

    def __init__(self, lm: LoadedModel, layer: int, corpus: str, *, seed: int, context_length: int,
                 batch_tokens: int, tokens: int) -> None:
        self.lm, self.corpus, self.seed = lm, corpus, seed
        self.context_length, self.batch_tokens = context_length, batch_tokens
        self.sites = lorsa_sites(layer)
        self.special = SpecialTokens.from_tokenizer(lm.tokenizer)
        self.capture = Capturer(lm.arch, list(self.sites))
        counts, docs = [], []
        for group in self._groups():
            counts.append(sum(n for _, n, _ in group))
            docs.append(group[-1][2])
            if sum(counts) > tokens:
                break
        self.total_steps = _steps_within(counts, tokens)
        if self.total_steps == 0:
            raise RanklensError(f"corpus {corpus!r} and --tokens {tokens} give no whole batch of {batch_tokens} "
                                "tokens; lower --batch-tokens or raise --tokens")
        self.docs_consumed = docs[self.total_steps - 1]  # documents behind the training batches (held out after)
        self.held_out = HeldOutSource(corpus, seed, self.docs_consumed, context_length)

    def _groups(self) -> Iterator[list[tuple[list[int], int, int]]]:
        """Batches of (ids, ordinary tokens, documents consumed so far), tokenization only."""
        excluded = self.special.excluded
        sequences = ((ids, sum(1 for t in ids if t not in excluded), consumed) for ids, consumed in
                     token_sequences(iter_documents(self.corpus, seed=self.seed), self.lm.tokenizer,
                                     self.context_length, splits_documents(self.corpus)))
        return group_by_tokens(sequences, lambda s: s[1], self.batch_tokens)

    def head(self) -> Iterator[LorsaBatch]:
        return self(0)

    def __call__(self, start_step: int) -> Iterator[LorsaBatch]:
        for group in itertools.islice(self._groups(), start_step, None):
            yield self._capture([ids for ids, _, _ in group])

    def _capture(self, sequences: list[list[int]]) -> LorsaBatch:
        lengths = torch.tensor([len(s) for s in sequences])
        width = int(lengths.max())
        ids = _pad([torch.tensor(s, dtype=torch.int64) for s in sequences], width)
        ids[torch.arange(width)[None, :] >= lengths[:, None]] = self.special.pad_id
        real = torch.arange(width)[None, :] < lengths[:, None]
        stat = real & ~torch.isin(ids, torch.tensor(sorted(self.special.excluded), dtype=torch.int64))
        acts = self.capture(ids.to(self.lm.device), real.long().to(self.lm.device))
        site_in, site_out = self.sites
        return LorsaBatch(acts[site_in], acts[site_out], real, stat)
