"""Read sparse autoencoders in the LlamaScope layout (the papers' authors; the Llama Scope SAEs on the hub).

A directory with ``hyperparams.json`` and ``checkpoints/final.safetensors``; the reference loader of the time
(lm-saes ``SparseAutoEncoder.from_config``, repository OpenMOSS/Language-Model-SAEs, late 2024) looks for
``sae_weights.safetensors``, ``checkpoints/pruned.safetensors`` and ``checkpoints/final.safetensors`` in that order,
and so does ``load_llamascope`` (the ``.pt`` variants are not read: pickles are not loaded). Tensors (torch Linear
layout): ``encoder.weight [d_sae, d_model]``, ``encoder.bias [d_sae]``, ``decoder.weight [d_model, d_sae]``,
``decoder.bias [d_model]`` (absent when use_decoder_bias is false). Later lm-saes versions also put
``dataset_average_activation_norm.<hook>`` scalars in the file; they are accepted (and used if hyperparams.json lacks
the norms). Anything else (``encoder_glu.*``, a per-feature ``log_jumprelu_threshold``) is an error.

hyperparams.json fields read (a dump of lm-saes' SAEConfig; defaults are that class's defaults where they did not
change between versions):

- ``d_model`` (required); ``d_sae`` (else ``d_model * expansion_factor``).
- ``act_fn``: "relu" | "topk" | "jumprelu" (default "relu"). As in the reference loader, "topk" with
  ``jump_relu_threshold > 0`` is run as "jumprelu" (the Llama Scope SAEs were trained as TopK and converted).
- ``jump_relu_threshold`` (default 0.0): ONE scalar theta for all features; ``top_k`` (default 50).
- ``norm_activation`` (required: its default changed from "token-wise" to "dataset-wise" between versions):
  "dataset-wise" | "inference" | "none"; "token-wise"/"batch-wise" normalize each token by its own norm, which no
  weights can express, and are refused.
- ``dataset_average_activation_norm``: ``{"in": a_in, "out": a_out}`` (also accepted: keyed by the hook names).
- ``sparsity_include_decoder_norm`` (default true), ``use_decoder_bias`` (default true),
  ``apply_decoder_bias_to_pre_encoder`` (required when use_decoder_bias: its default changed from true to false),
  ``use_glu_encoder`` (default false; true is refused), ``hook_point_in``/``hook_point_out`` (out defaults to in;
  different hooks make a transcoder, refused unless ``allow_transcoder=True``).

The authors' forward, training space (``encode``/``decode``/``compute_loss`` of that lm-saes version), with
s_in = sqrt(d_model) / a_in and s_out = sqrt(d_model) / a_out::

    x_n = s_in x;  pre = W_e (x_n - [b_d if apply_decoder_bias_to_pre_encoder]) + b_e;  f = act(pre);
    x_hat_n = W_d f + b_d;  x_hat = x_hat_n / s_out

and the inference form their loader builds (``from_config``): ``standardize_parameters_of_dataset_activation_scaling``
(b_e / s_in, W_d s_in / s_out, b_d / s_out, no runtime normalization), then, with sparsity_include_decoder_norm,
``transform_to_unit_decoder_norm`` (n_i = ||W_d[:, i]||: W_d[:, i] / n_i, W_e[i] n_i, b_e[i] n_i). The JumpReLU
threshold is compared with the pre-activation of THAT folded SAE: the authors' conversion
(``post_process_topk_to_jumprelu_for_inference``) takes theta as the (32768 k)-th largest ``relu(pre)`` over a batch
of 32768 tokens, pre being the pre-activation of the SAE loaded through ``from_config``. With n_i = ||W_d[:, i]|| (the stored decoder) and m_i = n_i s_in / s_out (the norm
after the standardization), a feature fires when ``pre_i m_i / s_in = pre_i n_i / s_out > theta``. (SAELens'
llama_scope loader scales theta by s_in after the authors' fix, SAELens PR #483, but ignores n_i, which is not 1 in
the released checkpoints.)

``load_llamascope`` builds exactly that folded SAE, which works on raw activations:

    W_E[i] = m_i W_e[i],  b_E[i] = m_i b_e[i] / s_in,  W_D[i] = W_d[:, i] (s_in / s_out) / m_i,  b_D = b_d / s_out,
    apply_b_dec_to_input = apply_decoder_bias_to_pre_encoder,  theta unchanged.

Check: ``W_E[i] x + b_E[i] = (m_i / s_in) pre_i``, so the gate is the authors' one, the code is
f'_i = (m_i / s_in) f_i, and ``sum_i f'_i W_D[i] + b_D = (W_d f + b_d) / s_out = x_hat``. (m_i = 1 without
sparsity_include_decoder_norm; s_in = s_out = 1 without dataset-wise normalization, and s_in = s_out for every SAE,
as opposed to a transcoder; subtracting b_D from a raw input equals subtracting b_d from the normalized one only
when s_in = s_out, so that flag with in != out norms is refused.)
A feature whose decoder column is zero (n_i = 0, where the reference divides 0 by 0) is loaded as never firing.
With unit decoder columns this is SAELens' llama_scope loader (W_enc s_in, threshold theta s_in, W_dec / s_in,
b_dec / s_in) up to the scale of the code: SAELens' feature activations stay in the normalized units (s_in times
larger), the authors' inference form, used here, gives them at the activations' real scale; reconstructions agree.

Guessed or inferred, not read from a published hyperparams.json (none is stored here): the defaults above, the
``{in, out}`` keying being the only one in the released files, and that the released checkpoints are the raw
training weights (norm_activation "dataset-wise"; decoder norms not 1, mean ~1.54 for LXR-8x L15 per issue #128 of
OpenMOSS/Llamascopium). The arithmetic is taken from the authors' code of the time.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ranklens.dictionaries.sae import SAEConfig, SparseAutoencoder
from ranklens.dictionaries.sae_files import (
    build_sae,
    check_shapes,
    json_flag,
    positive_int,
    read_json_object,
    read_tensors,
    require_file,
    sae_directory,
)
from ranklens.errors import RanklensError

__all__ = ["LLAMASCOPE_HYPERPARAMS", "load_llamascope"]

DTYPES = ("float32", "bfloat16", "float64")

LLAMASCOPE_HYPERPARAMS = "hyperparams.json"
# The reference loader's search order (lm-saes SparseAutoEncoder.from_config, late 2024), safetensors only.
LLAMASCOPE_CHECKPOINTS = (
    "sae_weights.safetensors",
    "checkpoints/pruned.safetensors",
    "checkpoints/final.safetensors",
)
# The sae-lens release whose layout this module writes (checked against its source); >= 6 is what matters to


def _llamascope_norms(hp: dict[str, Any], tensors: dict[str, torch.Tensor], what: str) -> tuple[float, float]:
    """(a_in, a_out), the dataset-average activation norms, from hyperparams.json or the checkpoint."""
    hook_in = hp.get("hook_point_in")
    hook_out = hp.get("hook_point_out", hook_in)
    raw = hp.get("dataset_average_activation_norm")
    found: dict[str, Any] = {}
    if isinstance(raw, dict):
        for side, hook in (("in", hook_in), ("out", hook_out)):
            if side in raw:
                found[side] = raw[side]
            elif hook is not None and hook in raw:
                found[side] = raw[hook]
    elif raw is not None:
        raise RanklensError(
            f"{what}: dataset_average_activation_norm={raw!r}; expected an object {{'in': ..., 'out': ...}}"
        )
    for side, hook in (("in", hook_in), ("out", hook_out)):
        if side not in found:
            for key in (f"dataset_average_activation_norm.{side}", f"dataset_average_activation_norm.{hook}"):
                if key in tensors and tensors[key].numel() == 1:
                    found[side] = tensors[key].item()
                    break
    out = []
    for side in ("in", "out"):
        v = found.get(side)
        if isinstance(v, bool) or not isinstance(v, int | float) or not (math.isfinite(v) and v > 0):
            raise RanklensError(
                f"{what}: norm_activation='dataset-wise' needs dataset_average_activation_norm[{side!r}] > 0; "
                f"got {v!r}"
            )
        out.append(float(v))
    return out[0], out[1]


def load_llamascope(
    directory: str | Path,
    device: torch.device | str = "cpu",
    *,
    dtype: str = "float32",
    allow_transcoder: bool = False,
) -> SparseAutoencoder:
    """Load a LlamaScope (lm-saes) SAE directory (``hyperparams.json`` + ``checkpoints/final.safetensors``) as a
    SparseAutoencoder that works on raw activations: the dataset-wise normalization, the decoder norms of the
    JumpReLU gate and the output scale are folded into the weights (derivation in the module docstring).

    ``allow_transcoder``: accept hook_point_in != hook_point_out (the result then maps the input hook's activations
    to a prediction of the output hook's). ``dtype``: "float32" | "bfloat16" | "float64" (the fold runs in float32,
    or in float64 for a float64 SAE).
    """
    what = "load_llamascope"
    d = sae_directory(directory, what)
    hp_path = require_file(d, LLAMASCOPE_HYPERPARAMS, what, "LlamaScope (hyperparams.json + checkpoints/final.safetensors)")
    hp = read_json_object(hp_path, what)
    if dtype not in DTYPES:
        raise RanklensError(f"{what}: dtype={dtype!r}; expected one of {', '.join(DTYPES)}")
    sae_type = hp.get("sae_type", "sae")
    if sae_type != "sae":
        raise RanklensError(f"{what}: sae_type={sae_type!r} in {str(hp_path)!r} is not supported; expected 'sae'")

    d_model = positive_int(hp.get("d_model"), "d_model", what)
    if "d_sae" in hp and hp["d_sae"] is not None:
        d_sae = positive_int(hp["d_sae"], "d_sae", what)
    elif "expansion_factor" in hp:
        d_sae = positive_int(d_model * hp["expansion_factor"], "d_model * expansion_factor", what)
    else:
        raise RanklensError(f"{what}: {str(hp_path)!r} has neither d_sae nor expansion_factor; expected one of them")
    if json_flag(hp, "use_glu_encoder", False, what):
        raise RanklensError(f"{what}: use_glu_encoder=true is not supported; expected false (a plain linear encoder)")
    hook_in = hp.get("hook_point_in")
    hook_out = hp.get("hook_point_out") or hook_in
    if hook_in is not None and hook_out != hook_in and not allow_transcoder:
        raise RanklensError(
            f"{what}: hook_point_in={hook_in!r} differs from hook_point_out={hook_out!r} (a transcoder); expected "
            "the same hook, or pass allow_transcoder=True"
        )
    use_b_dec = json_flag(hp, "use_decoder_bias", True, what)
    pre_bias = json_flag(hp, "apply_decoder_bias_to_pre_encoder", None, what) if use_b_dec else False
    unit_dec = json_flag(hp, "sparsity_include_decoder_norm", True, what)

    act_fn = str(hp.get("act_fn", "relu")).lower()
    theta = hp.get("jump_relu_threshold", 0.0)
    if theta is None:
        theta = 0.0
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not math.isfinite(theta):
        raise RanklensError(f"{what}: jump_relu_threshold={theta!r}; expected a finite number")
    if act_fn == "topk" and theta > 0:
        act_fn = "jumprelu"  # as the reference loader does: the Llama Scope SAEs were converted after training
    k = None
    if act_fn == "jumprelu":
        if theta < 0:
            raise RanklensError(f"{what}: jump_relu_threshold={theta!r}; expected a number >= 0")
        activation = "jumprelu" if theta > 0 else "relu"  # pre.where(pre > 0, 0) is relu
    elif act_fn == "topk":
        activation = "topk"
        k = positive_int(hp.get("top_k", 50), "top_k", what)
        if k > d_sae:
            raise RanklensError(f"{what}: top_k={k}; expected 1 <= top_k <= d_sae={d_sae}")
    elif act_fn == "relu":
        activation = "relu"
    else:
        raise RanklensError(f"{what}: act_fn={act_fn!r} is not supported; expected 'relu', 'topk' or 'jumprelu'")

    ckpt = next((d / name for name in LLAMASCOPE_CHECKPOINTS if (d / name).is_file()), None)
    if ckpt is None:
        pickles = [name.replace(".safetensors", ".pt") for name in LLAMASCOPE_CHECKPOINTS]
        found_pt = [p for p in pickles if (d / p).is_file()]
        hint = f" (found {', '.join(found_pt)}: .pt pickles are not loaded)" if found_pt else ""
        raise RanklensError(f"{what}: {str(d)!r} has no checkpoint{hint}; expected one of {', '.join(LLAMASCOPE_CHECKPOINTS)}")
    tensors = read_tensors(ckpt, what)

    norm_activation = hp.get("norm_activation")
    if norm_activation == "dataset-wise":
        a_in, a_out = _llamascope_norms(hp, tensors, what)
        s_in, s_out = math.sqrt(d_model) / a_in, math.sqrt(d_model) / a_out
    elif norm_activation in ("inference", "none"):
        s_in = s_out = 1.0
    elif norm_activation is None:
        raise RanklensError(
            f"{what}: {str(hp_path)!r} has no norm_activation; expected 'dataset-wise', 'inference' or 'none' "
            "(its default differs between lm-saes versions)"
        )
    else:
        raise RanklensError(
            f"{what}: norm_activation={norm_activation!r} normalizes each token by its own norm, which weights cannot "
            "express; expected 'dataset-wise', 'inference' or 'none'"
        )
    if pre_bias and not math.isclose(s_in, s_out, rel_tol=1e-12):
        raise RanklensError(
            f"{what}: apply_decoder_bias_to_pre_encoder with different in/out norms ({s_in:g} vs {s_out:g}); "
            "expected equal norms (one decoder bias cannot serve both scales)"
        )

    tensors = {k_: v for k_, v in tensors.items() if not k_.startswith("dataset_average_activation_norm.")}
    expected = {"encoder.weight": (d_sae, d_model), "encoder.bias": (d_sae,), "decoder.weight": (d_model, d_sae)}
    if use_b_dec:
        expected["decoder.bias"] = (d_model,)
    check_shapes(tensors, expected, what, ckpt)

    fold_dt = torch.float64 if dtype == "float64" else torch.float32  # the fold's dtype (see load_saelens)
    W_E = tensors["encoder.weight"].to(fold_dt)  # [d_sae, d_model]: row i is feature i
    b_E = tensors["encoder.bias"].to(fold_dt) / s_in
    W_D = tensors["decoder.weight"].to(fold_dt).T * (s_in / s_out)  # [d_sae, d_model]
    b_D = tensors["decoder.bias"].to(fold_dt) / s_out if use_b_dec else torch.zeros(d_model, dtype=fold_dt)
    if unit_dec:
        n = torch.linalg.vector_norm(W_D, dim=1)  # [d_sae]
        dead = n == 0
        n_safe = torch.where(dead, torch.ones_like(n), n)
        W_D = W_D / n_safe[:, None]
        W_E = W_E * n_safe[:, None]
        b_E = b_E * n_safe
        # Zero decoder column: the reference divides 0 by 0; its gate (pre * 0 > theta) never opens.
        W_E[dead] = 0
        b_E[dead] = 0
    config = SAEConfig(
        d_in=d_model, n_features=d_sae, activation=activation, k=k, apply_b_dec_to_input=pre_bias, dtype=dtype
    )
    log_threshold = torch.full((d_sae,), math.log(theta), dtype=torch.float64) if activation == "jumprelu" else None
    return build_sae(config, W_E, b_E, W_D, b_D, log_threshold, device)
