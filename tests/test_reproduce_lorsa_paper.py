"""`ranklens reproduce --paper lorsa` end to end on a tiny Llama with a micro preset: the App. B ablations, the App. C
scaling fit and the Section 5 heads experiment, their verdicts in results.json and the report, and reuse."""

import html
import json

import pytest
import yaml

from ranklens.cli import main
from ranklens.reproduce.experiments.heads import strongest_layer
from ranklens.reproduce.experiments.qk_ablations import nearest_divisor
from ranklens.reproduce.presets import ReproduceConfig

STEPS = ["activations", "qk_ablations", "lorsa_scaling", "heads"]


@pytest.fixture(scope="module")
def micro(tiny_dir, tmp_path_factory):
    """The tiny Llama (d = 32, 4 heads of d_head 8, 3 layers) at a few thousand tokens per run."""
    values = dict(paper="lorsa", model=str(tiny_dir / "model"), corpus=str(tiny_dir / "corpus"), context_length=64,
                  dtype="float32", seeds=2, store_tokens=1200, batch_size=256, warmup_steps=2, init_tokens=2048,
                  eval_tokens=500, lm_eval_tokens=300, lorsa_tokens=1024, lorsa_batch_tokens=256, lorsa_k=4,
                  qk_dims=[4, 8], qk_contexts=[64, 32], qk_group_ratios=["1/2", "1", "2"],
                  lorsa_scaling_expansions=[1, 2, 4], lorsa_scaling_k=[2, 4, 8], heads_prompts=12,
                  heads_tasks=["induction", "successor", "attention_sink", "arithmetic"])
    path = tmp_path_factory.mktemp("micro_lorsa") / "micro.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_lorsa_paper_pipeline(micro, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["reproduce", "--config", str(micro), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert list(results["steps"]) == STEPS
    report = (out / "report.html").read_text()
    assert "Low-Rank Sparse Decomposition" in report
    ids = set()
    for name in STEPS[1:]:
        step = results["steps"][name]
        assert step["verdicts"], name
        for v in step["verdicts"]:
            ids.add(v["id"])
            assert v["verdict"] in ("holds", "does not hold", "inconclusive")
            assert html.escape(v["claim"]) in report and html.escape(v["statistic"]) in report
    # B.1 at both contexts (d_qk 4 < d_head 8), B.2 below the MHSA's 4 heads (G = 2), B.3's two comparisons
    assert {"lorsa_b1.c64.q4", "lorsa_b1.c32.q4", "lorsa_b2.g2", "lorsa_b3.trainable", "lorsa_b3.random"} <= ids
    assert {"lorsa_c.falls_with_n", "lorsa_c.above_sae", "heads.mhsa.induction", "heads.lorsa.induction",
            "heads.lorsa.attention_sink"} <= ids
    ablations = results["steps"]["qk_ablations"]["result"]
    assert set(ablations["layout"]["b2"]) == {"2", "4", "8"}
    assert (out / "stores" / "lorsa-c32").is_dir()  # the second context's store
    b1 = ablations["layout"]["b1"]["64"]
    assert all(ablations["runs"][n]["metrics"]["n_qk_groups"] == 32 // int(q) for q, names in b1.items() for n in names)
    fits = results["steps"]["lorsa_scaling"]["result"]["fits"]
    assert set(fits["lorsa"]["params"]) == {"alpha", "beta_k", "beta_n", "gamma", "zeta", "eta"}
    heads = results["steps"]["heads"]["result"]
    scan = json.loads((out / "heads" / "scan" / "heads.json").read_text())
    assert set(heads["layers"]) == {"induction", "attention_sink"} == set(scan["tasks"])
    assert {task: strongest_layer(r, scan["share"]) for task, r in scan["tasks"].items()} == heads["layers"]
    assert [r["layer"] for r in heads["lorsa_runs"]] == sorted(set(heads["layers"].values()))
    assert [lo["layer"] for lo in heads["heads"]["tasks"]["induction"]["lorsa"]] == sorted(set(heads["layers"].values()))
    assert (out / "heads" / "heads.json").exists() and (out / "heads" / "scan" / "heads.json").exists()
    assert any(c.startswith("ranklens heads ") for c in results["steps"]["heads"]["commands"])
    assert "ranklens reproduce" in printed or "report:" in printed
    # a second run reuses every step
    assert main(["reproduce", "--config", str(micro), "--out", str(out), "--quiet"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert [s["attempts"] for s in again["steps"].values()] == [1] * len(STEPS)


def test_nearest_divisor():
    assert nearest_divisor(576, 3) == 3 and nearest_divisor(576, 4.5) == 4 and nearest_divisor(576, 36) == 36
    assert nearest_divisor(32, 1 / 3 * 4) == 1


def test_strongest_layer():
    def row(layer, effect, share, active=10):
        return {"layer": layer, "path_patching_active": effect, "pattern_share": share, "active_rows": active}
    task = {"sign": 1, "mhsa": [row(0, 5.0, 0.2), row(1, 0.3, 0.6), row(2, 0.2, 0.9), row(3, 9.0, None, 0)]}
    assert strongest_layer(task, 0.5) == 1  # the share first; a head never active does not count
    assert strongest_layer(task, 0.95) == 0  # none has the share: the strongest of all
    assert strongest_layer({**task, "sign": -1}, 0.5) == 2  # the task's direction


def test_lorsa_paper_config_errors():
    with pytest.raises(Exception, match="not among the lorsa paper's experiments"):
        ReproduceConfig.load(paper="lorsa", experiments="asi")
    with pytest.raises(Exception, match="--paper lorsa --preset 'long'"):
        ReproduceConfig.load(paper="lorsa", preset="long")
    with pytest.raises(Exception, match="ratio .zero.: expected a positive number"):
        ReproduceConfig.load(paper="lorsa", qk_group_ratios="1,zero")
    assert ReproduceConfig.load(paper="lorsa").experiments == ["qk_ablations", "lorsa_scaling", "heads"]
