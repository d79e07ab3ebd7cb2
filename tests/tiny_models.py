"""Tiny randomly initialized Hugging Face models of every supported architecture family, for tests.

Built from configs only (no downloads), seeded, float32, eval mode. After the usual initialization every 1-D
parameter (norm weights, biases) gets seeded noise, so that norms and biases are not identities/zeros and the
arithmetic checks in the tests mean something.

    model = tiny_model("llama")                 # LlamaForCausalLM
    ids, mask = tiny_batch(model)               # [2, 12] input_ids, mask with padding at the end of row 1
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 128
D_MODEL = 64
N_LAYERS = 3
N_HEADS = 4

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=D_MODEL,
    num_hidden_layers=N_LAYERS,
    num_attention_heads=N_HEADS,
    initializer_range=0.05,
)
_ROPE = dict(max_position_embeddings=64, intermediate_size=96, tie_word_embeddings=False)


def _llama() -> PreTrainedModel:
    # GQA: 2 key/value heads for 4 query heads; RoPE.
    return LlamaForCausalLM(LlamaConfig(**_COMMON, **_ROPE, num_key_value_heads=2))


def _qwen2() -> PreTrainedModel:
    # Qwen2 has biases on q/k/v (not on o_proj).
    return Qwen2ForCausalLM(Qwen2Config(**_COMMON, **_ROPE, num_key_value_heads=2))


def _qwen3() -> PreTrainedModel:
    # q/k norms, and n_heads * head_dim = 96 != d_model = 64.
    return Qwen3ForCausalLM(Qwen3Config(**_COMMON, **_ROPE, num_key_value_heads=2, head_dim=24))


def _mistral() -> PreTrainedModel:
    return MistralForCausalLM(MistralConfig(**_COMMON, **_ROPE, num_key_value_heads=2, sliding_window=8))


def _gemma() -> PreTrainedModel:
    return GemmaForCausalLM(GemmaConfig(**_COMMON, **_ROPE, num_key_value_heads=2, head_dim=16))


def _gemma2() -> PreTrainedModel:
    return Gemma2ForCausalLM(
        Gemma2Config(
            **_COMMON,
            **_ROPE,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=8,
            attn_implementation="eager",
        )
    )


def _gemma3() -> PreTrainedModel:
    # Gemma 3 (model_type gemma3_text): sandwich norms, q/k norms with (1 + w) weights, and per-layer attention
    # types whose RoPE differs: sliding layers (window 8 < seq 12) use theta 10^4, the global layer 10^6 with
    # linear scaling, so a Lorsa that took the wrong layer's frequencies would not reproduce the layer.
    return Gemma3ForCausalLM(
        Gemma3TextConfig(
            **_COMMON,
            **_ROPE,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 8.0},
            },
            attn_implementation="eager",
        )
    )


def _gpt2() -> PreTrainedModel:
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=D_MODEL,
            n_layer=N_LAYERS,
            n_head=N_HEADS,
            n_positions=64,
            initializer_range=0.05,
            bos_token_id=0,
            eos_token_id=0,
        )
    )


def _gpt_neox(parallel: bool) -> PreTrainedModel:
    return GPTNeoXForCausalLM(
        GPTNeoXConfig(
            **_COMMON, intermediate_size=128, max_position_embeddings=64, use_parallel_residual=parallel
        )
    )


def _bert_config() -> BertConfig:
    return BertConfig(**_COMMON, intermediate_size=128, max_position_embeddings=64)


BUILDERS: dict[str, Callable[[], PreTrainedModel]] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gpt2": _gpt2,
    "gpt_neox": lambda: _gpt_neox(True),
    "gpt_neox_seq": lambda: _gpt_neox(False),
    "bert": lambda: BertModel(_bert_config()),
    "bert_mlm": lambda: BertForMaskedLM(_bert_config()),
}
NAMES: tuple[str, ...] = tuple(BUILDERS)


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A tiny model of the named variant (one of NAMES), seeded, in eval mode. The global RNG is left untouched."""
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny model {name!r}; expected one of {', '.join(NAMES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BUILDERS[name]()
        with torch.no_grad():
            for p in model.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
    return model.to(dtype).eval()


def tiny_batch(
    model: PreTrainedModel | None = None, batch: int = 2, seq: int = 12, pad: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random input_ids [batch, seq] and an attention mask whose last row has `pad` padding positions at the end
    (padded ids are 0)."""
    vocab = model.config.vocab_size if model is not None else VOCAB
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad:
        mask[-1, seq - pad :] = 0
        ids[-1, seq - pad :] = 0
    return ids, mask
