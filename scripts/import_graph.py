"""The import graph of ranklens' packages, and the arrows that run up the layering.

    python scripts/import_graph.py            # edges with counts, then any upward arrow; exit 1 if there is one
    python scripts/import_graph.py --dot      # the same graph in Graphviz dot

A package is a subpackage of `ranklens` (`ranklens.lm`, `ranklens.train`, ...) or a top-level module
(`ranklens.errors`, ...). Every `import` counts, including those inside functions (lazy imports keep a startup
fast, they do not change who depends on whom). LAYERS lists the packages from the floor up; an import is allowed
only from a package to one strictly lower (or within the same package).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "ranklens"

# From the floor up. Packages on one line do not import each other.
LAYERS: list[list[str]] = [
    ["errors", "allocator", "version", "progress"],
    ["io", "linalg", "config", "lock"],
    ["rundir", "tensor_tree"],
    ["distributed"],
    ["lm"],
    ["data"],
    ["dictionaries"],
    ["eval", "report"],
    ["train", "spectrum", "analysis"],
    ["dashboard"],
    ["autointerp"],  # reads the dashboard's scan from its site and writes its results back into it
    ["reproduce", "api"],
    ["cli"],
    ["__main__", "__init__"],
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_packages(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
            if node.module == "ranklens":  # `from ranklens import x`: a module, or a name of the package itself
                names = [f"ranklens.{a.name}" if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").exists()
                         else "ranklens.__init__" for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "ranklens":
                found.append(parts[1] if len(parts) > 1 else "__init__")
    return found


def edges() -> Counter[tuple[str, str]]:
    counts: Counter[tuple[str, str]] = Counter()
    for path in sorted(ROOT.rglob("*.py")):
        src = package_of(path)
        for dst in imported_packages(path):
            if dst != src:
                counts[(src, dst)] += 1
    return counts


def upward(counts: Counter[tuple[str, str]]) -> list[tuple[str, str, int]]:
    bad = []
    for (src, dst), n in sorted(counts.items()):
        if src not in LEVEL or dst not in LEVEL or LEVEL[dst] >= LEVEL[src]:
            bad.append((src, dst, n))
    return bad


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dot", action="store_true", help="print Graphviz dot instead of a list")
    args = parser.parse_args()
    counts = edges()
    bad = upward(counts)
    if args.dot:
        print("digraph ranklens {\n  rankdir=BT;")
        for (src, dst), n in sorted(counts.items()):
            colour = ' color="red"' if (src, dst, n) in bad else ""
            print(f'  "{src}" -> "{dst}" [label="{n}"{colour}];')
        print("}")
        return 1 if bad else 0
    for level, names in enumerate(LAYERS):
        present = [n for n in names if (ROOT / n).is_dir() or (ROOT / f"{n}.py").exists()]
        if present:
            print(f"layer {level}: {', '.join(present)}")
    print()
    for (src, dst), n in sorted(counts.items()):
        print(f"{src} -> {dst} ({n})")
    print()
    if bad:
        for src, dst, n in bad:
            where = "unknown package" if src not in LEVEL or dst not in LEVEL else "runs up the layering"
            print(f"UPWARD: {src} -> {dst} ({n} imports): {where}")
        return 1
    print("no arrow runs from a lower package to a higher one")
    return 0


if __name__ == "__main__":
    sys.exit(main())
