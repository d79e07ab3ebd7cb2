"""ranklens.allocator: glibc malloc tuning that keeps freed memory (on by default, off by environment)."""

from __future__ import annotations

import ctypes.util
import platform

import pytest

from ranklens.allocator import ENV, retain_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not ctypes.util.find_library("c"),
                    reason="mallopt is glibc's")
def test_takes_effect_on_glibc(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert retain_freed_memory() is True


def test_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv(ENV, "0")
    assert retain_freed_memory() is False
