"""The configs of `ranklens train sae` and `ranklens train lorsa` (no torch here: the command line is built from
them). Defaults follow the dimensional-collapse paper (App. E.1 for SAEs, App. O.1 for Lorsa) where it gives one."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ranklens.config import CorpusFields, ModelFields

TRAIN_DTYPE_HELP = "float32, or bfloat16 (autocast of the dictionary's matmuls; weights and Adam stay float32)"


def comma_ints(value: Any) -> Any:
    """A list of ints from YAML (a list) or the command line (comma-separated)."""
    return [int(v) for v in value.split(",") if v.strip()] if isinstance(value, str) else value


class TrainFields(CorpusFields, ModelFields):
    """What SAE and Lorsa training share: where the data comes from, the optimizer, schedule and bookkeeping."""

    source: Literal["store", "stream"] = Field(
        "store", description="store: train from an activation store (--store, or one collected into "
                             "DIR/activations); stream: capture activations from the model as training goes")
    store: str | None = Field(None, description="an activation store directory (`ranklens collect`) to train "
                                                "from; default: collected into DIR/activations")
    optimizer: Literal["adam", "sparseadam"] = Field(
        "adam", description="adam, or sparseadam (App. M: only the rows of active features and their moments move)")
    bias_correction: Literal["per_row", "per_tensor"] = Field(
        "per_row", description="SparseAdam's bias correction: per_row (each row's own step count, = Adam's) or "
                               "per_tensor (torch.optim.SparseAdam's)")
    warmup_steps: int = Field(500, ge=0, description="linear learning-rate warm-up steps (App. E.1), at most 10% "
                                                     "of the run (more is cut, with a warning)")
    aux_k: int = Field(0, ge=0, description="AuxK: dead features in the auxiliary loss (Gao et al.; 512 for the "
                                            "AuxK baseline), 0 = off")
    aux_coefficient: float = Field(1 / 32, ge=0, description="weight of the AuxK loss")
    dead_window_tokens: int | None = Field(None, gt=0, description="a feature is dead when it did not fire in "
                                                                   "this many training tokens; default: a quarter "
                                                                   "of the run, at most the paper's 10M")
    eval_tokens: int = Field(100_000, gt=0, description="held-out tokens for FVU, L0 and the evaluation dead count")
    lm_eval_tokens: int = Field(16_384, ge=0, description="held-out tokens for the spliced LM loss (0: skip it)")
    train_dtype: Literal["float32", "bfloat16"] = Field("float32", description=TRAIN_DTYPE_HELP)
    checkpoint_every: int = Field(500, gt=0, description="steps between checkpoints (a killed run resumes there)")
    log_every: int = Field(50, gt=0, description="steps between rows of metrics.jsonl")
    wandb_project: str | None = Field(None, description="also log to this Weights & Biases project (needs wandb)")


class SAETrainConfig(TrainFields):
    site: str = Field("L15.attn_out", description="the site: L{layer}.{kind}, e.g. L15.attn_out or Lmid.attn_out")
    stream_chunk_tokens: int = Field(262_144, gt=0, description="--source stream: tokens captured and shuffled "
                                                                "together")
    tokens: int = Field(2_000_000, gt=0, description="training tokens (whole batches)")
    batch_size: int = Field(4096, gt=0, description="tokens per training batch")
    expansion: int = Field(8, ge=1, description="features = expansion x d (ignored with --n-features)")
    n_features: int | None = Field(None, ge=1, description="the number of features (overrides --expansion)")
    activation: Literal["topk", "batchtopk", "jumprelu", "relu"] = Field(
        "topk", description="topk (Section 3.2), batchtopk, jumprelu (App. E.4) or relu (+ L1)")
    k: int = Field(50, ge=1, description="active features per token (topk, batchtopk)")
    k_initial: int | None = Field(None, ge=1, description="K annealing (App. L.2): start at this k and fall to --k")
    k_anneal_fraction: float = Field(0.0, ge=0, le=1, description="share of the run over which k anneals")
    l1_coefficient: float | None = Field(None, ge=0, description="relu's L1 weight (default 1.0)")
    normalize_decoder: bool = Field(False, description="keep decoder rows at unit norm")
    init: Literal["standard", "asi", "random-subspace"] = Field(
        "standard", description="standard (App. E.3), asi (Section 5.2, App. K) or random-subspace (App. J.1)")
    d_init: int | Literal["auto"] = Field(
        "auto", description="ASI's subspace dimension: an integer in [1, d], or auto (the README's Definitions)")
    init_tokens: int = Field(100_000, gt=0, description="training tokens behind ASI's basis and b_D's mean")
    b_dec_init: Literal["zero", "mean"] = Field(
        "zero", description="b_D's start: zero (App. E.3) or the mean of the first --init-tokens training tokens "
                            "(b_D moves ~lr per step, so a short run cannot learn a large mean)")
    lr: float = Field(4e-4, gt=0, description="peak learning rate")
    shuffle_buffer_tokens: int = Field(262_144, gt=0, description="the store reader's shuffle buffer (App. E.2)")
    curve_tokens: list[int] = Field(
        [], description="held-out FVU and dead counts during training (DIR/curve.jsonl) at these training-token "
                        "counts and at the end, comma-separated, e.g. 100000,400000")
    shards: int = Field(1, ge=1, description="under torchrun: blocks of features, one per rank of a replica (the "
                                             "other ranks are data-parallel replicas); world size / shards replicas")
    data_seed: int | None = Field(None, description="seed of the data order (corpus order and shuffle); default "
                                                    "--seed, which then also seeds the initialization")
    # Many SAEs from one forward per batch (ranklens.train.sae_group): one per site and variant, each a normal run.
    sites: str | None = Field(None, description="train one SAE per site of this pattern (e.g. 'L*.attn_out' or "
                                                "'L5,10.attn_out,L15.resid_post') from one model forward per batch, "
                                                "each in DIR/<site>[-<variant>]; instead of --site")
    seeds: int = Field(1, ge=1, description="with --sites: SAEs per site with init seeds --seed, --seed + 1, ... on "
                                            "the same data")
    k_values: list[int] = Field([], description="with --sites: one SAE per k (comma-separated), instead of --k")
    expansion_values: list[int] = Field([], description="with --sites: one SAE per expansion (comma-separated), "
                                                        "instead of --expansion")

    @field_validator("curve_tokens", "k_values", "expansion_values", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return comma_ints(value)

    @model_validator(mode="after")
    def _one_or_many(self) -> SAETrainConfig:
        many = self.seeds > 1 or self.k_values or self.expansion_values
        if self.sites is None and many:
            raise ValueError("--seeds, --k-values and --expansion-values need --sites")
        fields = type(self).model_fields
        if self.sites is not None and self.site != fields["site"].default:
            raise ValueError("give --sites (many SAEs) or --site (one), not both")
        if self.k_values and self.k != fields["k"].default:
            raise ValueError("give --k-values (one SAE per k) or --k (one), not both")
        if self.expansion_values and (self.expansion != fields["expansion"].default or self.n_features is not None):
            raise ValueError("give --expansion-values (one SAE per size) or --expansion / --n-features (one), not both")
        if self.sites is not None and self.shards > 1:
            raise ValueError("--shards splits one SAE over torchrun ranks; with --sites (one process) train each "
                             "site alone with --site instead")
        if any(v < 1 for v in [*self.k_values, *self.expansion_values]):
            raise ValueError("--k-values and --expansion-values must be positive integers")
        return self

    @field_validator("d_init", mode="before")
    @classmethod
    def _int_or_auto(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() != "auto":
            try:
                value = int(value)
            except ValueError:
                raise ValueError("expected an integer >= 1 or auto") from None
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError("expected an integer >= 1 or auto")
        return value


class LorsaTrainConfig(TrainFields):
    layer: int | Literal["mid"] | None = Field(None, description="the attention layer to replace: an integer or "
                                                                 "mid; default the middle layer, n_layers // 2")
    heads: int | None = Field(None, ge=1, description="Lorsa heads H; default 8 x d_model (App. O.1)")
    qk_groups: int | None = Field(None, ge=1, description="QK groups G (heads share Q/K within one); default 8 x "
                                                          "the MHSA's heads (App. O.1)")
    d_qk: int | None = Field(None, ge=1, description="Q/K dimension per group; default the MHSA's d_head (Lorsa "
                                                     "App. B: never below it)")
    k: int = Field(32, ge=1, description="heads active per token (top-K)")
    init: Literal["default", "mhsa-qk", "asi"] = Field(
        "default", description="default (App. O.2), mhsa-qk (the MHSA's Q/K, Lorsa App. B.3) or asi (Section 5.4)")
    qk_trainable: bool = Field(True, description="copied Q/K keep training (App. B.3: better than fixed)")
    d_init: int | None = Field(None, ge=1, description="ASI's subspace dimension per head; default --d-qk")
    init_tokens: int = Field(100_000, gt=0, description="attention inputs behind ASI's subspaces (and the mean of "
                                                        "--output-bias mean)")
    output_bias: Literal["zero", "mean"] = Field(
        "zero", description="b_O's start: zero (App. O.2) or the mean attention output of the first --init-tokens "
                            "tokens (a short run cannot move b_O to a mean of norm ~20)")
    tokens: int = Field(1_000_000, gt=0, description="training tokens (ordinary tokens; whole batches)")
    batch_tokens: int = Field(32_768, gt=0, description="ordinary tokens per batch of whole sequences (App. O.1)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate (App. O.1)")
    normalize_output: bool = Field(False, description="renormalize w_o rows after every step (footnote 3)")
    group_chunk: int | None = Field(None, ge=1, description="QK groups per attention call (memory); default all")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints (a killed run resumes there)")
    log_every: int = Field(10, gt=0, description="steps between rows of metrics.jsonl")


class PlanConfig(SAETrainConfig):
    world_size: int = Field(1, ge=1, description="torchrun ranks (all nodes), e.g. 8 for one node of 8 GPUs")
    d: int | None = Field(None, ge=1, description="the site's dimension (default: read from the model's config, "
                                                  "without loading weights)")
