"""Read and write sparse autoencoders in the on-disk layouts the ecosystem uses.

Public API: ``save_saelens``, ``load_saelens``, ``load_llamascope``, ``load_sae`` (detects the layout) and
``saelens_hook_name`` (a ranklens site as a TransformerLens hook name).

SAELens layout (sae-lens 6.x; what Neuronpedia, SAEBench and sae-dashboard read)
================================================================================

Checked against the sae-lens 6.54.12 wheel: ``sae_lens/saes/sae.py`` (``SAEConfig``, ``SAEMetadata``,
``SAE.save_model``, ``SAE.load_from_disk``, ``process_sae_in``), ``sae_lens/saes/standard_sae.py``,
``sae_lens/saes/topk_sae.py``, ``sae_lens/saes/jumprelu_sae.py``, ``sae_lens/saes/batchtopk_sae.py``,
``sae_lens/loading/pretrained_sae_loaders.py`` (``sae_lens_disk_loader``, ``handle_config_defaulting``,
``handle_pre_6_0_config``, ``read_sae_components_from_disk``), ``sae_lens/constants.py`` and
``sae_lens/llm_sae_training_runner.py`` (``_set_sae_metadata``).

A directory with two files:

- ``cfg.json``: ``SAEConfig.to_dict()``, the dataclass fields in order, then ``architecture``::

      {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
       "reshape_activations", "metadata", ["k", "rescale_acts_by_decoder_norm"]  (topk only), "architecture"}

  ``architecture`` is "standard" (ReLU), "topk" or "jumprelu". SAELens has no inference "batchtopk": its trainer saves
  a BatchTopK SAE as "jumprelu" with every threshold set to the running estimate of the batch's k-th activation
  (``BatchTopKTrainingSAE.process_state_dict_for_saving_inference``). On load SAELens keeps only the dataclass fields
  of the architecture's config (unknown top-level keys are dropped) and builds ``SAEMetadata(**metadata)``, which
  accepts any key: ranklens' own ``metadata["ranklens"]`` entry is therefore harmless. ``metadata.sae_lens_version``
  must be >= 6 (``handle_config_defaulting`` otherwise rewrites the file as a pre-6.0 config and drops the metadata).
  The metadata keys written here are the ones SAELens' training runner writes (``_set_sae_metadata``): model_name,
  model_class_name, hook_name, hook_head_index, context_size, prepend_bos, dataset_path, seqpos_slice,
  model_from_pretrained_kwargs, plus the two version keys.
- ``sae_weights.safetensors``: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]``, ``b_dec [d_in]``
  and, for jumprelu, ``threshold [d_sae]``. SAELens loads them with ``load_state_dict(strict=True)``, so no other
  tensor may be in this file: ranklens' exact ``log_threshold`` goes into a separate ``ranklens.safetensors``.

SAELens' forward (``process_sae_in`` then ``encode``/``decode``): ``pre = (x - b_dec * apply_b_dec_to_input) @ W_enc
+ b_enc``; standard: ``relu(pre)``; topk: the k largest entries of pre, passed through ReLU (with
``rescale_acts_by_decoder_norm`` the selection is made on ``pre * ||W_dec_i||`` and the decoder divides by it again);
jumprelu: ``relu(pre) * (pre > threshold)``; ``x_hat = f @ W_dec + b_dec``. With W_enc = W_E^T and W_dec = W_D this is
ranklens' forward for every activation (JumpReLU: ranklens computes z H(z - theta) with z = relu(pre), which equals
SAELens' form for theta > 0). Both directions were checked once against sae-lens 6.54.12 itself, in a separate
environment (``SAE.load_from_disk`` on these files for every activation and for an attn_z site; these loaders on
``save_model``/``save_inference_model`` output, including topk with rescale_acts_by_decoder_norm and BatchTopK):
outputs agreed to 1e-14 in float64.

``ranklens.json`` beside the two files holds what SAELens has no field for: the site name, the full ``SAEConfig``
(training hyperparameters, and "batchtopk" with its k), the model, corpus and context length, and ``extra`` (the
initialization, d_init, the training config, ...). ``load_saelens`` uses it, when present and consistent with
``cfg.json``, to give back the exact ranklens SAE (a BatchTopK SAE comes back as BatchTopK; pass
``use_ranklens_json=False`` for the SAELens reading, a JumpReLU with the saved threshold).

Site -> hook names (TransformerLens ``HookedTransformer`` names, as SAELens metadata expects): resid_pre ->
``blocks.{n}.hook_resid_pre``, attn_in -> ``blocks.{n}.ln1.hook_normalized``, attn_z -> ``blocks.{n}.attn.hook_z``
(with ``reshape_activations = "hook_z"``: TransformerLens gives z as [..., n_heads, d_head] and SAELens flattens it to
the concatenation of the heads, which is ranklens' attn_z), attn_out -> ``blocks.{n}.hook_attn_out``, mlp_in ->
``blocks.{n}.ln2.hook_normalized``, mlp_hidden -> ``blocks.{n}.mlp.hook_post``, mlp_out -> ``blocks.{n}.hook_mlp_out``,
resid_post -> ``blocks.{n}.hook_resid_post``. The ln hooks match ranklens' attn_in/mlp_in only for a model loaded
without weight processing (``from_pretrained_no_processing``), where the norm's scale is not folded away.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
from ranklens.dictionaries.sae_files import (
    build_sae,
    check_shapes,
    json_flag,
    log_threshold_of,
    positive_int,
    read_json_object,
    read_tensors,
    require_file,
    sae_directory,
)
from ranklens.errors import RanklensError
from ranklens.io import atomic_directory
from ranklens.lm.sites import Site

__all__ = ["SAELENS_CFG", "SAELENS_WEIGHTS", "load_saelens", "saelens_hook_name", "save_saelens"]

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
RANKLENS_JSON = "ranklens.json"
RANKLENS_TENSORS = "ranklens.safetensors"
# SAELens' loader (handle_config_defaulting).
SAELENS_VERSION = "6.54.12"
RANKLENS_FORMAT = "ranklens.saelens"
RANKLENS_FORMAT_VERSION = 1

_HOOKS: dict[str, tuple[str, str]] = {
    # kind: (TransformerLens hook name, SAELens reshape_activations)
    "resid_pre": ("blocks.{n}.hook_resid_pre", "none"),
    "attn_in": ("blocks.{n}.ln1.hook_normalized", "none"),
    "attn_z": ("blocks.{n}.attn.hook_z", "hook_z"),
    "attn_out": ("blocks.{n}.hook_attn_out", "none"),
    "mlp_in": ("blocks.{n}.ln2.hook_normalized", "none"),
    "mlp_hidden": ("blocks.{n}.mlp.hook_post", "none"),
    "mlp_out": ("blocks.{n}.hook_mlp_out", "none"),
    "resid_post": ("blocks.{n}.hook_resid_post", "none"),
}
_ARCHITECTURE = {"relu": "standard", "topk": "topk", "jumprelu": "jumprelu", "batchtopk": "jumprelu"}
_SUPPORTED_ARCHITECTURES = ("standard", "topk", "jumprelu")
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float64: "float64"}
# SAELens' DTYPE_MAP spellings -> ranklens dtype names (float16 is widened: ranklens has no float16 SAEs).
_SAELENS_DTYPES = {
    "float32": "float32",
    "torch.float32": "float32",
    "bfloat16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "float64": "float64",
    "torch.float64": "float64",
    "float16": "float32",
    "torch.float16": "float32",
}


# ============================================================================ SAELens: hook names and saving


def saelens_hook_name(site: str) -> tuple[str, str]:
    """(TransformerLens hook name, SAELens ``reshape_activations``) of a ranklens site such as ``L3.attn_out``."""
    if not isinstance(site, str):
        raise RanklensError(f"saelens_hook_name: site is a {type(site).__name__}; expected a name like 'L3.attn_out'")
    parsed = Site.parse(site)
    template, reshape = _HOOKS[parsed.kind]
    return template.format(n=parsed.layer), reshape


def _jsonable(obj: Any, what: str, name: str) -> Any:
    try:
        json.dumps(obj, allow_nan=False)
    except (TypeError, ValueError) as err:
        raise RanklensError(f"{what}: {name} is not JSON-serializable ({err}); expected plain JSON data") from err
    return obj


def _saelens_files(
    sae: SparseAutoencoder,
    *,
    model: str,
    site: str,
    context_length: int,
    corpus: str,
    extra: dict | None,
    prepend_bos: bool,
    batchtopk_threshold: float | None,
    saelens_metadata: dict | None,
) -> dict[str, bytes]:
    what = "save_saelens"
    if not isinstance(sae, SparseAutoencoder):
        raise RanklensError(f"{what}: got a {type(sae).__name__}; expected a SparseAutoencoder")
    if not isinstance(model, str) or not model:
        raise RanklensError(f"{what}: model={model!r}; expected the model's name (e.g. 'HuggingFaceTB/SmolLM2-135M')")
    if not isinstance(corpus, str) or not corpus:
        raise RanklensError(f"{what}: corpus={corpus!r}; expected the corpus name or path")
    context_length = positive_int(context_length, "context_length", what)
    if not isinstance(prepend_bos, bool):
        raise RanklensError(f"{what}: prepend_bos={prepend_bos!r}; expected true or false")
    if extra is not None and not isinstance(extra, dict):
        raise RanklensError(f"{what}: extra is a {type(extra).__name__}; expected a dict or None")
    if saelens_metadata is not None and not isinstance(saelens_metadata, dict):
        raise RanklensError(f"{what}: saelens_metadata is a {type(saelens_metadata).__name__}; expected a dict")
    hook_name, reshape = saelens_hook_name(site)
    c = sae.config
    dtype_name = _DTYPE_NAMES[sae.W_E.dtype]

    tensors = {
        "W_enc": sae.W_E.detach().T,  # [d_in, d_sae]
        "b_enc": sae.b_E.detach(),  # [d_sae]
        "W_dec": sae.W_D.detach(),  # [d_sae, d_in]
        "b_dec": sae.b_D.detach(),  # [d_in]
    }
    ranklens_tensors: dict[str, torch.Tensor] = {}
    if c.activation == "jumprelu":
        tensors["threshold"] = sae.threshold.detach()
        ranklens_tensors["log_threshold"] = sae.log_threshold.detach()  # type: ignore[union-attr]
    elif c.activation == "batchtopk":
        if batchtopk_threshold is None:
            raise RanklensError(
                f"{what}: a batchtopk SAE needs batchtopk_threshold (the mean over training batches of "
                "kernels.batch_topk_threshold); SAELens stores BatchTopK as jumprelu with that threshold"
            )
        t = float(batchtopk_threshold)
        if not (math.isfinite(t) and t >= 0):
            raise RanklensError(f"{what}: batchtopk_threshold={batchtopk_threshold!r}; expected a finite number >= 0")
        tensors["threshold"] = torch.full((c.n_features,), t, dtype=sae.W_E.dtype, device=sae.W_E.device)
    elif batchtopk_threshold is not None:
        raise RanklensError(
            f"{what}: batchtopk_threshold given for activation={c.activation!r}; it applies to batchtopk only"
        )
    tensors = {k: v.to("cpu").contiguous() for k, v in tensors.items()}

    architecture = _ARCHITECTURE[c.activation]
    metadata: dict[str, Any] = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,
        "model_name": model,
        "model_class_name": "HookedTransformer",
        "hook_name": hook_name,
        "hook_head_index": None,
        "context_size": context_length,
        "prepend_bos": prepend_bos,
        "dataset_path": corpus,
        "seqpos_slice": [None],
        "model_from_pretrained_kwargs": {},
        "ranklens": {"site": Site.parse(site).name, "activation": c.activation, "file": RANKLENS_JSON},
    }
    if saelens_metadata:
        _jsonable(saelens_metadata, what, "saelens_metadata")
        if "ranklens" in saelens_metadata:
            raise RanklensError(f"{what}: saelens_metadata may not set 'ranklens'; expected other metadata keys")
        metadata.update(saelens_metadata)
    cfg: dict[str, Any] = {
        "d_in": c.d_in,
        "d_sae": c.n_features,
        "dtype": dtype_name,
        "device": "cpu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": reshape,
        "metadata": metadata,
    }
    if architecture == "topk":
        cfg["k"] = c.k
        cfg["rescale_acts_by_decoder_norm"] = False
    cfg["architecture"] = architecture

    sae_config = c.model_dump()
    sae_config["dtype"] = dtype_name
    ranklens = {
        "format": RANKLENS_FORMAT,
        "version": RANKLENS_FORMAT_VERSION,
        "site": Site.parse(site).name,
        "model": model,
        "corpus": corpus,
        "context_length": context_length,
        "prepend_bos": prepend_bos,
        "sae_config": sae_config,
        "batchtopk_threshold": None if batchtopk_threshold is None else float(batchtopk_threshold),
        "extra": _jsonable(extra, what, "extra") if extra is not None else {},
    }
    files = {
        SAELENS_CFG: (json.dumps(cfg, indent=2) + "\n").encode(),
        SAELENS_WEIGHTS: st_save(tensors, metadata={"format": "pt"}),
        RANKLENS_JSON: (json.dumps(ranklens, indent=2) + "\n").encode(),
    }
    if ranklens_tensors:
        files[RANKLENS_TENSORS] = st_save(
            {k: v.to("cpu").contiguous() for k, v in ranklens_tensors.items()}, metadata={"format": "pt"}
        )
    return files


def _holds(d: Path, files: dict[str, bytes]) -> bool:
    """True when directory d holds exactly these files with these bytes."""
    if sorted(p.name for p in d.iterdir()) != sorted(files):
        return False
    return all((d / name).is_file() and (d / name).read_bytes() == data for name, data in files.items())


def save_saelens(
    sae: SparseAutoencoder,
    directory: str | Path,
    *,
    model: str,
    site: str,
    context_length: int,
    corpus: str,
    extra: dict | None = None,
    prepend_bos: bool = True,
    batchtopk_threshold: float | None = None,
    saelens_metadata: dict | None = None,
) -> Path:
    """Write ``sae`` as a SAELens directory (``cfg.json``, ``sae_weights.safetensors``) plus ``ranklens.json``
    (and ``ranklens.safetensors`` with the exact ``log_threshold`` of a JumpReLU SAE). Returns the directory.

    Args:
        model: the model's name as SAELens should record it (``metadata.model_name``).
        site: the ranklens site, e.g. ``L3.attn_out``; gives ``metadata.hook_name`` (see ``saelens_hook_name``).
        context_length: tokens per training sequence (``metadata.context_size``).
        corpus: the training corpus (``metadata.dataset_path``).
        extra: JSON data for ``ranklens.json`` (initialization, d_init, training config, ...).
        prepend_bos: whether the training sequences started with BOS (``metadata.prepend_bos``).
        batchtopk_threshold: required for a batchtopk SAE, which SAELens stores as jumprelu with this threshold
            for every feature (e.g. the mean over training batches of ``kernels.batch_topk_threshold``).
        saelens_metadata: further SAELens metadata keys (e.g. ``neuronpedia_id``, ``exclude_special_tokens``).

    Atomic: the files are written into a temporary directory beside ``directory``, which is then renamed. An
    existing ``directory`` must be empty or already hold byte-identical files (then nothing is written);
    anything else is refused.
    """
    what = "save_saelens"
    files = _saelens_files(
        sae,
        model=model,
        site=site,
        context_length=context_length,
        corpus=corpus,
        extra=extra,
        prepend_bos=prepend_bos,
        batchtopk_threshold=batchtopk_threshold,
        saelens_metadata=saelens_metadata,
    )
    if not isinstance(directory, str | os.PathLike):
        raise RanklensError(f"{what}: directory is a {type(directory).__name__}; expected a path")
    d = Path(directory)

    def refuse_or_same() -> bool:
        if not d.exists():
            return False
        if not d.is_dir():
            raise RanklensError(f"{what}: {str(d)!r} is a file; expected a new or empty directory")
        names = sorted(p.name for p in d.iterdir())
        if not names:
            return False
        if _holds(d, files):
            return True
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        raise RanklensError(
            f"{what}: {str(d)!r} already holds {shown}, not this SAE; expected a new or empty directory "
            "(refusing to overwrite)"
        )

    if refuse_or_same():
        return d
    try:
        with atomic_directory(d) as tmp:
            for name, data in files.items():
                (tmp / name).write_bytes(data)
    except OSError:
        if refuse_or_same():  # another writer got there first with the same SAE
            return d
        raise
    return d


# ============================================================================ SAELens: loading


def _saelens_version_major(cfg: dict[str, Any]) -> int | None:
    version = cfg.get("sae_lens_version")
    meta = cfg.get("metadata")
    if not version and isinstance(meta, dict):
        version = meta.get("sae_lens_version")
    if not version:
        return None
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _legacy_to_v6(cfg: dict[str, Any]) -> dict[str, Any]:
    """The parts of SAELens' handle_pre_6_0_config that matter for the weights: architecture, k, flags."""
    new = dict(cfg)
    if "activation_fn_str" in new and "activation_fn" not in new:
        new["activation_fn"] = new["activation_fn_str"]
    new.setdefault("apply_b_dec_to_input", True)
    new.setdefault("architecture", "standard")
    kwargs = new.get("activation_fn_kwargs") or {}
    if new.get("activation_fn") == "topk" and isinstance(kwargs, dict) and kwargs.get("k") is not None:
        new["architecture"] = "topk"
        new["k"] = kwargs["k"]
    norm = new.get("normalize_activations")
    if isinstance(norm, bool):
        new["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        new["normalize_activations"] = "none"
    new.setdefault("reshape_activations", "hook_z" if "hook_z" in str(new.get("hook_name", "")) else "none")
    return new


def _ranklens_config(d: Path, cfg_arch: str, d_in: int, d_sae: int, k: int | None, apply_b: bool) -> SAEConfig | None:
    """The SAEConfig in ranklens.json, if there is one and it agrees with cfg.json."""
    path = d / RANKLENS_JSON
    if not path.is_file():
        return None
    what = "load_saelens"
    meta = read_json_object(path, what)
    if meta.get("format") != RANKLENS_FORMAT or not isinstance(meta.get("sae_config"), dict):
        raise RanklensError(
            f"{what}: {str(path)!r} is not a ranklens SAELens record (format={meta.get('format')!r}); expected "
            f"format {RANKLENS_FORMAT!r} with an sae_config (delete the file to load by cfg.json alone)"
        )
    config = SAEConfig(**meta["sae_config"])
    agrees = (
        config.d_in == d_in
        and config.n_features == d_sae
        and _ARCHITECTURE[config.activation] == cfg_arch
        and config.apply_b_dec_to_input == apply_b
        and (cfg_arch != "topk" or config.k == k)
    )
    if not agrees:
        raise RanklensError(
            f"{what}: {str(path)!r} describes d_in={config.d_in}, n_features={config.n_features}, "
            f"activation={config.activation!r}, k={config.k}, apply_b_dec_to_input={config.apply_b_dec_to_input}; "
            f"cfg.json has d_in={d_in}, d_sae={d_sae}, architecture={cfg_arch!r}, k={k}, apply_b_dec_to_input="
            f"{apply_b}; expected them to agree (pass use_ranklens_json=False, or delete ranklens.json)"
        )
    return config


def load_saelens(
    directory: str | Path,
    device: torch.device | str = "cpu",
    *,
    dtype: str | None = None,
    norm_scaling_factor: float | None = None,
    use_ranklens_json: bool = True,
) -> SparseAutoencoder:
    """Load a SAELens SAE directory (``cfg.json`` + ``sae_weights.safetensors``) as a SparseAutoencoder.

    Architectures: "standard" (-> relu), "topk" (``rescale_acts_by_decoder_norm`` is folded into the weights:
    W_enc n_i, b_enc n_i, W_dec / n_i, which leaves SAELens' selection and output unchanged) and "jumprelu" (theta
    <= 0 becomes log_threshold = -inf: SAELens then computes relu(pre), as does ranklens with theta = 0). Pre-6.0
    configs are read as SAELens' handle_pre_6_0_config does. Others (gated, abstopk, transcoders, ...) are refused.

    normalize_activations: "none"; or "expected_average_only_in" (inputs were scaled by a constant s that SAELens
    keeps outside the directory): pass ``norm_scaling_factor=s`` or have ``activation_scaler.json`` beside
    cfg.json; it is folded as SAELens' ``fold_activation_norm_scaling_factor`` does (W_enc s, W_dec / s,
    b_dec / s). Per-token normalizations (layer_norm, constant_norm_rescale) and covariance_whitening are refused.

    ``dtype``: "float32" | "bfloat16" | "float64"; default cfg.json's (float16 is widened to float32).
    ``use_ranklens_json``: restore the exact ranklens SAE from ``ranklens.json`` / ``ranklens.safetensors`` when
    present (training hyperparameters, batchtopk, the exact log_threshold).
    """
    what = "load_saelens"
    d = sae_directory(directory, what)
    cfg_path = require_file(d, SAELENS_CFG, what, "SAELens (cfg.json + sae_weights.safetensors)")
    w_path = require_file(d, SAELENS_WEIGHTS, what, "SAELens (cfg.json + sae_weights.safetensors)")
    cfg = read_json_object(cfg_path, what)
    major = _saelens_version_major(cfg)
    if major is None or major < 6:
        cfg = _legacy_to_v6(cfg)

    architecture = cfg.get("architecture")
    if architecture not in _SUPPORTED_ARCHITECTURES:
        hint = " (SAELens saves BatchTopK inference models as jumprelu)" if architecture == "batchtopk" else ""
        raise RanklensError(
            f"{what}: architecture={architecture!r} in {str(cfg_path)!r} is not supported{hint}; expected one of "
            f"{', '.join(_SUPPORTED_ARCHITECTURES)}"
        )
    d_in = positive_int(cfg.get("d_in"), "d_in", what)
    d_sae = positive_int(cfg.get("d_sae"), "d_sae", what)
    apply_b = json_flag(cfg, "apply_b_dec_to_input", True, what)
    k = None
    if architecture == "topk":
        k = positive_int(cfg.get("k", 100), "k", what)  # TopKSAEConfig's default k is 100
        if k > d_sae:
            raise RanklensError(f"{what}: k={k}; expected 1 <= k <= d_sae={d_sae}")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in"):
        raise RanklensError(
            f"{what}: normalize_activations={norm!r} is not supported (it is not a constant scale that weights can "
            "absorb); expected 'none' or 'expected_average_only_in'"
        )
    raw_dtype = cfg.get("dtype", "float32")
    if raw_dtype not in _SAELENS_DTYPES:
        raise RanklensError(f"{what}: dtype={raw_dtype!r} in cfg.json; expected one of {', '.join(_SAELENS_DTYPES)}")
    if dtype is not None and dtype not in _DTYPE_NAMES.values():
        raise RanklensError(f"{what}: dtype={dtype!r}; expected one of {', '.join(_DTYPE_NAMES.values())}")
    dtype_name = dtype if dtype is not None else _SAELENS_DTYPES[raw_dtype]

    tensors = read_tensors(w_path, what)
    if "scaling_factor" in tensors:  # older SAELens; read_sae_components_from_disk drops it when all ones
        if not torch.all(tensors["scaling_factor"] == 1):
            raise RanklensError(
                f"{what}: {str(w_path)!r} has a scaling_factor that is not all ones; expected none "
                "(finetuning scaling factors are not supported)"
            )
        del tensors["scaling_factor"]
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if architecture == "jumprelu":
        expected["threshold"] = (d_sae,)
    check_shapes(tensors, expected, what, w_path)

    # Folds run in float32 (float64 for a float64 SAE): one multiply per entry, no accumulation but the norms.
    fold_dt = torch.float64 if dtype_name == "float64" else torch.float32
    W_E = tensors["W_enc"].T
    b_E = tensors["b_enc"]
    W_D = tensors["W_dec"]
    b_D = tensors["b_dec"]
    folded = False
    if architecture == "topk" and json_flag(cfg, "rescale_acts_by_decoder_norm", False, what):
        n = torch.linalg.vector_norm(W_D.to(fold_dt), dim=1)
        if not torch.all(n > 0):
            raise RanklensError(f"{what}: rescale_acts_by_decoder_norm with a zero decoder row; expected nonzero rows")
        W_E, b_E, W_D = W_E.to(fold_dt) * n[:, None], b_E.to(fold_dt) * n, W_D.to(fold_dt) / n[:, None]
        folded = True
    if norm == "expected_average_only_in":
        s = norm_scaling_factor
        scaler = d / "activation_scaler.json"
        if s is None and scaler.is_file():
            s = read_json_object(scaler, what).get("scaling_factor")
        if s is None:
            raise RanklensError(
                f"{what}: normalize_activations='expected_average_only_in' and no scaling factor; expected "
                "norm_scaling_factor=... (SAELens keeps it in pretrained_saes.yaml or activation_scaler.json)"
            )
        if isinstance(s, bool) or not isinstance(s, int | float) or not (math.isfinite(s) and s > 0):
            raise RanklensError(f"{what}: norm_scaling_factor={s!r}; expected a finite number > 0")
        W_E, W_D, b_D = W_E.to(fold_dt) * s, W_D.to(fold_dt) / s, b_D.to(fold_dt) / s
        folded = True
    elif norm_scaling_factor is not None:
        raise RanklensError(
            f"{what}: norm_scaling_factor given but normalize_activations={norm!r}; expected "
            "'expected_average_only_in'"
        )

    config = None
    if use_ranklens_json and not folded:
        config = _ranklens_config(d, architecture, d_in, d_sae, k, apply_b)
    if config is not None:
        if config.dtype != dtype_name:
            config = SAEConfig(**{**config.model_dump(), "dtype": dtype_name})
    else:
        activation = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}[architecture]
        config = SAEConfig(
            d_in=d_in, n_features=d_sae, activation=activation, k=k, apply_b_dec_to_input=apply_b, dtype=dtype_name
        )

    log_threshold = None
    if config.activation == "jumprelu":
        theta = tensors["threshold"]
        log_threshold = log_threshold_of(theta)
        exact = d / RANKLENS_TENSORS
        if use_ranklens_json and exact.is_file():
            extra = read_tensors(exact, what)
            lt = extra.get("log_threshold")
            # The exact parameter, if it is the one this threshold came from (exp computed as ranklens does).
            if lt is not None and lt.shape == theta.shape and lt.dtype == theta.dtype and torch.equal(lt.exp(), theta):
                log_threshold = lt
    return build_sae(config, W_E, b_E, W_D, b_D, log_threshold, device)
