"""The configs of `ranklens zpattern` and `ranklens lorsa-top` (no torch here: the command line is built from
them)."""

from __future__ import annotations

from pydantic import Field

from ranklens.config import DEFAULT_CONTEXT_LENGTH, Config
from ranklens.eval.config import (
    context_field,
    corpus_field,
    device_field,
    dtype_field,
    model_field,
    seed_field,
)


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
