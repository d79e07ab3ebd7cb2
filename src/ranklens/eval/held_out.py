"""Held-out evaluation of sparse autoencoders, prepared once and reused for every dictionary evaluated on it.

A ``HeldOutSet`` holds the text after a run's training data (``ranklens.data.corpus.HeldOutSource``: corpus, seed,
first document, context length) and what every evaluation on it shares: the activations of its sites over
``eval_tokens`` ordinary tokens (one early-stopped forward pass for all sites), the token batches of the spliced LM
loss, and the clean and zero-ablated cross-entropies per site. Evaluating a dictionary then costs its own forward
over the cached activations and one spliced pass of the layers from its site on (the input of the site's layer is
captured once). ``ranklens train sae`` builds one per run; ``ranklens reproduce`` builds one per store and evaluates
dozens of SAEs on it, with the same numbers each run would give alone.

Metrics (``ranklens.eval.metrics``; the README's Definitions): ``fvu``, ``nmse_uncentered``, explained variance, L0
and dead features over the evaluation tokens (``ReconstructionMetrics``), and ``ce_clean``, ``ce_spliced``,
``ce_zero_ablation``, ``delta_lm_loss``, ``loss_recovered`` over ``lm_eval_tokens`` (App. B; footnote 8 of the
dimensional-collapse paper).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence

import torch

from ranklens.data.corpus import HeldOutSource, splits_documents
from ranklens.data.tokenize import TokenBatch, first_tokens, lm_predictions, take_tokens, token_batches
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.errors import RanklensError
from ranklens.eval.lm_loss import cross_entropies, layer_inputs, spliced_metrics, zero_ablation
from ranklens.eval.metrics import ReconstructionMetrics
from ranklens.lm.capture import Capturer
from ranklens.lm.load import LoadedModel
from ranklens.lm.sites import Site
from ranklens.progress import progress_bar

EVAL_BATCH_TOKENS = 8192  # padded positions per forward pass


def eval_batches(lm: LoadedModel, source: HeldOutSource) -> Iterator[TokenBatch]:
    """The held-out text of `source` as padded batches, from its start."""
    return token_batches(source.documents(), lm.tokenizer, source.context_length, EVAL_BATCH_TOKENS,
                         split=splits_documents(source.corpus))


class HeldOutSet:
    """The shared part of evaluating dictionaries at `sites` on the held-out text of `source`."""

    def __init__(self, lm: LoadedModel, sites: Sequence[str], source: HeldOutSource, eval_tokens: int,
                 lm_eval_tokens: int, progress: bool = False) -> None:
        self.lm = lm
        self.progress = progress
        self.arch = lm.arch
        self.source = source
        self.eval_tokens = eval_tokens
        self.lm_eval_tokens = lm_eval_tokens
        parsed = [self.arch.site(s) for s in sites]
        self.sites = tuple(s.name for s in parsed)
        self._rows: dict[str, list[torch.Tensor]] = {name: [] for name in self.sites}
        capture = Capturer(lm.arch, parsed)
        with progress_bar(eval_tokens, "held-out activations", enabled=progress) as bar:
            for batch in take_tokens(eval_batches(lm, source), eval_tokens):
                acts = capture(batch.input_ids.to(lm.device), batch.attention_mask.to(lm.device))
                for name in self.sites:
                    self._rows[name].append(acts[name][batch.stat_mask.to(lm.device)])
                bar.update(batch.n_tokens)
        # The same text from its start, cut at lm_eval_tokens scored next-token predictions.
        self.lm_batches = first_tokens(eval_batches(lm, source), lm_eval_tokens, predictions=True) if self.arch.causal else []
        if self.n_tokens < eval_tokens:  # metrics record the count they used; say it once where it is decided
            print(f"warning: the held-out text (corpus {source.corpus!r} from document {source.start_doc:,}) gives "
                  f"{self.n_tokens:,} of the {eval_tokens:,} evaluation tokens asked for; held-out metrics use "
                  f"{self.n_tokens:,} (a larger corpus, or fewer training tokens, leaves more)", file=sys.stderr)
        self._prefixes: dict[int, list[torch.Tensor | None]] = {}  # per layer: its input for every LM batch
        self._baselines: dict[str, dict[str, float]] = {}

    @property
    def n_tokens(self) -> int:
        """The evaluation tokens the text gave: eval_tokens, or fewer when it runs out."""
        return sum(rows.shape[0] for rows in next(iter(self._rows.values()), []))

    def activations(self, site: str) -> list[torch.Tensor]:
        """The evaluation activations of `site`, one [m, d] tensor per batch (model dtype)."""
        if site not in self._rows:
            raise RanklensError(f"held-out set holds sites {list(self.sites)}, not {site!r}")
        return self._rows[site]

    def _cross_entropies(self, site: str, replacements: dict) -> dict[str, float]:
        parsed = Site.parse(site)
        if parsed.layer not in self._prefixes:
            self._prefixes[parsed.layer] = layer_inputs(self.lm.model, self.arch, self.lm_batches, parsed)
        return cross_entropies(self.lm.model, self.arch, self.lm_batches, parsed, replacements,
                               prefixes=self._prefixes[parsed.layer], progress=self.progress)

    def _baseline(self, site: str) -> dict[str, float]:
        """Clean CE (once per layer: it runs the same layers from the same input for every site of a layer) and
        zero-ablated CE (per site)."""
        if site not in self._baselines:
            layer = Site.parse(site).layer
            clean = next((b["clean"] for s, b in self._baselines.items() if Site.parse(s).layer == layer), None)
            wanted = {"zero": zero_ablation} if clean is not None else {"clean": None, "zero": zero_ablation}
            self._baselines[site] = {"clean": clean, **self._cross_entropies(site, wanted)}
        return self._baselines[site]

    @torch.no_grad()
    def reconstruction(self, sae: SparseAutoencoder, site: str) -> dict:
        """FVU, L0 and dead features over the evaluation tokens."""
        if self.arch.site_dim(Site.parse(site)) != sae.d_in:
            raise RanklensError(f"site {site} has dimension {self.arch.site_dim(Site.parse(site))} but the SAE "
                                f"expects d_in={sae.d_in}")
        metrics = ReconstructionMetrics(sae.n_features)
        for rows in self.activations(site):
            x = rows.to(sae.W_D.dtype)
            x_hat, code = sae(x)
            fired = code.indices[code.active_mask()] if code.is_sparse else code.active_mask().nonzero()[:, 1]
            metrics.update(x, x_hat, fired)
        return metrics.result()

    @torch.no_grad()
    def evaluate(self, sae: SparseAutoencoder, site: str) -> dict:
        """FVU, L0 and dead features over the evaluation tokens, and the spliced LM loss (causal models)."""
        result = self.reconstruction(sae, site)
        if not self.arch.causal:
            print(f"note: {self.lm.name} is not a causal LM; skipping the spliced LM loss", file=sys.stderr)
            return result
        if not self.lm_batches:
            return result

        def reconstruct(x: torch.Tensor) -> torch.Tensor:
            return sae(x.to(sae.W_D.dtype))[0]

        base = self._baseline(site)
        spliced = self._cross_entropies(site, {"spliced": reconstruct})["spliced"]
        result.update(spliced_metrics(base["clean"], spliced, base["zero"]),
                      lm_eval_tokens=lm_predictions(self.lm_batches))
        return result
