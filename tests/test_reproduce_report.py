"""The reproduce report's top: the quick preset's caveat with its real step counts, the verdicts that differ from a
reference run's (by claim id, computed from a given results.json), and the verdict table's badges and counts.
Built from the records of the packaged standard run, with no model."""

from __future__ import annotations

import copy
import html
import json
import re

import pytest

from ranklens.reproduce import report
from ranklens.reproduce.experiments import asi, lorsa
from ranklens.reproduce.presets import ReproduceConfig
from ranklens.reproduce.results_format import read_results

pytestmark = pytest.mark.skipif(not report.REFERENCE.is_file(), reason="the packaged standard run is not here")


@pytest.fixture(scope="module")
def standard():
    return read_results(report.REFERENCE)


def _build(tmp_path, standard, reference, preset="quick", model=None):
    cfg = ReproduceConfig.load(preset=preset, model=model or standard["config"]["model"], experiments=["asi", "lorsa"])
    records = {name: standard["steps"][name] for name in ("asi", "lorsa")}
    out = tmp_path / "run"
    results = report.build(out, cfg, standard["plan"], [asi, lorsa], records, "ranklens reproduce", reference)
    return results, (out / "report.html").read_text()


def _reference_with_one_flip(tmp_path, standard):
    ref = copy.deepcopy(standard)
    fvu = next(v for v in ref["steps"]["lorsa"]["verdicts"] if "lower FVU" in v["claim"])
    assert fvu["verdict"] == "holds"
    fvu["verdict"] = "does not hold"
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(ref))
    return path, fvu["claim"]


def test_quick_report_states_its_steps_and_the_verdicts_that_differ(tmp_path, standard):
    path, claim = _reference_with_one_flip(tmp_path, standard)
    results, page = _build(tmp_path, standard, path)
    top = page[:page.index('id="verdicts"')]  # everything before the verdicts heading
    assert "quick preset: each SAE trains for only 64 steps" in top and "Lorsa for about 64 steps" in top
    ref = results["reference"]
    assert ref["compared"] == 13  # asi's 10 and lorsa's 3 claims
    assert [d["id"] for d in ref["differing"]] == ["lorsa.fvu"]
    assert "1 of the 13 verdicts this run shares with the standard run of smollm2-135m" in top
    assert html.escape(claim) in top
    row = top[top.index(html.escape(claim)):]
    assert re.match(r'[^<]*</td><td><span class="badge holds">holds</span></td>'
                    r'<td><span class="badge does-not-hold">does not hold</span></td>', row)
    assert all(v["id"] for s in results["steps"].values() for v in s["verdicts"])


def test_no_comparison_for_another_model_and_no_caveat_for_standard(tmp_path, standard):
    results, page = _build(tmp_path, standard, report.REFERENCE, preset="standard", model="other-model")
    assert "reference" not in results and "class=\"caveat\"" not in page
    results, page = _build(tmp_path, standard, report.REFERENCE, preset="standard")
    assert results["reference"]["differing"] == [] and "All 13 verdicts this run shares" in page
    assert "trains for only" not in page


def test_verdict_table_has_badges_and_counts(tmp_path, standard):
    results, page = _build(tmp_path, standard, report.REFERENCE, preset="standard")
    found = [v["verdict"] for s in results["steps"].values() for v in s["verdicts"]]
    table = page[page.index('id="verdicts"'):]
    counts = re.search(r'<p class="counts">(\d+) verdicts: (.*?)</p>', table)
    assert int(counts.group(1)) == len(found) == 13
    for word in ("holds", "does not hold", "inconclusive"):
        assert f'<span class="badge {word.replace(" ", "-")}">{found.count(word)} {word}</span>' in counts.group(2)
    body = table[table.index("<tbody>"):table.index("</tbody>")]
    assert body.count('<span class="badge ') == len(found)


def test_a_training_curve_figure_per_sae_cell(tmp_path, standard):
    """Each cell (the runs of one setting over seeds) whose run directories hold metrics.jsonl and curve.jsonl
    gets its figure in DIR/figures/curves and in the report; cells whose directories are gone are left out."""
    out = tmp_path / "run"
    runs = standard["steps"]["asi"]["result"]["runs"]
    cells = report.cells_of(standard["steps"]["asi"])
    assert len(cells) < len(runs) and all(len(ns) == standard["config"]["seeds"] for ns in cells.values())
    kept = list(cells)[:2]
    for cell in kept:
        for i, name in enumerate(cells[cell]):
            d = out / runs[name]["dir"]
            d.mkdir(parents=True)
            d.joinpath("metrics.jsonl").write_text("".join(
                json.dumps({"step": s, "tokens": 1024 * s, "fvu": 1 / s + 0.01 * i, "dead": 100 * s,
                            "dead_window_tokens": 2048}) + "\n" for s in (1, 2, 4, 8)))
            d.joinpath("curve.jsonl").write_text("".join(
                json.dumps({"step": s, "tokens": 1024 * s, "fvu": 1.2 / s, "eval_dead": 50 * s}) + "\n"
                for s in (2, 8)))
    cfg = ReproduceConfig.load(preset="standard", model="smollm2-135m", experiments=["asi"])
    report.build(out, cfg, standard["plan"], [asi], {"asi": standard["steps"]["asi"]}, None, report.REFERENCE)
    figures = sorted(p.stem for p in (out / "figures" / "curves").glob("*.png"))
    assert figures == sorted(kept)
    page = (out / "report.html").read_text()
    assert "Training curves" in page and all(f"{cell} (5 seeds). A: FVU" in page for cell in kept)


def test_report_states_held_out_tokens_the_text_could_not_give():
    from ranklens.reproduce.presets import ReproduceConfig
    from ranklens.reproduce.report import held_out_counts, scale

    records = {"budget": {"result": {"runs": {"a": {"metrics": {"fvu": 0.1, "eval_tokens": 47015},
                                                     "curve": [{"fvu": 0.2, "eval_tokens": 47015}]}}}},
               "asi": {"result": {"cells": [{"fvu": 0.3, "eval_tokens": 2048, "n": 5}]}}}
    assert held_out_counts(records) == {47015, 2048}
    cfg = ReproduceConfig.load(preset="quick")  # eval_tokens 2,048
    plan = {"d_model": 64, "n_layers": 3, "middle_layer": 1, "sweep_layers": [0, 1]}
    key = "held-out tokens (FVU / LM loss)"
    assert scale(cfg, plan, {2048})[key] == scale(cfg, plan)[key] == "2,048 / 512"
    assert scale(cfg, plan, {2048, 1500})[key] == ("2,048 / 512; the held-out text gave only 1,500 to some "
                                                    "evaluations (the corpus ran out)")
