"""Shared fixtures. The embedded models load from the user cache (built once, ~25 s for SmolLM2)."""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2():
    from ranklens.lm.load import load_model

    return load_model("smollm2-135m", dtype="float32")


@pytest.fixture(scope="session")
def smollm2_bf16():
    """SmolLM2 in bf16, the dtype jobs run it in on this CPU (a model of its own: casting the float32 fixture to
    bf16 and back would round its weights for every later test)."""
    from ranklens.lm.load import load_model

    return load_model("smollm2-135m", dtype="bfloat16")


@pytest.fixture(scope="session")
def minilm():
    from ranklens.lm.load import load_model

    return load_model("minilm-l6", dtype="float32")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, minilm):
    """A tiny random Llama saved as a local HF model directory with a real tokenizer (`model/`), and a small local
    corpus of 200 embedded prose documents as .txt files (`corpus/`)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ranklens.data.corpus import iter_documents

    root = tmp_path_factory.mktemp("tiny")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=128, architectures=["LlamaForCausalLM"])
        LlamaForCausalLM(cfg).save_pretrained(root / "model")
    minilm.tokenizer.save_pretrained(root / "model")
    corpus = root / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(iter_documents("prose", seed=0)):
        (corpus / f"{i:03d}.txt").write_text(doc)
        if i == 199:
            break
    return root
