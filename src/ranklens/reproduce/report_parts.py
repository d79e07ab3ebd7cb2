"""Small helpers the experiment sections share when writing the report."""

from __future__ import annotations

from ranklens.report.html import Report
from ranklens.reproduce.verdicts import Verdict


def verdict_blocks(rep: Report, found: list[Verdict]) -> None:
    for v in found:
        rep.verdict(v.claim, v.verdict, v.statistic)
