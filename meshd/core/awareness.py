"""Lifeguard's local health multiplier (memberlist awareness.go).

A node that misses nacks or has to refute rumours about itself is probably the slow one; it
stretches its own probe interval and timeouts instead of accusing healthy peers.
"""

from __future__ import annotations


class Awareness:
    __slots__ = ("max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max = max_multiplier
        self.score = 0

    def apply_delta(self, delta: int) -> None:
        self.score = min(max(self.score + delta, 0), self.max - 1)

    def scale(self, timeout: float) -> float:
        return timeout * (self.score + 1)
