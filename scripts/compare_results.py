"""Every number of two `ranklens reproduce` results.json files, compared exactly (an older format is read through
today's reader, so renamed keys still pair up). Timings, throughputs and memory are left out.

    python scripts/compare_results.py OLD/results.json NEW/results.json     # exit 1 if a shared number differs

Used to check that a change of structure left the numbers alone: e.g. `reproduce --preset quick --experiments asi`
run on the tree before and after it.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from typing import Any

from ranklens.reproduce.results_format import read_results

SKIP = ("seconds", "wall", "time", "tokens_per_s", "throughput", "peak", "rss", "memory")


def numbers(x: Any, path: str = "") -> Iterator[tuple[str, float]]:
    if isinstance(x, dict):
        for k, v in x.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(x, int | float) and not isinstance(x, bool) and not any(s in path.lower() for s in SKIP):
        yield path, float(x)


def main() -> int:
    old, new = (dict(numbers(read_results(p)["steps"])) for p in sys.argv[1:3])
    shared = sorted(set(old) & set(new))
    differ = [k for k in shared if old[k] != new[k] and not (math.isnan(old[k]) and math.isnan(new[k]))]
    print(f"{len(shared)} numbers in both, {len(shared) - len(differ)} equal, {len(differ)} differ; "
          f"{len(set(old) - set(new))} only in the first, {len(set(new) - set(old))} only in the second")
    for k in differ[:20]:
        print(f"differs: {k}: {old[k]!r} -> {new[k]!r}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
