"""ranklens: the geometry of transformer activations and sparse dictionaries that respect it.

Every job subcommand takes `--config FILE.yaml` and one flag per field of its typed config (flags override the
file; unknown keys are an error), and calls a job function. The parser is built from the configs alone, which
import no torch, so `--help` answers at once; a job imports what it needs when it runs. A `RanklensError` (bad input
a user can fix) becomes one line on stderr and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ranklens.analysis.config import HeadsConfig, LorsaTopConfig, ZPatternConfig
from ranklens.autointerp.config import CompareConfig, ExplainConfig, ScoreConfig
from ranklens.config import Config, flag
from ranklens.dashboard.config import DashboardConfig, ServeConfig
from ranklens.data.config import CollectConfig
from ranklens.errors import RanklensError
from ranklens.eval.config import LorsaEvalConfig, SAEEvalConfig
from ranklens.report.console import dictionary_table, spectrum_table, verdict_counts_table
from ranklens.reproduce.presets import PRESETS, ReproduceConfig
from ranklens.spectrum.config import SpectrumConfig
from ranklens.train.config import LorsaTrainConfig, PlanConfig, SAETrainConfig
from ranklens.version import __version__

MODEL_HELP = "embedded model name (see `ranklens models`), Hugging Face id or local model directory"


def shell_value(value: Any) -> str:
    """A default as a shell user would type it (lists comma-separated)."""
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value) if value else "(none)"
    return str(value)


def _choices(annotation) -> list[str] | None:
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _config_flags(parser: argparse.ArgumentParser, config_cls: type[Config], defaults: dict[str, Any]) -> None:
    """One `--field-name` flag per config field, its help the field's description with its default (``defaults``
    overrides the class default in the help, e.g. a preset's value); values go to the config's own validation."""
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file with these options (flags override it)")
    for name, field in config_cls.model_fields.items():
        default = defaults.get(name, field.default)
        required = field.is_required()
        shown = "required" if required else f"default: {shell_value(default)}" if default is not None else "optional"
        help_text = f"{field.description or ''} ({shown})".strip()
        if field.annotation is bool:
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
            continue
        choices = _choices(field.annotation)
        parser.add_argument(flag(name), dest=name, default=None, choices=choices,
                            metavar=None if choices else name.upper(), help=help_text.replace("%", "%%"))


def _config(args: argparse.Namespace, config_cls: type[Config]):
    overrides = {name: getattr(args, name) for name in config_cls.model_fields if getattr(args, name, None) is not None}
    return config_cls.load(args.config, **overrides)


def _command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["ranklens", *sys.argv[1:]])


# ---------------------------------------------------------------------------- commands (each imports its job lazily)


def _cmd_models(args: argparse.Namespace) -> None:
    import importlib.util

    from ranklens.lm.load import EMBEDDED_MODELS

    width = max(len(n) for n in EMBEDDED_MODELS)
    for entry in EMBEDDED_MODELS.values():
        installed = importlib.util.find_spec(entry.module) is not None
        state = "installed" if installed else f"not installed: {entry.install}"
        print(f"{entry.name:<{width}}  {entry.description}  [package {entry.package}, {state}]")
    print("Any Hugging Face model id (gpt2, org/name) or local model directory works too (families: Llama, "
          "Qwen2/3, Mistral, Gemma 1/2/3, GPT-2, GPT-NeoX/Pythia, BERT).")


def _cmd_sites(args: argparse.Namespace) -> None:
    from ranklens.lm.load import load_model

    arch = load_model(args.model, dtype="float32").arch
    print(f"{args.model}: family {arch.family}, {arch.n_layers} layers, d_model {arch.d_model}, "
          f"{arch.n_heads} heads ({arch.n_kv_heads} KV), d_head {arch.d_head}, d_mlp {arch.d_mlp}")
    for site, dim in arch.sites():
        print(f"{site.name}\t{dim}")


def _cmd_collect(args: argparse.Namespace) -> None:
    from ranklens.data.collect import collect
    from ranklens.distributed import is_main, process_group

    cfg = _config(args, CollectConfig)
    with process_group(cfg.device):  # under torchrun: the ranks share the batches
        main = is_main()
        store = collect(cfg, args.out, progress=not args.quiet)
    if main:
        print(f"{store.n_tokens} tokens of {', '.join(store.sites)} in {args.out}")


def _cmd_spectrum(args: argparse.Namespace) -> None:
    from ranklens.distributed import is_main, process_group
    from ranklens.spectrum.job import run_spectrum

    cfg = _config(args, SpectrumConfig)
    with process_group(cfg.device) as distributed:  # under torchrun: the ranks share the accumulation
        main = is_main()
        result = run_spectrum(cfg, args.out, progress=not args.quiet, command=_command_line(), distributed=distributed)
    if main:
        print(spectrum_table(result))
        print(f"report: {Path(args.out) / 'report.html'}")


def _cmd_train_sae(args: argparse.Namespace) -> None:
    from ranklens.train.sae_job import train_sae

    if args.site is not None and args.sites is not None:
        raise RanklensError("give --sites (many SAEs) or --site (one), not both")
    for one, many in (("k", "k_values"), ("expansion", "expansion_values"), ("n_features", "expansion_values")):
        if getattr(args, one) is not None and getattr(args, many) is not None:
            raise RanklensError(f"give {flag(many)} (one SAE per value) or {flag(one)} (one), not both")
    cfg = _config(args, SAETrainConfig)
    from ranklens.distributed import is_main, process_group

    with process_group(cfg.device):  # under torchrun: the ranks share the batch (and the features)
        main = is_main()
        metrics = train_sae(cfg, args.out, progress=not args.quiet)
    if not main or not metrics:
        return
    if cfg.sites is not None:
        members = [{"member": name, **m} for name, m in metrics["members"].items()]
        print(dictionary_table(members, label="member"))
        print(f"{len(members)} SAEs (SAELens layout in each {args.out}/<member>/sae); every metric: "
              f"{Path(args.out) / 'group.json'}")
        return
    print(dictionary_table(metrics))
    print(f"SAE (SAELens layout): {Path(args.out) / 'sae'}; every metric: {Path(args.out) / 'metrics.json'}")


def _cmd_plan(args: argparse.Namespace) -> None:
    from ranklens.lm.load import site_dimension
    from ranklens.train.plan import describe_plan

    cfg = _config(args, PlanConfig)
    if cfg.world_size % cfg.shards:
        raise RanklensError(f"--shards {cfg.shards} does not divide --world-size {cfg.world_size}")
    d = cfg.d or site_dimension(cfg.model, cfg.site)
    print(describe_plan(cfg, d, cfg.world_size, cfg.shards))


def _cmd_eval_sae(args: argparse.Namespace) -> None:
    from ranklens.eval.jobs import eval_sae

    cfg = _config(args, SAEEvalConfig)
    print(dictionary_table(eval_sae(args.directory, cfg, progress=not args.quiet)))
    print(f"every metric: {cfg.results or Path(args.directory) / 'eval.json'}")


def _cmd_train_lorsa(args: argparse.Namespace) -> None:
    from ranklens.distributed import is_main, process_group
    from ranklens.train.lorsa_job import train_lorsa

    cfg = _config(args, LorsaTrainConfig)
    with process_group(cfg.device):  # under torchrun: the ranks share every batch's sequences
        main = is_main()
        metrics = train_lorsa(cfg, args.out, progress=not args.quiet)
    if not main:
        return
    print(dictionary_table(metrics))
    print(f"Lorsa: {Path(args.out) / 'lorsa'}; every metric: {Path(args.out) / 'metrics.json'}")


def _cmd_eval_lorsa(args: argparse.Namespace) -> None:
    from ranklens.eval.jobs import eval_lorsa

    cfg = _config(args, LorsaEvalConfig)
    print(dictionary_table(eval_lorsa(args.directory, cfg, progress=not args.quiet)))
    print(f"every metric: {cfg.results or Path(args.directory) / 'eval.json'}")


def _cmd_zpattern(args: argparse.Namespace) -> None:
    from ranklens.analysis.lorsa_jobs import run_zpattern

    cfg = _config(args, ZPatternConfig)
    record = run_zpattern(args.directory, cfg)
    print(f"z pattern written to {cfg.output}" if cfg.output else json.dumps(record))


def _cmd_lorsa_top(args: argparse.Namespace) -> None:
    from ranklens.analysis.lorsa_jobs import run_lorsa_top

    out = run_lorsa_top(args.directory, _config(args, LorsaTopConfig), progress=not args.quiet)
    print(f"top activations and attribution: {out}")


def _cmd_heads(args: argparse.Namespace) -> None:
    from ranklens.analysis.heads import RESULTS_NAME, find_heads, heads_table

    result = find_heads(_config(args, HeadsConfig), args.out, progress=not args.quiet)
    print(heads_table(result))
    print(f"every head's scores: {Path(args.out) / RESULTS_NAME}")


def _cmd_dashboard(args: argparse.Namespace) -> None:
    from ranklens.dashboard.build import build_dashboard, compare_dashboards

    cfg = _config(args, DashboardConfig)
    if args.compare:
        if args.directory or not args.out:
            raise RanklensError("--compare RUN_A RUN_B takes the two runs and --out DIR, and no other directory")
        site = compare_dashboards(*args.compare, args.out, cfg, progress=not args.quiet)
        print(f"comparison: {site / 'compare.html'}")
        return
    if not args.directory:
        raise RanklensError("give a dictionary directory (a train sae or train lorsa run, an SAE or a Lorsa "
                            "directory), or --compare RUN_A RUN_B")
    site = build_dashboard(args.directory, cfg, args.out, progress=not args.quiet)
    print(f"dashboard: {site / 'index.html'}  (ranklens serve {site} adds the prompt box)")


def _cmd_serve(args: argparse.Namespace) -> None:
    from ranklens.dashboard.prompt import serve_dashboard

    serve_dashboard(args.directory, _config(args, ServeConfig))


def _cmd_autointerp(args: argparse.Namespace) -> None:
    from ranklens.autointerp.jobs import run_compare, run_explain, run_score
    from ranklens.autointerp.report import describe_compare, describe_scores

    common = dict(command=_command_line(), progress=not args.quiet)
    if args.what == "explain":
        result = run_explain(args.run, _config(args, ExplainConfig), args.out, **common)
        for fid, expl in result["features"].items():
            print(f"{fid:>6}  {expl.get('activation', '')}")
            if "z_pattern" in expl:
                print(f"{'':>6}  z: {expl['z_pattern']}")
    elif args.what == "score":
        print(describe_scores(run_score(args.run, _config(args, ScoreConfig), args.out, **common)))
    else:
        print(describe_compare(run_compare(args.run_a, args.run_b, _config(args, CompareConfig), args.out,
                                           **common)))


def _cmd_reproduce(args: argparse.Namespace) -> None:
    from ranklens.reproduce.job import reproduce

    results = reproduce(_config(args, ReproduceConfig), args.out, progress=not args.quiet, command=_command_line())
    print(verdict_counts_table(results))
    print(f"report: {Path(args.out) / 'report.html'}")


# ---------------------------------------------------------------------------- the parser


def _job(sub, name: str, help_text: str, config_cls: type[Config], func: Callable, *, out: bool = True,
         defaults: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    _config_flags(p, config_cls, defaults or {})
    if out:
        p.add_argument("--out", required=True, metavar="DIR",
                       help="run directory (resumed or reused if it holds the same run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=func)
    return p


def _preset_in(argv: Sequence[str]) -> str:
    """The preset named on a command line, so `reproduce --preset standard --help` shows that preset's values."""
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--preset="):
            return arg.split("=", 1)[1]
    return "quick"


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ranklens", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ranklens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("models", help="list the embedded models").set_defaults(func=_cmd_models)
    p = sub.add_parser("sites", help="list every activation site of a model with its dimension")
    p.add_argument("--model", required=True, help=f"{MODEL_HELP} (required)")
    p.set_defaults(func=_cmd_sites)
    _job(sub, "collect", "capture activations of sites over a corpus into an on-disk store", CollectConfig,
         _cmd_collect)
    _job(sub, "spectrum", "effective rank, singular spectra, loss recovered and the W_O decomposition of sites "
                          "(paper Section 4), with figures and an HTML report", SpectrumConfig, _cmd_spectrum)
    train = sub.add_parser("train", help="train a sparse dictionary").add_subparsers(dest="what", required=True,
                                                                                      metavar="WHAT")
    _job(train, "sae", "train a sparse autoencoder on one site (TopK/BatchTopK/JumpReLU/ReLU; standard, ASI or "
                       "random-subspace init; Adam or SparseAdam; AuxK)", SAETrainConfig, _cmd_train_sae)
    _job(train, "lorsa", "train a Lorsa (low-rank sparse attention) replacing one attention layer (default, MHSA-QK "
                         "or ASI init; Adam or SparseAdam; AuxK)", LorsaTrainConfig, _cmd_train_lorsa)
    _job(sub, "plan", "the memory per rank of a `train sae` config on a torchrun world (parameters, gradients, "
                      "optimizer, activations, data), before renting devices", PlanConfig, _cmd_plan, out=False)
    evaluate = sub.add_parser("eval", help="evaluate a trained dictionary").add_subparsers(dest="what", required=True,
                                                                                         metavar="WHAT")
    p = _job(evaluate, "sae", "evaluate an SAE (a ranklens run, or a SAELens/LlamaScope directory) on held-out text",
             SAEEvalConfig, _cmd_eval_sae, out=False)
    p.add_argument("directory", help="a `ranklens train sae` run directory or an SAE directory")
    lorsa_dir = "a `ranklens train lorsa` run directory or a Lorsa directory"
    p = _job(evaluate, "lorsa", "evaluate a Lorsa on held-out text: FVU, dead heads, spliced LM loss",
             LorsaEvalConfig, _cmd_eval_lorsa, out=False)
    p.add_argument("directory", help=lorsa_dir)
    p = _job(sub, "zpattern", "the z pattern of one Lorsa head on a text (Lorsa paper Section 4.1), as JSON",
             ZPatternConfig, _cmd_zpattern, out=False)
    p.add_argument("directory", help=lorsa_dir)
    p = _job(sub, "lorsa-top", "top activations of every Lorsa head on held-out text and their attribution to the "
                               "original heads (Lorsa paper Section 4.1, App. F), as JSON", LorsaTopConfig,
             _cmd_lorsa_top, out=False)
    p.add_argument("directory", help=lorsa_dir)
    _job(sub, "heads", "find attention heads by function: MHSA and Lorsa heads scored by path patching, "
                       "attribution and pattern share on generated probes (induction, previous token, successor, "
                       "copy suppression, acronyms, attention sinks, arithmetic; Lorsa paper Section 5)",
         HeadsConfig, _cmd_heads)
    p = _job(sub, "dashboard", "a browsable site of what an SAE or Lorsa learned (top contexts, interval samples, "
                               "logit effects, neighbours, subspace share; Lorsa z-patterns and head attribution), "
                               "or the comparison of two runs", DashboardConfig, _cmd_dashboard, out=False)
    p.add_argument("directory", nargs="?", help="a `train sae` / `train lorsa` run directory, an SAELens or "
                                                "LlamaScope SAE directory (with --model and --site), or a Lorsa "
                                                "directory")
    p.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                   help="compare two runs of the same site instead (their dashboards are built when missing) "
                        "(optional)")
    p.add_argument("--out", metavar="DIR", help="where the site goes (default: DIRECTORY/dashboard; required with "
                                                "--compare)")
    p = _job(sub, "serve", "serve a dashboard on 127.0.0.1 with a prompt box: type a text, see which features (or "
                           "Lorsa heads, with their z-patterns) fire on each token", ServeConfig, _cmd_serve,
             out=False)
    p.add_argument("directory", help="a dashboard directory written by `ranklens dashboard`")
    auto = sub.add_parser("autointerp", help="explain and score features with a judge LM behind any "
                                             "OpenAI-compatible endpoint").add_subparsers(dest="what", required=True,
                                                                                          metavar="WHAT")
    run_help = "a `train sae` / `train lorsa` run directory (its dashboard is built when missing) or a dashboard"
    out_help = "where the results go (default: RUN/autointerp)"
    p = _job(auto, "explain", "explain sampled features (SAE: top activations and interval samples; Lorsa: top "
                              "activations and z-patterns, Lorsa paper App. D) into explanations.json",
             ExplainConfig, _cmd_autointerp, out=False)
    p.add_argument("run", help=run_help)
    p.add_argument("--out", metavar="DIR", help=out_help)
    p = _job(auto, "score", "explain and score sampled features (simulation as in Bills et al., detection, "
                            "fuzzing) beside a random-explanation floor, into scores.json", ScoreConfig,
             _cmd_autointerp, out=False)
    p.add_argument("run", help=run_help)
    p.add_argument("--out", metavar="DIR", help=out_help)
    p = _job(auto, "compare", "two dictionaries of the same site: N features each, blinded and shuffled, scored by "
                              "the same judge (and the App. N.1 rubric), Welch t-tests, into compare.json",
             CompareConfig, _cmd_autointerp)
    p.add_argument("run_a", metavar="RUN_A", help=run_help)
    p.add_argument("run_b", metavar="RUN_B", help=run_help)
    preset = _preset_in(argv)
    _job(sub, "reproduce", "the experiments of the dimensional-collapse paper as one resumable pipeline (preset "
                           "quick, standard, long or paper), with results.json and a report with computed verdicts",
         ReproduceConfig, _cmd_reproduce, defaults={**PRESETS.get(preset, {}), "preset": preset})
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    from ranklens.allocator import retain_freed_memory

    retain_freed_memory()  # training loops reuse their large temporaries' pages (ranklens.allocator)
    try:
        args.func(args)
    except RanklensError as err:
        print(f"ranklens: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ranklens: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
