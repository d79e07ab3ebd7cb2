"""Small helpers the experiment sections share when writing the report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ranklens.report.html import Report
from ranklens.reproduce.verdicts import Verdict


def add_figure(rep: Report, draw: Callable[..., Path], args: tuple, path: Path, caption: str) -> None:
    """Draw a figure and embed it; when the data cannot make it, say why instead."""
    try:
        png = draw(*args, path)
    except ValueError as exc:
        rep.paragraph(f"Figure omitted ({path.name}): {exc}")
        return
    rep.figure(png, caption)


def verdict_blocks(rep: Report, found: list[Verdict]) -> None:
    for v in found:
        rep.verdict(v.claim, v.verdict, v.statistic)
