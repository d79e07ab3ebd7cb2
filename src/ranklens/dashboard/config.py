"""The configs of `ranklens dashboard` and `ranklens serve` (no torch here: the command line is built from them)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ranklens.config import Config
from ranklens.eval.config import (
    context_field,
    corpus_field,
    device_field,
    dtype_field,
    model_field,
    seed_field,
)


class DashboardConfig(Config):
    tokens: int = Field(100_000, gt=0, description="held-out ordinary tokens scanned for every statistic")
    model: str | None = model_field()
    site: str | None = Field(None, description="the site of an SAELens or LlamaScope SAE (a ranklens run knows its "
                                               "own)")
    corpus: str | None = corpus_field()
    seed: int = seed_field()
    context_length: int | None = context_field()
    n_top: int = Field(20, ge=1, description="top activating contexts per feature")
    n_sample: int = Field(100, ge=1, description="activations sampled uniformly per feature, for the interval "
                                                 "examples")
    intervals: int = Field(4, ge=1, description="activation intervals (equal shares of the feature's max) shown with "
                                                "examples")
    per_interval: int = Field(5, ge=1, description="examples per interval")
    before: int = Field(16, ge=0, description="context tokens shown before an activating token")
    after: int = Field(6, ge=0, description="context tokens shown after it")
    random_windows: int = Field(64, ge=0, description="random context windows kept with every active feature's "
                                                     "activation at each token (autointerp's random held-out "
                                                     "contexts)")
    neighbours: int = Field(8, ge=1, description="nearest features by decoder cosine")
    logit_tokens: int = Field(10, ge=1, description="promoted and suppressed tokens shown")
    subspace_dim: int | Literal["auto"] = Field(
        "auto", description="dimension of the active subspace behind each feature's subspace share: an integer, or "
                            "auto (the d_init rule of the README's Definitions, from the scanned activations)")
    attribution: bool = Field(True, description="Lorsa: attribute each head to the original attention heads (App. F)")
    dtype: str = dtype_field()
    device: str = device_field()


class ServeConfig(Config):
    host: str = Field("127.0.0.1", description="address to bind (there is no authentication: keep it local)")
    port: int = Field(8000, ge=1, le=65535, description="port")
    max_chars: int = Field(2000, ge=1, description="longest prompt accepted")
    top_features: int = Field(8, ge=1, description="features (or heads) listed per token")
    dtype: str = dtype_field()
    device: str = device_field()
