"""A small builder for self-contained HTML reports (one file, figures embedded as base64 PNG, no JS, no external links).

Every command that writes a report (``ranklens spectrum``, SAE and Lorsa training, ``reproduce``) builds it with
``Report``: add headings, paragraphs, tables, figures and verdicts in order, then ``write`` the file atomically::

    rep = Report("Spectrum of smollm2-135m")
    rep.heading("Findings")
    rep.paragraph("attention output has a lower effective rank than ...")
    rep.table(["site", "effective rank"], [["L15.attn_out", 312.4]])
    rep.figure(Path("figures/erank_by_layer.png"), "Effective rank fraction per layer")
    rep.write(run_dir / "report.html")

Text given to ``heading``, ``paragraph``, ``table``, ``code``, ``key_values`` and ``verdict`` is escaped; only ``html``
takes trusted markup. Numbers in tables are formatted by ``format_number``: integers with thousands separators, floats
with 4 significant digits (fixed notation from 1e-4 up to 1e15, thousands separators from 1e4).
"""

from __future__ import annotations

import base64
import html as _html
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import metadata
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from ranklens.io import atomic_write_bytes

__all__ = ["VERDICTS", "Report", "badge", "format_number", "format_value", "software_versions"]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
VERDICTS = ("holds", "does not hold", "inconclusive")

NumberFormat = str | Callable[[Any], str] | None

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #ccc;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.15em}
h3{font-size:1.1em;margin-top:1.4em}
nav.toc{background:#f6f6f6;border:1px solid #e0e0e0;padding:.4em 1em;font-size:.92em}
nav.toc ul{margin:.2em 0;padding-left:1.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
caption{caption-side:top;text-align:left;font-weight:600;padding:.3em 0}
th,td{border:1px solid #d0d0d0;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f0f0f0}
tr:nth-child(even) td{background:#fafafa}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1.2em 0}
figure img{max-width:100%;height:auto;border:1px solid #e4e4e4}
figcaption{font-size:.9em;color:#444;margin-top:.3em}
pre{background:#f6f6f6;border:1px solid #e0e0e0;padding:.6em;overflow-x:auto;font-size:.85em}
.verdict{margin:.5em 0;padding:.4em .7em;border-left:5px solid #999;background:#f7f7f7}
.verdict .badge{display:inline-block;font-weight:700;padding:0 .45em;border-radius:3px;color:#fff;margin:0 .3em}
.verdict.holds{border-color:#2e7d32}.verdict.holds .badge{background:#2e7d32}
.verdict.does-not-hold{border-color:#c62828}.verdict.does-not-hold .badge{background:#c62828}
.verdict.inconclusive{border-color:#b7791f}.verdict.inconclusive .badge{background:#b7791f}
.verdict .stat{color:#444;font-size:.92em}
span.badge{display:inline-block;font-weight:700;padding:0 .45em;border-radius:3px;color:#fff;white-space:nowrap}
span.badge.holds{background:#2e7d32}span.badge.does-not-hold{background:#c62828}
span.badge.inconclusive{background:#b7791f}
.counts span.badge{margin-right:.5em}
.caveat{margin:.8em 0;padding:.5em .8em;border:1px solid #e0b252;border-left:6px solid #b7791f;background:#fff8e6}
""".strip()


def _esc(text: Any) -> str:
    return _html.escape(str(text), quote=True)


# --------------------------------------------------------------------------- number formatting


def format_number(x: Any, sig: int = 4) -> str:
    """Format a number for a table: ints as ``1,234,567``; floats with ``sig`` significant digits.

    Floats with 1e-4 <= |x| < 1e15 use fixed notation (thousands separators from 1e4 up, trailing zeros dropped),
    smaller ones scientific (``4.9e-05``); NaN and infinities print as ``nan``, ``inf``, ``-inf``; bools as
    ``true``/``false``. Anything else is returned as ``str(x)``.
    """
    if isinstance(x, bool):
        return "true" if x else "false"
    if isinstance(x, Integral):
        return f"{int(x):,}"
    if not isinstance(x, Real):
        return str(x)
    v = float(x)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    mag = abs(v)
    if mag < 1e-4 or mag >= 1e15:
        return f"{v:.{sig - 1}e}"
    decimals = max(0, sig - 1 - math.floor(math.log10(mag)))
    text = f"{v:,.{decimals}f}" if mag >= 1e4 else f"{v:.{decimals}f}"
    if decimals > 0:
        text = text.rstrip("0").rstrip(".")
    return text


def format_value(value: Any, number_format: NumberFormat = None) -> str:
    """Plain-text form of a table cell (not yet escaped): numbers via ``format_number`` or ``number_format``
    (a format spec for floats such as ``".3f"``, or a callable), None as an em dash, sequences joined by ", "."""
    if value is None:
        return "\u2014"
    if isinstance(value, Real) and not isinstance(value, bool):
        if callable(number_format):
            return str(number_format(value))
        if isinstance(number_format, str) and not isinstance(value, Integral):
            return format(float(value), number_format)
        return format_number(value)
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={format_value(v, number_format)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(format_value(v, number_format) for v in value)
    return format_number(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


# --------------------------------------------------------------------------- the report


class Report:
    """An HTML report assembled block by block; ``render`` gives the document, ``write`` saves it atomically.

    Level-2 headings are listed in a table of contents at the top. All text is escaped except what goes through
    ``html``. Figures are embedded as ``data:image/png;base64`` URIs, so the written file has no external references.
    """

    def __init__(self, title: str) -> None:
        if not str(title).strip():
            raise ValueError("Report: title must be a non-empty string")
        self.title = str(title)
        self._blocks: list[str] = []
        self._toc: list[tuple[str, str]] = []  # (anchor id, text) of level-2 headings
        self._ids: set[str] = set()

    # ----------------------------------------------------------------- blocks

    def heading(self, text: str, level: int = 2) -> str:
        """Add a heading (level 2..6; level 1 is the title). Returns its anchor id (for ``#id`` links)."""
        if not isinstance(level, int) or not 2 <= level <= 6:
            raise ValueError(f"Report.heading: level must be an int in 2..6 (1 is the title), got {level!r}")
        anchor = self._anchor(text)
        self._blocks.append(f'<h{level} id="{anchor}">{_esc(text)}</h{level}>')
        if level == 2:
            self._toc.append((anchor, str(text)))
        return anchor

    def paragraph(self, text: str) -> None:
        """Add a paragraph of plain text (escaped)."""
        self._blocks.append(f"<p>{_esc(text)}</p>")

    def bullets(self, items: Iterable[str]) -> None:
        """Add a bulleted list of plain-text items (each escaped)."""
        lis = "".join(f"<li>{_esc(item)}</li>" for item in items)
        self._blocks.append(f"<ul>{lis}</ul>")

    def links(self, items: Iterable[tuple[str, str]]) -> None:
        """Add a bulleted list of links: (text, relative href) pairs, both escaped."""
        lis = "".join(f'<li><a href="{_esc(href)}">{_esc(text)}</a></li>' for text, href in items)
        self._blocks.append(f"<ul>{lis}</ul>")

    def html(self, raw: str) -> None:
        """Add a trusted HTML snippet as is. Never pass text that came from data or users through here."""
        self._blocks.append(str(raw))

    def code(self, text: str) -> None:
        """Add preformatted text (escaped): command lines, YAML configs, tracebacks."""
        self._blocks.append(f"<pre><code>{_esc(text)}</code></pre>")

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[Any]],
        caption: str | None = None,
        number_format: NumberFormat | Mapping[str, NumberFormat] = None,
    ) -> None:
        """Add a table. Cells are formatted by ``format_value``; numeric cells are right-aligned.

        ``number_format``: None (``format_number``: ints with thousands separators, floats to 4 significant
        digits), a format spec applied to floats (``".2%"``), a callable applied to every number, or a mapping from
        header to one of those for per-column formats (other columns keep the default).
        """
        headers = [str(h) for h in headers]
        rows = [list(r) for r in rows]
        for i, row in enumerate(rows):
            if len(row) != len(headers):
                raise ValueError(
                    f"Report.table: row {i} has {len(row)} cells; expected {len(headers)} (one per header {headers})"
                )
        if isinstance(number_format, Mapping):
            unknown = set(number_format) - set(headers)
            if unknown:
                raise ValueError(f"Report.table: number_format names unknown columns {sorted(unknown)}; headers are {headers}")
            formats = [number_format.get(h) for h in headers]
        else:
            formats = [number_format] * len(headers)
        parts = ["<table>"]
        if caption:
            parts.append(f"<caption>{_esc(caption)}</caption>")
        parts.append("<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr></thead>")
        parts.append("<tbody>")
        for row in rows:
            cells = []
            for value, fmt in zip(row, formats, strict=True):
                cls = ' class="num"' if _is_number(value) else ""
                cells.append(f"<td{cls}>{_esc(format_value(value, fmt))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        self._blocks.append("".join(parts))

    def key_values(self, mapping: Mapping[str, Any], caption: str | None = None) -> None:
        """Add a two-column table of keys and values; nested mappings are flattened to dotted keys."""
        self.table(["key", "value"], _flatten(mapping), caption=caption)

    def figure(self, png: str | os.PathLike[str] | bytes, caption: str, alt: str | None = None) -> None:
        """Embed a PNG (a path or the bytes) as a base64 data URI, with a caption (escaped)."""
        if isinstance(png, bytes | bytearray):
            data, what = bytes(png), "the given bytes"
        else:
            path = Path(png)
            if not path.is_file():
                raise ValueError(f"Report.figure: {path} is not a file; expected a PNG (ranklens.report.plots.save_figure)")
            data, what = path.read_bytes(), str(path)
        if not data.startswith(PNG_MAGIC):
            raise ValueError(f"Report.figure: {what} is not a PNG (bad magic bytes {data[:8]!r})")
        uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
        alt_text = _esc(alt if alt is not None else caption)
        self._blocks.append(
            f'<figure><img src="{uri}" alt="{alt_text}"><figcaption>{_esc(caption)}</figcaption></figure>'
        )

    def add_figure(self, draw: Callable[..., Path], args: tuple, path: Path, caption: str) -> bool:
        """Draw a figure (``draw(*args, path)`` returns the PNG) and embed it; when the data cannot make it (the
        drawing raises ValueError), say why in the report instead. True if the figure was embedded."""
        try:
            png = draw(*args, path)
        except ValueError as exc:
            self.paragraph(f"Figure omitted ({Path(path).name}): {exc}")
            return False
        self.figure(png, caption)
        return True

    def caveat(self, text: str, items: Iterable[str] = ()) -> None:
        """Add a highlighted notice (escaped text, then an optional bulleted list): what a reader must know before
        reading on, e.g. that a preset trains for a few steps only."""
        lis = "".join(f"<li>{_esc(item)}</li>" for item in items)
        self._blocks.append(f'<div class="caveat"><p>{_esc(text)}</p>' + (f"<ul>{lis}</ul>" if lis else "")
                            + "</div>")

    def verdict_table(self, headers: Sequence[str], rows: Iterable[Sequence[Any]], verdict_columns: Sequence[int],
                      caption: str | None = None) -> dict[str, int]:
        """Add a table whose cells in ``verdict_columns`` are verdict badges ("holds" green, "does not hold" red,
        "inconclusive" amber; a None cell is an em dash), preceded by the count of each verdict of the first
        such column as badges. Returns those counts."""
        headers = [str(h) for h in headers]
        rows = [list(r) for r in rows]
        for i, row in enumerate(rows):
            if len(row) != len(headers):
                raise ValueError(f"Report.verdict_table: row {i} has {len(row)} cells; expected {len(headers)}")
            for j in verdict_columns:
                if row[j] is not None and row[j] not in VERDICTS:
                    raise ValueError(f"Report.verdict_table: row {i}: {row[j]!r} is not one of {VERDICTS}")
        counts = {word: sum(row[verdict_columns[0]] == word for row in rows) for word in VERDICTS} \
            if verdict_columns else {}
        if counts:
            self._blocks.append('<p class="counts">' + f"{len(rows)} verdict{'s' if len(rows) != 1 else ''}: "
                                + "".join(f"{badge(word, f'{n} {word}')}" for word, n in counts.items()) + "</p>")
        parts = ["<table>"]
        if caption:
            parts.append(f"<caption>{_esc(caption)}</caption>")
        parts.append("<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr></thead><tbody>")
        for row in rows:
            cells = []
            for j, value in enumerate(row):
                if j in verdict_columns:
                    cells.append(f"<td>{badge(value) if value is not None else chr(0x2014)}</td>")
                else:
                    cls = ' class="num"' if _is_number(value) else ""
                    cells.append(f"<td{cls}>{_esc(format_value(value))}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</tbody></table>")
        self._blocks.append("".join(parts))
        return counts

    def verdict(self, claim: str, verdict: str, statistic: str) -> None:
        """Add a styled verdict line: the claim, "holds" / "does not hold" / "inconclusive", and the statistic."""
        if verdict not in VERDICTS:
            raise ValueError(f"Report.verdict: verdict must be one of {VERDICTS}, got {verdict!r}")
        cls = verdict.replace(" ", "-")
        self._blocks.append(
            f'<div class="verdict {cls}"><span class="claim">{_esc(claim)}</span>'
            f'<span class="badge">{_esc(verdict)}</span><span class="stat">{_esc(statistic)}</span></div>'
        )

    # ----------------------------------------------------------------- output

    def render(self) -> str:
        """The complete HTML document as a string."""
        toc = ""
        if len(self._toc) > 1:
            items = "".join(f'<li><a href="#{a}">{_esc(t)}</a></li>' for a, t in self._toc)
            toc = f'<nav class="toc"><strong>Contents</strong><ul>{items}</ul></nav>'
        body = "\n".join(self._blocks)
        return (
            "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{_esc(self.title)}</title>\n<style>\n{_CSS}\n</style>\n</head>\n<body>\n"
            f"<h1>{_esc(self.title)}</h1>\n{toc}\n{body}\n</body>\n</html>\n"
        )

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the report to ``path`` atomically (a temporary file in the same directory, then rename).

        Creates the parent directory. On any error the temporary file is removed and an existing file at ``path``
        is left untouched. Returns the path.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, self.render().encode("utf-8"))
        return path

    # ----------------------------------------------------------------- helpers

    def _anchor(self, text: str) -> str:
        base = "".join(c if c.isalnum() else "-" for c in str(text).lower()).strip("-")
        base = "-".join(filter(None, base.split("-"))) or "section"
        anchor, i = base, 2
        while anchor in self._ids:
            anchor, i = f"{base}-{i}", i + 1
        self._ids.add(anchor)
        return anchor


def badge(verdict: str, text: str | None = None) -> str:
    """The HTML of a verdict badge (``text`` defaults to the verdict)."""
    if verdict not in VERDICTS:
        raise ValueError(f"badge: verdict must be one of {VERDICTS}, got {verdict!r}")
    return f'<span class="badge {verdict.replace(" ", "-")}">{_esc(text if text is not None else verdict)}</span>'


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[list[Any]]:
    rows: list[list[Any]] = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            rows.extend(_flatten(value, name + "."))
        else:
            rows.append([name, value])
    return rows




# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def software_versions() -> dict[str, Any]:
    """Versions of the software a report was made with (read from package metadata; nothing heavy is imported)."""
    try:
        available = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        available = os.cpu_count()
    return {
        "python": sys.version.split()[0],
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "numpy": _version("numpy"),
        "matplotlib": _version("matplotlib"),
        "ranklens": _version("ranklens"),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_available": available,
    }
