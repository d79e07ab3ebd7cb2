"""Atomic writes: a file or directory is complete or absent, never half-written; results are group-readable."""

import stat

import pytest

from ranklens.errors import RanklensError
from ranklens.io import FILE_MODE, atomic_directory, atomic_path, atomic_write_json, read_json


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_file_written_whole_with_shared_mode(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1})
    assert read_json(path) == {"x": 1} and _mode(path) == FILE_MODE
    assert [p.name for p in path.parent.iterdir()] == ["a.json"]


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = atomic_write_json(tmp_path / "a.json", {"x": 1})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert read_json(path) == {"x": 1} and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_directory_replaced_only_when_asked(tmp_path):
    target = tmp_path / "sae"
    with atomic_directory(target) as tmp:
        (tmp / "w").write_text("1")
    assert (target / "w").read_text() == "1" and _mode(target / "w") == FILE_MODE
    with pytest.raises(OSError), atomic_directory(target) as tmp:
        (tmp / "w").write_text("2")
    assert (target / "w").read_text() == "1"
    with atomic_directory(target, replace=True) as tmp:
        (tmp / "w").write_text("3")
    assert (target / "w").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    with pytest.raises(KeyboardInterrupt), atomic_directory(target, replace=True) as tmp:
        (tmp / "w").write_text("4")
        raise KeyboardInterrupt
    assert (target / "w").read_text() == "3" and sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


def test_read_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(RanklensError, match="bad.json' is not valid JSON"):
        read_json(bad)
