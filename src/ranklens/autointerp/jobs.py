"""`ranklens autointerp explain | score | compare`: the jobs, from a run directory to JSON files and the dashboard.

A run is a `ranklens train sae` / `train lorsa` run directory (its dashboard, RUN/dashboard, is built first when it
is missing) or a dashboard site itself. The results go to OUT (default RUN/autointerp): ``explanations.json``,
``scores.json``, and the judge's cache (OUT/cache unless ``--cache``). After each job the run's dashboard gets the
explanations and scores (a table column, a section on each feature page).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ranklens.autointerp import pipeline
from ranklens.autointerp.client import Judge
from ranklens.autointerp.config import CompareConfig, ExplainConfig, JudgeConfig, ScoreConfig
from ranklens.autointerp.samples import FeatureData, feature_data
from ranklens.autointerp.scores import summary, welch
from ranklens.dashboard.site_reader import (
    attach_autointerp,
    read_index,
    read_manifest,
    read_random_windows,
    read_records,
)
from ranklens.errors import RanklensError
from ranklens.io import atomic_write_json, read_json
from ranklens.rundir import check_output_dir

OUT_DIR = "autointerp"
EXPLANATIONS = "explanations.json"
SCORES = "scores.json"
COMPARE = "compare.json"


def find_site(run: str | Path, progress: bool = True) -> tuple[Path, Path]:
    """(the dashboard site, the run directory) of ``run``: a site itself, or a run whose RUN/dashboard is used (and
    built with the dashboard's defaults when missing: the one scan autointerp reads)."""
    from ranklens.dashboard.build import DASHBOARD_DIR, build_dashboard
    from ranklens.dashboard.config import DashboardConfig
    from ranklens.dashboard.site_writer import MARKER

    run = Path(run)
    if (run / MARKER).is_file():
        return run, run.parent
    if not run.is_dir():
        raise RanklensError(f"{str(run)!r} is not a directory; expected a `ranklens train sae` / `train lorsa` run "
                            "or a dashboard site")
    site = run / DASHBOARD_DIR
    if not (site / MARKER).is_file():
        build_dashboard(run, DashboardConfig(), site, progress)
    return site, run


class Loaded:
    """A dictionary's features as the judge will see them, read from its dashboard."""

    def __init__(self, site: Path, cfg: ExplainConfig, n: int | None = None, salt: int = 0) -> None:
        self.site = site
        self.meta = read_manifest(site)["meta"]
        self.kind = self.meta["kind"]
        index = read_index(site)
        if cfg.feature_ids is not None:
            known = {r["id"] for r in index}
            bad = [i for i in cfg.feature_ids if i not in known]
            if bad:
                raise RanklensError(f"feature {bad[0]} is not in {site} (ids {index[0]['id']}-{index[-1]['id']})")
            ids = list(cfg.feature_ids)
        else:
            alive = [r["id"] for r in index if r["alive"]]
            if not alive:
                raise RanklensError(f"{site} has no alive feature to explain")
            ids = sorted(random.Random(cfg.seed + salt).sample(alive, min(n or cfg.features, len(alive))))
        records = read_records(site, ids)
        windows = read_random_windows(site)
        score_top = getattr(cfg, "score_top", 4)
        score_random = getattr(cfg, "score_random", 4)
        self.features: list[FeatureData] = [
            feature_data(records[i], windows, self.kind, explain_top=cfg.explain_top,
                         explain_quantile=cfg.explain_quantile, score_top=score_top, score_random=score_random,
                         before=cfg.before, after=cfg.after, seed=cfg.seed)
            for i in ids if i in records and records[i]["top"]]
        if not self.features:
            raise RanklensError(f"none of the chosen features of {site} has a top activating context")


def _judge(cfg: JudgeConfig, out: Path) -> Judge:
    return Judge(cfg, Path(cfg.cache) if cfg.cache else out / "cache")


def _header(judge: Judge, cfg: JudgeConfig, command: str) -> dict[str, Any]:
    return {"judge": judge.name, "judge_model": cfg.model, "base_url": cfg.base_url, "seed": cfg.seed,
            "temperature": 0.0, "command": command, "written": datetime.now(UTC).isoformat(timespec="seconds")}


def _settings(cfg: ExplainConfig) -> dict[str, Any]:
    return cfg.model_dump(exclude={"base_url", "model", "api_key_env", "cache", "concurrency", "max_retries",
                                   "retry_base_seconds", "timeout", "price_input", "price_output"})


def _attach(site: Path, judge: Judge, explanations: dict, scores: dict | None) -> None:
    """The dashboard's view of the results: per feature its explanation(s) and headline scores."""
    features: dict[str, Any] = {}
    for fid, expl in explanations.items():
        entry: dict[str, Any] = {"explanation": expl.get("activation", "")}
        if "z_pattern" in expl:
            entry["z_explanation"] = expl["z_pattern"]
        if scores and fid in scores:
            s = scores[fid]
            entry["scores"] = {m: pipeline.headline(s, m) for m in ("simulation", "simulation_z", "detection",
                                                                    "fuzzing") if m in s}
            floor = s.get("random_explanation", {})
            entry["floor"] = {m: pipeline.headline(floor, m) for m in entry["scores"] if m in floor}
        features[str(fid)] = entry
    attach_autointerp(site, {"judge": judge.name, "features": features})


def run_explain(run: str | Path, cfg: ExplainConfig, out: str | Path | None = None, *, command: str = "",
                progress: bool = True) -> dict[str, Any]:
    site, run_dir = find_site(run, progress)
    out = check_output_dir(Path(out) if out else run_dir / OUT_DIR)
    loaded = Loaded(site, cfg)
    judge = _judge(cfg, out)
    expl = pipeline.explain(judge, loaded.features, cfg.explain_max_tokens)
    result = {**_header(judge, cfg, command), "kind": loaded.kind, "site": str(site), "settings": _settings(cfg),
              "features": {str(k): v for k, v in expl.items()}, "usage": judge.usage.to_json()}
    atomic_write_json(out / EXPLANATIONS, result)
    previous = read_json(out / SCORES) if (out / SCORES).is_file() else None
    scores = {int(k): v for k, v in previous["features"].items()} if previous else None
    _attach(site, judge, expl, {k: v for k, v in (scores or {}).items() if k in expl} or None)
    return result


def _score_features(judge: Judge, features: list[FeatureData], cfg: ScoreConfig) -> tuple[dict, dict]:
    """Explanations and scores (with the random-explanation floor under ``random_explanation``) of ``features``."""
    expl = pipeline.explain(judge, features, cfg.explain_max_tokens)
    scores = pipeline.score(judge, features, expl, cfg.methods, cfg.seed)
    if cfg.random_baseline:
        fake = pipeline.random_explanations(expl, cfg.seed)
        floor = pipeline.score(judge, features, fake, cfg.methods, cfg.seed)
        for fid in scores:
            scores[fid]["random_explanation"] = {"explanation": fake[fid], **floor[fid]}
    return expl, scores


def _methods(scores: dict[int, dict], cfg: ScoreConfig) -> list[str]:
    found = {m for s in scores.values() for m in s if m != "random_explanation"}
    return [m for m in ("simulation", "simulation_z", "detection", "fuzzing") if m in found]


def _summaries(scores: dict[int, dict], methods: list[str]) -> dict[str, Any]:
    out = {}
    for m in methods:
        out[m] = {**summary([pipeline.headline(s, m) for s in scores.values()]),
                  "floor": summary([pipeline.headline(s.get("random_explanation", {}), m) for s in scores.values()])}
    return out


def run_score(run: str | Path, cfg: ScoreConfig, out: str | Path | None = None, *, command: str = "",
              progress: bool = True) -> dict[str, Any]:
    site, run_dir = find_site(run, progress)
    out = check_output_dir(Path(out) if out else run_dir / OUT_DIR)
    loaded = Loaded(site, cfg)
    judge = _judge(cfg, out)
    expl, scores = _score_features(judge, loaded.features, cfg)
    methods = _methods(scores, cfg)
    header = {**_header(judge, cfg, command), "kind": loaded.kind, "site": str(site), "settings": _settings(cfg)}
    atomic_write_json(out / EXPLANATIONS, {**header, "features": {str(k): v for k, v in expl.items()},
                                           "usage": judge.usage.to_json()})
    result = {**header, "methods": methods, "summary": _summaries(scores, methods),
              "features": {str(k): v for k, v in scores.items()}, "usage": judge.usage.to_json()}
    atomic_write_json(out / SCORES, result)
    _attach(site, judge, expl, scores)
    return result


def run_compare(run_a: str | Path, run_b: str | Path, cfg: CompareConfig, out: str | Path, *, command: str = "",
                progress: bool = True) -> dict[str, Any]:
    """N features of each dictionary, blinded (the judge never sees which dictionary a feature is from) and shuffled
    (one seeded order for every phase), explained and scored by the same judge; Welch's test of each score between
    the two (Lorsa paper Figure 3; dimensional-collapse paper App. N.1 with the 1-5 rubric, Table 8)."""
    out = check_output_dir(out)
    sides = {}
    for key, run, salt in (("a", run_a, 0), ("b", run_b, 1)):
        site, run_dir = find_site(run, progress)
        sides[key] = (run_dir, Loaded(site, cfg, salt=salt))
    if sides["a"][1].meta.get("d") != sides["b"][1].meta.get("d"):
        raise RanklensError("the two dictionaries live in spaces of different dimension; expected two dictionaries "
                            "of the same site")
    # Blinding: features of both sides get fresh ids in one shuffled order, so prompts, cache keys and the order of
    # requests carry nothing of where a feature came from.
    items = [(key, f) for key, (_, loaded) in sides.items() for f in loaded.features]
    random.Random(cfg.seed + 104_729).shuffle(items)
    blinded = [FeatureData(n, f.kind, f.max_act, f.explain, f.held_top, f.held_random, f.negatives)
               for n, (_, f) in enumerate(items)]
    judge = _judge(cfg, out)
    expl, scores = _score_features(judge, blinded, cfg)
    ratings = pipeline.rate(judge, blinded) if cfg.rubric else {}
    methods = _methods(scores, cfg)
    per_side: dict[str, list[dict]] = {"a": [], "b": []}
    for n, (key, f) in enumerate(items):
        per_side[key].append({"feature": f.id, "blind_id": n, "explanations": expl[n], "scores": scores[n],
                              **({"rubric": ratings[n]} if cfg.rubric else {})})
    result: dict[str, Any] = {**_header(judge, cfg, command), "settings": _settings(cfg), "methods": methods,
                              "runs": {}, "tests": {}}
    for key in ("a", "b"):
        run_dir, loaded = sides[key]
        rows = per_side[key]
        side = {"run": str(run_dir), "site": str(loaded.site), "kind": loaded.kind, "title": loaded.meta["title"],
                "n_features": len(rows), "summary": _summaries({r["blind_id"]: r["scores"] for r in rows}, methods)}
        if cfg.rubric:
            side["rubric"] = {**summary([r["rubric"] for r in rows]),
                              "counts": {str(s): sum(1 for r in rows if r["rubric"] == s) for s in range(5, 0, -1)},
                              "unreadable": sum(1 for r in rows if r["rubric"] is None)}
        side["features"] = rows
        result["runs"][key] = side
    for m in methods:
        result["tests"][m] = welch(*[[pipeline.headline(r["scores"], m) for r in per_side[k]] for k in ("a", "b")])
    if cfg.rubric:
        result["tests"]["rubric"] = welch(*[[r["rubric"] for r in per_side[k]] for k in ("a", "b")])
    result["usage"] = judge.usage.to_json()
    atomic_write_json(out / COMPARE, result)
    return result
