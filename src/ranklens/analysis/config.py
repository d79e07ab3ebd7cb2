"""The configs of `ranklens zpattern`, `ranklens lorsa-top` and `ranklens heads` (no torch here: the command line is
built from them)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from ranklens.config import DEFAULT_CONTEXT_LENGTH, Config, ModelFields
from ranklens.eval.config import (
    context_field,
    corpus_field,
    device_field,
    dtype_field,
    model_field,
    seed_field,
)

# The probe names (ranklens.analysis.probes.TASKS, which imports torch; tests/test_heads.py checks they agree).
HEAD_TASKS = ("induction", "previous_token", "successor", "copy_suppression", "name_mover", "acronym",
              "attention_sink", "arithmetic")


class ZPatternConfig(Config):
    head: int = Field(ge=0, description="the Lorsa head")
    text: str = Field(min_length=1, description="the text whose z pattern is shown")
    model: str | None = model_field()
    context_length: int = Field(DEFAULT_CONTEXT_LENGTH, ge=2, description="tokens of --text kept")
    output: str | None = Field(None, description="write the JSON to this file (default: print it)")
    dtype: str = dtype_field()
    device: str = device_field()


class LorsaTopConfig(Config):
    tokens: int = Field(100_000, gt=0, description="held-out ordinary tokens to scan")
    n_top: int = Field(16, ge=1, description="activations kept per head (Lorsa paper Section 4.1)")
    before: int = Field(12, ge=0, description="context tokens kept before the activating token")
    after: int = Field(4, ge=0, description="context tokens kept after it")
    attribution: bool = Field(True, description="also attribute each head to the MHSA heads (App. F)")
    model: str | None = model_field()
    corpus: str | None = corpus_field()
    seed: int = seed_field()
    context_length: int | None = context_field()
    output: str | None = Field(None, description="directory for the JSON files (default: DIR/interp)")
    dtype: str = dtype_field()
    device: str = device_field()


class HeadsConfig(ModelFields):
    """`ranklens heads`: score attention heads on generated task probes (Lorsa paper Section 5, App. E.1, F.3)."""

    dtype: str = Field("float32", description="the model's compute dtype (float32 keeps path-patching effects far "
                                              "above rounding)")
    tasks: list[str] = Field(list(HEAD_TASKS), description=f"probes to run, from {','.join(HEAD_TASKS)}")
    layers: str = Field("*", description="MHSA layers whose heads are scored: * (every layer), mid, a range like "
                                         "3-7, or several joined with commas")
    lorsa: list[str] = Field([], description="`train lorsa` run directories whose heads are scored too (each at its "
                                             "own layer)")
    prompts: int = Field(64, ge=1, description="generated sequences per task")
    corpus: str = Field("default", description="the corpus of the previous_token and attention_sink probes")
    seed: int = Field(0, description="seed of every probe")
    top: int = Field(10, ge=1, description="heads listed per task and model part (every MHSA head is in the JSON)")
    threshold: float = Field(0.1, ge=0, description="path-patching effect (metric units, in the task's direction) "
                                                    "a head needs to be called a head of the task")
    share: float = Field(0.5, ge=0, le=1, description="pattern share on the task's sources a head needs too")
    broadcast_sequences: int = Field(64, ge=0, description="corpus windows of 128 tokens on which each Lorsa head's "
                                                           "broadcast (thematic anchor, Section 5.3) is scored (0: "
                                                           "none)")
    input_sae: str | None = Field(None, description="with one --lorsa, an SAE on its input (attn_in of its layer): "
                                                    "features moving each top head's Q and K (App. G.1) and aligned "
                                                    "with its w_v (G.2)")
    output_sae: str | None = Field(None, description="with one --lorsa, an SAE on its output (attn_out of its layer): "
                                                     "features aligned with each top head's w_o (App. G.2)")
    operand_heads: int = Field(6, ge=0, description="operand plots (Section 5.2) of this many top arithmetic heads of "
                                                    "each Lorsa, over the 100 x 100 grid (0: none)")

    @model_validator(mode="after")
    def _saes_need_one_lorsa(self) -> HeadsConfig:
        if (self.input_sae or self.output_sae) and len(self.lorsa) != 1:
            raise ValueError("--input-sae and --output-sae read the input and output of one Lorsa's layer; give "
                             f"exactly one --lorsa (got {len(self.lorsa)})")
        return self

    @field_validator("tasks", "lorsa", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in HEAD_TASKS]
        if unknown or not value:
            raise ValueError(f"unknown task(s) {', '.join(unknown) or '(none given)'}; expected some of "
                             f"{', '.join(HEAD_TASKS)}")
        return value
