"""The config of `ranklens collect` (no torch here: the command line is built from it)."""

from __future__ import annotations

from pydantic import Field

from ranklens.config import CorpusFields, ModelFields


class CollectConfig(CorpusFields, ModelFields):
    sites: str = Field("L15.attn_out", description="site pattern(s): L{layer}.{kind}, layer an integer, a range "
                                                   "10-20, * or mid; e.g. 'L*.attn_out,L10-20.mlp_out,Lmid.*'")
    tokens: int = Field(100_000, gt=0, description="ordinary tokens to collect (bos/eos/pad excluded)")
    store_dtype: str = Field("model", description="dtype on disk: model (the compute dtype), float32, bfloat16 or "
                                                  "float16")
    batch_tokens: int = Field(8192, gt=0, description="padded positions per forward pass")
    shard_tokens: int = Field(65_536, gt=0, description="tokens per shard file")
