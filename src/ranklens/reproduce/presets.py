"""The configuration of `ranklens reproduce` and its four presets.

``ReproduceConfig`` is one flat, typed config (unknown keys are an error), so every field is also a CLI flag and a
YAML key. A preset is a named set of field values: ``quick`` is the class defaults, ``standard`` and ``paper`` override
some of them. Values are resolved in this order: the preset, then the YAML file, then the flags
(``ReproduceConfig.load``).

- ``quick`` (what ``make demo`` runs): every experiment at reduced scale, minutes on a laptop CPU; a
  100k-token spectrum of every layer; 3 seeds per cell; dictionaries of 4x the model width, 32k training tokens (64
  steps of 512), 5 sampled layers.
- ``standard`` (the README's results table): 5 seeds per cell, 8x
  dictionaries, 400k training tokens per SAE (1.6 passes over a 250k-token store of 23 sites, ~6.6 GB) with bf16
  autocast, 7 layers for the dead-feature sweep.
- ``long`` (experiment 9 alone, sized for hours on a 2-core CPU): TopK, AuxK, ASI (the auto d_init and 256) and ASI +
  SparseAdam at the middle layer's attention output, 3 seeds, the paper's batch of 4,096, 20M training tokens per SAE
  from a 2M-token store read for 10 epochs, a learning rate chosen by a sweep at this batch, and held-out curves.
- ``paper`` (a GPU machine): the paper's sizes (App. E.1: 8x dictionaries, k = 50, batch 4,096, 800M tokens, lr 4e-5;
  App. H: 15 seeds; Section 4.2: 10M tokens per spectrum; every layer; App. O.1: Lorsa with 8x d heads in 8 QK groups
  per MHSA head, batches of 32,768 tokens, b_O starting at zero as in App. O.2).

Every SAE's b_D starts at the mean of its training data in ``quick``, ``standard`` and ``long``, whatever its init
(``b_dec_init``), so the comparison of inits is not decided by who carries the mean; ``paper`` keeps App. E.3's zero.
Lorsa's output bias starts at the target's mean in ``quick`` and ``standard`` for both inits
(``lorsa_output_bias``): their budgets of tens to hundreds of steps cannot move b_O from zero to a mean of norm ~20,
which would leave every Lorsa with an FVU above 1 and hide what the heads learn.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ranklens.analysis.config import HEAD_TASKS
from ranklens.config import CorpusFields, ModelFields
from ranklens.errors import RanklensError

Preset = Literal["quick", "standard", "long", "paper"]
Paper = Literal["collapse", "lorsa"]
EXPERIMENT_NAMES = ("low_rank", "wo", "dead_vs_rank", "asi", "controls", "scaling", "dead_subspace", "lorsa", "budget",
                    "dashboards")
# `--paper lorsa`: the Lorsa paper's experiments (App. B ablations, App. C scaling, Section 5 heads by function).
LORSA_EXPERIMENT_NAMES = ("qk_ablations", "lorsa_scaling", "heads")


class ReproduceConfig(CorpusFields, ModelFields):
    """Every field is a flag; a preset sets many of them at once (see the module docstring)."""

    preset: Preset = Field("quick", description="quick, standard, long or paper (see the README); the other flags "
                                                "override its values")
    paper: Paper = Field("collapse", description="whose experiments: collapse (dimensional collapse in attention "
                                                 "outputs) or lorsa (the Lorsa paper: App. B, App. C, Section 5)")
    experiments: list[str] = Field(list(EXPERIMENT_NAMES), description="experiments to run, comma-separated, from "
                                   f"{','.join(EXPERIMENT_NAMES)} (--paper collapse) or "
                                   f"{','.join(LORSA_EXPERIMENT_NAMES)} (--paper lorsa); the steps they need come "
                                   "along")
    compare_corpora: list[str] = Field(["prose", "code", "zh"], description="Figure 2 right: corpora whose middle "
                                                                             "layer is measured too")
    compare_models: list[str] = Field(["minilm-l6"], description="Figure 2 middle: other models whose middle layer "
                                                                 "is measured")
    seeds: int = Field(3, ge=1, description="runs per cell of the seeded experiments, seeds --seed, --seed + 1, ... "
                                            "(App. H: 15)")
    only_seeds: list[int] = Field([], description="experiment 9 split over jobs: run only these of the seeds "
                                   "(--seed ... --seed + seeds - 1); a later run takes them with --reuse. Empty: all")
    reuse: list[str] = Field([], description="experiment 9: run directories of the same experiment (other seeds, "
                                             "e.g. from --only-seeds) whose finished learning-rate sweep and SAE "
                                             "runs with the same settings are taken instead of recomputed")
    alpha: float = Field(0.05, gt=0, lt=1, description="significance level of every verdict")
    # Experiments 1-2 (Section 4, App. B-D): one spectrum job over every layer.
    spectrum_tokens: int = Field(100_000, gt=0, description="tokens per site of the spectrum of every layer")
    splits: int = Field(4, ge=1, description="App. C: disjoint splits at the middle layer")
    loss_tokens: int = Field(1024, gt=0, description="App. B: held-out tokens per loss evaluation")
    loss_points: int = Field(4, ge=2, description="App. B: grid points over n before the bisection")
    compare_tokens: int = Field(4096, gt=0, description="tokens per comparison setting (Figure 2)")
    # SAE training (App. E.1), shared by experiments 3-7 and 9; one activation store feeds them all.
    store_tokens: int = Field(16_384, gt=0, description="activations collected once; training reads them in epochs")
    sae_tokens: int = Field(32_768, gt=0, description="training tokens per SAE")
    batch_size: int = Field(512, gt=0, description="SAE training batch (tokens)")
    lr: float = Field(1e-3, gt=0, description="SAE learning rate (quick: 1e-3 reaches FVU 0.48 against 0.66 for "
                                              "4e-4 in 64 steps on SmolLM2 L15.attn_out, TopK)")
    warmup_steps: int = Field(8, ge=0, description="SAE warm-up steps (at most 10% of a run)")
    expansion: int = Field(4, ge=1, description="SAE features = expansion x d")
    k: int = Field(32, ge=1, description="SAE active features per token")
    d_init: int | Literal["auto"] = Field("auto", description="the main ASI subspace dimension: an integer, or auto "
                                                              "(the README's Definitions)")
    aux_k: int = Field(512, ge=1, description="the AuxK baseline's k_aux (App. E.1)")
    b_dec_init: Literal["zero", "mean"] = Field(
        "mean", description="b_D's start for every SAE, whatever its init: zero (App. E.3) or the training data's "
                            "mean (short runs cannot learn a mean that carries ~40% of E||x||^2)")
    curve_tokens: list[int] = Field([4096, 8192, 16_384], description="held-out FVU and dead counts of every SAE "
                                    "during training (curve.jsonl), at these training-token counts and at the end")
    train_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="float32, or bfloat16 autocast of the SAE and Lorsa matmuls (fp32 weights and Adam)")
    init_tokens: int = Field(16_384, gt=0, description="tokens behind the ASI basis and b_D's mean")
    eval_tokens: int = Field(2048, gt=0, description="held-out tokens for FVU and the evaluation dead count")
    lm_eval_tokens: int = Field(512, ge=0, description="held-out tokens for the spliced LM loss")
    # Experiment 3 (Figure 5, App. F): one standard-init TopK SAE per site of the sampled layers.
    sweep_layers: int | Literal["all"] = Field(5, description="layers of the dead-feature sweep: a count (evenly "
                                                              "spaced, always with the middle one) or all")
    # Experiment 4 (Figures 6, 7; Tables 4, 5; App. H).
    d_init_values: list[int] = Field([32, 128], description="Figure 6: the d_init sweep")
    k_values: list[int] = Field([16, 32], description="Figure 7: the k sweep")
    # Experiment 6 (Figure 8): dictionary sizes (multiples of d), one seed each.
    scaling_expansions: list[int] = Field([2, 4, 8, 16, 32], description="Figure 8: dictionary sizes, multiples of d")
    scaling_tokens: int = Field(16_384, gt=0, description="training tokens per SAE of Figure 8")
    # Experiment 8 (Section 5.4, Figure 9, App. O): Lorsa at the middle layer, default init against ASI.
    lorsa_expansion: int = Field(1, ge=1, description="Lorsa heads = lorsa_expansion x d (App. O.1: 8)")
    lorsa_qk_groups_per_head: int = Field(1, ge=1, description="QK groups per MHSA head (App. O.1: 8; Lorsa App. B: "
                                                               "at least 1)")
    lorsa_k: int = Field(16, ge=1, description="Lorsa heads active per token")
    lorsa_tokens: int = Field(65_536, gt=0, description="training tokens per Lorsa")
    lorsa_batch_tokens: int = Field(1024, gt=0, description="Lorsa batch (ordinary tokens of whole sequences)")
    lorsa_lr: float = Field(3e-3, gt=0, description="Lorsa learning rate (quick: FVU 0.88 against 1.80 with App. "
                                                    "O.1's 2e-4 in 64 steps)")
    lorsa_warmup_steps: int = Field(1, ge=0, description="Lorsa warm-up steps")
    lorsa_output_bias: Literal["zero", "mean"] = Field(
        "mean", description="b_O's start for both inits: zero (App. O.2) or the target's mean (a short run cannot "
                            "move b_O to a mean of norm ~20)")
    # Experiment 9: TopK, AuxK, ASI (d_init and these extra values) and ASI + SparseAdam over training tokens.
    budget_d_init_values: list[int] = Field([128], description="experiment 9: ASI d_init values besides --d-init")
    budget_verdict_tokens: list[int] = Field([400_000], description="experiment 9: verdicts also judged at these "
                                                                    "training-token counts (when the run is longer)")
    lr_sweep: list[float] = Field([], description="experiment 9: learning rates swept first (TopK and ASI, first "
                                                  "seed); the lowest mean FVU replaces --lr there. Empty: no sweep")
    lr_sweep_tokens: int = Field(1_000_000, gt=0, description="training tokens per run of the learning-rate sweep")
    dashboard_tokens: int = Field(20_000, gt=0, description="held-out tokens each dashboard of the run scans (a TopK "
                                                            "SAE, an ASI SAE and a Lorsa; experiment dashboards)")
    # --paper lorsa. App. B: Lorsa ablations at the middle layer, with the Lorsa settings above (lorsa_*).
    ablation_heads_per_d: int = Field(1, ge=1, description="App. B.1: Lorsa heads = this x d at every QK dimension; "
                                                           "with 4d parameters per head (B.1's budget) a QK group "
                                                           "binds d_qk heads")
    qk_dims: list[int] = Field([16, 64], description="App. B.1: QK dimensions (d_head among them; each must divide "
                                                     "the heads)")
    qk_contexts: list[int] = Field([128], description="App. B.1: context lengths the QK dimensions are compared at")
    qk_group_ratios: list[str] = Field(["1/3", "1", "3"], description="App. B.2: QK groups as multiples of the MHSA's "
                                                                    "heads (each rounded to the nearest divisor of "
                                                                    "the Lorsa heads)")
    # App. C: L(N, K) of Lorsa and of a TopK SAE on the same layer's attention output.
    lorsa_scaling_expansions: list[int] = Field([1, 2, 4], description="App. C: Lorsa heads and SAE features, "
                                                                       "multiples of d")
    lorsa_scaling_k: list[int] = Field([8, 16, 32], description="App. C: heads or features active per token")
    # Section 5: heads by function (`ranklens heads`).
    heads_layer: int | Literal["auto"] = Field("auto", description="Section 5: the layer of the Lorsa whose heads are "
                                                                   "scored; auto: one Lorsa at the layer of each "
                                                                   "Lorsa task's strongest MHSA head (induction, "
                                                                   "previous token, attention sink)")
    heads_prompts: int = Field(16, ge=1, description="Section 5: generated sequences per task")
    heads_tasks: list[str] = Field(list(HEAD_TASKS), description=f"Section 5: probes, from {','.join(HEAD_TASKS)}")
    zpattern_text: str = Field("When Mary and John went to the store, John gave a drink to Mary. The store was "
                               "closed, so they walked home.", description="experiment 8: the text of the z-pattern "
                                                                           "figure")

    @field_validator("experiments", "compare_corpora", "compare_models", "d_init_values", "k_values",
                     "scaling_expansions", "curve_tokens", "budget_d_init_values", "budget_verdict_tokens", "lr_sweep",
                     "only_seeds", "reuse",
                     "qk_dims", "qk_contexts", "qk_group_ratios", "lorsa_scaling_expansions", "lorsa_scaling_k",
                     "heads_tasks", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """Lists come from YAML as lists and from the command line as comma-separated strings."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("d_init", "sweep_layers", "heads_layer", mode="before")
    @classmethod
    def _int_or_word(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @field_validator("heads_tasks")
    @classmethod
    def _tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in HEAD_TASKS]
        if unknown or not value:
            raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none)'}; expected some of {', '.join(HEAD_TASKS)}")
        return value

    @field_validator("qk_group_ratios")
    @classmethod
    def _ratios(cls, value: list[str]) -> list[str]:
        for ratio in value:
            try:
                if Fraction(ratio) <= 0:
                    raise ValueError
            except (ValueError, ZeroDivisionError):
                raise ValueError(f"QK group ratio {ratio!r}: expected a positive number or fraction like 1/3") from None
        return value

    @model_validator(mode="after")
    def _experiments_of_the_paper(self) -> ReproduceConfig:
        names = LORSA_EXPERIMENT_NAMES if self.paper == "lorsa" else EXPERIMENT_NAMES
        unknown = [e for e in self.experiments if e not in names]
        if unknown or not self.experiments:
            raise ValueError(f"--experiments: {', '.join(unknown) or '(none)'} not among the {self.paper} paper's "
                             f"experiments {', '.join(names)}")
        return self

    @model_validator(mode="after")
    def _split_seeds(self) -> ReproduceConfig:
        """--only-seeds and --reuse split experiment 9 over jobs; the other experiments judge every seed in one run."""
        if (self.only_seeds or self.reuse) and (self.paper != "collapse" or self.experiments != ["budget"]):
            raise ValueError("--only-seeds and --reuse split experiment 9 alone over jobs: use them with "
                             "--experiments budget (the long preset)")
        outside = [s for s in self.only_seeds if not self.seed <= s < self.seed + self.seeds]
        if outside:
            raise ValueError(f"--only-seeds {','.join(map(str, outside))}: not among the run's seeds "
                             f"{self.seed}..{self.seed + self.seeds - 1} (--seed, --seeds)")
        return self

    @classmethod
    def defaults_for(cls, values: dict[str, Any]) -> dict[str, Any]:
        """The values of the preset that `values` name (quick when none), for the paper they name."""
        preset = values.get("preset", "quick")
        if preset not in PRESETS:
            raise RanklensError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
        if values.get("paper", "collapse") != "lorsa":
            return PRESETS[preset]
        if preset not in LORSA_PRESETS:
            raise RanklensError(f"--paper lorsa --preset {preset!r}: expected one of {', '.join(LORSA_PRESETS)}")
        return {**PRESETS[preset], "experiments": list(LORSA_EXPERIMENT_NAMES), **LORSA_PRESETS[preset]}

    def seed_list(self) -> list[int]:
        """The seeds this job runs: --seed, --seed + 1, ..., or the --only-seeds among them."""
        return [self.seed + i for i in range(self.seeds) if not self.only_seeds or self.seed + i in self.only_seeds]


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "standard": {
        "seeds": 5,
        "spectrum_tokens": 200_000,
        "loss_tokens": 4096,
        "loss_points": 10,
        "compare_tokens": 50_000,
        "store_tokens": 250_000,
        "sae_tokens": 400_000,
        "batch_size": 1024,
        "train_dtype": "bfloat16",
        "lr": 4e-4,
        "warmup_steps": 50,
        "expansion": 8,
        "k": 50,
        "init_tokens": 100_000,
        "eval_tokens": 50_000,
        "lm_eval_tokens": 8192,
        "sweep_layers": 7,
        "d_init_values": [64, 128, 256, 512],
        "k_values": [30, 50, 70],
        "scaling_tokens": 200_000,
        "lorsa_expansion": 2,
        "lorsa_k": 32,
        "lorsa_tokens": 200_000,
        "lorsa_batch_tokens": 2048,
        "lorsa_lr": 1e-3,
        "lorsa_warmup_steps": 5,
        "curve_tokens": [50_000, 100_000, 200_000],
        "budget_d_init_values": [256],
        "dashboard_tokens": 100_000,
    },
    # Experiment 9 alone, sized for a few hours on a 2-core CPU: does ASI's advantage
    # appear with budget? The paper's batch of 4,096; 20M training tokens per SAE read as 10 epochs of a 2M-token store
    # (each epoch in a new shard order through the refilling shuffle buffer); dead window a quarter of the run (5M).
    "long": {
        "experiments": ["budget"],
        "seeds": 3,
        "store_tokens": 2_000_000,
        "sae_tokens": 20_000_000,
        "batch_size": 4096,
        "train_dtype": "bfloat16",
        "warmup_steps": 50,
        "expansion": 8,
        "k": 50,
        "init_tokens": 200_000,
        "eval_tokens": 100_000,
        "lm_eval_tokens": 16_384,
        "curve_tokens": [100_000, 200_000, 400_000, 1_000_000, 2_000_000, 5_000_000, 10_000_000],
        "budget_d_init_values": [256],
        "lr_sweep": [1e-4, 2e-4, 4e-4, 8e-4],
        "lr_sweep_tokens": 4_000_000,
    },
    "paper": {
        "seeds": 15,
        "spectrum_tokens": 10_000_000,
        "loss_tokens": 65_536,
        "loss_points": 12,
        "compare_tokens": 1_000_000,
        "store_tokens": 10_000_000,
        "sae_tokens": 800_000_000,
        "batch_size": 4096,
        "train_dtype": "bfloat16",
        "lr": 4e-5,
        "warmup_steps": 500,
        "expansion": 8,
        "k": 50,
        "init_tokens": 1_000_000,
        "eval_tokens": 1_000_000,
        "lm_eval_tokens": 1_000_000,
        "sweep_layers": "all",
        "d_init_values": [64, 128, 256, 512, 1024, 2048],
        "k_values": [40, 50, 60, 70, 80],
        "scaling_expansions": [4, 8, 16, 32, 64, 128, 256],
        "scaling_tokens": 800_000_000,
        "lorsa_expansion": 8,
        "lorsa_qk_groups_per_head": 8,
        "lorsa_k": 64,
        "lorsa_tokens": 800_000_000,
        "lorsa_batch_tokens": 32_768,
        "lorsa_lr": 2e-4,
        "lorsa_warmup_steps": 500,
        "lorsa_output_bias": "zero",  # App. O.2; 800M tokens leave b_O time to learn the mean
        "b_dec_init": "zero",  # App. E.3; 800M tokens leave b_D time to learn the mean
        "dashboard_tokens": 1_000_000,
        "curve_tokens": [1_000_000, 10_000_000, 100_000_000],
        "budget_d_init_values": [256, 2048],
    },
}

# --paper lorsa, layered over PRESETS[preset] (whose lorsa_* values the ablations share).
LORSA_PRESETS: dict[str, dict[str, Any]] = {
    "quick": {},
    "standard": {
        "seeds": 3,
        "ablation_heads_per_d": 2,
        "qk_dims": [16, 32, 64, 128],
        "qk_contexts": [128, 512],
        "qk_group_ratios": ["1/3", "1", "4"],
        "lorsa_scaling_expansions": [1, 2, 4, 8],
        "lorsa_scaling_k": [16, 32, 64],
        "heads_prompts": 64,
    },
    "paper": {
        "seeds": 3,
        "ablation_heads_per_d": 4,  # App. B.1: 4d parameters per head, 4x the MHSA's parameters
        "qk_dims": [16, 32, 64, 128],
        "qk_contexts": [256, 1024],  # App. B.1
        "qk_group_ratios": ["1/4", "1/2", "1", "2", "4", "8"],
        "lorsa_scaling_expansions": [1, 2, 4, 8, 16],
        "lorsa_scaling_k": [16, 32, 64, 128],
        "heads_prompts": 256,
    },
}
