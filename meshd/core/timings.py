"""Durations the core measures with the `now` it is given, kept until the shell takes them.

The core knows when a probe's ping went out and when its ack came back; the shell turns the
round trips into a histogram (meshd_probe_rtt_seconds) without the core importing any metrics
library. Bounded, so a shell that never takes them (the simulator) costs a fixed amount.
"""

from __future__ import annotations

from collections import deque

__all__ = ["Timings"]

MAX_PENDING = 256


class Timings:
    """(label, seconds) measurements, oldest dropped past `maxlen`."""

    def __init__(self, maxlen: int = MAX_PENDING) -> None:
        self._pending: deque[tuple[str, float]] = deque(maxlen=maxlen)

    def add(self, label: str, seconds: float) -> None:
        self._pending.append((label, max(0.0, seconds)))

    def take(self) -> list[tuple[str, float]]:
        if not self._pending:  # the usual case: taken after every core call
            return []
        out = list(self._pending)
        self._pending.clear()
        return out
