"""Lifeguard's dynamic suspicion timeout (memberlist suspicion.go).

A suspicion starts at the maximum timeout. Each independent confirmation (a different node
that also suspects the member) shrinks it on a log scale towards the minimum, so a member
many peers agree on is declared dead quickly, while a lone accuser (maybe itself slow)
waits long enough for the member to refute.
"""

from __future__ import annotations

import math


def suspicion_timeout(suspicion_mult: int, n: int, probe_interval: float) -> float:
    """The minimum suspicion timeout: mult * max(1, log10(n)) * interval (memberlist util.go)."""
    scale = max(1.0, math.log10(max(1, n)))
    return suspicion_mult * scale * probe_interval


def remaining_suspicion_time(
    confirmations: int, k: int, elapsed: float, min_timeout: float, max_timeout: float
) -> float:
    """Seconds left before the suspicion fires; may be negative (fire now)."""
    frac = math.log(confirmations + 1.0) / math.log(k + 1.0) if k > 0 else 1.0
    timeout = max_timeout - frac * (max_timeout - min_timeout)
    timeout = max(timeout, min_timeout)
    return timeout - elapsed


class Suspicion:
    """One member's suspicion: who confirmed it and when it fires."""

    __slots__ = ("confirmations", "deadline", "k", "max_timeout", "min_timeout", "start")

    def __init__(self, accuser: str, k: int, min_timeout: float, max_timeout: float, now: float) -> None:
        self.k = k
        self.min_timeout = min_timeout
        # With nobody to confirm, there is no point waiting for confirmations.
        self.max_timeout = max_timeout if k >= 1 else min_timeout
        self.start = now
        self.confirmations: set[str] = {accuser}
        self.deadline = self._deadline()  # kept: every timer re-arm reads it

    def confirm(self, accuser: str) -> bool:
        """Record an independent accuser; True when it is new information."""
        if len(self.confirmations) - 1 >= self.k or accuser in self.confirmations:
            return False
        self.confirmations.add(accuser)
        self.deadline = self._deadline()
        return True

    def _deadline(self) -> float:
        left = remaining_suspicion_time(
            len(self.confirmations) - 1, self.k, 0.0, self.min_timeout, self.max_timeout
        )
        return self.start + left
