"""The `stats` event: what the dashboard's live charts plot, published on the event stream.

Every STATS_INTERVAL the daemon publishes one, kind "stats", with cumulative byte counters
(the page computes rates from two of them), the mean probe round trip of the interval (None
when no probe was answered) and the members by state:

    {"t": monotonic seconds, "gossip_in_bytes": n, "gossip_out_bytes": n,
     "transfer_sent_bytes": n, "transfer_received_bytes": n, "transfer_origin_bytes": n,
     "probe_rtt_ms": float | None, "members": {"alive": n, "suspect": n, "dead": n, "left": n}}
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshd.core.messages import MemberState
from meshd.core.node import MemberView
from meshd.metrics import TransferStats

__all__ = ["STATS_INTERVAL", "RttWindow", "stats_payload"]

STATS_INTERVAL = 2.0


class RttWindow:
    """Probe round trips since the last `take_mean_ms`."""

    def __init__(self) -> None:
        self._sum = 0.0
        self._n = 0

    def add(self, seconds: float) -> None:
        self._sum += seconds
        self._n += 1

    def take_mean_ms(self) -> float | None:
        mean = self._sum / self._n * 1000.0 if self._n else None
        self._sum, self._n = 0.0, 0
        return mean


def stats_payload(
    t: float,
    *,
    gossip_in_bytes: int,
    gossip_out_bytes: int,
    transfer: TransferStats,
    probe_rtt_ms: float | None,
    members: Iterable[MemberView],
) -> dict[str, Any]:
    counts = dict.fromkeys((s.name.lower() for s in MemberState), 0)
    for m in members:
        counts[m.state.name.lower()] += 1
    return {
        "t": float(t),
        "gossip_in_bytes": int(gossip_in_bytes),
        "gossip_out_bytes": int(gossip_out_bytes),
        "transfer_sent_bytes": transfer.sent_bytes,
        "transfer_received_bytes": transfer.received_bytes,
        "transfer_origin_bytes": transfer.origin_bytes,
        "probe_rtt_ms": None if probe_rtt_ms is None else round(probe_rtt_ms, 3),
        "members": counts,
    }
