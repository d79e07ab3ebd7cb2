"""`ranklens serve DIR`: the prompt box of a written dashboard, with the model and dictionary loaded once.

``make_analyzer(site_dir, cfg)`` reads the site's meta (which run it shows), opens that dictionary and its model,
and returns ``analyze(text)``: the text framed like training sequences (bos first), the site's activations in one
forward, the dictionary's code, and per token its top features (for a Lorsa: its top heads, each with its z pattern
over the prompt, Lorsa paper Section 4.1).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ranklens.dashboard.build import Vocabulary, open_dictionary
from ranklens.dashboard.config import DashboardConfig, ServeConfig
from ranklens.dashboard.server import read_site_meta, serve
from ranklens.data.sequences import lorsa_sites
from ranklens.data.tokenize import SpecialTokens
from ranklens.errors import RanklensError
from ranklens.lm.capture import Capturer
from ranklens.lm.load import max_positions


def make_analyzer(site_dir: str | Path, cfg: ServeConfig) -> Callable[[str], dict[str, Any]]:
    meta = read_site_meta(Path(site_dir))
    source = Path(meta["source"])
    if not source.exists():
        raise RanklensError(f"the dashboard in {str(site_dir)!r} was built from {str(source)!r}, which is gone; the "
                            "prompt box needs that dictionary")
    opened = open_dictionary(source, DashboardConfig(model=meta["model"], dtype=cfg.dtype, device=cfg.device,
                                                     site=meta.get("site"), corpus=meta["corpus"]))
    lm, dictionary = opened.lm, opened.dictionary
    special = SpecialTokens.from_tokenizer(lm.tokenizer)
    limit = max_positions(lm.name) or 4096
    vocab = Vocabulary(lm.tokenizer)
    site_in = lm.arch.site(lorsa_sites(opened.site.layer)[0]) if opened.kind == "lorsa" else opened.site
    capture = Capturer(lm.arch, [site_in])

    @torch.no_grad()
    def analyze(text: str) -> dict[str, Any]:
        body = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = [*special.prefix, *body, *special.suffix]
        if len(ids) > limit:
            raise RanklensError(f"the prompt is {len(ids)} tokens; {lm.name} takes at most {limit}")
        x = capture(torch.tensor([ids], device=lm.device))[site_in.name][0]
        ordinary = torch.tensor([i not in special.excluded for i in ids])
        if opened.kind == "sae":
            code = dictionary.encode(x.to(dictionary.W_D.dtype))
            dense = code.to_dense() if not code.is_sparse else torch.zeros(len(ids), dictionary.n_features).scatter(
                1, code.indices.cpu(), code.values.float().cpu())
            features = _top(dense.float().cpu(), ordinary, cfg.top_features)
            return {"tokens": vocab(ids), "features": features}
        out = dictionary(x[None].to(dictionary.W_V.dtype))
        values, indices = out.values[0].float().cpu(), out.indices[0].cpu()
        features, heads = [], []
        for i in range(len(ids)):
            pairs = [(int(h), float(v)) for v, h in zip(values[i], indices[i], strict=True) if v > 0 and ordinary[i]]
            pairs = sorted(pairs, key=lambda p: -p[1])[: cfg.top_features]
            features.append([[h, v] for h, v in pairs])
            if pairs:
                rows = dictionary.z_rows(x.to(dictionary.W_V.dtype), torch.tensor([h for h, _ in pairs]),
                                         torch.full((len(pairs),), i)).float().cpu()
                heads.append([{"id": h, "act": v, "z": row.tolist()} for (h, v), row in zip(pairs, rows, strict=True)])
            else:
                heads.append([])
        return {"tokens": vocab(ids), "features": features, "heads": heads}

    return analyze


def _top(dense: torch.Tensor, ordinary: torch.Tensor, n: int) -> list[list[list]]:
    values, indices = dense.topk(min(n, dense.shape[1]), dim=1)
    return [[[int(f), float(v)] for v, f in zip(values[i], indices[i], strict=True) if v > 0] if ordinary[i] else []
            for i in range(dense.shape[0])]


def serve_dashboard(site_dir: str | Path, cfg: ServeConfig) -> None:
    serve(site_dir, make_analyzer(site_dir, cfg), host=cfg.host, port=cfg.port, max_chars=cfg.max_chars)
