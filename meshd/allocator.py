"""glibc's allocator, told to keep the megabyte buffers a fetch or an upload goes through.

By default glibc maps every block over 128 KiB fresh from the kernel and unmaps it when freed
(its threshold adapts, but each worker thread's arena starts over). A piece is about 2 MiB, and
a node moving a release allocates several per piece (the body read, the opened view, the file
reads, the sealed reply): every one of them was new pages, faulted in and zeroed by the kernel.
In a 16-host lab that was a tenth of every daemon's CPU. With the thresholds raised, freed
buffers go back to the heap and the next piece reuses pages already mapped; the heap keeps at
most TRIM_KEEP unused at its top.

Arenas are capped at ARENAS too: by default each worker thread that allocates gets an arena of
its own (up to 8 per core), and a buffer freed in one is never reused by a thread allocating in
another, so every arena faulted in pages of its own for the same pieces. In the 32-host lab the
cap took a run from a median of 18.0 to 16.6 CPU-s (3 interleaved runs each; noisy, as every
figure of that lab, but in three separate comparisons the same way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("meshd")

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 * 1024 * 1024  # blocks above this are still mapped on their own
TRIM_KEEP = 64 * 1024 * 1024
ARENAS = 2  # the event loop's and one the worker threads share (set before they start)


def keep_large_buffers() -> bool:
    """Tune glibc's malloc for piece-sized buffers; False (and nothing changed) elsewhere, e.g.
    musl or macOS, where there is no mallopt."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = (
        bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
        and bool(mallopt(M_TRIM_THRESHOLD, TRIM_KEEP))
        and bool(mallopt(M_ARENA_MAX, ARENAS))
    )
    log.debug("malloc thresholds %s", "raised" if done else "left as they were")
    return done
