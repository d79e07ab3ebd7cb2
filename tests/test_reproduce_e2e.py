"""`ranklens reproduce` end to end on a tiny Llama with a micro preset: every experiment, results.json, the report
with every verdict and its statistic, reuse of a finished run, and continuation of a killed one."""

import html
import json
import re

import pytest
import yaml

from ranklens.cli import main
from ranklens.reproduce import context as context_module
from ranklens.reproduce import job
from ranklens.reproduce import report as rp
from ranklens.reproduce.context import Context
from ranklens.reproduce.experiments.sae_runs import fmt_mean_std
from ranklens.reproduce.pipeline import run_steps
from ranklens.reproduce.plan import ModelShape, Plan
from ranklens.reproduce.presets import ReproduceConfig
from ranklens.train.sae_job import SAERun

STEPS = ["low_rank", "wo", "activations", "dead_vs_rank", "asi", "controls", "scaling", "dead_subspace", "lorsa",
         "budget", "dashboards"]


@pytest.fixture(scope="module")
def micro(tiny_dir, tmp_path_factory):
    """A config file with the micro preset: every experiment at a few thousand tokens on the tiny model."""
    values = dict(model=str(tiny_dir / "model"), corpus=str(tiny_dir / "corpus"), compare_corpora=[],
                  compare_models=[], context_length=64, dtype="float32", seeds=2, spectrum_tokens=1500, splits=2,
                  loss_tokens=300, loss_points=4, compare_tokens=500, store_tokens=2048, sae_tokens=2048,
                  batch_size=256, warmup_steps=2, expansion=2, k=4, d_init=8, init_tokens=2048, eval_tokens=500,
                  lm_eval_tokens=300, sweep_layers=1, d_init_values=[4], k_values=[4],
                  scaling_expansions=[2, 4], scaling_tokens=1024, lorsa_tokens=1024, lorsa_batch_tokens=256,
                  lorsa_k=4, curve_tokens=[512, 1024], budget_d_init_values=[4], budget_verdict_tokens=[1024],
                  dashboard_tokens=400)
    path = tmp_path_factory.mktemp("micro") / "micro.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def _run(micro, out) -> int:
    return main(["reproduce", "--config", str(micro), "--out", str(out), "--quiet"])


def test_every_experiment_report_and_reuse(micro, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run(micro, out) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["steps"]) == STEPS
    assert results["config"]["seeds"] == 2 and results["software"]["ranklens"] and results["software"]["git_commit"]
    report = (out / "report.html").read_text()
    assert "<img src=\"data:image/png;base64," in report and "src=\"http" not in report
    n_verdicts = 0
    assert [m.NAME for m in job.selected(ReproduceConfig.load(micro))] == [n for n in STEPS if n != "activations"]
    for module in job.selected(ReproduceConfig.load(micro)):
        step = results["steps"][module.NAME]
        assert step["wall_seconds"] > 0 and step["config"]
        assert step["verdicts"] or module.NAME == "dashboards", module.NAME
        for v in step["verdicts"]:
            n_verdicts += 1
            assert v["verdict"] in ("holds", "does not hold", "inconclusive")
            assert html.escape(v["claim"]) in report and html.escape(v["statistic"]) in report
    assert n_verdicts >= 25
    total = next(line for line in printed.splitlines() if line.startswith("total"))  # the verdict counts
    assert sum(map(int, total.split()[1:])) == n_verdicts
    summary = (out / "results.md").read_text()  # the same verdicts as a Markdown table
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| experiment")]
    assert len(rows) == n_verdicts
    assert all(f"**{v['verdict']}**" in summary for s in results["steps"].values() for v in s["verdicts"])
    asi = results["steps"]["asi"]
    assert all(c.startswith("ranklens train sae ") and "--store" in c for c in asi["commands"])
    assert len(asi["result"]["layout"]["baseline"]) == 2  # seeds per cell
    runs = asi["result"]["runs"]
    assert all((out / r["dir"] / "metrics.json").exists() and not (out / r["dir"] / "checkpoint.safetensors").exists()
               for r in runs.values())
    sites = results["steps"]["dashboards"]["result"]["sites"]
    assert set(sites) == {"TopK SAE", "ASI SAE", "ASI Lorsa"}
    assert all((out / href).exists() and f'href="{html.escape(href)}"' in report for href in sites.values())
    # The micro config is the quick preset's: its caveat states the steps it trains for, before any verdict.
    assert "each SAE trains for only 8 steps" in report[:report.index('id="verdicts"')]
    assert re.search(r'<p class="counts">' + str(n_verdicts) + r" verdicts: ", report)
    cells = {cell for step in results["steps"].values() for cell in rp.cells_of(step)}
    assert len(cells) > 10 and {p.stem for p in (out / "figures" / "curves").glob("*.png")} == cells
    z = results["steps"]["lorsa"]["result"]["zpattern"]
    assert z["heads"] and len(z["heads"][0]["row"]) == len(z["heads"][0]["tokens"])

    # A second run reuses every step: no model is loaded, nothing is trained.
    def no_model(*args, **kwargs):
        raise AssertionError("a finished run loaded a model")

    monkeypatch.setattr(context_module, "load_model", no_model)
    before = {p: p.stat().st_mtime_ns for p in (out / "steps").iterdir()}
    assert _run(micro, out) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "steps").iterdir()} == before
    assert json.loads((out / "results.json").read_text())["steps"]["asi"]["result"] == asi["result"]


def test_killed_run_continues_with_finished_work(micro, tmp_path, monkeypatch):
    """The dead-feature sweep's 3 cells train as one group; killed after 2 of them finished, the rerun trains only the
    third (alone, from its own checkpoint)."""
    cfg = ReproduceConfig.load(micro)
    plan = Plan(cfg, tmp_path, ModelShape.of(cfg.model))
    steps = job.steps(plan)[:4]  # the spectrum, W_O, the store and the dead-feature sweep
    assert [s.name for s in steps] == STEPS[:4]
    finished = []
    original_finish = SAERun.finish

    def dies_after_two(run):
        if len(finished) == 2:
            raise KeyboardInterrupt
        finished.append(run.out.name)
        return original_finish(run)

    monkeypatch.setattr(SAERun, "finish", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_steps(tmp_path, steps, Context(plan, progress=False), progress=False)
    assert {p.name for p in (tmp_path / "steps").iterdir()} == {"low_rank.json", "wo.json", "activations.json",
                                                                 "dead_vs_rank.partial.json"}
    assert all((tmp_path / "sae" / d / "metrics.json").exists() for d in finished)
    monkeypatch.setattr(SAERun, "finish", original_finish)

    retrained = []
    original = context_module.train_sae

    def counting(cfg, run_dir, *args, **kwargs):
        if kwargs.get("lm") is not None:  # a run that trains (finished runs are read without a model)
            retrained.append(run_dir.name)
        return original(cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(context_module, "train_sae", counting)
    records = run_steps(tmp_path, steps, Context(plan, progress=False), progress=False)
    assert len(retrained) == 1 and retrained[0] not in finished
    assert records["dead_vs_rank"]["attempts"] == 2 and len(records["dead_vs_rank"]["result"]["points"]) == 3


def test_budget_alone_with_an_lr_sweep(micro, tmp_path):
    """The `long` preset's shape at micro scale: experiment 9 alone (a store of the middle attention output only), a
    learning-rate sweep whose lowest mean FVU sets experiment 9's rate, curves, and verdicts at an earlier count."""
    values = yaml.safe_load(micro.read_text())
    values.update(experiments=["budget"], lr_sweep=[1e-3, 3e-2], lr_sweep_tokens=1024, sae_tokens=2048,
                  curve_tokens=[512, 1024], budget_verdict_tokens=[1024])
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(values))
    out = tmp_path / "run"
    assert main(["reproduce", "--config", str(path), "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["steps"]) == ["activations", "lr_sweep", "budget"]
    assert results["steps"]["activations"]["result"]["sites"] == "L1.attn_out"  # the tiny model's middle layer
    sweep = results["steps"]["lr_sweep"]["result"]
    fvu = {lr: sum(sweep["runs"][n]["metrics"]["fvu"] for n in ms.values()) / 2 for lr, ms in sweep["layout"]["grid"].items()}
    assert sweep["chosen_lr"] == float(min(fvu, key=fvu.get))
    budget = results["steps"]["budget"]
    lay = budget["result"]["layout"]
    assert lay["lr"] == sweep["chosen_lr"] and lay["lr_from_sweep"]
    assert set(lay["groups"]) == {"TopK", "AuxK", "ASI (d_init 8)", "ASI (d_init 4)", "ASI + SparseAdam"}
    assert all(f"--lr {sweep['chosen_lr']:g}" in c or f"--lr {sweep['chosen_lr']}" in c for c in budget["commands"])
    curve = next(iter(budget["result"]["runs"].values()))["curve"]
    assert [p["tokens"] for p in curve] == [512, 1024, 2048]
    claims = [v["claim"] for v in budget["verdicts"]]
    assert sum("at the end of training" in c for c in claims) == 9 and sum("after 1,024 tokens" in c for c in claims) == 8
    assert (out / "figures" / "fig_budget_curves.png").exists()
    side = "largest" if sweep["chosen_lr"] == 3e-2 else "smallest"  # of two rates, the choice is at an edge
    report = html.unescape((out / "report.html").read_text())
    assert f"The chosen rate is the {side} one tried" in report
    # The per-point tables: TopK's share of never-firing features at 1,024 tokens, from its runs' curves.
    runs = budget["result"]["runs"]
    shares = [next(p["eval_dead"] for p in runs[n]["curve"] if p["tokens"] == 1024) / runs[n]["metrics"]["n_features"]
              for n in lay["groups"]["TopK"]]
    assert "Share of features never firing on the held-out tokens at each curve point" in report
    assert f"<td>{fmt_mean_std(shares)}</td>" in report


def test_budget_split_over_jobs_by_seed(micro, tmp_path):
    """The long preset split by seed: a job with --only-seeds, then a job with --reuse that trains only the other
    seeds and reuses the sweep; its numbers and verdicts equal one unsplit run's."""
    values = yaml.safe_load(micro.read_text())
    values.update(experiments=["budget"], lr_sweep=[1e-3, 3e-2], lr_sweep_tokens=1024, sae_tokens=2048,
                  curve_tokens=[512, 1024], budget_verdict_tokens=[1024], budget_d_init_values=[])
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(values))

    def run(out, *flags):
        assert main(["reproduce", "--config", str(path), "--out", str(out), "--quiet", *flags]) == 0
        return json.loads((out / "results.json").read_text())["steps"]

    whole = run(tmp_path / "whole")
    run(tmp_path / "part", "--only-seeds", "1")
    # A copy of what a job keeps (its config and step records; no store, no SAE weights) is enough to reuse it.
    kept = tmp_path / "kept"
    (kept / "steps").mkdir(parents=True)
    (kept / "config.yaml").write_text((tmp_path / "part" / "config.yaml").read_text())
    for name in ("lr_sweep", "budget"):
        (kept / "steps" / f"{name}.json").write_text((tmp_path / "part" / "steps" / f"{name}.json").read_text())
    merged = run(tmp_path / "merged", "--reuse", str(kept))
    trained = sorted(p.name for p in (tmp_path / "merged" / "sae").iterdir())
    assert trained and all(name.endswith("-s0") for name in trained)  # seed 1 came from the part, the sweep too
    runs = merged["budget"]["result"]["runs"]
    assert sorted(n for n, r in runs.items() if r.get("reused")) == sorted(n for n in runs if n.endswith("-s1"))
    assert merged["lr_sweep"]["result"] == whole["lr_sweep"]["result"]
    for name, r in whole["budget"]["result"]["runs"].items():
        assert runs[name]["metrics"] == r["metrics"] and runs[name]["curve"] == r["curve"], name
    assert json.dumps(merged["budget"]["verdicts"]) == json.dumps(whole["budget"]["verdicts"])
    assert merged["budget"]["result"]["layout"]["groups"] == whole["budget"]["result"]["layout"]["groups"]
    report = html.unescape((tmp_path / "merged" / "report.html").read_text())
    assert f"4 of the 8 SAE runs were trained by earlier jobs of this split run (--only-seeds) and taken from {kept}" \
        in report
    # A last job whose every run is finished elsewhere collects no store and trains nothing, with the same numbers.
    final = run(tmp_path / "final", "--reuse", f"{kept},{tmp_path / 'merged'}")
    assert sorted(p.name for p in (tmp_path / "final").iterdir() if p.is_dir()) == ["figures", "steps"]
    assert final["activations"]["result"]["reused_from"] == str(tmp_path / "merged")
    assert all(r.get("reused") for r in final["budget"]["result"]["runs"].values())
    assert json.dumps(final["budget"]["verdicts"]) == json.dumps(whole["budget"]["verdicts"])


@pytest.mark.parametrize("flags, message", [
    (["--only-seeds", "5"], "not among the run's seeds 0..1"),
    (["--only-seeds", "1", "--experiments", "budget,asi"], "with --experiments budget"),
    (["--reuse", "{tmp}"], "holds no config.yaml"),
    (["--reuse", "{tmp}/other"], "ran with other settings (k: 4 here, 99 there); only seeds, only_seeds, reuse"),
])
def test_split_flags_refused(micro, tmp_path, capsys, flags, message):
    values = yaml.safe_load(micro.read_text())
    values.update(experiments=["budget"])
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(values))
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    other = {"job": "reproduce", **ReproduceConfig.load(path).model_dump(mode="json"), "k": 99, "seeds": 5}
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text(yaml.safe_dump(other))
    assert main(["reproduce", "--config", str(path), "--out", str(tmp_path / "out"), "--quiet", *flags]) != 0
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
