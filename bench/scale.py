"""Scale-out on the embedded SmolLM2, as ratios measured in the same run.

(a) k SAEs on k sites from one forward per batch (`train sae --sites`, on the fly) against k separate single-site
    runs over the same tokens: wall time of the group over the sum of the k runs, for k = 1, 4, 16, 30.
(b) 2 torchrun ranks of 1 thread each (data parallel, from one store) against 1 process of 2 threads, same SAE and
    tokens: the ratio of their training throughputs (tokens/s from metrics.jsonl).
(c) peak memory (max RSS) per rank with the dictionary sharded by feature over 2 ranks against one process.

Usage: python bench/scale.py [--tokens 65536] [--parts a,b,c] [--a-sites 1,4,16,30] [--a-tokens N]
       [--out bench/results/scale.json]   (runs c, then a, then b)
Each part runs the `ranklens` command line in subprocesses (nothing is shared between variants); the results file is
rewritten after every measurement, so an interrupted run keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANKLENS = [sys.executable, "-m", "ranklens.cli"]
COMMON = ["--model", "smollm2-135m", "--expansion", "4", "--k", "32", "--batch-size", "1024", "--warmup-steps", "1",
          "--eval-tokens", "2048", "--lm-eval-tokens", "0", "--checkpoint-every", "100000", "--quiet"]


# Runs a command and prints the peak RSS of its largest process (torchrun's ranks included) as its last stderr line.
# A fresh process per command: this process's own RUSAGE_CHILDREN maximum only ever grows.
PEAK = [sys.executable, "-c", "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)"]


def run(cmd: list[str], threads: int) -> tuple[float, int]:
    """(wall seconds, peak RSS of the command's largest process in KiB) of a command."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run([*PEAK, *cmd], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, int(done.stderr.strip().splitlines()[-1])


def part_a(tmp: Path, tokens: int, ks: list[int], save) -> dict:
    out: dict = {}
    for k in ks:
        layers = sorted({round(i * 29 / max(k - 1, 1)) for i in range(k)}) if k > 1 else [15]
        sites = ",".join(f"L{layer}.attn_out" for layer in layers)
        group, _ = run([*RANKLENS, "train", "sae", "--source", "stream", "--sites", sites, "--tokens", str(tokens),
                        "--stream-chunk-tokens", str(tokens), *COMMON, "--out", str(tmp / f"group{k}")], 2)
        alone = 0.0
        for layer in layers:
            seconds, _ = run([*RANKLENS, "train", "sae", "--source", "stream", "--site", f"L{layer}.attn_out",
                              "--tokens", str(tokens), "--stream-chunk-tokens", str(tokens), *COMMON, "--out",
                              str(tmp / f"alone{k}-{layer}")], 2)
            alone += seconds
        out[str(k)] = {"sites": len(layers), "group_seconds": round(group, 1), "separate_seconds": round(alone, 1),
                       "speedup": round(alone / group, 2)}
        print(f"(a) k = {len(layers)}: one forward {group:.1f} s, separate runs {alone:.1f} s, "
              f"speedup {alone / group:.2f}x", flush=True)
        save(out)
    return out


def _throughput(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["tokens_per_second"]


def part_b(tmp: Path, tokens: int, store: Path) -> dict:
    args = ["train", "sae", "--site", "L15.attn_out", "--store", str(store), "--tokens", str(tokens), *COMMON,
            "--log-every", "8"]
    run([*RANKLENS, *args, "--out", str(tmp / "b-one")], 2)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ranklens.cli",
         *args, "--out", str(tmp / "b-two")], 1)
    one, two = _throughput(tmp / "b-one"), _throughput(tmp / "b-two")
    print(f"(b) 2 ranks x 1 thread {two:,.0f} tok/s, 1 process x 2 threads {one:,.0f} tok/s: {two / one:.2f}",
          flush=True)
    return {"one_process_tokens_per_second": round(one), "two_ranks_tokens_per_second": round(two),
            "ratio": round(two / one, 3)}


def part_c(tmp: Path, tokens: int, store: Path) -> dict:
    args = ["train", "sae", "--site", "L15.attn_out", "--store", str(store), "--tokens", str(tokens), *COMMON,
            "--expansion", "64", "--batch-size", "1024"]
    _, rss_one = run([*RANKLENS, *args, "--out", str(tmp / "c-one")], 2)
    _, rss_two = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                      "ranklens.cli", *args, "--shards", "2", "--out", str(tmp / "c-two")], 1)
    print(f"(c) peak RSS: one process {rss_one / 1024:.0f} MiB, largest of 2 sharded ranks {rss_two / 1024:.0f} MiB",
          flush=True)
    return {"one_process_peak_mib": round(rss_one / 1024), "sharded_rank_peak_mib": round(rss_two / 1024),
            "note": "RUSAGE_CHILDREN max RSS: the largest single process of the command (the torchrun agent "
                    "included); each includes the model and the data"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65_536)
    parser.add_argument("--parts", default="a,b,c")
    parser.add_argument("--a-sites", default="1,4,16,30", help="part a: the numbers of sites")
    parser.add_argument("--a-tokens", type=int, default=None, help="part a: training tokens (default --tokens)")
    parser.add_argument("--out", default="bench/results/scale.json")
    args = parser.parse_args()
    results: dict = {"tokens": args.tokens, "a_tokens": args.a_tokens or args.tokens}

    def save(part_a: dict | None = None) -> None:
        if part_a is not None:
            results["a_sites_from_one_forward"] = part_a
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if {"b", "c"} & set(args.parts.split(",")):
            store = tmp / "store"
            run([*RANKLENS, "collect", "--model", "smollm2-135m", "--sites", "L15.attn_out", "--tokens",
                 str(args.tokens), "--quiet", "--out", str(store)], 2)
        if "c" in args.parts:
            results["c_feature_sharding_memory"] = part_c(tmp, args.tokens, store)
            save()
        if "a" in args.parts:
            part_a(tmp, args.a_tokens or args.tokens, [int(k) for k in args.a_sites.split(",")], save)
        if "b" in args.parts:
            results["b_data_parallel"] = part_b(tmp, args.tokens, store)
            save()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
