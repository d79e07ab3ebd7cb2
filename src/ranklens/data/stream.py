"""Training batches computed from the model as training goes ("on the fly"), with no activation store on disk.

The token stream is cut into chunks of `chunk_tokens` ordinary tokens (whole batches of documents; the tokens past
the chunk size in its last batch are dropped). Each chunk's activations are captured, shuffled with a generator
seeded by (seed, chunk index) - the refilled shuffle buffer of App. E.2 with the buffer equal to a chunk - and cut
into training batches. Which documents a chunk holds is found by tokenizing alone (no forward pass), so resuming
at step s recomputes at most one chunk and yields exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

from ranklens.data.corpus import iter_documents, splits_documents
from ranklens.data.tokenize import TokenBatch, token_batches
from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel


class StreamSource:
    """Batches of one site's activations [batch_size, d], computed chunk by chunk from `corpus`; with a list of
    sites, one forward per chunk feeds them all and each step yields {site: batch}, every site's rows shuffled by
    the same permutation (so each site's batches equal those of its single-site stream)."""

    def __init__(self, lm: LoadedModel, site: str | list[str], corpus: str, *, seed: int, context_length: int,
                 batch_size: int, chunk_tokens: int = 262_144, forward_tokens: int = 8192) -> None:
        if chunk_tokens < batch_size:
            raise RanklensError(f"chunk of {chunk_tokens} tokens is smaller than a batch of {batch_size}")
        if splits_documents(corpus):  # chunks start at document boundaries, which split documents do not keep
            raise RanklensError(f"corpus {corpus!r} has its long documents split into contexts, which --source "
                                "stream cannot chunk; expected --source store (or --long-documents truncate)")
        self.lm, self.corpus, self.seed = lm, corpus, seed
        self.context_length, self.batch_size = context_length, batch_size
        self.chunk_tokens = chunk_tokens - chunk_tokens % batch_size  # whole batches per chunk
        # The tokens past the chunk size in a chunk's last forward batch are dropped; small batches next to the
        # chunk keep that waste under 1/8.
        self.forward_tokens = max(1, min(forward_tokens, self.chunk_tokens // 8))
        self.sites = [site] if isinstance(site, str) else list(site)
        self.capture = Capturer(lm.arch, self.sites)
        self._last: tuple[int, dict[str, torch.Tensor], int] | None = None  # (first document, rows, next document)

    @property
    def batches_per_chunk(self) -> int:
        return self.chunk_tokens // self.batch_size

    def _token_batches(self, skip_docs: int = 0) -> Iterator[TokenBatch]:
        documents = itertools.islice(iter_documents(self.corpus, seed=self.seed), skip_docs, None)
        return token_batches(documents, self.lm.tokenizer, self.context_length, self.forward_tokens)

    def chunk_documents(self, n_chunks: int) -> list[int]:
        """Documents consumed before each of the first n_chunks + 1 chunks (tokenization only)."""
        starts, docs, tokens = [0], 0, 0
        for batch in self._token_batches():
            if len(starts) > n_chunks:
                break
            docs += batch.n_docs
            tokens += batch.n_tokens
            if tokens >= self.chunk_tokens:
                starts.append(docs)
                tokens = 0
        if len(starts) <= n_chunks:
            raise RanklensError(f"corpus {self.corpus!r} holds fewer than {n_chunks} chunks of "
                                f"{self.chunk_tokens} tokens; lower --tokens or use a larger corpus")
        return starts

    def _chunk(self, start_doc: int) -> tuple[dict[str, torch.Tensor], int]:
        """The chunk starting at document `start_doc`: its activation rows per site and the next chunk's first
        document. The last chunk is kept, so reading the start of the stream for initialization and then training
        from step 0 runs the model over it once."""
        if self._last is not None and self._last[0] == start_doc:
            return self._last[1], self._last[2]
        rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.sites}
        seen, docs = 0, start_doc
        for batch in self._token_batches(start_doc):
            acts = self.capture(batch.input_ids.to(self.lm.device), batch.attention_mask.to(self.lm.device))
            for name in self.sites:
                rows[name].append(acts[name][batch.stat_mask.to(self.lm.device)])
            seen += batch.n_tokens
            docs += batch.n_docs
            if seen >= self.chunk_tokens:
                break
        if seen < self.chunk_tokens:
            raise RanklensError(f"corpus {self.corpus!r} ran out of documents during an on-the-fly chunk; lower "
                                "--tokens or use a larger corpus")
        self._last = (start_doc, {name: torch.cat(r)[: self.chunk_tokens] for name, r in rows.items()}, docs)
        return self._last[1], self._last[2]

    def __call__(self, start_step: int) -> Iterator[torch.Tensor] | Iterator[dict[str, torch.Tensor]]:
        """Batches from training step `start_step` on (the Trainer's BatchSource; {site: batch} for several sites)."""
        chunk, offset = divmod(start_step, self.batches_per_chunk)
        doc = self.chunk_documents(chunk)[chunk]  # tokenization only: cheap next to the forward passes
        single = len(self.sites) == 1
        while True:
            rows, next_doc = self._chunk(doc)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + chunk)
            order = torch.randperm(self.chunk_tokens, generator=generator)
            for b in range(offset, self.batches_per_chunk):
                pick = order[b * self.batch_size:(b + 1) * self.batch_size]
                batch = {name: r[pick] for name, r in rows.items()}
                yield batch[self.sites[0]] if single else batch
            offset, chunk, doc = 0, chunk + 1, next_doc
