"""A small dashboard site with features whose meaning is known, for the autointerp tests.

Text is a few plain sentences cut into word tokens (" cat", "."); feature 0 fires on animal words, feature 1 on
numbers, feature 2 on the full stop, feature 3 never fires (dead). The site is written by the dashboard's own
``write_site`` with the random windows beside it, as ``ranklens dashboard`` writes them; for ``kind="lorsa"`` every
top context carries a z-pattern (the query attends to the previous animal word).
"""

from __future__ import annotations

import json
from pathlib import Path

from ranklens.dashboard.site_reader import RANDOM_WINDOWS_NAME
from ranklens.dashboard.site_writer import write_site

SENTENCES = [
    "The cat sat on the mat near the dog .",
    "In 2019 there were 12 horses and 3 cows on the farm .",
    "A small bird sang while the cat slept .",
    "She paid 40 dollars for 2 tickets .",
    "The dog chased the rabbit across 5 fields .",
    "Rain fell all day over the quiet town .",
    "He read the paper and drank his tea .",
    "We counted 7 ducks and 9 geese by the river .",
    "The model has 30 layers and 9 heads .",
    "Snow covered the roofs of the old houses .",
    "My horse and my dog are friends .",
    "They sold 100 books in 4 days .",
]
ANIMALS = {"cat", "dog", "horses", "cows", "bird", "rabbit", "ducks", "geese", "horse"}


def tokens_of(sentence: str) -> list[str]:
    words = sentence.split()
    return [words[0]] + [w if w == "." else " " + w for w in words[1:]]


def activation(feature: int, token: str) -> float:
    word = token.strip()
    if feature == 0:
        return 4.0 if word in ANIMALS else 0.0
    if feature == 1:
        return 3.0 if word.isdigit() else 0.0
    if feature == 2:
        return 2.0 if word == "." else 0.0
    return 0.0


def _contexts(feature: int, kind: str) -> list[dict]:
    out = []
    for doc, sentence in enumerate(SENTENCES):
        toks = tokens_of(sentence)
        acts = [activation(feature, t) for t in toks]
        for peak, a in enumerate(acts):
            if a > 0:
                ctx = {"tokens": toks, "acts": acts, "peak": peak, "doc": doc, "pos": peak}
                if kind == "lorsa":
                    z = [0.0] * len(toks)
                    z[peak] = 1.0
                    if peak > 0:
                        z[peak - 1] = 2.0
                    ctx["z"] = z
                out.append(ctx)
    return out


def write_synthetic_site(out: Path, kind: str = "sae", n_features: int = 4) -> Path:
    records, index = [], []
    for f in range(n_features):
        top = _contexts(f, kind)
        n_active = sum(1 for s in SENTENCES for t in tokens_of(s) if activation(f, t) > 0)
        density = n_active / sum(len(tokens_of(s)) for s in SENTENCES)
        max_act = max((max(c["acts"]) for c in top), default=0.0)
        row = {"id": f, "density": density, "mean_act": max_act if top else None, "max_act": max_act,
               "alive": bool(top), "subspace_share": 0.5,
               "top_tokens": list(dict.fromkeys(c["tokens"][c["peak"]] for c in top))[:5]}
        if kind == "lorsa":
            row["qk_group"] = 0
        index.append(row)
        rec = {k: row[k] for k in ("id", "density", "mean_act", "max_act", "alive", "subspace_share")}
        rec["top"] = top
        rec["quantiles"] = [{"label": "upper half", "range": [max_act / 2, max_act], "examples": top[:2]}]
        if kind == "lorsa":
            rec["lorsa"] = {"qk_group": 0, "attribution": [], "heads_for_90pct": None}
        records.append(rec)
    windows = []
    for doc, sentence in enumerate(SENTENCES):
        toks = tokens_of(sentence)
        codes = [[[f, activation(f, t)] for f in range(n_features) if activation(f, t) > 0] for t in toks]
        windows.append({"tokens": toks, "peak": len(toks) // 2, "doc": doc, "pos": len(toks) // 2, "codes": codes})
    meta = {"kind": kind, "title": f"synthetic {kind}", "model": "synthetic", "n_features": n_features, "d": 8,
            "corpus": "sentences", "tokens": sum(len(tokens_of(s)) for s in SENTENCES),
            "dead_definition": "never fired", "n_dead": sum(1 for r in index if not r["alive"]), "subspace_dim": 4,
            "logit_note": "none", "metrics": {}, "source": "tests/autointerp_data.py",
            **({"layer": 3} if kind == "lorsa" else {"site": "L3.attn_out"})}
    return write_site(out, meta, index, records,
                      extra_files={RANDOM_WINDOWS_NAME: json.dumps({"windows": windows}).encode()})
