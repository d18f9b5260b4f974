"""glibc's malloc told to keep piece-sized buffers (meshd/allocator.py)."""

from __future__ import annotations

import ctypes
import platform
import subprocess
import sys

import pytest

from meshd import allocator


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_takes_the_thresholds() -> None:
    assert allocator.keep_large_buffers() is True


# A child process (arenas are per process, and set before threads allocate): eight threads
# each allocate piece-sized buffers; glibc's malloc_info lists the heaps (arenas) it made.
_ARENAS_CHILD = """
import ctypes, ctypes.util, os, sys, tempfile, threading
from meshd import allocator
if sys.argv[1] == "capped":
    assert allocator.keep_large_buffers()
def work():
    for _ in range(20):
        b = bytearray(2 << 20)
        b[-1] = 1
start = threading.Barrier(8)
def run():
    start.wait()
    work()
threads = [threading.Thread(target=run) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas and malloc_info are glibc's")
def test_worker_threads_share_the_capped_arenas() -> None:
    def heaps(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", _ARENAS_CHILD, mode],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        return int(out.stdout.strip())

    assert heaps("capped") <= allocator.ARENAS
    assert heaps("default") > allocator.ARENAS  # what the cap is for: a heap per thread or so


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
