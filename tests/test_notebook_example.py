"""The notebook example in docs/ runs as a script on the embedded model (what a new user copies first)."""

import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "quickstart.py"


@pytest.mark.slow
def test_quickstart_runs(capsys):
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    assert "L15.attn_out: erank" in out and "held-out FVU" in out and "Lorsa: 576 heads" in out
