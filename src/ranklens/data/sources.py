"""Training data for sparse dictionaries, with the text held out after it.

A *source* is what a training job reads: ``source(start_step)`` yields the training batches from that step on (the
Trainer's ``BatchSource``, so a resumed run sees exactly the batches an uninterrupted one does), ``source.head()``
yields the training activations from the start (for initializations that look at the data: the norm search, ASI,
b_D's mean), ``source.total_steps`` is the number of steps the tokens make, and ``source.held_out`` names the
documents after those the training consumed, which evaluation reads (text the dictionary never saw).

- SAEs train on shuffled rows of one site: ``StoreTokens`` (an activation store, read through its refilling shuffle
  buffer, epoch after epoch) or ``StreamTokens`` (captured chunk by chunk from the model, ``ranklens.data.stream``).
- Lorsa trains on whole sequences of a layer's attention input and output: ``StoreSequences`` or
  ``StreamSequences`` (``ranklens.data.sequences``).

``sae_source`` and ``lorsa_source`` open either kind from a job's settings; with ``kind="store"`` and no store given
they collect one into the run directory first (``ranklens collect``, resumable).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ranklens.data.collect import CollectConfig, collect
from ranklens.data.corpus import HeldOutSource
from ranklens.data.sequences import StoreSequences, StreamSequences, lorsa_sites
from ranklens.data.store import ActivationStore
from ranklens.data.stream import StreamSource
from ranklens.errors import RanklensError
from ranklens.lm.load import LoadedModel
from ranklens.lm.sites import Site

SourceKind = Literal["store", "stream"]
ACTIVATIONS_DIR = "activations"  # where a run collects its own store


class StoreTokens:
    """SAE training batches [batch_size, d] of one site from a store, shuffled, for ``tokens // batch_size`` steps
    (the store is read again, in a new shard order, when the run is longer than the store)."""

    def __init__(self, store: ActivationStore, site: Site, *, batch_size: int, buffer_tokens: int, seed: int,
                 tokens: int) -> None:
        if site.name not in store.sites:
            raise RanklensError(f"store {str(store.directory)!r} holds sites {sorted(store.sites)}, not {site.name!r}")
        self.store, self.site, self.seed = store, site.name, seed
        self.batch_size, self.buffer_tokens = batch_size, buffer_tokens
        self.total_steps = tokens // batch_size
        self.held_out = store.held_out()

    def __call__(self, start_step: int) -> Iterator[torch.Tensor]:
        return self.store.token_batches(self.site, self.batch_size, self.buffer_tokens, self.seed,
                                        start_batch=start_step, epochs=None)

    def head(self) -> Iterator[torch.Tensor]:
        return self.store.iter_tokens(self.site)


class StreamTokens(StreamSource):
    """SAE training batches captured from the model as training goes (``ranklens.data.stream``), for
    ``tokens // batch_size`` steps; the held-out text starts after the last chunk training reads."""

    def __init__(self, lm: LoadedModel, site: Site, corpus: str, *, seed: int, context_length: int,
                 batch_size: int, tokens: int, chunk_tokens: int) -> None:
        super().__init__(lm, site.name, corpus, seed=seed, context_length=context_length, batch_size=batch_size,
                         chunk_tokens=chunk_tokens)
        self.total_steps = tokens // batch_size
        n_chunks = -(-self.total_steps // self.batches_per_chunk)
        self.held_out = HeldOutSource(corpus, seed, self.chunk_documents(n_chunks)[-1], context_length)

    def head(self) -> Iterator[torch.Tensor]:
        return self(0)


def open_store(lm: LoadedModel, sites: list[Site], *, store: str | Path | None, collect_dir: Path, corpus: str,
               seed: int, context_length: int, tokens: int, device: str, dtype: str, progress: bool,
               ) -> ActivationStore:
    """The given complete store, or one collected (resumed, reused) into ``collect_dir``."""
    if store is not None:
        return ActivationStore(store, require_complete=True)
    cfg = CollectConfig(model=lm.name, sites=",".join(s.name for s in sites), corpus=corpus, tokens=tokens,
                        context_length=context_length, seed=seed, dtype=dtype, device=device)
    return collect(cfg, collect_dir, progress=progress, lm=lm)


def sae_source(lm: LoadedModel, site: Site, *, kind: SourceKind, store: str | Path | None, run_dir: Path,
               corpus: str, seed: int, context_length: int, tokens: int, batch_size: int, buffer_tokens: int,
               chunk_tokens: int, dtype: str, device: str, progress: bool) -> StoreTokens | StreamTokens:
    """An SAE run's training data (see the module docstring)."""
    if kind == "stream":
        return StreamTokens(lm, site, corpus, seed=seed, context_length=context_length, batch_size=batch_size,
                            tokens=tokens, chunk_tokens=chunk_tokens)
    opened = open_store(lm, [site], store=store, collect_dir=run_dir / ACTIVATIONS_DIR, corpus=corpus, seed=seed,
                        context_length=context_length, tokens=tokens, device=device, dtype=dtype, progress=progress)
    return StoreTokens(opened, site, batch_size=batch_size, buffer_tokens=buffer_tokens, seed=seed, tokens=tokens)


def lorsa_source(lm: LoadedModel, layer: int, *, kind: SourceKind, store: str | Path | None, run_dir: Path,
                 corpus: str, seed: int, context_length: int, tokens: int, batch_tokens: int, dtype: str,
                 device: str, progress: bool) -> StoreSequences | StreamSequences:
    """A Lorsa run's training data: whole sequences of ``L{layer}.attn_in`` and ``attn_out``."""
    if kind == "stream":
        source = StreamSequences(lm, layer, corpus, seed=seed, context_length=context_length,
                                 batch_tokens=batch_tokens, tokens=tokens)
    else:
        sites = [lm.arch.site(name) for name in lorsa_sites(layer)]
        opened = open_store(lm, sites, store=store, collect_dir=run_dir / ACTIVATIONS_DIR, corpus=corpus,
                            seed=seed, context_length=context_length, tokens=tokens, device=device, dtype=dtype,
                            progress=progress)
        source = StoreSequences(opened, layer, batch_tokens, seed, tokens)
    if source.total_steps == 0:
        raise RanklensError(f"--tokens {tokens} holds no whole batch of {batch_tokens} tokens")
    return source


def held_out_text(saved: Mapping[str, Any] | None, *, corpus: str | None, seed: int, context_length: int | None,
                  default_corpus: str, default_context: int) -> HeldOutSource:
    """The text to evaluate or interpret a trained dictionary on: its run's held-out documents (``saved``, the
    ``held_out`` record written at training) unless a ``corpus`` is asked for, which is read from its start in
    ``seed`` order; ``context_length`` overrides the context either way."""
    if saved is not None and corpus is None:
        source = HeldOutSource.from_json(saved)
    else:
        source = HeldOutSource(corpus or default_corpus, seed, 0, default_context)
    if context_length is not None:
        source = HeldOutSource(source.corpus, source.seed, source.start_doc, context_length)
    return source


def recorded_held_out(run_config: Mapping[str, Any], run_dir: Path, lm: LoadedModel, *,
                      lorsa_layer: int | None = None) -> HeldOutSource:
    """The held-out text of a training run saved without a ``held_out`` record (format 1), from its recorded config:
    the store's, or, for a run on the fly, where its last training batch ended (tokenization only for Lorsa; SAE
    chunks are found the same way)."""
    c = run_config
    if c.get("source", "store") == "store":
        return ActivationStore(c.get("store") or Path(run_dir) / ACTIVATIONS_DIR).held_out()
    if lorsa_layer is not None:
        return StreamSequences(lm, lorsa_layer, c["corpus"], seed=int(c["seed"]),
                               context_length=int(c["context_length"]), batch_tokens=int(c["batch_tokens"]),
                               tokens=int(c["tokens"])).held_out
    return StreamTokens(lm, lm.arch.site(c["site"]), c["corpus"], seed=int(c["seed"]),
                        context_length=int(c["context_length"]), batch_size=int(c["batch_size"]),
                        tokens=int(c["tokens"]), chunk_tokens=int(c["stream_chunk_tokens"])).held_out
