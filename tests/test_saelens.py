"""SAELens and LlamaScope layouts: round trips, the exact SAELens cfg.json / tensor layout, SAELens' forward computed
from the written files, a hand-written LlamaScope directory against the authors' forward formula, and errors.

No sae-lens, no network: the SAELens and LlamaScope forwards are written out here from their sources (see the module
docstring of ranklens.dictionaries.saelens for the files and versions checked)."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from ranklens.dictionaries import kernels
from ranklens.dictionaries.llamascope import load_llamascope
from ranklens.dictionaries.load import load_sae
from ranklens.dictionaries.sae import SparseAutoencoder
from ranklens.dictionaries.saelens import load_saelens, saelens_hook_name, save_saelens
from ranklens.errors import RanklensError

D_IN, N_FEAT, K = 12, 40, 5
META = dict(model="HuggingFaceTB/SmolLM2-135M", site="L3.attn_out", context_length=256, corpus="shakespeare")

# The exact cfg.json keys, in order, that sae-lens 6.54.12 writes for an inference SAE: SAEConfig.to_dict() in
# sae_lens/saes/sae.py (dataclass fields d_in, d_sae, dtype, device, apply_b_dec_to_input, normalize_activations,
# reshape_activations, metadata, then "architecture"), with TopKSAEConfig's k and rescale_acts_by_decoder_norm
# (sae_lens/saes/topk_sae.py) after metadata. StandardSAEConfig / JumpReLUSAEConfig add no field.
BASE_KEYS = [
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "metadata",
]
CFG_KEYS = {
    "standard": [*BASE_KEYS, "architecture"],
    "topk": [*BASE_KEYS, "k", "rescale_acts_by_decoder_norm", "architecture"],
    "jumprelu": [*BASE_KEYS, "architecture"],
}
# Metadata keys SAELens' own training runner writes (llm_sae_training_runner._set_sae_metadata, SAEMetadata's version
# keys), plus ranklens' pointer (SAEMetadata accepts any key).
META_KEYS = {
    "sae_lens_version",
    "sae_lens_training_version",
    "model_name",
    "model_class_name",
    "hook_name",
    "hook_head_index",
    "context_size",
    "prepend_bos",
    "dataset_path",
    "seqpos_slice",
    "model_from_pretrained_kwargs",
    "ranklens",
}


def _sae(activation="topk", dtype="float32", seed=0, apply_b=False, d_in=D_IN, n=N_FEAT):
    k = K if activation in ("topk", "batchtopk") else None
    sae = SparseAutoencoder(
        d_in=d_in,
        n_features=n,
        activation=activation,
        k=k,
        dtype=dtype,
        apply_b_dec_to_input=apply_b,
        generator=torch.Generator().manual_seed(seed),
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if name == "log_threshold":
                r = (r * 0.5 - 1.0)  # thresholds around e^-1, so some features fire and some do not
            elif name.startswith("b"):
                r = r * 0.3
            p.copy_(r.to(p.dtype))
    return sae


def _x(seed=5, n=64, d=D_IN, dtype=torch.float32):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _saelens_forward(directory, x):
    """SAELens 6 inference forward computed from the files (SAE.process_sae_in, StandardSAE/TopKSAE/JumpReLUSAE
    encode and decode), in float64."""
    cfg = json.loads((directory / "cfg.json").read_text())
    t = {k: v.to(torch.float64) for k, v in load_file(str(directory / "sae_weights.safetensors")).items()}
    x = x.to(torch.float64)
    sae_in = x - t["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = sae_in @ t["W_enc"] + t["b_enc"]
    arch = cfg["architecture"]
    if arch == "standard":
        f = torch.relu(pre)
    elif arch == "topk":
        norms = t["W_dec"].norm(dim=-1)
        if cfg["rescale_acts_by_decoder_norm"]:
            pre = pre * norms
        vals, idx = torch.topk(pre, k=cfg["k"], dim=-1)
        f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
        if cfg["rescale_acts_by_decoder_norm"]:
            f = f / norms
    elif arch == "jumprelu":
        f = torch.relu(pre) * (pre > t["threshold"])
    else:
        raise AssertionError(arch)
    return f @ t["W_dec"] + t["b_dec"], f


# --------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu", "batchtopk"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("apply_b", [False, True])
def test_round_trip_identical(tmp_path, activation, dtype, apply_b):
    sae = _sae(activation, dtype=dtype, apply_b=apply_b)
    extra = {"init": "asi", "d_init": 7, "train": {"lr": 1e-3, "steps": 10}}
    thr = 0.2 if activation == "batchtopk" else None
    out = save_saelens(sae, tmp_path / "sae", extra=extra, batchtopk_threshold=thr, **META)
    assert out == tmp_path / "sae"
    loaded = load_saelens(out)
    assert loaded.config == sae.config
    for (name, p), (name2, q) in zip(sae.named_parameters(), loaded.named_parameters(), strict=True):
        assert name == name2 and p.dtype == q.dtype
        assert torch.equal(p, q), name
    x = _x(dtype=sae.W_E.dtype)
    with torch.no_grad():
        assert torch.equal(sae(x)[0], loaded(x)[0])
        assert torch.equal(sae.encode(x).to_dense(), loaded.encode(x).to_dense())
    meta = json.loads((out / "ranklens.json").read_text())
    assert meta["site"] == "L3.attn_out" and meta["extra"] == extra and meta["sae_config"]["activation"] == activation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]  # no temporary directory left behind


def test_round_trip_through_load_sae_and_dtype_override(tmp_path):
    sae = _sae("jumprelu")
    save_saelens(sae, tmp_path / "s", **META)
    loaded = load_sae(tmp_path / "s")
    assert torch.equal(loaded.log_threshold, sae.log_threshold)
    wide = load_saelens(tmp_path / "s", dtype="float64")
    assert wide.W_E.dtype == torch.float64 and wide.config.dtype == "float64"
    assert torch.equal(wide.W_E, sae.W_E.double())


def test_batchtopk_is_jumprelu_for_saelens(tmp_path):
    """SAELens stores BatchTopK as jumprelu (BatchTopKTrainingSAE.process_state_dict_for_saving_inference); read
    without ranklens.json it is the thresholded BatchTopK of Bussmann et al."""
    sae = _sae("batchtopk", dtype="float64")
    save_saelens(sae, tmp_path / "s", batchtopk_threshold=0.3, **META)
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"
    t = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    assert torch.equal(t["threshold"], torch.full((N_FEAT,), 0.3, dtype=torch.float64))
    plain = load_saelens(tmp_path / "s", use_ranklens_json=False)
    assert plain.config.activation == "jumprelu"
    x = _x(dtype=torch.float64)
    with torch.no_grad():
        pre = sae.pre_activations(x)
        ref = kernels.batch_topk(pre, K, threshold=0.3) @ sae.W_D + sae.b_D
        torch.testing.assert_close(plain(x)[0], ref, rtol=1e-12, atol=1e-12)
    assert load_saelens(tmp_path / "s").config.activation == "batchtopk"


# --------------------------------------------------------------------------- the SAELens layout


@pytest.mark.parametrize(
    ("activation", "architecture"),
    [("relu", "standard"), ("topk", "topk"), ("jumprelu", "jumprelu"), ("batchtopk", "jumprelu")],
)
def test_cfg_json_and_tensors_are_saelens_layout(tmp_path, activation, architecture):
    sae = _sae(activation)
    thr = 0.1 if activation == "batchtopk" else None
    save_saelens(sae, tmp_path / "s", batchtopk_threshold=thr, **META)
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert list(cfg) == CFG_KEYS[architecture]
    assert cfg["architecture"] == architecture
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"], cfg["device"]) == (D_IN, N_FEAT, "float32", "cpu")
    assert cfg["apply_b_dec_to_input"] is False
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    if architecture == "topk":
        assert cfg["k"] == K and cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert set(meta) == META_KEYS
    assert int(meta["sae_lens_version"].split(".")[0]) >= 6  # else handle_config_defaulting treats it as pre-6.0
    assert meta["model_name"] == META["model"] and meta["hook_name"] == "blocks.3.hook_attn_out"
    assert meta["context_size"] == 256 and meta["prepend_bos"] is True and meta["dataset_path"] == "shakespeare"
    assert meta["hook_head_index"] is None and meta["model_from_pretrained_kwargs"] == {}
    assert meta["ranklens"]["site"] == "L3.attn_out"

    t = load_file(str(tmp_path / "s" / "sae_weights.safetensors"))
    shapes = {"W_enc": (D_IN, N_FEAT), "b_enc": (N_FEAT,), "W_dec": (N_FEAT, D_IN), "b_dec": (D_IN,)}
    if architecture == "jumprelu":
        shapes["threshold"] = (N_FEAT,)
    assert {k: tuple(v.shape) for k, v in t.items()} == shapes  # SAELens loads these with strict=True
    assert all(v.dtype == torch.float32 for v in t.values())
    assert torch.equal(t["W_enc"], sae.W_E.detach().T) and torch.equal(t["W_dec"], sae.W_D.detach())
    if activation == "jumprelu":
        assert torch.equal(t["threshold"], sae.threshold.detach())
    assert (tmp_path / "s" / "ranklens.safetensors").is_file() == (activation == "jumprelu")


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b", [False, True])
def test_saelens_forward_of_written_files_matches(tmp_path, activation, apply_b):
    """What a SAELens reader computes from the written files is ranklens' forward."""
    sae = _sae(activation, dtype="float64", apply_b=apply_b)
    save_saelens(sae, tmp_path / "s", **META)
    x = _x(dtype=torch.float64)
    ref, f_ref = _saelens_forward(tmp_path / "s", x)
    with torch.no_grad():
        x_hat, code = sae(x)
        torch.testing.assert_close(x_hat, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(code.to_dense(), f_ref, rtol=1e-12, atol=1e-12)
    active = (f_ref != 0).float().mean().item()
    assert 0 < active < 1


def test_hook_names():
    assert saelens_hook_name("L0.resid_pre") == ("blocks.0.hook_resid_pre", "none")
    assert saelens_hook_name("L2.attn_in") == ("blocks.2.ln1.hook_normalized", "none")
    assert saelens_hook_name("L3.attn_z") == ("blocks.3.attn.hook_z", "hook_z")
    assert saelens_hook_name("L4.attn_out") == ("blocks.4.hook_attn_out", "none")
    assert saelens_hook_name("L5.mlp_in") == ("blocks.5.ln2.hook_normalized", "none")
    assert saelens_hook_name("L6.mlp_hidden") == ("blocks.6.mlp.hook_post", "none")
    assert saelens_hook_name("L7.mlp_out") == ("blocks.7.hook_mlp_out", "none")
    assert saelens_hook_name("L11.resid_post") == ("blocks.11.hook_resid_post", "none")
    with pytest.raises(RanklensError, match="unknown site kind 'attn_q'"):
        saelens_hook_name("L1.attn_q")


def test_attn_z_sets_hook_z_reshape(tmp_path):
    save_saelens(_sae("topk"), tmp_path / "z", **{**META, "site": "L1.attn_z"})
    cfg = json.loads((tmp_path / "z" / "cfg.json").read_text())
    # SAE.turn_on_forward_pass_hook_z_reshaping requires a hook name ending in "_z".
    assert cfg["reshape_activations"] == "hook_z" and cfg["metadata"]["hook_name"].endswith("_z")


def test_saelens_metadata_extra_keys(tmp_path):
    save_saelens(_sae("relu"), tmp_path / "s", saelens_metadata={"neuronpedia_id": "x/y"}, prepend_bos=False, **META)
    meta = json.loads((tmp_path / "s" / "cfg.json").read_text())["metadata"]
    assert meta["neuronpedia_id"] == "x/y" and meta["prepend_bos"] is False


# --------------------------------------------------------------------------- SAELens directories not made by ranklens


def _write_saelens(d, cfg, tensors):
    d.mkdir(parents=True)
    (d / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(d / "sae_weights.safetensors"))
    return d


def _foreign_tensors(seed=3, d_in=D_IN, d_sae=N_FEAT, threshold=False):
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(d_in, d_sae, generator=g, dtype=torch.float64),
        "b_enc": torch.randn(d_sae, generator=g, dtype=torch.float64) * 0.3,
        "W_dec": torch.randn(d_sae, d_in, generator=g, dtype=torch.float64) * 0.5,
        "b_dec": torch.randn(d_in, generator=g, dtype=torch.float64) * 0.3,
    }
    if threshold:
        t["threshold"] = torch.rand(d_sae, generator=g, dtype=torch.float64) * 2 - 0.3  # some <= 0
    return t


def _cfg(architecture, **kw):
    cfg = {
        "d_in": D_IN,
        "d_sae": N_FEAT,
        "dtype": "float64",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.3.0", "hook_name": "blocks.0.hook_resid_post"},
        "architecture": architecture,
    }
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize(
    "cfg_kw",
    [
        dict(architecture="standard"),
        dict(architecture="topk", k=4, rescale_acts_by_decoder_norm=False),
        dict(architecture="topk", k=4, rescale_acts_by_decoder_norm=True),
        dict(architecture="jumprelu"),
    ],
)
def test_load_foreign_saelens_matches_saelens_forward(tmp_path, cfg_kw):
    arch = cfg_kw["architecture"]
    d = _write_saelens(tmp_path / "f", _cfg(**cfg_kw), _foreign_tensors(threshold=arch == "jumprelu"))
    sae = load_saelens(d)
    assert sae.config.dtype == "float64" and sae.config.apply_b_dec_to_input
    x = _x(dtype=torch.float64)
    ref, f_ref = _saelens_forward(d, x)
    with torch.no_grad():
        torch.testing.assert_close(sae(x)[0], ref, rtol=1e-10, atol=1e-10)
    assert 0 < (f_ref != 0).float().mean().item() < 1


def test_load_expected_average_only_in_folds_scale(tmp_path):
    """The SAE was trained on s x; SAELens' fold_activation_norm_scaling_factor makes it read raw x."""
    s = 2.5
    d = _write_saelens(
        tmp_path / "n", _cfg("jumprelu", normalize_activations="expected_average_only_in"), _foreign_tensors(threshold=True)
    )
    with pytest.raises(RanklensError, match="norm_scaling_factor"):
        load_saelens(d)
    sae = load_saelens(d, norm_scaling_factor=s)
    x = _x(dtype=torch.float64)
    ref_scaled, _ = _saelens_forward(d, x * s)  # the SAE on the scaled input, in the scaled space
    with torch.no_grad():
        torch.testing.assert_close(sae(x)[0], ref_scaled / s, rtol=1e-10, atol=1e-10)
    (d / "activation_scaler.json").write_text(json.dumps({"scaling_factor": s, "has_whitening": False}))
    with torch.no_grad():
        torch.testing.assert_close(load_saelens(d)(x)[0], ref_scaled / s, rtol=1e-10, atol=1e-10)


def test_load_pre_6_saelens_config(tmp_path):
    """A pre-6.0 cfg.json (top-level hook_point, activation_fn_str, activation_fn_kwargs.k), read as SAELens'
    handle_pre_6_0_config does."""
    cfg = {
        "d_in": D_IN,
        "d_sae": N_FEAT,
        "dtype": "torch.float32",
        "hook_point": "blocks.2.hook_resid_pre",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "normalize_activations": False,
    }
    t = {k: v.float() for k, v in _foreign_tensors().items()}
    sae = load_saelens(_write_saelens(tmp_path / "old", cfg, t))
    assert (sae.config.activation, sae.config.k, sae.config.apply_b_dec_to_input) == ("topk", 3, True)
    assert torch.equal(sae.W_E, t["W_enc"].T)


# --------------------------------------------------------------------------- LlamaScope


def _llamascope_dir(
    d,
    *,
    act_fn="jumprelu",
    theta=None,
    norm_in=3.7,
    norm_out=None,
    norm_activation="dataset-wise",
    unit_dec=True,
    pre_bias=False,
    top_k=4,
    d_model=D_IN,
    d_sae=N_FEAT,
    hook_out=None,
    seed=11,
    extra_tensors=None,
    hp_overrides=None,
):
    """A LlamaScope-format directory as lm-saes wrote them: hyperparams.json (a dump of its SAEConfig) and
    checkpoints/final.safetensors with torch Linear names and shapes, decoder norms != 1 (as in the released
    checkpoints)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "encoder.weight": torch.randn(d_sae, d_model, generator=g) * 0.4,  # [d_sae, d_model]
        "encoder.bias": torch.randn(d_sae, generator=g) * 0.2,
        "decoder.weight": torch.randn(d_model, d_sae, generator=g) * 0.2 * (1 + torch.rand(d_sae, generator=g)),
        "decoder.bias": torch.randn(d_model, generator=g) * 0.3,
    }
    tensors.update(extra_tensors or {})
    hook = "blocks.3.hook_resid_post"
    hp = {
        "sae_type": "sae",
        "hook_point_in": hook,
        "hook_point_out": hook_out or hook,
        "d_model": d_model,
        "expansion_factor": d_sae // d_model,
        "d_sae": d_sae,
        "use_decoder_bias": True,
        "apply_decoder_bias_to_pre_encoder": pre_bias,
        "norm_activation": norm_activation,
        "dataset_average_activation_norm": {"in": norm_in, "out": norm_out or norm_in},
        "decoder_exactly_fixed_norm": False,
        "sparsity_include_decoder_norm": unit_dec,
        "use_glu_encoder": False,
        "init_decoder_norm": 0.5,
        "init_encoder_with_decoder_transpose": True,
        "act_fn": act_fn,
        "jump_relu_threshold": 0.0 if theta is None else theta,
        "top_k": top_k,
        "lp": 1,
        "use_ghost_grads": False,
        "tp_size": 1,
        "ddp_size": 1,
    }
    hp.update(hp_overrides or {})
    (d / "checkpoints").mkdir(parents=True)
    (d / "hyperparams.json").write_text(json.dumps(hp))
    save_file(tensors, str(d / "checkpoints" / "final.safetensors"))
    return {k: v.to(torch.float64) for k, v in tensors.items()}, hp


def _llamascope_reference(t, hp, x):
    """The authors' forward (lm-saes of late 2024) written out in training space: x_n = s_in x,
    pre = W_e (x_n - [b_d]) + b_e, a JumpReLU feature fires when pre_i n_i / s_out > theta (theta applies to the
    pre-activation of the SAE their loader builds: raw scale, unit decoder norm), TopK picks the top relu(pre_i) n_i,
    and x_hat = (W_d f + b_d) / s_out. n_i = ||decoder.weight[:, i]|| when sparsity_include_decoder_norm, else 1."""
    d = hp["d_model"]
    if hp["norm_activation"] == "dataset-wise":
        s_in = math.sqrt(d) / hp["dataset_average_activation_norm"]["in"]
        s_out = math.sqrt(d) / hp["dataset_average_activation_norm"]["out"]
    else:
        s_in = s_out = 1.0
    W_e, b_e, W_d, b_d = t["encoder.weight"], t["encoder.bias"], t["decoder.weight"], t["decoder.bias"]
    x_n = x * s_in
    if hp["apply_decoder_bias_to_pre_encoder"]:
        x_n = x_n - b_d
    pre = x_n @ W_e.T + b_e
    n = W_d.norm(dim=0) if hp["sparsity_include_decoder_norm"] else torch.ones(W_d.shape[1], dtype=W_d.dtype)
    theta = hp["jump_relu_threshold"]
    if hp["act_fn"] == "jumprelu" or (hp["act_fn"] == "topk" and theta > 0):
        f = pre * (pre * n / s_out > theta)
    elif hp["act_fn"] == "topk":
        acts = pre.clamp(min=0)
        idx = torch.topk(acts * n, hp["top_k"], dim=-1).indices
        f = torch.zeros_like(acts).scatter(-1, idx, acts.gather(-1, idx))
    else:
        f = pre.clamp(min=0)
    return (f @ W_d.T + b_d) / s_out, f


def _theta_for_mix(tmp_path, x, **kw):
    """A threshold inside the range of the gate's values, so that some features fire and some do not."""
    t, hp = _llamascope_dir(tmp_path / "probe", act_fn="relu", **kw)
    s = math.sqrt(hp["d_model"]) / hp["dataset_average_activation_norm"]["in"]
    pre = (x * s) @ t["encoder.weight"].T + t["encoder.bias"]
    gate = pre * t["decoder.weight"].norm(dim=0) / s
    pos = gate[gate > 0].sort().values
    mid = len(pos) // 2
    return float((pos[mid] + pos[mid + 1]) / 2)  # between two gate values, away from rounding ties


@pytest.mark.parametrize("pre_bias", [False, True])
def test_llamascope_jumprelu_dataset_wise_matches_reference(tmp_path, pre_bias):
    x = _x(n=128, dtype=torch.float64) * 2.0
    theta = _theta_for_mix(tmp_path, x, pre_bias=pre_bias)
    t, hp = _llamascope_dir(tmp_path / "ls", theta=theta, pre_bias=pre_bias)
    sae = load_llamascope(tmp_path / "ls", dtype="float64")
    assert sae.config.activation == "jumprelu" and sae.config.apply_b_dec_to_input == pre_bias
    assert torch.allclose(sae.threshold, torch.full((N_FEAT,), theta, dtype=torch.float64), rtol=1e-14)
    ref, f = _llamascope_reference(t, hp, x)
    frac = (f != 0).float().mean().item()
    assert 0.05 < frac < 0.95
    with torch.no_grad():
        x_hat, code = sae(x)
    torch.testing.assert_close(x_hat, ref, rtol=1e-10, atol=1e-10)
    # the same features fire, with the raw-scale activation f_i n_i / s_in
    assert torch.equal(code.to_dense() != 0, f != 0)
    # the folded SAE has unit decoder rows (the authors' transform_to_unit_decoder_norm)
    torch.testing.assert_close(sae.W_D.norm(dim=1), torch.ones(N_FEAT, dtype=torch.float64))
    # and load_sae detects the layout
    torch.testing.assert_close(load_sae(tmp_path / "ls")(x.float())[0].double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "kw",
    [
        dict(act_fn="topk", unit_dec=True),
        dict(act_fn="topk", unit_dec=False, norm_activation="inference"),
        dict(act_fn="relu", unit_dec=True),
        dict(act_fn="jumprelu", theta=0.0),  # jumprelu at theta 0 is relu
    ],
)
def test_llamascope_other_activations_match_reference(tmp_path, kw):
    t, hp = _llamascope_dir(tmp_path / "ls", **kw)
    sae = load_llamascope(tmp_path / "ls", dtype="float64")
    x = _x(n=96, dtype=torch.float64) * 2.0
    ref, f = _llamascope_reference(t, hp, x)
    with torch.no_grad():
        torch.testing.assert_close(sae(x)[0], ref, rtol=1e-10, atol=1e-10)
    assert 0 < (f != 0).float().mean().item() < 1


def test_llamascope_unit_decoder_matches_saelens_loader(tmp_path):
    """With unit decoder columns the loader agrees with SAELens' llama_scope loader (pretrained_sae_loaders.py:
    W_enc = encoder.weight^T, threshold = jump_relu_threshold * s, then fold_activation_norm_scaling_factor(s):
    W_enc * s, W_dec / s, b_dec / s, with s = sqrt(d_model) / a_in): same reconstruction, same firing features, and
    SAELens' code is s times ours (it stays in the normalized units)."""
    t, hp = _llamascope_dir(tmp_path / "ls", theta=0.2)
    W_d = t["decoder.weight"] / t["decoder.weight"].norm(dim=0)
    tensors = {k: v.float() for k, v in t.items()}
    tensors["decoder.weight"] = W_d.float()
    save_file(tensors, str(tmp_path / "ls" / "checkpoints" / "final.safetensors"))
    t = {k: v.double() for k, v in tensors.items()}
    s = math.sqrt(D_IN) / hp["dataset_average_activation_norm"]["in"]
    x = _x(n=128, dtype=torch.float64) * 2.0
    pre = x @ (t["encoder.weight"].T * s) + t["encoder.bias"]  # apply_b_dec_to_input is False in that loader
    f_sl = torch.relu(pre) * (pre > hp["jump_relu_threshold"] * s)
    y_sl = f_sl @ (t["decoder.weight"].T / s) + t["decoder.bias"] / s
    sae = load_llamascope(tmp_path / "ls", dtype="float64")
    with torch.no_grad():
        y, code = sae(x)
    torch.testing.assert_close(y, y_sl, rtol=1e-10, atol=1e-10)
    # (the stored float32 columns have norms 1 +- 1e-7, which our code keeps and SAELens' ignores)
    torch.testing.assert_close(code.to_dense() * s, f_sl, rtol=1e-6, atol=1e-6)
    assert torch.equal(code.to_dense() != 0, f_sl != 0)
    assert 0 < (f_sl != 0).float().mean().item() < 1


def test_llamascope_topk_with_threshold_runs_as_jumprelu(tmp_path):
    t, hp = _llamascope_dir(tmp_path / "ls", act_fn="topk", theta=0.05)
    sae = load_llamascope(tmp_path / "ls", dtype="float64")
    assert sae.config.activation == "jumprelu"
    x = _x(n=32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sae(x)[0], _llamascope_reference(t, hp, x)[0], rtol=1e-10, atol=1e-10)


def test_llamascope_transcoder_two_norms(tmp_path):
    t, hp = _llamascope_dir(tmp_path / "tc", theta=0.1, norm_in=3.46, norm_out=0.4, hook_out="blocks.3.hook_mlp_out")
    with pytest.raises(RanklensError, match="transcoder"):
        load_llamascope(tmp_path / "tc")
    sae = load_llamascope(tmp_path / "tc", dtype="float64", allow_transcoder=True)
    x = _x(n=32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(sae(x)[0], _llamascope_reference(t, hp, x)[0], rtol=1e-10, atol=1e-10)


def test_llamascope_zero_decoder_column_never_fires(tmp_path):
    _llamascope_dir(tmp_path / "ls", theta=0.01)
    path = tmp_path / "ls" / "checkpoints" / "final.safetensors"
    t = load_file(str(path))
    t["decoder.weight"][:, 0] = 0
    save_file(t, str(path))
    sae = load_llamascope(tmp_path / "ls")
    assert torch.isfinite(sae.W_D).all() and torch.isfinite(sae.W_E).all()
    with torch.no_grad():
        assert (sae.encode(_x() * 5).to_dense()[:, 0] == 0).all()


# --------------------------------------------------------------------------- errors


def test_missing_files(tmp_path):
    with pytest.raises(RanklensError, match="does not exist"):
        load_saelens(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RanklensError, match="has no cfg.json"):
        load_saelens(tmp_path / "empty")
    with pytest.raises(RanklensError, match="holds nothing; expected cfg.json"):
        load_sae(tmp_path / "empty")
    with pytest.raises(RanklensError, match="has no hyperparams.json"):
        load_llamascope(tmp_path / "empty")
    save_saelens(_sae("relu"), tmp_path / "s", **META)
    os.remove(tmp_path / "s" / "sae_weights.safetensors")
    with pytest.raises(RanklensError, match="has no sae_weights.safetensors"):
        load_saelens(tmp_path / "s")
    _llamascope_dir(tmp_path / "ls")
    os.remove(tmp_path / "ls" / "checkpoints" / "final.safetensors")
    with pytest.raises(RanklensError, match="has no checkpoint; expected one of"):
        load_llamascope(tmp_path / "ls")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cfg.json").write_text("{not json")
    (tmp_path / "bad" / "sae_weights.safetensors").write_bytes(b"junk")
    with pytest.raises(RanklensError, match="not valid JSON"):
        load_saelens(tmp_path / "bad")
    (tmp_path / "bad" / "cfg.json").write_text(json.dumps(_cfg("standard")))
    with pytest.raises(RanklensError, match="not a readable safetensors file"):
        load_saelens(tmp_path / "bad")


@pytest.mark.parametrize(
    ("cfg_kw", "match"),
    [
        (dict(architecture="gated"), "architecture='gated' .* not supported; expected one of standard, topk, jumprelu"),
        (dict(architecture="batchtopk"), "saves BatchTopK inference models as jumprelu"),
        (dict(architecture="standard", normalize_activations="layer_norm"), "normalize_activations='layer_norm'"),
        (dict(architecture="standard", dtype="int8"), "dtype='int8'"),
        (dict(architecture="topk", k=N_FEAT + 1), f"k={N_FEAT + 1}; expected 1 <= k <= d_sae={N_FEAT}"),
        (dict(architecture="standard", d_in=0), "d_in=0; expected a positive integer"),
    ],
)
def test_unsupported_saelens(tmp_path, cfg_kw, match):
    d = _write_saelens(tmp_path / "u", _cfg(**cfg_kw), _foreign_tensors())
    with pytest.raises(RanklensError, match=match):
        load_saelens(d)


def test_saelens_shape_and_name_mismatches(tmp_path):
    t = _foreign_tensors()
    t["W_enc"] = t["W_enc"].T.contiguous()  # [d_sae, d_in]: the ranklens/torch orientation, wrong for SAELens
    d = _write_saelens(tmp_path / "a", _cfg("standard"), t)
    with pytest.raises(RanklensError, match=rf"tensor W_enc .* has shape \[{N_FEAT}, {D_IN}\]; expected \[{D_IN}, {N_FEAT}\]"):
        load_saelens(d)
    d = _write_saelens(tmp_path / "b", _cfg("jumprelu"), _foreign_tensors())
    with pytest.raises(RanklensError, match="lacks tensor.*threshold"):
        load_saelens(d)
    d = _write_saelens(tmp_path / "c", _cfg("standard"), _foreign_tensors(threshold=True))
    with pytest.raises(RanklensError, match="unexpected tensor.*threshold"):
        load_saelens(d)
    d = _write_saelens(tmp_path / "d", _cfg("standard", d_sae=N_FEAT + 1), _foreign_tensors())
    with pytest.raises(RanklensError, match="has shape"):
        load_saelens(d)


def test_ranklens_json_must_agree(tmp_path):
    save_saelens(_sae("topk"), tmp_path / "s", **META)
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["k"] = K + 1
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(RanklensError, match="expected them to agree"):
        load_saelens(tmp_path / "s")
    assert load_saelens(tmp_path / "s", use_ranklens_json=False).config.k == K + 1


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(hp_overrides={"norm_activation": "token-wise"}), "norm_activation='token-wise' normalizes each token"),
        (dict(hp_overrides={"norm_activation": None}), "no norm_activation"),
        (dict(hp_overrides={"use_glu_encoder": True}), "use_glu_encoder=true is not supported"),
        (dict(hp_overrides={"act_fn": "batchtopk"}), "act_fn='batchtopk' is not supported"),
        (dict(hp_overrides={"jump_relu_threshold": -0.5}), r"jump_relu_threshold=-0.5; expected a number >= 0"),
        (dict(hp_overrides={"dataset_average_activation_norm": {"in": 0.0, "out": 1.0}}), r"\['in'\] > 0; got 0.0"),
        (dict(hp_overrides={"d_model": D_IN + 1}), "encoder.weight .* has shape"),
        (dict(extra_tensors={"encoder_glu.weight": torch.zeros(N_FEAT, D_IN)}), "unexpected tensor.*encoder_glu.weight"),
        (dict(pre_bias=True, norm_out=1.0), "apply_decoder_bias_to_pre_encoder with different in/out norms"),
    ],
)
def test_llamascope_errors(tmp_path, kw, match):
    kw = dict(kw)
    if kw.get("norm_out") is not None:
        kw["hook_out"] = "blocks.3.hook_mlp_out"
    _llamascope_dir(tmp_path / "ls", theta=0.1, **kw)
    with pytest.raises(RanklensError, match=match):
        load_llamascope(tmp_path / "ls", allow_transcoder=True)


def test_llamascope_requires_pre_encoder_flag(tmp_path):
    _, hp = _llamascope_dir(tmp_path / "ls", theta=0.1)
    del hp["apply_decoder_bias_to_pre_encoder"]
    (tmp_path / "ls" / "hyperparams.json").write_text(json.dumps(hp))
    with pytest.raises(RanklensError, match="no 'apply_decoder_bias_to_pre_encoder'"):
        load_llamascope(tmp_path / "ls")


def test_overwrite_refusal_and_idempotent_resave(tmp_path):
    sae = _sae("jumprelu")
    d = save_saelens(sae, tmp_path / "s", **META)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    assert save_saelens(sae, tmp_path / "s", **META) == d  # same SAE: nothing to do
    other = _sae("jumprelu", seed=9)
    with pytest.raises(RanklensError, match="already holds .*not this SAE; expected a new or empty directory"):
        save_saelens(other, tmp_path / "s", **META)
    with pytest.raises(RanklensError, match="already holds"):
        save_saelens(sae, tmp_path / "s", **{**META, "corpus": "kjv"})  # same weights, other record
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    with pytest.raises(RanklensError, match="already holds notes.txt"):
        save_saelens(sae, tmp_path / "run", **META)
    (tmp_path / "emptydir").mkdir()
    save_saelens(sae, tmp_path / "emptydir", **META)  # an empty directory is fine
    assert (tmp_path / "emptydir" / "cfg.json").is_file()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(RanklensError, match="is a file"):
        save_saelens(sae, tmp_path / "afile", **META)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(site="attn_out"), "malformed site name 'attn_out'"),
        (dict(context_length=0), "context_length=0; expected a positive integer"),
        (dict(model=""), "model=''; expected the model's name"),
        (dict(extra={"f": object()}), "extra is not JSON-serializable"),
        (dict(batchtopk_threshold=0.1), "batchtopk_threshold given for activation='topk'"),
        (dict(saelens_metadata={"ranklens": 1}), "may not set 'ranklens'"),
    ],
)
def test_save_argument_errors(tmp_path, kw, match):
    with pytest.raises(RanklensError, match=match):
        save_saelens(_sae("topk"), tmp_path / "s", **{**META, **kw})
    assert not (tmp_path / "s").exists()


def test_save_batchtopk_needs_threshold(tmp_path):
    with pytest.raises(RanklensError, match="batchtopk SAE needs batchtopk_threshold"):
        save_saelens(_sae("batchtopk"), tmp_path / "s", **META)
    with pytest.raises(RanklensError, match="batchtopk_threshold=-1.0; expected a finite number >= 0"):
        save_saelens(_sae("batchtopk"), tmp_path / "s", batchtopk_threshold=-1.0, **META)
    with pytest.raises(RanklensError, match="expected a SparseAutoencoder"):
        save_saelens("not an sae", tmp_path / "s", **META)
