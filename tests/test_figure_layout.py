"""Every figure of the reports keeps its legend off the data (outside every axes), letters its panels A, B, C when
it has several, and is at least 8 inches wide."""

from __future__ import annotations

import pytest

from ranklens.reproduce import figures as rfig
from ranklens.spectrum import figures as sfig
from test_report import _result

DRAWN = []


@pytest.fixture(autouse=True)
def capture(monkeypatch):
    """Check each figure as it is saved (save_figure clears it)."""
    DRAWN.clear()
    for module in (rfig, sfig):
        original = module.save_figure

        def checked(fig, path, original=original):
            fig.canvas.draw()
            renderer = fig.canvas.get_renderer()
            axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
            legends = list(fig.legends) + [ax.get_legend() for ax in axes if ax.get_legend() is not None]
            boxes = [ax.get_window_extent(renderer) for ax in axes]
            overlaps = [(i, j) for i, leg in enumerate(legends) for j, box in enumerate(boxes)
                        if leg.get_window_extent(renderer).overlaps(box)]
            titles = [ax.get_title(loc="left") for ax in axes]
            DRAWN.append({"path": path, "overlaps": overlaps, "letters": titles, "n_axes": len(axes),
                          "width": fig.get_figwidth(), "legends": len(legends)})
            return original(fig, path)

        monkeypatch.setattr(module, "save_figure", checked)


def _check(min_width: float = 8.0):
    assert DRAWN
    for d in DRAWN:
        assert d["overlaps"] == [], f"{d['path'].name}: a legend over data"
        assert d["width"] >= min_width, f"{d['path'].name}: {d['width']} inches wide"
        if d["n_axes"] > 1:
            assert d["letters"] == list("ABCDEFGH"[:d["n_axes"]]), f"{d['path'].name}: panels {d['letters']}"


def test_spectrum_figures(tmp_path):
    result = _result()
    records = result["records"]
    mid = [r for r in records if r["layer"] == 1]
    sfig.erank_by_layer(records, tmp_path / "a.png")
    sfig.singular_spectra(mid, tmp_path / "b.png")
    sfig.loss_recovered_curves([r for r in mid if r.get("loss_recovered")], tmp_path / "c.png")
    sfig.wo_decomposition(next(r for r in mid if r.get("wo_decomposition")), tmp_path / "d.png")
    sfig.erank_z_vs_o(records, tmp_path / "e.png")
    sfig.compare_bars({"main": mid, "code": [r for r in result["compare"][0]["records"] if r["layer"] == 1]},
                      tmp_path / "f.png")
    assert len(DRAWN) == 6 and all(d["legends"] for d in DRAWN)
    _check()


def test_experiment_figures(tmp_path):
    series = {m: [(1, 0.5, 0.1), (2, 0.4, 0.05), (4, 0.3, 0.02)] for m in ("TopK", "AuxK", "ASI")}
    panels = [rfig.Panel(label, "x", series, references={"default": (0.45, 0.01)}) for label in ("a", "b", "c")]
    rfig.metric_panels(panels, tmp_path / "m.png")
    rfig.curve_panels(panels[:2], tmp_path / "c.png")
    points = [{"site": f"L{i}.{k}", "layer": i, "kind": k, "effective_rank": 10.0 + i + (k == "resid_post"),
               "train_dead_fraction": 0.5 - 0.1 * i} for i in range(3) for k in ("attn_out", "resid_post")]
    rfig.dead_vs_erank(points, tmp_path / "d.png")
    rfig.grouped_bars({"dead fraction": {"TopK": (0.5, 0.1), "ASI": (0.3, 0.05)},
                       "FVU": {"TopK": (0.4, 0.02), "ASI": (0.35, 0.01)}}, "value", tmp_path / "g.png")
    train = [{"tokens": 512 * s, "fvu": 1 / s, "dead": 10 * s, "dead_window_tokens": 1024} for s in (1, 2, 4)]
    curve = [{"tokens": 1024, "fvu": 0.9, "eval_dead": 12}, {"tokens": 2048, "fvu": 0.5, "eval_dead": 30}]
    rfig.training_curve([(train, curve, 64), (train, curve, 64)], tmp_path / "t.png")
    assert [d["n_axes"] for d in DRAWN] == [3, 2, 2, 1, 2]
    _check()
