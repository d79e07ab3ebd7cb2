"""End-of-job tables and notes: what a person reads when a job finishes."""

from ranklens.report.console import dictionary_table, table
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
