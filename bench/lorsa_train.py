"""Lorsa training throughput and memory: ranklens' grouped Lorsa against a naive per-head reference, same weights and
same batches, at H = 8 x d_model on SmolLM2-135M.

    .venv/bin/python bench/lorsa_train.py                 # H 4608, G 72, K 32, sequences of 256 tokens (~15 min here)
    .venv/bin/python bench/lorsa_train.py --quick         # tiny sizes: checks that the script and the reference agree

What is compared (the issue's "attention computed once per QK group, never one call per head"):

- grouped (ranklens): ``Trainer._one_step`` with ``LorsaObjective`` and Adam, i.e. exactly a training step of
  ``ranklens train lorsa``: zero_grad, Lorsa.encode (per QK group one q/k projection and ONE scaled-dot-product
  attention call for all groups, whose value dimension holds the group's heads; top-K by z ||w_o||), the
  embedding_bag decoder, the FVU loss over ordinary tokens, backward, Adam.step, the firing tracker. In fp32 and with
  bf16 autocast (``--train-dtype bfloat16`` of the job).
- naive (written here): Algorithm 1 of the Lorsa paper head by head. q and k are computed once per QK group (so the
  reference is not charged for recomputing shared projections), then for every head its scalar values v^h = x w_v^h
  and ONE attention call per head: ``naive-sdpa`` uses F.scaled_dot_product_attention(q, k, v^h, is_causal=True),
  ``naive-math`` the explicit softmax(q k^T * scale + causal mask) v^h. Then ReLU, top-K by z ||w_o||, a dense decode,
  the same FVU loss, backward, torch.optim.Adam.step. fp32.

Both start from the same weights (ranklens' App. O.2 init with the MHSA's Q/K and RoPE) and see the same batch of real
SmolLM2 layer-15 attention inputs/outputs (whole sequences of ``--seq`` tokens, bos excluded from the loss, no
padding). Before timing, the script checks that the naive forward equals ranklens' (outputs to 1e-4 relative).

Timing: every (variant, batch) cell runs in its own fresh subprocess (so peak memory is its own): ``--warmup`` untimed
full steps (grouped cells only; a naive step takes minutes), then ``--steps`` (naive: ``--naive-steps``) timed steps;
``--rounds`` rounds with the cells in rotated order (ABC, BCA, ...), so drifting load hits all alike; medians over all
timed steps. tokens/s = loss tokens per step / median step wall time.

Memory per token: each cell first runs one step on 8 positions per sequence (loading the kernels and allocating the
gradients and Adam's moments), then resets the kernel's RSS high-water mark (/proc/self/clear_refs); the peak RSS of
the first full step above the RSS before it, divided by the tokens of a step, is the transient memory (activations,
attention, temporaries) a token costs during training (later steps reuse what the allocator kept).

The JSON (bench/results/lorsa_train.json) records the 1-minute load average before and after, and the cores each
cell actually got (process CPU time / wall time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "results" / "lorsa_train.json"


# ------------------------------------------------------------------------------------------------------------- setup


def prepare(args: argparse.Namespace, path: Path) -> dict:
    """Capture real attention inputs/outputs of full-length sequences and save them with the Lorsa config."""
    from ranklens.data.corpus import iter_documents
    from ranklens.data.tokenize import token_sequences
    from ranklens.dictionaries.lorsa import LorsaConfig
    from ranklens.lm.attention import mhsa_weights
    from ranklens.lm.capture import capture
    from ranklens.lm.load import load_model

    lm = load_model(args.model, "float32")
    w = mhsa_weights(lm.model, args.layer)
    seqs = []
    for ids, _ in token_sequences(iter_documents("default", seed=0), lm.tokenizer, args.seq):
        if len(ids) == args.seq:
            seqs.append(ids)
        if len(seqs) == max(args.batches):
            break
    ids = torch.tensor(seqs)
    acts = capture(lm.model, f"L{args.layer}.attn_in,L{args.layer}.attn_out", ids)
    heads = args.heads or 8 * w.d_model
    groups = args.groups or 8 * w.n_heads
    cfg = LorsaConfig.from_mhsa(w, n_heads=heads, n_qk_groups=groups, k=args.k, dtype=torch.float32)
    torch.save({"x": acts[f"L{args.layer}.attn_in"], "y": acts[f"L{args.layer}.attn_out"], "cfg": cfg.to_dict(),
                "w": w}, path)
    return {"model": args.model, "layer": args.layer, "d_model": w.d_model, "heads": heads, "qk_groups": groups,
            "d_qk": cfg.d_qk, "k": args.k, "seq": args.seq}


def build(data: dict, seed: int = 0):
    from ranklens.dictionaries.lorsa import Lorsa, LorsaConfig
    from ranklens.dictionaries.lorsa_init import init_default_, init_qk_from_mhsa_

    lorsa = Lorsa(LorsaConfig.from_dict(data["cfg"]))
    init_default_(lorsa, torch.Generator().manual_seed(seed))
    init_qk_from_mhsa_(lorsa, data["w"].to(dtype=torch.float32))
    with torch.no_grad():  # a trained-like scale, so heads fire and the top-K is not decided by ties at zero
        lorsa.W_V.mul_(8.0)
    return lorsa


def batch_of(data: dict, n_seq: int, positions: int | None = None):
    from ranklens.data.sequences import LorsaBatch

    x, y = data["x"][:n_seq, :positions].contiguous(), data["y"][:n_seq, :positions].contiguous()
    real = torch.ones(x.shape[:2], dtype=torch.bool)
    stat = real.clone()
    stat[:, 0] = False  # bos
    return LorsaBatch(x, y, real, stat)


# ---------------------------------------------------------------------------------------------- the naive reference


class NaiveLorsa(torch.nn.Module):
    """Algorithm 1 of the Lorsa paper, one attention call per head (q/k computed once per QK group)."""

    def __init__(self, lorsa, attention: str) -> None:
        super().__init__()
        self.cfg = lorsa.cfg
        self.attention = attention
        for name, p in lorsa.named_parameters():
            setattr(self, name, torch.nn.Parameter(p.detach().clone()))
        self.inv_freq = lorsa.rope_inv_freq

    def _rope(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        rd = cos.shape[-1]
        rot, rest = t[..., :rd], t[..., rd:]
        half = torch.cat((-rot[..., rd // 2 :], rot[..., : rd // 2]), -1)
        return torch.cat((rot * cos + half * sin, rest), -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        B, T, _ = x.shape
        n = c.n_heads // c.n_qk_groups
        ang = torch.arange(T, dtype=torch.float32)[:, None] * self.inv_freq[None]
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos() * c.positions.attention_scaling, ang.sin() * c.positions.attention_scaling
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        zs = []
        for g in range(c.n_qk_groups):
            q = self._rope(x @ self.W_Q[g].T + self.b_Q[g], cos, sin)[:, None]  # [B, 1, T, dqk]
            k = self._rope(x @ self.W_K[g].T + self.b_K[g], cos, sin)[:, None]
            for h in range(g * n, (g + 1) * n):
                v = (x @ self.W_V[h] + self.b_V[h])[:, None, :, None]  # [B, 1, T, 1]
                if self.attention == "sdpa":
                    z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=c.attn_scale)
                else:
                    s = (q @ k.mT * c.attn_scale).masked_fill(~causal, -math.inf)
                    z = torch.softmax(s, -1) @ v
                zs.append(z[:, 0, :, 0])
        z = torch.relu(torch.stack(zs, -1))  # [B, T, H]
        score = z.detach() * self.W_O.detach().norm(dim=1)
        idx = score.topk(c.k, dim=-1).indices
        code = torch.zeros_like(z).scatter(-1, idx, z.gather(-1, idx))
        return code @ self.W_O + self.b_O


def naive_step(model: NaiveLorsa, optimizer: torch.optim.Optimizer, batch) -> None:
    optimizer.zero_grad(set_to_none=True)
    out = model(batch.x)
    sel = batch.stat_mask
    y, y_hat = batch.target[sel], out[sel]
    loss = (y_hat - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    loss.backward()
    optimizer.step()


# ------------------------------------------------------------------------------------------------------ the cells


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak_rss() -> int:
    """Reset the kernel's resident-set high-water mark (VmHWM) to the current RSS; returns the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kib("VmHWM") * 1024


def child(args: argparse.Namespace) -> None:
    """One cell in a fresh process: build, run warm-up and timed steps, print a JSON line."""
    from ranklens.train.lorsa_objective import LorsaObjective
    from ranklens.train.trainer import Trainer, TrainSettings

    if args.threads:
        torch.set_num_threads(args.threads)
    data = torch.load(args.data, weights_only=False)
    batch, tiny = batch_of(data, args.n_seq), batch_of(data, args.n_seq, 8)
    lorsa = build(data)
    n_params = sum(p.numel() for p in lorsa.parameters())
    if args.variant.startswith("grouped"):
        autocast = torch.bfloat16 if args.variant.endswith("bf16") else None
        settings = TrainSettings(total_steps=10**6, lr=2e-4, warmup_steps=0, k=lorsa.cfg.k, checkpoint_every=10**9,
                                 log_every=10**9)
        trainer = Trainer(LorsaObjective(lorsa, autocast_dtype=autocast), settings, Path(args.tmp), progress=False)

        def step(b) -> None:
            trainer._one_step(b)
    else:
        model = NaiveLorsa(lorsa, args.variant.removeprefix("naive-"))
        del lorsa
        optimizer = torch.optim.Adam(model.parameters(), lr=2e-4)

        def step(b) -> None:
            naive_step(model, optimizer, b)

    # A first step on 8 positions per sequence loads the kernels and allocates gradients and Adam's moments, so that
    # the peak of the first full step is that step's own transient memory (activations, attention, temporaries);
    # later steps reuse memory the allocator kept, so only the first full step is measured.
    step(tiny)
    before = reset_peak_rss()
    times, cpu, peak = [], [], None
    for i in range(args.warmup + args.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        step(batch)
        t1, c1 = time.perf_counter(), time.process_time()
        peak = peak_rss() - before if peak is None else peak
        if i >= args.warmup:
            times.append(t1 - t0)
            cpu.append(c1 - c0)
    print(json.dumps({"times": times, "cpu": cpu, "tokens": batch.n_tokens, "peak_delta": peak, "n_params": n_params}))


def run_cell(args: argparse.Namespace, data: Path, variant: str, n_seq: int, steps: int, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, __file__, "--child", variant, "--data", str(data), "--n-seq", str(n_seq),
               "--steps", str(steps), "--warmup", str(warmup), "--tmp", tmp, "--threads", str(args.threads or 0)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_agreement(data_path: Path) -> float:
    """Max relative difference between the naive and the grouped forward on one sequence."""
    data = torch.load(data_path, weights_only=False)
    lorsa = build(data)
    batch = batch_of(data, 1)
    with torch.no_grad():
        ours = lorsa(batch.x).out
        ref = NaiveLorsa(lorsa, "math")(batch.x)
    return float((ours - ref).abs().max() / ref.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=15)
    parser.add_argument("--heads", type=int, default=None, help="default 8 x d_model")
    parser.add_argument("--groups", type=int, default=None, help="default 8 x the MHSA's heads")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16],
                        help="sequences per step: the naive cells use the first, grouped cells every one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per grouped cell")
    parser.add_argument("--naive-steps", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--naive", nargs="*", default=["math", "sdpa"], help="naive attention variants to time")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every cell (default torch's; 1 keeps cells stable when another job "
                             "holds a core)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON results (an entry per --threads)")
    # child mode
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-seq", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.variant = args.child
        child(args)
        return
    if args.quick:
        args.heads, args.groups, args.seq, args.batches, args.rounds, args.steps = 576, 18, 64, [1, 2], 1, 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data.pt"
        setup = prepare(args, data)
        agreement = check_agreement(data)
        print(f"setup {setup}; naive vs grouped forward, max relative difference {agreement:.2e}", flush=True)
        if agreement > 1e-4:
            raise SystemExit("the naive reference disagrees with ranklens' Lorsa; not timing")
        small = args.batches[0]
        cells = [(f"naive-{a}", small) for a in args.naive]
        cells += [(v, b) for b in args.batches for v in ("grouped-fp32", "grouped-bf16")]
        results: dict[tuple[str, int], list[dict]] = {c: [] for c in cells}
        for r in range(args.rounds):
            order = cells[r % len(cells):] + cells[: r % len(cells)]
            for variant, n_seq in order:
                naive = variant.startswith("naive")
                res = run_cell(args, data, variant, n_seq, args.naive_steps if naive else args.steps,
                               0 if naive else args.warmup)
                results[(variant, n_seq)].append(res)
                print(f"round {r} {variant:>13} x{n_seq:<3} {res['tokens']:>6} tokens: "
                      f"{statistics.median(res['times']):8.3f} s/step, load {os.getloadavg()[0]:.2f}", flush=True)
    rows = []
    for (variant, n_seq), runs in results.items():
        times = list(itertools.chain.from_iterable(r["times"] for r in runs))
        cpu = list(itertools.chain.from_iterable(r["cpu"] for r in runs))
        tokens = runs[0]["tokens"]
        peak = statistics.median(r["peak_delta"] for r in runs)
        rows.append({"variant": variant, "sequences": n_seq, "tokens_per_step": tokens,
                     "median_step_seconds": statistics.median(times), "step_seconds": times,
                     "tokens_per_second": tokens / statistics.median(times),
                     "cores_used": sum(cpu) / sum(times),
                     "peak_rss_delta_mb": peak / 2**20,
                     "activation_bytes_per_token": peak / tokens,
                     "n_params": runs[0]["n_params"]})
    by = {(r["variant"], r["sequences"]): r for r in rows}
    ratios = {f"grouped-fp32_vs_{v}": by[("grouped-fp32", small)]["tokens_per_second"] / by[(v, small)][
        "tokens_per_second"] for v, _ in cells if v.startswith("naive")}
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "setup": setup, "agreement_max_rel_diff": agreement,
              "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
              "machine": platform.processor(),
              "load_before": load_before, "load_after": os.getloadavg(), "rounds": args.rounds,
              "ratios_same_batch": ratios, "rows": rows}
    print("| variant | seqs x tokens | tokens/step | s/step | tokens/s | cores | activation bytes/token |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['sequences']} x {args.seq} | {r['tokens_per_step']} | "
              f"{r['median_step_seconds']:.3f} | {r['tokens_per_second']:.0f} | {r['cores_used']:.2f} | "
              f"{r['activation_bytes_per_token'] / 1024:.0f} KiB |")
    print(json.dumps(ratios, indent=1))
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        entries = json.loads(args.out.read_text()) if args.out.exists() else {}
        entries[f"threads={report['threads']}"] = report
        args.out.write_text(json.dumps(entries, indent=1) + "\n")
        print(f"written to {args.out}")


if __name__ == "__main__":
    main()
