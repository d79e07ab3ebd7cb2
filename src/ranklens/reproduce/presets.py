"""The configuration of `ranklens reproduce` and its four presets.

``ReproduceConfig`` is one flat, typed config (unknown keys are an error), so every field is also a CLI flag and a
YAML key. A preset is a named set of field values: ``quick`` is the class defaults, ``standard`` and ``paper`` override
some of them. Values are resolved in this order: the preset, then the YAML file, then the flags
(``ReproduceConfig.load``).

- ``quick`` (what ``make demo`` runs): every experiment at reduced scale, within 20 minutes on a 2-core CPU; a
  100k-token spectrum of every layer; 3 seeds per cell; dictionaries of 4x the model width, 32k training tokens (64
  steps of 512), 5 sampled layers.
- ``standard`` (the README's results table; 68 minutes on this 2-core CPU, quiet): 5 seeds per cell, 8x
  dictionaries, 400k training tokens per SAE (1.6 passes over a 250k-token store of 23 sites, ~6.6 GB) with bf16
  autocast, 7 layers for the dead-feature sweep.
- ``long`` (experiment 9 alone, about four hours here): TopK, AuxK, ASI (the auto d_init and 256) and ASI +
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

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import field_validator

from ranklens.config import Config
from ranklens.errors import RanklensError

Preset = Literal["quick", "standard", "long", "paper"]
EXPERIMENT_NAMES = ("low_rank", "wo", "dead_vs_rank", "asi", "controls", "scaling", "dead_subspace", "lorsa", "budget")


class ReproduceConfig(Config):
    preset: Preset = "quick"
    experiments: list[str] = list(EXPERIMENT_NAMES)  # which experiments to run (the shared steps they need come along)
    model: str = "smollm2-135m"
    corpus: str = "default"
    compare_corpora: list[str] = ["prose", "code", "zh"]  # Figure 2 right: the middle layer on each corpus
    compare_models: list[str] = ["minilm-l6"]  # Figure 2 middle: the middle layer of other models
    context_length: int = 1024  # App. E.2
    dtype: str = "auto"
    device: str = "cpu"
    seed: int = 0  # seeds of a cell: seed, seed + 1, ...
    seeds: int = 3  # runs per cell of the seeded experiments (App. H uses 15)
    alpha: float = 0.05  # significance level of every verdict
    # Experiments 1-2 (Section 4, App. B-D): one spectrum job over every layer.
    spectrum_tokens: int = 100_000
    splits: int = 4  # App. C: disjoint splits at the middle layer
    loss_tokens: int = 1024  # App. B: held-out tokens per loss evaluation
    loss_points: int = 4
    compare_tokens: int = 4096
    # SAE training (App. E.1), shared by experiments 3-7; one activation store feeds them all.
    store_tokens: int = 16_384  # activations collected once; training cycles over them
    sae_tokens: int = 32_768  # training tokens per SAE
    batch_size: int = 512
    lr: float = 1e-3  # 64 steps: 1e-3 reaches a lower FVU than 4e-4 (0.48 vs 0.66 on SmolLM2 L15.attn_out, TopK)
    warmup_steps: int = 8
    expansion: int = 4  # features = expansion * d
    k: int = 32
    d_init: int | Literal["auto"] = "auto"  # the main ASI subspace dimension (App. E.1 uses 768 of 4096)
    aux_k: int = 512  # the AuxK baseline (App. E.1)
    # b_D's start for every SAE of the run, whatever its init: App. E.3's zero, or the training data's mean. Short runs
    # need "mean": b_D moves ~lr per step and cannot learn a mean that carries ~40% of E||x||^2 in a few hundred steps.
    b_dec_init: Literal["zero", "mean"] = "mean"
    # Held-out FVU and dead features of every SAE during training (curve.jsonl), at these training-token counts and at
    # the end; the budget experiment draws them and judges its verdicts at `budget_verdict_tokens` too.
    curve_tokens: list[int] = [4096, 8192, 16_384]
    # bf16 autocast of the SAE and Lorsa matmuls (fp32 weights and Adam): 1.4x the float32 speed at 4,608 features
    # here, same training FVU to 4 digits (0.1943 vs 0.1942 after 200 steps on SmolLM2 L15.attn_out)
    train_dtype: Literal["float32", "bfloat16"] = "float32"
    init_tokens: int = 16_384  # tokens behind the ASI basis
    eval_tokens: int = 2048
    lm_eval_tokens: int = 512
    # Experiment 3 (Figure 5, App. F): one standard-init TopK SAE per site of the sampled layers.
    sweep_layers: int | Literal["all"] = 5  # evenly spaced layers (always with the middle one), or all
    # Experiment 4 (Figures 6, 7; Tables 4, 5; App. H).
    d_init_values: list[int] = [32, 128]
    k_values: list[int] = [16, 32]
    # Experiment 6 (Figure 8): dictionary sizes (multiples of d), one seed each.
    scaling_expansions: list[int] = [2, 4, 8, 16, 32]
    scaling_tokens: int = 16_384
    # Experiment 8 (Section 5.4, Figure 9, App. O): Lorsa at the middle layer, default init against ASI.
    lorsa_expansion: int = 1  # heads = lorsa_expansion * d (App. O.1: 8)
    lorsa_qk_groups_per_head: int = 1  # QK groups per MHSA head (App. O.1: 8; Lorsa App. B: at least 1)
    lorsa_k: int = 16
    lorsa_tokens: int = 65_536
    lorsa_batch_tokens: int = 1024
    lorsa_lr: float = 3e-3  # 64 steps (App. O.1's 2e-4 is for 800M tokens): FVU 0.88 against 1.80 with 2e-4
    lorsa_warmup_steps: int = 1
    # "mean" for both inits: a short run cannot move b_O from zero to the target's mean (see LorsaTrainConfig)
    lorsa_output_bias: Literal["zero", "mean"] = "mean"
    # Experiment 9: TopK, AuxK, ASI (d_init and these extra values) and ASI + SparseAdam over training tokens.
    budget_d_init_values: list[int] = [128]
    budget_verdict_tokens: list[int] = [400_000]  # verdicts also stated here (when the run is longer)
    # A learning-rate sweep before experiment 9 (TopK and ASI, first seed, `lr_sweep_tokens` each): its lr with the
    # lowest mean held-out FVU replaces `lr` for experiment 9. Empty: no sweep.
    lr_sweep: list[float] = []
    lr_sweep_tokens: int = 1_000_000
    zpattern_text: str = ("When Mary and John went to the store, John gave a drink to Mary. The store was closed, so "
                          "they walked home.")

    @field_validator("experiments", "compare_corpora", "compare_models", "d_init_values", "k_values",
                     "scaling_expansions", "curve_tokens", "budget_d_init_values", "budget_verdict_tokens", "lr_sweep",
                     mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        """Lists come from YAML as lists and from the command line as comma-separated strings."""
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("d_init", "sweep_layers", mode="before")
    @classmethod
    def _int_or_word(cls, value: Any) -> Any:
        return int(value) if isinstance(value, str) and value.strip().isdigit() else value

    @classmethod
    def load(cls, path: str | Path | None = None, **overrides: Any) -> ReproduceConfig:
        """The preset's values, then the YAML file's, then the non-None overrides (the CLI's flags)."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise RanklensError(f"config file {str(path)!r} does not exist")
            loaded = yaml.safe_load(path.read_text()) or {}
            if not isinstance(loaded, dict):
                raise RanklensError(f"config file {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
            values.update(loaded)
        values.update({k: v for k, v in overrides.items() if v is not None})
        preset = values.get("preset", "quick")
        if preset not in PRESETS:
            raise RanklensError(f"--preset {preset!r}: expected one of {', '.join(PRESETS)}")
        return cls.build({**PRESETS[preset], **values}, source=str(path) if path else "arguments")

    @field_validator("experiments")
    @classmethod
    def _known_experiments(cls, value: list[str]) -> list[str]:
        unknown = [name for name in value if name not in EXPERIMENT_NAMES]
        if unknown:
            raise ValueError(f"unknown experiments {unknown}; expected names from {', '.join(EXPERIMENT_NAMES)}")
        return value

    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


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
    },
    # Experiment 9 alone, for as long as this machine can afford (about four hours on 2 cores): does ASI's advantage
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
        "curve_tokens": [1_000_000, 10_000_000, 100_000_000],
        "budget_d_init_values": [256, 2048],
    },
}
