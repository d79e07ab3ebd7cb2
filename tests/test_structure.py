"""The layering of the packages holds: no import runs from a lower package to a higher one
(`scripts/import_graph.py`, the command the README gives for the graph)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_upward_imports():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "import_graph.py")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "no arrow runs from a lower package to a higher one" in done.stdout
    assert "linalg -> " not in done.stdout.replace("linalg -> errors", "")  # the floor imports only errors
