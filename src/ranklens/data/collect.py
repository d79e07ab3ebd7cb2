"""`ranklens collect`: run a model over a corpus and write the activations of chosen sites to a store.

One forward pass per batch feeds every requested site and stops after the deepest one. The job is resumable:
the store records how many corpus documents its complete shards hold, and a rerun skips exactly those, so a
killed run finishes with the same store an uninterrupted run writes.
"""

from __future__ import annotations

import itertools
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from ranklens.data.config import CollectConfig
from ranklens.data.corpus import iter_documents, splits_documents
from ranklens.data.store import (
    MANIFEST_NAME,
    ActivationStore,
    ActivationStoreWriter,
    merge_rank_stores,
    rank_dir,
)
from ranklens.data.tokenize import take_tokens, token_batches
from ranklens.distributed import Layout, rank_device
from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel, load_model, resolve_dtype
from ranklens.lm.sites import parse_sites
from ranklens.rundir import check_output_dir
from ranklens.version import __version__


def check_context_length(model, context_length: int) -> None:
    """Absolute-position models cannot see past their position table."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if context_length < 2:
        raise RanklensError(f"context length {context_length} is too short; expected at least 2")
    if limit is not None and context_length > limit:
        raise RanklensError(f"context length {context_length} exceeds the model's {limit} positions; "
                            f"expected at most {limit}")


def collect(cfg: CollectConfig, out: str | Path, progress: bool = True, lm: LoadedModel | None = None,
            layout: Layout | None = None) -> ActivationStore:
    """Collect (or resume, or reuse) the store in `out`; `lm` reuses a model the caller already loaded.

    Under torchrun (``layout`` with several ranks) batch i of the corpus goes to rank i mod N, which writes its own
    shards into OUT/rank-<r>/ (resumable on its own); once all are done, rank 0 writes the one manifest that makes
    them one store (``merge_rank_stores``). The store then holds the same batches as a one-process collection."""
    layout = layout or Layout()
    check_output_dir(out)  # before the model loads
    lm = lm or load_model(cfg.model, cfg.dtype, rank_device(cfg.device))
    check_context_length(lm.model, cfg.context_length)
    arch = lm.arch
    sites = parse_sites(cfg.sites, arch.n_layers)
    store_dtype = lm.dtype if cfg.store_dtype == "model" else resolve_dtype(cfg.store_dtype)
    meta = {"model": cfg.model, "corpus": cfg.corpus, "seed": cfg.seed, "context_length": cfg.context_length,
            "model_dtype": str(lm.dtype).removeprefix("torch."), "tokens_requested": cfg.tokens,
            "code_version": __version__}
    if layout.world > 1:
        meta.update(world_size=layout.world, rank=layout.rank)
    documents = iter_documents(cfg.corpus, seed=cfg.seed)  # checks the corpus before anything is written
    target = Path(out) if layout.world == 1 else rank_dir(out, layout.rank)
    if layout.world > 1 and (Path(out) / MANIFEST_NAME).exists():
        store = ActivationStore(out)
        if int(store.meta.get("world_size", 1)) != layout.world:
            raise RanklensError(f"{str(out)!r} holds a store collected by {store.meta.get('world_size', 1)} ranks; "
                                f"this collection has {layout.world}: use the same world size or a new directory")
        store.verify()
        return store
    created = not target.exists()
    writer = ActivationStoreWriter.open(target, meta, {s.name: arch.site_dim(s) for s in sites}, store_dtype,
                                        shard_tokens=cfg.shard_tokens)
    reused = writer.complete
    try:
        if not reused:
            _fill(writer, lm, sites, cfg, documents, progress and layout.main, layout)
    except RanklensError:
        if created and not writer.shards:  # e.g. an empty corpus: leave nothing half-written behind
            writer.close()
            shutil.rmtree(target, ignore_errors=True)
        raise
    if layout.world > 1:
        layout.barrier()
        if layout.main:
            merge_rank_stores(out, layout.world)
        layout.barrier()
    store = ActivationStore(out)
    if reused:
        store.verify()  # a rerun on a finished store re-checks every shard's sha256 before anyone reads it
    return store


def _fill(writer: ActivationStoreWriter, lm, sites, cfg: CollectConfig, documents, progress: bool,
          layout: Layout) -> None:
    """Run the model over this rank's batches (every batch in one process) until the corpus gives exactly
    ``cfg.tokens`` tokens (the last sequence's surplus positions are stored but not counted), skipping the batches already on disk. Batches are cut by tokenization alone, so every rank knows the
    global count and which batches are its own without talking to the others."""
    done_docs = writer.docs_consumed
    bar = tqdm(total=cfg.tokens, unit="tok", desc="collect", disable=not progress, file=sys.stderr,
               dynamic_ncols=True)
    tokens, docs = 0, 0
    # Split documents (ranklens.data.corpus: a long document cut into contexts) can end a shard mid-document, so
    # a resume cannot start at a document; it re-tokenizes from the start and skips this rank's batches up to the
    # stat tokens on disk (shards hold whole batches, and the batches are the same on every run).
    split = splits_documents(cfg.corpus)
    stored, own = writer.n_tokens, 0
    skip = layout.world == 1 and done_docs > 0 and not split  # one process: resume at its last shard's documents
    if skip:
        documents = itertools.islice(documents, done_docs, None)
        tokens, docs = writer.n_tokens, done_docs
    bar.update(min(tokens, cfg.tokens))
    with Capturer(lm.arch, sites) as capture:
        batches = token_batches(documents, lm.tokenizer, cfg.context_length, cfg.batch_tokens, split=split)
        for i, batch in enumerate(take_tokens(batches, cfg.tokens - tokens)):  # exactly --tokens, the last cut
            docs += batch.n_docs
            tokens += batch.n_tokens
            bar.update(min(batch.n_tokens, cfg.tokens - bar.n))
            if i % layout.world != layout.rank:
                continue  # another rank's batch
            own += batch.n_tokens
            if (own <= stored) if split else (docs <= done_docs and not skip):
                continue  # one of ours already stored
            acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
            writer.add({name: a.cpu() for name, a in acts.items()}, batch.lengths, batch.stat_mask,
                       batch.input_ids, docs_consumed=docs)
    bar.close()
    if tokens < cfg.tokens:
        print(f"warning: corpus {cfg.corpus!r} ran out after {tokens} tokens of the {cfg.tokens} requested",
              file=sys.stderr)
    writer.finish()
