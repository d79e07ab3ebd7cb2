"""The judge's tasks on a list of features: explain, score (simulation, detection, fuzzing) and rate (rubric).

Each phase builds all its prompts first and sends them as one batch (``Judge.complete_all``: concurrent, cached,
resumable), then reads the answers. Explanations come first, since the scoring prompts contain them.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from ranklens.autointerp import prompts
from ranklens.autointerp.client import Judge
from ranklens.autointerp.samples import FeatureData
from ranklens.autointerp.scores import balanced_accuracy, simulation_score

Explanations = dict[int, dict[str, str]]  # feature -> {"activation": ..., "z_pattern": ... (Lorsa)}


def explain(judge: Judge, features: Sequence[FeatureData], max_tokens: int) -> Explanations:
    """One explanation per feature from its top activations (Lorsa paper App. D, first prompt) and, for a Lorsa head,
    a second one from its z-patterns (App. D, third prompt)."""
    jobs, where = [], []
    for f in features:
        jobs.append((prompts.explain_activations(f.explain, f.max_act), max_tokens))
        where.append((f.id, "activation"))
        if f.has_z:
            jobs.append((prompts.explain_zpattern(f.explain), max_tokens))
            where.append((f.id, "z_pattern"))
    out: Explanations = {f.id: {} for f in features}
    for (fid, key), answer in zip(where, judge.complete_all(jobs), strict=True):
        out[fid][key] = prompts.clean_explanation(answer) or "(no explanation)"
    return out


def random_explanations(explanations: Explanations, seed: int) -> Explanations:
    """The floor: every feature gets another feature's explanations (a random derangement, seeded); with a single
    feature, a fixed unrelated explanation from ``templates/random_explanations.txt``."""
    ids = sorted(explanations)
    rng = random.Random(seed + 7_919)
    if len(ids) < 2:
        pool = prompts.random_explanations()
        return {i: {k: rng.choice(pool) for k in explanations[i]} for i in ids}
    order = ids[:]
    rng.shuffle(order)
    donor = {order[j]: order[(j + 1) % len(order)] for j in range(len(order))}  # a cycle: nobody keeps its own
    return {i: {k: explanations[donor[i]].get(k, explanations[donor[i]]["activation"]) for k in explanations[i]}
            for i in ids}


def _simulation_jobs(f: FeatureData, expl: dict[str, str]) -> tuple[list, list]:
    jobs, meta = [], []
    for kind, contexts in (("top", f.held_top), ("random", f.held_random)):
        for c in contexts:
            jobs.append((prompts.simulate_activations(expl["activation"], c),
                         prompts.simulation_budget(len(c["tokens"]))))
            meta.append(("simulation", kind, c["acts"]))
    if "z_pattern" in expl and f.has_z:
        for c in f.held_top:  # z-patterns exist for top activations only
            truth = prompts.z_truth(c)
            jobs.append((prompts.simulate_zpattern(expl["z_pattern"], c), prompts.simulation_budget(len(truth))))
            meta.append(("simulation_z", "top", truth))
    return jobs, meta


def _detection_set(f: FeatureData, seed: int) -> tuple[list[dict], list[int]]:
    items = [(c, 1) for c in f.held_top] + [(c, 0) for c in f.negatives[:len(f.held_top)]]
    random.Random(seed * 31 + f.id).shuffle(items)
    return [c for c, _ in items], [t for _, t in items]


def _fuzzing_set(f: FeatureData, seed: int) -> tuple[list[dict], list[set[int]], list[int]]:
    """Held-out top contexts, every second one with its highlights moved to as many tokens where the feature is not
    active (delphi's fuzzing)."""
    rng = random.Random(seed * 37 + f.id)
    contexts, marks, truth = [], [], []
    for j, c in enumerate(f.held_top):
        active = {i for i, a in enumerate(c["acts"]) if a > 0} or {c["peak"]}
        quiet = [i for i in range(len(c["tokens"])) if i not in active]
        if j % 2 == 1 and quiet:
            marks.append(set(rng.sample(quiet, min(len(active), len(quiet)))))
            truth.append(0)
        else:
            marks.append(active)
            truth.append(1)
        contexts.append(c)
    order = list(range(len(contexts)))
    rng.shuffle(order)
    return [contexts[i] for i in order], [marks[i] for i in order], [truth[i] for i in order]


def score(judge: Judge, features: Sequence[FeatureData], explanations: Explanations, methods: Sequence[str],
          seed: int, answer_budget: int = 8) -> dict[int, dict[str, Any]]:
    """Scores of each feature's explanations by ``methods``; one batch of requests for all features."""
    jobs: list = []
    plan: list[tuple[int, str, Any]] = []  # (feature, method, what to compare the answer with)
    for f in features:
        expl = explanations[f.id]
        if "simulation" in methods:
            sj, sm = _simulation_jobs(f, expl)
            jobs += sj
            plan += [(f.id, m, (kind, truth)) for m, kind, truth in sm]
        if "detection" in methods and f.held_top and f.negatives:
            contexts, truth = _detection_set(f, seed)
            jobs.append((prompts.detect(expl["activation"], contexts), answer_budget * len(contexts)))
            plan.append((f.id, "detection", truth))
        if "fuzzing" in methods and len(f.held_top) >= 2:
            contexts, marks, truth = _fuzzing_set(f, seed)
            jobs.append((prompts.fuzz(expl["activation"], contexts, marks), answer_budget * len(contexts)))
            plan.append((f.id, "fuzzing", truth))
    answers = judge.complete_all(jobs)
    sims: dict[tuple[int, str], list] = {}
    out: dict[int, dict[str, Any]] = {f.id: {} for f in features}
    for (fid, method, truth), answer in zip(plan, answers, strict=True):
        if method.startswith("simulation"):
            kind, values = truth
            pred, missing = prompts.parse_simulation(answer, len(values))
            sims.setdefault((fid, method), []).append((kind, pred, values, missing))
        else:
            parsed = prompts.parse_answers(answer, len(truth))
            out[fid][method] = balanced_accuracy(parsed, truth)
    for (fid, method), rows in sims.items():
        result = simulation_score([r[1] for r in rows], [r[2] for r in rows], [r[0] for r in rows])
        result["unread_tokens"] = sum(r[3] for r in rows)
        out[fid][method] = result
    return out


def headline(scores: dict[str, Any], method: str) -> float | None:
    """The one number of a method: a simulation's ``all`` correlation, or detection/fuzzing balanced accuracy."""
    value = scores.get(method)
    return value.get("all") if isinstance(value, dict) else value


def rate(judge: Judge, features: Sequence[FeatureData], max_contexts: int = 10) -> dict[int, int | None]:
    """The App. N.1 monosemanticity rating (1-5) of each feature from its top activating contexts."""
    jobs = [(prompts.rubric((f.explain + f.held_top)[:max_contexts]), 4) for f in features]
    return {f.id: prompts.parse_rating(a) for f, a in zip(features, judge.complete_all(jobs), strict=True)}
