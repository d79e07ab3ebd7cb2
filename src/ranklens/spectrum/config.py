"""The config of `ranklens spectrum` (no torch here: the command line is built from it)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ranklens.config import CorpusFields, ModelFields


class SpectrumConfig(CorpusFields, ModelFields):
    sites: str = Field("L*.attn_out,L*.attn_z,L*.mlp_out,L*.resid_post",
                       description="site pattern(s) to measure, e.g. 'L*.attn_out,L10-20.mlp_out,Lmid.*'")
    tokens: int = Field(100_000, gt=0, description="ordinary tokens per site")
    batch_tokens: int = Field(8192, gt=0, description="padded positions per forward pass")
    gram_dtype: Literal["float64", "float32"] = Field(
        "float32", description="dtype of the per-chunk Gram products, merged in float64 either way (float32: every "
                               "reported statistic within the README's stated accuracy of float64, at a fraction "
                               "of the cost)")
    splits: int = Field(1, ge=1, description="App. C: disjoint splits for the stability of the effective rank")
    stability_sites: str | None = Field(None, description="site pattern of the sites that keep split accumulators "
                                                          "(default: all, when --splits > 1)")
    exclude_outliers: bool = Field(False, description="footnote 3: drop activations whose norm exceeds mean + "
                                                      "sigma * std (from a calibration prefix)")
    outlier_sigma: float = Field(5.0, gt=0, description="the sigma of --exclude-outliers")
    outlier_calibration_tokens: int = Field(16_384, gt=0, description="tokens behind the outlier bound")
    loss_recovered: str | None = Field(None, description="App. B: site pattern whose loss recovered by the top-n "
                                                         "singular components is measured, e.g. 'Lmid.attn_out'")
    loss_tokens: int = Field(4096, gt=0, description="held-out tokens per loss evaluation")
    loss_points: int = Field(10, ge=2, description="grid points over n before the bisection")
    decompose: str | None = Field(None, description="layers for the Section 4.4 W_O decomposition: an integer, a "
                                                    "range 10-20, mid, or * (every layer)")
    compare: str | None = Field(None, description="side-by-side runs, comma-separated key=value: corpus=NAME or "
                                                  "model=NAME, e.g. 'corpus=code,model=minilm-l6'")
    compare_sites: str = Field("Lmid.attn_out,Lmid.attn_z,Lmid.mlp_out,Lmid.resid_post",
                               description="site pattern measured in each comparison")
    compare_tokens: int = Field(30_000, gt=0, description="tokens per comparison run")
    checkpoint_seconds: float = Field(300.0, ge=0, description="seconds between accumulator checkpoints (0: after every batch)")
