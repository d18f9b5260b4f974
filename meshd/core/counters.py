"""Event counts every component keeps the same way: dotted names, a missing name reads 0.

Each component owns one `Counters`; /metrics turns "drops.auth" into meshd_drops_auth_total.
"""

from __future__ import annotations

from collections import Counter

__all__ = ["Counters"]


class Counters(Counter[str]):
    """Dotted event counts ("drops.auth", "msgs.in.ping") for /metrics."""

    def inc(self, name: str, by: int = 1) -> None:
        self[name] += by
