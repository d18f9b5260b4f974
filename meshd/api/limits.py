"""Per-client limits on the API's long requests (event streams, gossip queries) and the API's
refusal counters.

A long request holds a slot for as long as it runs: one client (one address) may hold at most
`per_client` slots of a kind, all clients together `total`; beyond that the API answers 429
with Retry-After instead of letting one host on the site network take every stream or query.
"""

from __future__ import annotations

from aiohttp import web

from meshd.core.counters import Counters
from meshd.metrics import Exposition

__all__ = ["API_COUNTERS", "REFUSALS", "ClientSlots", "client_of", "collect_api_metrics"]

# What the API refuses, one counter each (meshd_api_refused_total{reason=...}).
REFUSALS = (
    "host",  # Host header missing or naming something else (DNS rebinding)
    "origin",  # Origin of another site
    "events_per_client",
    "events_total",
    "queries_per_client",
    "queries_total",
)
SLOW_READER = "events.slow_reader"  # event streams dropped because the client did not read

API_COUNTERS = web.AppKey("api_counters", Counters)


class ClientSlots:
    """Concurrent slots per client address and in total (sans-IO: the caller names the client)."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client, self.total = per_client, total
        self.by_client: dict[str, int] = {}
        self.count = 0

    def acquire(self, client: str) -> str | None:
        """Take a slot: None when taken, else why not ("per_client" or "total")."""
        if self.by_client.get(client, 0) >= self.per_client:
            return "per_client"
        if self.count >= self.total:
            return "total"
        self.by_client[client] = self.by_client.get(client, 0) + 1
        self.count += 1
        return None

    def release(self, client: str) -> None:
        left = self.by_client.get(client, 0) - 1
        if left < 0:
            return
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]  # the table holds only clients with a slot
        self.count -= 1


def client_of(request: web.Request) -> str:
    """The client's address: the unit of the per-client limits."""
    return request.remote or "unknown"


def collect_api_metrics(counters: Counters, out: Exposition, *, streams: int, queries: int) -> None:
    out.labelled(
        "meshd_api_refused_total",
        "counter",
        "operator API requests refused, by reason",
        [({"reason": r}, counters[f"refused.{r}"]) for r in REFUSALS],
    )
    out.counter(
        "meshd_api_events_slow_reader_total",
        "event streams closed because the client stopped reading",
        counters[SLOW_READER],
    )
    out.gauge("meshd_api_event_streams", "event streams open now", streams)
    out.gauge("meshd_api_queries_waiting", "gossip queries the API waits on now", queries)
