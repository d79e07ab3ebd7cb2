"""End-of-job tables and notes: what a person reads when a job finishes."""
import re

from ranklens.report.console import dictionary_table, spectrum_table, table, verdict_counts_table
from ranklens.train.config import LorsaTrainConfig
from ranklens.train.lorsa_job import lorsa_notes


def test_table_aligns_rounds_and_drops_absent_columns():
    rows = [{"name": "a", "x": 0.123456, "n": 1200}, {"name": "bb", "x": None, "n": 5}]
    text = table(rows, [("x", "X", "{:.2f}"), ("y", "Y", "{}"), ("n", "count", "{:,}")], label="name")
    assert text.splitlines() == ["       X  count",
                                 "a   0.12  1,200",
                                 "bb     -      5"]


def test_dictionary_table_reads_train_metrics():
    metrics = {"fvu": 0.098515, "l0": 50.0, "train_dead_fraction": 14 / 4608, "eval_dead_fraction": 0.0282,
               "tokens": 1_000_000, "nmse": 0.098515}
    lines = dictionary_table(metrics).splitlines()
    assert lines[0].split() == ["FVU", "L0", "dead", "(train)", "dead", "(held-out)", "tokens"]
    assert lines[1].split() == ["0.0985", "50.0", "0.3%", "2.8%", "1,000,000"]


def test_lorsa_notes_name_the_shortfall_and_an_fvu_above_one():
    cfg = LorsaTrainConfig(model="smollm2-135m", layer=3, tokens=10_000, batch_tokens=4096)
    assert lorsa_notes({"tokens": 10_000, "steps": 2, "fvu": 0.5}, cfg) == []
    notes = lorsa_notes({"tokens": 8_300, "steps": 2, "fvu": 1.2}, cfg)
    assert "8,300 of the 10,000 tokens" in notes[0] and "at least 4,096 tokens" in notes[0]
    assert notes[1].startswith("warning: held-out FVU 1.200 is above 1")


def test_spectrum_table_shows_every_site_or_the_middle_layer():
    records = [{"site": f"L{layer}.{kind}", "layer": layer, "kind": kind, "d": 64, "effective_rank": 20.04 + layer,
                "erank_fraction": 0.31, "frac_sv_above_1pct": 0.5, "n_tokens": 1000,
                **({"loss_recovered": {"n_99": 12}} if layer == 1 else {})}
               for layer in range(3) for kind in ("attn_out", "mlp_out")]
    lines = spectrum_table({"records": records[:2]}).splitlines()
    assert lines[0].split()[:3] == ["effective", "rank", "d"] and lines[1].split()[:3] == ["L0.attn_out", "20.0", "64"]
    lines = spectrum_table({"records": records}, max_rows=4).splitlines()
    assert [line.split()[0] for line in lines[1:3]] == ["L1.attn_out", "L1.mlp_out"] and lines[1].split()[-2] == "12"
    assert lines[-1] == "(layer 1 of 6 sites; every site in spectrum.json)"


def test_verdict_counts_table_counts_per_experiment_and_in_all():
    results = {"steps": {
        "low_rank": {"title": "1. Low rank (Figure 2)", "verdicts": [{"verdict": "holds"}, {"verdict": "holds"}]},
        "activations": {"title": "SAE activation store"},
        "asi": {"title": "4. ASI (App. H)", "verdicts": [{"verdict": "does not hold"}, {"verdict": "inconclusive"}]}},
        "reference": {"compared": 4, "differing": [{}], "preset": "standard", "path": "docs/results/x.json"}}
    lines = verdict_counts_table(results).splitlines()
    assert lines[0].split() == ["holds", "does", "not", "hold", "inconclusive"]
    assert [line.split() for line in lines[1:4]] == [["1.", "Low", "rank", "2", "0", "0"],
                                                     ["4.", "ASI", "0", "1", "1"], ["total", "2", "1", "1"]]
    assert lines[4] == "1 of 4 verdicts differ from the standard run in docs/results/x.json (listed at the top of " \
                       "the report)"


def test_spectrum_prints_its_table(tiny_dir, tmp_path, capsys):
    from ranklens.cli import main

    out = tmp_path / "run"
    assert main(["spectrum", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus"), "--sites",
                 "L1.attn_out,L1.mlp_out", "--tokens", "500", "--context-length", "64", "--dtype", "float32",
                 "--quiet", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["effective", "rank", "d", "erank"]
    assert [line.split()[0] for line in lines[1:3]] == ["L1.attn_out", "L1.mlp_out"]
    assert lines[3] == f"report: {out / 'report.html'}"


def test_loss_recovered_progress_moves_with_every_evaluation(tiny_dir, tmp_path, capsys):
    from ranklens.cli import main

    out = tmp_path / "run"
    assert main(["spectrum", "--model", str(tiny_dir / "model"), "--corpus", str(tiny_dir / "corpus"), "--sites",
                 "L1.attn_out", "--loss-recovered", "L1.attn_out", "--loss-tokens", "200", "--loss-points", "3",
                 "--tokens", "500", "--context-length", "64", "--dtype", "float32", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "L1.attn_out: clean and zero-ablated loss" in err
    done = [int(m) for m in re.findall(r"L1\.attn_out: (\d+) evaluations, last n = \d+", err)]
    assert sorted(set(done)) == list(range(1, max(done) + 1)) and max(done) >= 3  # one by one
