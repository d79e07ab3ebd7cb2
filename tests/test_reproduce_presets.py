"""Presets as typed configs: preset, then YAML, then flags; unknown keys refused; commands rebuild their configs."""

import pytest

from ranklens.cli import _config, build_parser
from ranklens.errors import RanklensError
from ranklens.reproduce.commands import cli_command
from ranklens.reproduce.plan import sampled_layers
from ranklens.reproduce.presets import PRESETS, ReproduceConfig
from ranklens.train.sae_job import SAETrainConfig


def test_preset_then_yaml_then_flags(tmp_path):
    assert ReproduceConfig.load() == ReproduceConfig()  # quick = the class defaults
    standard = ReproduceConfig.load(preset="standard")
    assert standard.seeds == 5 and standard.sae_tokens == PRESETS["standard"]["sae_tokens"]
    assert ReproduceConfig.load(preset="paper").sweep_layers == "all"
    yml = tmp_path / "r.yaml"
    yml.write_text("preset: standard\nseeds: 7\nk_values: [10, 20]\n")
    cfg = ReproduceConfig.load(yml, k_values="3,4", d_init="64")
    assert cfg.preset == "standard" and cfg.seeds == 7 and cfg.k_values == [3, 4] and cfg.d_init == 64
    assert cfg.expansion == PRESETS["standard"]["expansion"]


def test_unknown_keys_and_presets_are_refused(tmp_path):
    yml = tmp_path / "r.yaml"
    yml.write_text("sedes: 3\n")
    with pytest.raises(RanklensError, match="sedes"):
        ReproduceConfig.load(yml)
    with pytest.raises(RanklensError, match="huge"):
        ReproduceConfig.load(preset="huge")


def test_cli_flags_reach_the_config():
    args = build_parser().parse_args(["reproduce", "--preset", "standard", "--seeds", "2", "--compare-models", "",
                                      "--scaling-expansions", "2,32", "--out", "x"])
    cfg = _config(args, ReproduceConfig)
    assert cfg.seeds == 2 and cfg.compare_models == [] and cfg.scaling_expansions == [2, 32]
    assert cfg.spectrum_tokens == PRESETS["standard"]["spectrum_tokens"]


@pytest.mark.parametrize("subcommand, cfg, base", [
    ("reproduce", ReproduceConfig.load(preset="standard", seeds=4, k_values=[8, 16], compare_models=[]),
     ReproduceConfig.load(preset="standard")),
    ("train sae", SAETrainConfig(site="L3.mlp_out", init="asi", d_init=64, lr=1e-3, store="runs/s"), None),
])
def test_commands_rebuild_their_config(subcommand, cfg, base):
    import shlex

    argv = shlex.split(cli_command(subcommand, cfg, "out/dir", base=base))[1:]
    args = build_parser().parse_args(argv)
    assert args.out == "out/dir"
    assert _config(args, type(cfg)) == cfg


def test_sampled_layers_keep_the_ends_and_the_middle():
    assert sampled_layers(30, 4) == [0, 10, 15, 29]
    assert sampled_layers(30, 3) == [0, 15, 29]
    assert sampled_layers(30, "all") == list(range(30))
    assert sampled_layers(3, 5) == [0, 1, 2]
    assert sampled_layers(30, 1) == [15]


def test_results_of_format_1_are_read_with_todays_keys():
    """The committed standard run (format 1: nmse, dead_features, eval_dead_features) reads as format 2."""
    from pathlib import Path

    from ranklens.reproduce.results_format import RESULTS_FORMAT, read_results

    path = Path(__file__).resolve().parents[1] / "docs" / "results" / "standard-smollm2-135m" / "results.json"
    results = read_results(path)
    assert results["format"] == RESULTS_FORMAT and results["read_from_format"] == "ranklens.reproduce/1"
    run = next(iter(results["steps"]["asi"]["result"]["runs"].values()))["metrics"]
    assert run["fvu"] == run["nmse"] and "train_dead" in run and "dead_features" not in run
    assert run["train_dead_fraction"] == run["train_dead"] / run["n_features"] and "eval_dead" in run
    lorsa = next(iter(results["steps"]["lorsa"]["result"]["runs"].values()))["metrics"]
    assert {"eval_dead", "eval_dead_fraction", "train_dead"} <= set(lorsa) and "dead_heads" not in lorsa
    point = results["steps"]["dead_vs_rank"]["result"]["points"][0]
    assert {"train_dead_fraction", "fvu"} <= set(point) and "nmse" not in point
