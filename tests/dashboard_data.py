"""Deterministic synthetic dashboard data (SAE and Lorsa) in the contract of docs/dashboard.md.

Used by the dashboard tests and by scripts/dashboard_screenshots.py. Every value derives from (seed, feature id), so
a record can be regenerated on its own (``record(fid)``) and ``features()`` streams them without holding them all.
Feature 0 is always alive and its first top context holds the awkward tokens (markup, newline, tab, spaces, a
zero-width space, non-ASCII): the page must show all of them as text; its second starts with a null token (a
position outside the document). A few values are NaN or infinite on purpose
(the writer turns them into null).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

_WORDS_TEXT = ("the of and to in is was for that with as on by at from his her an be it are which this or had not but "
               "were have they one all their has been its who would more there when can into than two other first time "
               "after some also new these may only most over such made any where then about between during out through "
               "state year city under while cat sat mat dog ran model token layer head attention sparse feature "
               "value matrix vector rank space subspace learning paper result table figure number system data")
WORDS = tuple(dict.fromkeys(_WORDS_TEXT.split()))
PUNCT = (".", ",", ";", ":", "(", ")", "\"", "'", "-", "?", "!", "\n", "\n\n", " ", "  ", "\t", "0", "1", "2019",
         "def", "return", "=", "==", "{", "}", "[", "]", "->", "的", "是", "中文", "é", "naïve", "🙂")
AWKWARD = ("<script>window.__xss=1</script>", "\n", " ", "\t", "&amp;", "<b>bold</b>", "\u200b", "é", "  x  ",
           "\r\n", "a\u0000b")


def _vocab() -> list[str]:
    words = [" " + w for w in WORDS] + [w.capitalize() for w in WORDS[:40]] + list(WORDS[:30])
    return words + list(PUNCT)


VOCAB = _vocab()
_VOCAB_ARR = np.array(VOCAB, dtype=object)
_ZIPF = 1.0 / np.arange(1, len(VOCAB) + 1) ** 0.9
_ZIPF /= _ZIPF.sum()


class SyntheticDashboard:
    """A synthetic dictionary: ``meta()``, ``index_rows()``, ``features()`` (a generator) and ``record(fid)``.

    ``quantiles`` intervals with ``examples`` contexts each; ``skip_records`` ids get an index row but no record.
    """

    def __init__(self, kind: str = "sae", n_features: int = 200, *, n_top: int = 20, ctx_len: int = 32,
                 quantiles: int = 4, examples: int = 3, seed: int = 0, dead_every: int = 17,
                 skip_records: frozenset[int] = frozenset(), heads_per_group: int = 8, n_orig_heads: int = 9,
                 title: str | None = None) -> None:
        if kind not in ("sae", "lorsa"):
            raise ValueError(kind)
        self.kind, self.n, self.n_top, self.ctx_len = kind, n_features, n_top, ctx_len
        self.quantiles, self.examples, self.seed = quantiles, examples, seed
        self.dead_every, self.skip = dead_every, skip_records
        self.heads_per_group, self.n_orig_heads = heads_per_group, n_orig_heads
        self.title = title or (f"Lorsa L3 synthetic ({n_features} heads)" if kind == "lorsa"
                               else f"SAE L3.attn_out synthetic ({n_features} features)")

    # ----------------------------------------------------------------- per-feature summary

    def is_dead(self, fid: int) -> bool:
        return fid != 0 and self.dead_every > 0 and fid % self.dead_every == self.dead_every - 1

    def summary(self, fid: int) -> dict:
        rng = np.random.default_rng([self.seed, fid, 0])
        dead = self.is_dead(fid)
        density = 0.0 if dead else float(10 ** rng.uniform(-5.5, -1.0))
        max_act = 0.0 if dead else float(rng.gamma(3.0, 2.0) + 0.5)
        mean_act = float("nan") if dead else max_act * float(rng.uniform(0.15, 0.5))
        tops = [VOCAB[i] for i in rng.choice(len(VOCAB), size=5, replace=False, p=_ZIPF)]
        if fid == 0:
            tops = [AWKWARD[0], " cat", "\n", " mat", " sat"]
        row = {"id": fid, "density": density, "mean_act": mean_act, "max_act": max_act, "alive": not dead,
               "subspace_share": float(rng.beta(4, 2)), "top_tokens": [] if dead else tops}
        if self.kind == "lorsa":
            row["qk_group"] = fid // self.heads_per_group
        return row

    def meta(self) -> dict:
        n_dead = sum(1 for f in range(self.n) if self.is_dead(f))
        densities = np.array([self.summary(f)["density"] for f in range(self.n)]) if self.n <= 5000 else None
        meta = {
            "format": "ranklens.dashboard/1", "kind": self.kind, "title": self.title, "model": "smollm2-135m",
            "n_features": self.n, "d": 576, "corpus": "prose", "tokens": 1_000_000,
            "dead_definition": "a feature is dead when it fired on none of the 1,000,000 held-out tokens",
            "n_dead": n_dead, "subspace_dim": 64,
            "logit_note": "Logit effects are W_U applied to the decoder direction after the final RMSNorm's "
                          "weight (the norm's scale taken as 1).",
            "metrics": {"fvu": 0.123456789, "l0": 32.0, "dead_share": n_dead / max(self.n, 1),
                        "spliced_loss_delta": 0.0421, "nan_metric": float("nan"), "inf_metric": float("inf"),
                        "optimizer": "sparseadam", "k": 32},
            "built": "2026-01-02T03:04:05+00:00", "source": f"runs/synthetic-{self.kind}",
        }
        if self.kind == "lorsa":
            meta["layer"] = 3
        else:
            meta["site"] = "L3.attn_out"
        if densities is not None:  # big dictionaries: let the writer compute it
            pos = densities[densities > 0]
            counts, edges = np.histogram(np.log10(pos), bins=30, range=(-6, 0))
            meta["density_histogram"] = {"edges": edges.tolist(), "counts": counts.tolist()}
        return meta

    def index_rows(self) -> list[dict]:
        return [self.summary(f) for f in range(self.n)]

    # ----------------------------------------------------------------- records

    def _context(self, rng: np.random.Generator, peak_token: str, peak_act: float, doc: int) -> dict:
        n = self.ctx_len
        toks = _VOCAB_ARR[rng.choice(len(VOCAB), size=n, p=_ZIPF)].tolist()
        peak = int(n - 1 - rng.integers(0, min(5, n)))
        toks[peak] = peak_token
        acts = np.zeros(n)
        others = rng.choice(n, size=min(3, n), replace=False)
        acts[others] = rng.uniform(0.05, 0.6, size=len(others)) * peak_act
        acts[peak] = peak_act
        ctx = {"tokens": toks, "acts": acts.tolist(), "peak": peak, "doc": doc, "pos": int(rng.integers(0, 1000))}
        if self.kind == "lorsa":
            z = np.zeros(n)
            src = np.arange(peak + 1)
            w = rng.dirichlet(np.full(len(src), 0.3)) * peak_act
            z[src] = w
            z[rng.choice(src)] *= -0.5  # a negative contribution
            ctx["z"] = z.tolist()
        return ctx

    def record(self, fid: int) -> dict:
        s = self.summary(fid)
        rng = np.random.default_rng([self.seed, fid, 1])
        dead = not s["alive"]
        rec = {k: s[k] for k in ("id", "density", "mean_act", "max_act", "alive", "subspace_share")}
        top, quantiles = [], []
        if not dead:
            peaks = np.sort(rng.uniform(0.3, 1.0, size=self.n_top))[::-1] * s["max_act"]
            peaks[0] = s["max_act"]
            for i, pa in enumerate(peaks):
                top.append(self._context(rng, s["top_tokens"][i % len(s["top_tokens"])], float(pa),
                                         int(rng.integers(0, 5000))))
            if fid == 0 and top:
                ctx = top[0]
                for j, tok in enumerate(AWKWARD[: self.ctx_len]):
                    if j != ctx["peak"]:
                        ctx["tokens"][j] = tok
                if len(top) > 1:  # a position before the document's start
                    top[1]["tokens"][0], top[1]["acts"][0] = None, 0.0
            bounds = np.linspace(0, s["max_act"], self.quantiles + 1)
            for q in range(self.quantiles):
                lo, hi = float(bounds[q]), float(bounds[q + 1])
                quantiles.append({"label": f"interval {q + 1} of {self.quantiles}", "range": [lo, hi],
                                  "count": int(rng.integers(1, 10_000)),
                                  "examples": [self._context(rng, s["top_tokens"][0], float(rng.uniform(lo, hi)),
                                                             int(rng.integers(0, 5000)))
                                               for _ in range(self.examples)]})
        counts = rng.integers(0, 400, size=30)
        rec["act_histogram"] = None if dead else {"edges": np.linspace(0, s["max_act"], 31).tolist(),
                                                  "counts": counts.tolist()}
        rec["top"], rec["quantiles"] = top, quantiles
        promoted = [[VOCAB[i], float(v)] for i, v in zip(rng.choice(len(VOCAB), 10, replace=False),
                                                          np.sort(rng.uniform(0.5, 3.0, 10))[::-1], strict=True)]
        suppressed = [[VOCAB[i], float(v)] for i, v in zip(rng.choice(len(VOCAB), 10, replace=False),
                                                            np.sort(rng.uniform(-3.0, -0.5, 10)), strict=True)]
        if fid == 0:
            promoted[0][0] = "<img src=x onerror=window.__xss=2>"
        rec["logits"] = {"promoted": promoted, "suppressed": suppressed,
                         "histogram": {"edges": np.linspace(-3, 3, 41).tolist(),
                                       "counts": np.round(4000 * np.exp(-np.linspace(-3, 3, 40) ** 2)).astype(int)
                                       .tolist()}}
        nb = rng.choice(self.n, size=min(8, self.n), replace=False)
        rec["neighbours"] = [[int(i), float(c)] for i, c in zip(nb, np.sort(rng.uniform(0.1, 0.9, len(nb)))[::-1],
                                                                strict=True)]
        if self.kind == "lorsa":
            share = rng.dirichlet(np.full(self.n_orig_heads, 0.4))
            order = np.argsort(-share)
            cum = np.cumsum(share[order])
            rec["lorsa"] = {"qk_group": s["qk_group"],
                            "attribution": [[f"L3.H{int(h)}", float(share[h])] for h in order[:6]],
                            "heads_for_90pct": int(np.searchsorted(cum, 0.9) + 1)}
        return rec

    def features(self) -> Iterator[dict]:
        for fid in range(self.n):
            if fid not in self.skip:
                yield self.record(fid)


def synthetic_compare(n_a: int = 300, n_b: int = 280, *, seed: int = 0, site_href_a: str | None = None,
                      site_href_b: str | None = None) -> dict:
    """Comparison data of two synthetic runs (``write_compare``'s input)."""
    rng = np.random.default_rng([seed, 99])

    def run(title: str, n: int, href: str | None, shift: float) -> dict:
        counts, edges = np.histogram(rng.normal(-3.2 + shift, 0.8, size=n), bins=30, range=(-6, 0))
        sc, se = np.histogram(rng.beta(4 + shift * 4, 2, size=n), bins=20, range=(0, 1))
        out = {"title": title, "n_features": n, "n_dead": int(n * (0.08 - shift * 0.05)),
               "density_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
               "subspace_histogram": {"edges": se.tolist(), "counts": sc.tolist()}}
        if href is not None:
            out["site_href"] = href
        return out

    cos = rng.beta(5, 2, size=n_a)
    best = rng.integers(0, n_b, size=n_a)
    cc, ce = np.histogram(cos, bins=25, range=(0, 1))
    pairs = [[a, int(b), float(c)] for a, (b, c) in enumerate(zip(best, cos, strict=True))]
    pairs[1][1] = None  # a feature of A without a match
    pairs[2][2] = float("nan")
    return {"a": run("SAE TopK (A)", n_a, site_href_a, 0.0), "b": run("SAE ASI (B)", n_b, site_href_b, 0.3),
            "cosine_histogram": {"edges": ce.tolist(), "counts": cc.tolist()}, "pairs": pairs}
