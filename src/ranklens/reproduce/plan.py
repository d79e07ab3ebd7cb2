"""What a reproduce run will do, derived from its config and the model's shape (read from its config file, no
weights): the middle layer, the sampled layers, the sites, the store, and the SAE cells of each experiment.

A *cell* is one SAE training run (one method, size, k and seed at one site); its run directory name is derived from
its settings, so experiments that need the same cell (the TopK baseline of the k sweep is also the d_init = d point
of the d_init sweep, the control of the random subspace, and half of the dead-subspace analysis) share one run.

Cells of one seed and token budget read the same store in the same order (the data order follows the seed), whatever
their site, method, size, k or learning rate; ``Plan.groups`` gathers them so that a step trains each such group in
lockstep from one pass over the store (``ranklens.train.group``), every member computing what its single run
computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ranklens.data.config import CollectConfig
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.presets import ReproduceConfig
from ranklens.train.config import SAETrainConfig

STORE_DIR = "stores/sae"
LORSA_STORE_PREFIX = "stores/lorsa-c"
SAE_DIR = "sae"
SWEEP_KINDS = ("attn_out", "mlp_out", "resid_post")  # Figure 5: attention output, MLP output, residual stream
SHUFFLE_BUFFER_TOKENS = 262_144
# At most this much dictionary state (weights, gradients, Adam moments: 16 bytes a parameter) and held-out activations
# in memory at once when cells train as a group; a larger group is split (into groups trained one after another).
GROUP_BYTES = 4 << 30

# The methods of Figures 7 and 8: (init, optimizer, AuxK?)
METHODS = {
    "TopK": ("standard", "adam", False),
    "AuxK": ("standard", "adam", True),
    "ASI": ("asi", "adam", False),
    "ASI + SparseAdam": ("asi", "sparseadam", False),
    "random subspace": ("random-subspace", "adam", False),
}


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    d_model: int
    n_heads: int

    @classmethod
    def of(cls, model: str) -> ModelShape:
        from transformers import AutoConfig

        from ranklens.lm.load import model_source

        config = AutoConfig.from_pretrained(model_source(model))
        return cls(int(config.num_hidden_layers), int(config.hidden_size), int(config.num_attention_heads))


def sampled_layers(n_layers: int, count: int | str) -> list[int]:
    """`count` evenly spaced layers from the first to the last, the one closest to the middle (n_layers // 2)
    moved onto it; every layer for "all" or a count of at least n_layers."""
    if count == "all" or int(count) >= n_layers:
        return list(range(n_layers))
    count = max(1, int(count))
    mid = n_layers // 2
    spaced = sorted({round(i * (n_layers - 1) / (count - 1)) for i in range(count)}) if count > 1 else [mid]
    closest = min(spaced, key=lambda layer: (abs(layer - mid), layer))
    return sorted({mid if layer == closest else layer for layer in spaced})


@dataclass(frozen=True)
class Cell:
    """One SAE run: `method` (a key of METHODS) at `site`, with `expansion` x d features, `k`, `d_init` (ASI and
    random subspace only), `seed` and `tokens`."""

    site: str
    method: str
    expansion: int
    k: int
    seed: int
    tokens: int
    d_init: int | str | None = None
    lr: float | None = None  # None: the run's `lr`

    @property
    def name(self) -> str:
        init, optimizer, auxk = METHODS[self.method]
        parts = [self.site, init + ("" if self.d_init is None else f"{self.d_init}"), optimizer]
        if auxk:
            parts.append("auxk")
        parts += [f"x{self.expansion}", f"k{self.k}", f"t{self.tokens}"]
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        return "-".join(parts + [f"s{self.seed}"])


class Plan:
    """The run's derived settings. `cfg` is the resolved ReproduceConfig, `out` the run directory."""

    def __init__(self, cfg: ReproduceConfig, out: Path, shape: ModelShape) -> None:
        self.cfg, self.out, self.shape = cfg, Path(out), shape
        self.mid = shape.n_layers // 2
        self.sweep_layers = sampled_layers(shape.n_layers, cfg.sweep_layers)
        self.main_site = f"L{self.mid}.attn_out"  # App. E.1: the middle layer's attention output
        self.resid_site = f"L{self.mid}.resid_post"  # App. J.2
        self.sweep_sites = [f"L{layer}.{kind}" for layer in self.sweep_layers for kind in SWEEP_KINDS]
        self.store_dir = self.out / STORE_DIR

    @property
    def store_sites(self) -> list[str]:
        """The sites the run's experiments train on: the middle layer's attention output always; the sweep's sites
        (dead features against rank), the residual stream (controls) and the attention input (Lorsa's input, beside
        its target attn_out) when those experiments run."""
        wanted = {self.main_site}
        run = set(self.cfg.experiments)
        if "dead_vs_rank" in run:
            wanted |= set(self.sweep_sites)
        if "controls" in run:
            wanted.add(self.resid_site)
        if run & {"lorsa", "dashboards", "qk_ablations", "lorsa_scaling"}:
            wanted.add(f"L{self.mid}.attn_in")
        return sorted(wanted, key=lambda s: (int(s[1:].split(".")[0]), s))

    def collect_config(self, context_length: int | None = None) -> CollectConfig:
        """The run's store; at another context length (App. B.1), the middle layer's Lorsa sites only."""
        c = self.cfg
        if context_length in (None, c.context_length):
            return CollectConfig(model=c.model, sites=",".join(self.store_sites), corpus=c.corpus,
                                 tokens=c.store_tokens, context_length=c.context_length, seed=c.seed, dtype=c.dtype,
                                 device=c.device)
        # As many sequences per forward as the run's store: both then consume the corpus in the same steps, so a
        # shorter context does not swallow the held-out documents of a small corpus in its first batch.
        batch = max(context_length, CollectConfig.model_fields["batch_tokens"].default * context_length
                    // c.context_length)
        return CollectConfig(model=c.model, sites=f"L{self.mid}.attn_in,L{self.mid}.attn_out", corpus=c.corpus,
                             tokens=c.store_tokens, context_length=context_length, seed=c.seed, dtype=c.dtype,
                             device=c.device, batch_tokens=batch)

    def lorsa_store_dir(self, context_length: int) -> Path:
        """Where Lorsa runs at the middle layer read from: the run's store, or one per other context length."""
        if context_length == self.cfg.context_length:
            return self.store_dir
        return self.out / f"{LORSA_STORE_PREFIX}{context_length}"

    def cell(self, method: str, *, site: str | None = None, expansion: int | None = None, k: int | None = None,
             seed: int | None = None, tokens: int | None = None, d_init: int | str | None = None,
             lr: float | None = None) -> Cell:
        c = self.cfg
        init = METHODS[method][0]
        return Cell(site=site or self.main_site, method=method, expansion=expansion or c.expansion, k=k or c.k,
                    seed=c.seed if seed is None else seed, tokens=tokens or c.sae_tokens,
                    d_init=None if init == "standard" else (c.d_init if d_init is None else d_init),
                    lr=None if lr is None or lr == c.lr else lr)

    def cells(self, method: str, **kwargs) -> list[Cell]:
        """The cell of `method` once per seed."""
        return [self.cell(method, seed=s, **kwargs) for s in self.cfg.seed_list()]

    def sae_config(self, cell: Cell) -> SAETrainConfig:
        c = self.cfg
        init, optimizer, auxk = METHODS[cell.method]
        return SAETrainConfig(
            model=c.model, site=cell.site, corpus=c.corpus, store=str(self.store_dir), tokens=cell.tokens,
            batch_size=c.batch_size, expansion=cell.expansion, k=cell.k, init=init,
            d_init=cell.d_init if cell.d_init is not None else "auto", init_tokens=c.init_tokens,
            b_dec_init=c.b_dec_init, optimizer=optimizer, lr=c.lr if cell.lr is None else cell.lr,
            warmup_steps=c.warmup_steps, aux_k=c.aux_k if auxk else 0, curve_tokens=c.curve_tokens,
            shuffle_buffer_tokens=max(2 * c.batch_size, min(SHUFFLE_BUFFER_TOKENS, c.store_tokens)),
            eval_tokens=c.eval_tokens, lm_eval_tokens=c.lm_eval_tokens, seed=cell.seed,
            context_length=c.context_length, dtype=c.dtype, train_dtype=c.train_dtype, device=c.device)

    def group_key(self, cell: Cell) -> tuple[int, int]:
        """Cells with equal keys read the same batches of their sites in the same order, for as many steps."""
        return cell.seed, cell.tokens

    def group_bytes(self, cells: list[Cell]) -> int:
        """What a group holds in memory: each member's dictionary state and each site's held-out activations."""
        d = self.shape.d_model
        return sum(16 * 2 * c.expansion * d * d for c in cells) + 4 * self.cfg.eval_tokens * d * len({c.site for c in cells})

    def groups(self, cells: list[Cell], budget: int = GROUP_BYTES) -> list[list[Cell]]:
        """`cells` (in order, each once) as groups of one key, each within `budget` bytes (``group_bytes``); a
        group of one cell trains alone."""
        by_key: dict[tuple[int, int], list[list[Cell]]] = {}
        for cell in dict.fromkeys(cells):
            chunks = by_key.setdefault(self.group_key(cell), [[]])
            if chunks[-1] and self.group_bytes([*chunks[-1], cell]) > budget:
                chunks.append([])
            chunks[-1].append(cell)
        return [chunk for chunks in by_key.values() for chunk in chunks]

    def sae_dir(self, cell: Cell) -> Path:
        return self.out / SAE_DIR / cell.name

    def sae_command(self, cell: Cell) -> str:
        return cli_command("train sae", self.sae_config(cell), self.sae_dir(cell))

    def collect_command(self) -> str:
        return cli_command("collect", self.collect_config(), self.store_dir)
