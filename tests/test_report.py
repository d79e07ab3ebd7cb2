"""Report builder, figures and the spectrum report on a small synthetic spectrum.json (fast, no model)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import numpy as np
import pytest

from ranklens.errors import RanklensError
from ranklens.report.html import Report, format_number, software_versions
from ranklens.spectrum import figures
from ranklens.spectrum.report import build_spectrum_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
D = 16

# Geometric decay rate of the singular values per (layer, kind): a smaller rate = a lower effective rank. attn_out is
# below mlp_out at layers 1 and 2 but not at 0, and below resid_post at all three layers.
DECAY = {
    "attn_out": [0.95, 0.70, 0.70],
    "attn_z": [0.85, 0.85, 0.85],
    "mlp_out": [0.80, 0.90, 0.90],
    "resid_post": [0.97, 0.97, 0.97],
}


def _record(layer: int, kind: str, decay: float, n_tokens: int = 1000) -> dict:
    s = 10.0 * decay ** np.arange(D)
    p = s / s.sum()
    erank = float(math.exp(-(p * np.log(p)).sum()))
    return {
        "site": f"L{layer}.{kind}",
        "layer": layer,
        "kind": kind,
        "d": D,
        "n_tokens": n_tokens,
        "n_excluded": 0,
        "effective_rank": erank,
        "erank_fraction": erank / D,
        "frac_sv_above_1pct": float((s > 0.01 * s[0]).mean()),
        "singular_values": s.tolist(),
        "cumulative_variance": (np.cumsum(s**2) / (s**2).sum()).tolist(),
    }


def _loss_recovered(scale: float) -> dict:
    n = list(range(0, D + 1, 2))
    fraction = [1.0 - math.exp(-k / scale) if k < D else 1.0 for k in n]
    n_99 = next(k for k, f in zip(n, fraction, strict=True) if f >= 0.99)
    return {"n": n, "fraction": fraction, "ce": [3.0 + 4.0 * (1 - f) for f in fraction], "ce_clean": 3.0,
            "ce_zero": 7.0, "n_99": n_99, "frac_dims_99": n_99 / D, "n_tokens": 256}


def _wo_decomposition(rec: dict) -> dict:
    var_o = np.asarray(rec["singular_values"]) ** 2 / rec["n_tokens"]
    contrib_wo = np.linspace(1.0, 0.05, D)  # W^O shrinks the tail
    return {"var_O": var_o.tolist(), "contrib_Z": (var_o / contrib_wo).tolist(), "contrib_WO": contrib_wo.tolist()}


def _result() -> dict:
    records = [_record(layer, kind, DECAY[kind][layer]) for layer in range(3) for kind in DECAY]
    mid = {r["kind"]: r for r in records if r["layer"] == 1}
    mid["attn_out"]["loss_recovered"] = _loss_recovered(2.0)
    mid["mlp_out"]["loss_recovered"] = _loss_recovered(4.0)
    mid["attn_out"]["wo_decomposition"] = _wo_decomposition(mid["attn_out"])
    mid["attn_out"]["stability"] = {"n_splits": 4, "effective_ranks": [5.0, 5.01, 4.99, 5.0], "erank_mean": 5.0,
                                    "erank_std": 0.007, "erank_cv": 1.4e-3, "sv_cv_max": 4.9e-3, "sv_cv_mean": 1e-3}
    code = [_record(layer, kind, DECAY[kind][layer] - 0.05) for layer in range(3) for kind in ("attn_out", "mlp_out")]
    return {
        "format": "ranklens.spectrum/1", "model": "tiny-<b>model</b>", "corpus": "default", "family": "llama",
        "n_layers": 3, "d_model": D, "n_tokens": 1000,
        "config": {"model": "tiny", "sites": ["L*.attn_out"], "n_tokens": 1000, "note": "<script>x()</script>"},
        "command": "ranklens spectrum --model tiny --sites 'L*.attn_out'",
        "timings": {"accumulate": 12.5, "loss_recovered": 3.25},
        "records": records,
        "compare": [{"label": "corpus=code", "model": "tiny", "corpus": "code", "records": code}],
    }


def _strip_optional(result: dict) -> dict:
    res = copy.deepcopy(result)
    for key in ("compare", "config", "command", "timings"):
        res.pop(key)
    res["records"] = [r for r in res["records"] if r["kind"] != "attn_z"]
    for r in res["records"]:
        for key in ("loss_recovered", "wo_decomposition", "stability"):
            r.pop(key, None)
    return res


def _images(html: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,', html)


# --------------------------------------------------------------------------- spectrum report


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run")
    path = build_spectrum_report(_result(), out)
    return out, path.read_text(encoding="utf-8")


def test_report_is_self_contained_with_all_figures(full_report):
    out, html = full_report
    assert (out / "report.html").is_file()
    assert not re.search(r'(?:src|href)\s*=\s*["\'](?!data:|#)', html), "only data: URIs and #anchors allowed"
    assert not re.search(r'(?:src|href)\s*=\s*[^"\'\s]', html), "attributes are quoted"
    assert html.count("href=") >= 5  # the table of contents
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html
    pngs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert pngs == sorted(["erank_by_layer.png", "erank_z_vs_o.png", "singular_spectra_L1.png", "loss_recovered_L1.png",
                           "wo_decomposition_L1.png", "compare_middle_layer.png"])
    assert len(_images(html)) == len(pngs)
    for name in pngs:
        data = (out / "figures" / name).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG_MAGIC), name
    assert "Figure omitted" not in html


def test_findings_count_layers(full_report):
    _, html = full_report
    assert "than the MLP output at 2 of 3 layers" in html
    assert "than the residual stream at 3 of 3 layers" in html
    assert "It is not lower than the MLP output at layer 0." in html
    attn = [_record(k, "attn_out", DECAY["attn_out"][k])["erank_fraction"] for k in range(3)]
    mlp = [_record(k, "mlp_out", DECAY["mlp_out"][k])["erank_fraction"] for k in range(3)]
    assert f"(mean erank fraction {np.mean(attn):.2f} vs {np.mean(mlp):.2f})" in html


def test_findings_middle_layer_stability_decomposition_compare(full_report):
    _, html = full_report
    mid = {k: _record(1, k, DECAY[k][1]) for k in DECAY}
    pct = {k: f"{100 * r['frac_sv_above_1pct']:.1f}%" for k, r in mid.items()}
    assert (f"At the middle layer (1), {pct['attn_out']} of singular values exceed 1% of the largest in the attention "
            f"output, versus {pct['mlp_out']} for the MLP output and {pct['resid_post']} for the residual stream") in html
    n99_attn, n99_mlp = _loss_recovered(2.0)["n_99"], _loss_recovered(4.0)["n_99"]
    assert (f"the attention output needs {100 * n99_attn / D:.1f}% of its dimensions ({n99_attn} of {D}; zero ablation "
            "costs 4 nats)") in html
    assert f"the MLP output needs {100 * n99_mlp / D:.1f}% of its dimensions" in html
    assert "coefficient of variation is at most 1.40e-03 (L1.attn_out)" in html
    assert "largest CV of any singular value is 4.90e-03" in html
    assert "W^O accounts for" in html  # contrib_WO falls 20x over the spectrum
    assert "in 2 of 2 settings" in html  # this run and corpus=code at the middle layer
    assert "Comparison across models and corpora" in html


def test_run_details_and_escaping(full_report):
    _, html = full_report
    assert "tiny-&lt;b&gt;model&lt;/b&gt;" in html and "<b>model</b>" not in html
    assert "&lt;script&gt;x()&lt;/script&gt;" in html
    assert "ranklens spectrum --model tiny --sites &#x27;L*.attn_out&#x27;" in html
    assert "Resolved config" in html and "accumulate" in html
    assert ">15.8<" in html  # timings total 12.5 + 3.25 (".1f")
    assert "torch" in html and "cpu_count" in html


def test_missing_optional_parts_are_omitted(tmp_path):
    path = build_spectrum_report(_strip_optional(_result()), tmp_path)
    html = path.read_text(encoding="utf-8")
    assert sorted(p.name for p in (tmp_path / "figures").glob("*.png")) == ["erank_by_layer.png",
                                                                             "singular_spectra_L1.png"]
    assert len(_images(html)) == 2
    for absent in ("Comparison across models", "Stability across", "W^O accounts", "To recover 99%",
                   "Resolved config", "Timings", "Figure omitted"):
        assert absent not in html
    assert "than the MLP output at 2 of 3 layers" in html


def test_middle_layer_falls_back_and_lone_kind(tmp_path):
    res = _strip_optional(_result())
    res["records"] = [r for r in res["records"] if r["layer"] != 1 and r["kind"] == "attn_out"]
    html = build_spectrum_report(res, tmp_path).read_text(encoding="utf-8")
    assert "The middle layer 1 was not analysed; layer 0 is the closest that was." in html
    assert "the per-layer comparison cannot be made" in html


def test_atomic_write_leaves_no_temp_files(tmp_path, full_report):
    out, _ = full_report
    assert sorted(p.name for p in out.iterdir()) == ["figures", "report.html"]
    assert not [p for p in (out / "figures").iterdir() if not p.name.endswith(".png")]


def test_bad_result_is_rejected(tmp_path):
    with pytest.raises(RanklensError, match="no records"):
        build_spectrum_report({"format": "ranklens.spectrum/1", "records": []}, tmp_path)
    with pytest.raises(RanklensError, match="format"):
        build_spectrum_report({"format": "ranklens.sae/1", "records": [{}]}, tmp_path)
    assert not (tmp_path / "report.html").exists()


# --------------------------------------------------------------------------- figures


def test_figures_reject_missing_inputs(tmp_path):
    png = tmp_path / "f.png"
    rec = _record(0, "attn_out", 0.7)
    for fn in (figures.erank_by_layer, figures.singular_spectra, figures.loss_recovered_curves, figures.erank_z_vs_o):
        with pytest.raises(ValueError, match="no records"):
            fn([], png)
    with pytest.raises(ValueError, match="expected a non-empty dict"):
        figures.compare_bars({}, png)
    with pytest.raises(ValueError, match="loss_recovered"):
        figures.loss_recovered_curves([rec], png)
    with pytest.raises(ValueError, match="wo_decomposition"):
        figures.wo_decomposition(rec, png)
    with pytest.raises(ValueError, match="attn_z"):
        figures.erank_z_vs_o([rec], png)
    with pytest.raises(ValueError, match="two records for layer 0"):
        figures.erank_by_layer([rec, rec], png)
    with pytest.raises(ValueError, match="no positive singular value"):
        figures.singular_spectra([{**rec, "singular_values": [0.0] * D}], png)
    assert not png.exists()


def test_figure_returns_path_and_handles_zero_tail(tmp_path):
    rec = _record(2, "attn_out", 0.5)
    rec["singular_values"][-3:] = [0.0, 0.0, 0.0]  # numerical zeros: gaps on the log axis, no warnings or crash
    path = figures.singular_spectra([rec], tmp_path / "sub" / "s.png")
    assert path == tmp_path / "sub" / "s.png" and path.read_bytes().startswith(PNG_MAGIC)


# --------------------------------------------------------------------------- html builder


def test_report_escapes_text(tmp_path):
    rep = Report("a < b")
    rep.heading("<i>h</i>")
    rep.paragraph("<script>alert(1)</script>")
    rep.code("x = '<tag>' & y")
    rep.table(["<x-head>"], [["<x-cell>"]], caption="<cap>")
    rep.key_values({"k": {"<nested>": "<v>"}})
    rep.bullets(["<x-item>"])
    rep.verdict("<claim>", "holds", "<stat>")
    html = rep.render()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for raw in ("<i>h</i>", "<tag>", "<x-head>", "<x-cell>", "<cap>", "<nested>", "<v>", "<x-item>", "<claim>", "<stat>"):
        assert raw not in html
    assert "<title>a &lt; b</title>" in html and "k.&lt;nested&gt;" in html
    rep.html("<em>trusted</em>")
    assert "<em>trusted</em>" in rep.render()


def test_number_formatting():
    assert format_number(1234567) == "1,234,567"
    assert format_number(0.123456) == "0.1235"
    assert format_number(312.4) == "312.4"
    assert format_number(2523.165) == "2523"
    assert format_number(123456.7) == "123,457"
    assert format_number(0.5) == "0.5"
    assert format_number(4.9e-6) == "4.900e-06"
    assert format_number(float("nan")) == "nan" and format_number(True) == "true" and format_number(0.0) == "0"
    rep = Report("t")
    rep.table(["a", "b", "c"], [[1000, 0.25, None]], number_format={"b": ".1%"})
    html = rep.render()
    assert '<td class="num">1,000</td>' in html and '<td class="num">25.0%</td>' in html and "<td>\u2014</td>" in html
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        rep.table(["a", "b"], [[1]])
    with pytest.raises(ValueError, match="unknown columns"):
        rep.table(["a"], [[1]], number_format={"z": ".1f"})


def test_verdict_and_figure_validation(tmp_path):
    rep = Report("t")
    for v in ("holds", "does not hold", "inconclusive"):
        rep.verdict("claim", v, "p = 0.01")
    html = rep.render()
    assert 'class="verdict does-not-hold"' in html and 'class="verdict holds"' in html
    with pytest.raises(ValueError, match="verdict must be one of"):
        rep.verdict("claim", "maybe", "")
    with pytest.raises(ValueError, match="not a PNG"):
        rep.figure(b"GIF89a....", "x")
    with pytest.raises(ValueError, match="not a file"):
        rep.figure(tmp_path / "missing.png", "x")
    rep.figure(PNG_MAGIC + b"\x00" * 8, "tiny <png>")
    assert rep.render().count('src="data:image/png;base64,') == 1


def test_write_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "r" / "report.html"
    rep = Report("first")
    assert rep.write(target) == target and "first" in target.read_text()

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("ranklens.report.html.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        Report("second").write(target)
    assert "first" in target.read_text()
    assert [p.name for p in target.parent.iterdir()] == ["report.html"]


def test_software_versions():
    v = software_versions()
    for key in ("python", "torch", "transformers", "numpy", "ranklens", "platform", "cpu_count"):
        assert key in v
    assert v["torch"].startswith("2.")
