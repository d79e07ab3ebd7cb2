"""Which contexts of a feature the judge sees, and which are held out to score it.

Everything comes from the dashboard's one scan (``ranklens.dashboard.site_reader``): a feature record's top contexts
(ranked by activation) and interval samples, and the shared random windows with every feature's activation at each
token. The split follows the Lorsa paper's App. D (8 top contexts explain, 4 top and 4 random contexts score):

- explain: the even-ranked top contexts (0, 2, 4, ...) and, for an SAE, interval samples one per interval in turn;
- held-out top: the odd-ranked top contexts, so the scored ones span the same range of activations;
- held-out random: random windows, a different draw per feature (seeded by the seed and the feature id).

Every context is cut to ``before`` tokens before its peak and ``after`` after.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ranklens.autointerp.prompts import trim
from ranklens.dashboard.site_reader import window_context


@dataclass
class FeatureData:
    id: int
    kind: str  # "sae" | "lorsa"
    max_act: float
    explain: list[dict]
    held_top: list[dict]
    held_random: list[dict]
    negatives: list[dict] = field(default_factory=list)  # random windows where the feature never fires

    @property
    def has_z(self) -> bool:
        return bool(self.explain) and all("z" in c for c in self.explain + self.held_top)


def _round_robin(quantiles: list[dict], n: int) -> list[dict]:
    out, i = [], 0
    pools = [list(q["examples"]) for q in quantiles if q["examples"]]
    while len(out) < n and any(pools):
        pool = pools[i % len(pools)]
        if pool:
            out.append(pool.pop(0))
        i += 1
    return out


def feature_data(record: dict, windows: list[dict], kind: str, *, explain_top: int, explain_quantile: int,
                 score_top: int, score_random: int, before: int, after: int, seed: int) -> FeatureData:
    fid = int(record["id"])
    top = record["top"]
    explain = top[0::2][:explain_top]
    if kind == "sae":
        explain = explain + _round_robin(record.get("quantiles") or [], explain_quantile)
    held_top = top[1::2][:score_top]
    order = list(range(len(windows)))
    random.Random(seed * 1_000_003 + fid).shuffle(order)
    drawn = [trim(window_context(windows[i], fid), before, after) for i in order]
    negatives = [c for c in drawn if not any(a > 0 for a in c["acts"])]  # quiet where the judge looks
    cut = [trim(c, before, after) for c in explain]
    max_act = float(record["max_act"] or 0.0)
    if not max_act > 0:
        max_act = max((a for c in top for a in c["acts"]), default=0.0)
    return FeatureData(fid, kind, max_act, cut, [trim(c, before, after) for c in held_top],
                       drawn[:score_random], negatives[:max(score_top, score_random)])
