"""glibc's malloc told to keep piece-sized buffers (meshd/allocator.py)."""

from __future__ import annotations

import ctypes
import platform

import pytest

from meshd import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_thresholds() -> None:
    assert allocator.keep_large_buffers() is True


def test_without_mallopt_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoMallopt:
        def __init__(self, name: str | None) -> None:
            pass

    monkeypatch.setattr(ctypes, "CDLL", NoMallopt)
    assert allocator.keep_large_buffers() is False


def test_a_refused_threshold_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class Libc:
        def __init__(self, name: str | None) -> None:
            def mallopt(param: int, value: int) -> int:
                calls.append((param, value))
                return 0  # glibc's "refused"

            self.mallopt = mallopt

    monkeypatch.setattr(ctypes, "CDLL", Libc)
    assert allocator.keep_large_buffers() is False
    assert calls == [(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD)]
