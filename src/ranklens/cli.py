"""The `ranklens` console script: one command with subcommands.

Every subcommand takes its flags (and optionally `--config FILE.yaml`), builds a typed config that rejects
unknown keys, and calls a job function. A `RanklensError` becomes one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from ranklens.errors import RanklensError


def _cmd_models(args: argparse.Namespace) -> None:
    from ranklens.lm.load import EMBEDDED_MODELS

    width = max(len(n) for n in EMBEDDED_MODELS)
    for entry in EMBEDDED_MODELS.values():
        print(f"{entry.name:<{width}}  {entry.description}  [package {entry.package}]")
    print("Any Hugging Face model id or local model directory works too (families: Llama, Qwen2/3, Mistral, "
          "Gemma 2, GPT-2, GPT-NeoX/Pythia, BERT).")


def _cmd_sites(args: argparse.Namespace) -> None:
    from ranklens.lm.load import load_model
    from ranklens.lm.sites import describe

    arch = describe(load_model(args.model, dtype="float32").model)
    print(f"{args.model}: family {arch.family}, {arch.n_layers} layers, d_model {arch.d_model}, "
          f"{arch.n_heads} heads ({arch.n_kv_heads} KV), d_head {arch.d_head}, d_mlp {arch.d_mlp}")
    for site, dim in arch.sites():
        print(f"{site.name}\t{dim}")


def _cmd_collect(args: argparse.Namespace) -> None:
    from ranklens.data.collect import CollectConfig, collect

    cfg = CollectConfig.load(args.config, **_flags(args, CollectConfig))
    store = collect(cfg, args.out, progress=not args.quiet)
    print(f"{store.n_tokens} tokens of {', '.join(store.sites)} in {args.out}")


def _cmd_spectrum(args: argparse.Namespace) -> None:
    from ranklens.spectrum.job import SpectrumConfig, run_spectrum

    cfg = SpectrumConfig.load(args.config, **_flags(args, SpectrumConfig))
    run_spectrum(cfg, args.out, progress=not args.quiet, command=_command_line())
    print(f"report: {Path(args.out) / 'report.html'}")


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["ranklens", *sys.argv[1:]])


def _flags(args: argparse.Namespace, config_cls) -> dict:
    """The CLI flags that name fields of config_cls (argparse dests match field names)."""
    return {name: getattr(args, name) for name in config_cls.model_fields if hasattr(args, name)}


def _add_collect(sub) -> None:
    p = sub.add_parser("collect", help="capture activations of sites over a corpus into an on-disk store")
    p.add_argument("--config", help="YAML file with the options below (flags override it)")
    p.add_argument("--model", help="embedded name (see `ranklens models`), HF id or local directory")
    p.add_argument("--sites", help="site pattern(s), e.g. 'L15.attn_out' or 'L*.attn_out,L10-20.mlp_out'")
    p.add_argument("--corpus", help="embedded corpus (default, prose, code, zh, a+b), a .txt/.jsonl/.parquet "
                                    "path or directory, or hf:NAME")
    p.add_argument("--tokens", type=int, help="number of tokens (bos/eos/pad excluded) to collect")
    p.add_argument("--context-length", dest="context_length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype", help="model compute dtype: auto (bf16 where fast), float32, bfloat16")
    p.add_argument("--store-dtype", dest="store_dtype", help="dtype on disk: model, float32, bfloat16")
    p.add_argument("--batch-tokens", dest="batch_tokens", type=int)
    p.add_argument("--shard-tokens", dest="shard_tokens", type=int)
    p.add_argument("--device")
    p.add_argument("--out", required=True, help="store directory (resumed if it holds the same collection)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_collect)


def _add_spectrum(sub) -> None:
    p = sub.add_parser("spectrum", help="effective rank, singular spectra, loss recovered and the W_O "
                                        "decomposition of sites (paper Section 4), with figures and a report")
    p.add_argument("--config", help="YAML file with the options below (flags override it)")
    p.add_argument("--model")
    p.add_argument("--sites", help="site pattern(s); default 'L*.attn_out,L*.attn_z,L*.mlp_out,L*.resid_post'")
    p.add_argument("--corpus")
    p.add_argument("--tokens", type=int, help="tokens accumulated per site (bos/eos/pad excluded)")
    p.add_argument("--context-length", dest="context_length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dtype")
    p.add_argument("--device")
    p.add_argument("--batch-tokens", dest="batch_tokens", type=int)
    p.add_argument("--gram-dtype", dest="gram_dtype", help="float64 (exact) or float32 (faster)")
    p.add_argument("--splits", type=int, help="disjoint splits for stability (App. C)")
    p.add_argument("--stability-sites", dest="stability_sites", help="sites that keep split statistics")
    p.add_argument("--exclude-outliers", dest="exclude_outliers", action="store_true", default=None,
                   help="drop activations with norm > mean + 5 sigma (footnote 3)")
    p.add_argument("--outlier-sigma", dest="outlier_sigma", type=float)
    p.add_argument("--loss-recovered", dest="loss_recovered", help="sites for the loss-recovered curve (App. B)")
    p.add_argument("--loss-tokens", dest="loss_tokens", type=int, help="held-out tokens for loss evaluations")
    p.add_argument("--loss-points", dest="loss_points", type=int)
    p.add_argument("--decompose", help="layers for the W_O decomposition (Section 4.4), e.g. 15 or mid")
    p.add_argument("--compare", help="side-by-side runs, e.g. 'corpus=code,corpus=zh,model=minilm-l6'")
    p.add_argument("--compare-sites", dest="compare_sites")
    p.add_argument("--compare-tokens", dest="compare_tokens", type=int)
    p.add_argument("--out", required=True, help="run directory (resumed or reused if it holds the same run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_spectrum)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ranklens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the embedded models").set_defaults(func=_cmd_models)
    p = sub.add_parser("sites", help="list every activation site of a model with its dimension")
    p.add_argument("--model", required=True)
    p.set_defaults(func=_cmd_sites)
    _add_collect(sub)
    _add_spectrum(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], None] = args.func
    try:
        func(args)
    except RanklensError as err:
        print(f"ranklens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ranklens: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
