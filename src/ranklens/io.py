"""Atomic writes: every file and directory ranklens leaves behind is either complete or absent.

A file is written under a temporary name in its own directory (``.<name>.<random>.tmp``), flushed to disk, given the
shared results mode (0644: mkstemp makes 0600) and renamed over the target; the directory entry is then flushed too.
A directory (an SAE, a Lorsa, a dashboard) is built as a temporary sibling and renamed into place the same way.
A killed writer leaves at most a temporary name, never a half-written target.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ranklens.errors import RanklensError

FILE_MODE = 0o644  # results are meant to be shared with the group and others
DIR_MODE = 0o755
# Temporary names made here (".<name>.<random>.tmp").
TEMP_NAME = re.compile(r"^\..+\.tmp$")


def fsync_dir(directory: str | Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk, where the platform allows it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to (by name, e.g. ``safetensors.save_file``); on leaving the block
    without an error it is flushed, made readable (FILE_MODE) and renamed over ``path``; on an error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=1, allow_nan=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """A fresh temporary directory beside ``path`` to fill; on leaving the block without an error its files are
    flushed and it is renamed to ``path``, which must not exist then or be an empty directory, unless ``replace``:
    then an existing ``path`` is first moved aside and removed after the rename. On an error, or when ``path`` was
    taken meanwhile, the temporary directory is removed and the error raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                with open(Path(root) / name, "rb") as f:
                    os.fsync(f.fileno())
                os.chmod(Path(root) / name, FILE_MODE)
            os.chmod(root, DIR_MODE)
        old = None
        if replace and path.exists() and any(path.iterdir()):
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
            os.replace(path, old)
        os.rename(tmp, path)  # POSIX: replaces a missing or empty directory atomically, fails otherwise
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``; a one-line error naming the file when it is not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise RanklensError(f"{str(path)!r} is not valid JSON ({err.msg} at line {err.lineno})") from err
