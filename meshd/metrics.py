"""Prometheus metrics on prometheus-client, on a private registry per daemon.

Several daemons run in one test process, so nothing here touches prometheus_client's global
REGISTRY. Components report their counts as before (`collect_metrics(out)` into an
`Exposition`, which builds prometheus-client metric families); `SourcesCollector` hands those to
the daemon's registry at scrape time, next to the latency histograms (`Histograms`) and the
process, GC and platform collectors. Names carry the `meshd_` prefix, close to memberlist's
where it has a counterpart; counters end in `_total`, units are `_seconds`/`_bytes`. The core's
dotted counters ("drops.auth", "msgs.in.ping") become meshd_drops_auth_total, ...
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = [
    "CONTENT_TYPE",
    "SOURCES",
    "Exposition",
    "Histograms",
    "MetricsSource",
    "SourcesCollector",
    "TransferStats",
    "counter_name",
    "daemon_registry",
]

# The text format generate_latest writes (0.0.4), understood by every Prometheus version.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")

# Where release bytes came from: a peer of this node's site, a peer of another site, the origin.
SOURCES = ("site", "remote_site", "origin")

# Probes answer within the probe timeout (500 ms LAN, 3 s WAN); indirect ones take longer.
PROBE_RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Gossip queries run for up to their timeout, seconds at most on a big mesh.
QUERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# One request fetches a piece of up to a few MB: LAN milliseconds to a slow WAN's tens of seconds.
CHUNK_FETCH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Materialising a release and its hook: from a small file to a large tree with a slow hook.
ACTIVATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def counter_name(dotted: str) -> str:
    """'drops.auth' -> 'meshd_drops_auth_total'."""
    base = _BAD_CHARS.sub("_", dotted.replace(".", "_")).strip("_").lower()
    return f"meshd_{base}_total"


class Exposition:
    """The metric families one scrape gathers from the components; each family is kept once
    (the first component to report a name wins)."""

    def __init__(self) -> None:
        self._families: dict[str, Metric] = {}

    def _family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]
    ) -> None:
        # prometheus-client names a counter family without its `_total`; its sample has it.
        base = name.removesuffix("_total") if kind == "counter" else name
        if base in self._families:
            return
        family = Metric(base, help_text, kind)
        sample_name = f"{base}_total" if kind == "counter" else base
        for labels, value in samples:
            family.add_sample(sample_name, {k: str(v) for k, v in labels.items()}, float(value))
        self._families[base] = family

    def gauge(self, name: str, help_text: str, value: float, **labels: str) -> None:
        self._family(name, "gauge", help_text, [(labels, value)])

    def counter(self, name: str, help_text: str, value: float, **labels: str) -> None:
        self._family(name, "counter", help_text, [(labels, value)])

    def labelled(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]
    ) -> None:
        self._family(name, kind, help_text, list(samples))

    def core_counters(self, counters: Mapping[str, int]) -> None:
        for dotted in sorted(counters):
            self.counter(counter_name(dotted), f"core counter {dotted}", counters[dotted])

    def extend(self, families: Iterable[Metric]) -> None:
        """Families collected elsewhere (a registry: histograms, process metrics)."""
        for family in families:
            if family.name not in self._families:
                self._families[family.name] = family

    def families(self) -> list[Metric]:
        return list(self._families.values())

    def render(self) -> str:
        """The text format (0.0.4), written by prometheus-client."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(self.families()))
        return generate_latest(registry).decode()


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


class MetricsSource(Protocol):
    """A component that reports its own metrics; the daemon's /metrics loops over its sources."""

    def collect_metrics(self, out: Exposition) -> None: ...


class SourcesCollector(Collector):
    """A prometheus-client collector over the components' own counts, read at scrape time."""

    def __init__(self, collect: Callable[[Exposition], None]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        out = Exposition()
        self._collect(out)
        return out.families()


class Histograms:
    """The latency histograms (unregistered without a registry: a component built alone)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.probe_rtt = Histogram(
            "meshd_probe_rtt_seconds",
            "probe round trip, ping sent to ack received (memberlist.probeNode)",
            ["path"],
            buckets=PROBE_RTT_BUCKETS,
            registry=registry,
        )
        self.query = Histogram(
            "meshd_query_seconds",
            "gossip queries this node asked, from start to result",
            buckets=QUERY_BUCKETS,
            registry=registry,
        )
        self.chunk_fetch = Histogram(
            "meshd_chunk_fetch_seconds",
            "release piece requests, from request to stored, by source",
            ["source"],
            buckets=CHUNK_FETCH_BUCKETS,
            registry=registry,
        )
        self.activation = Histogram(
            "meshd_activation_seconds",
            "release activations (materialise, switch, hook)",
            buckets=ACTIVATION_BUCKETS,
            registry=registry,
        )
        # Every series exists from the start: a dashboard's rate() sees 0, not "no data".
        for path in ("direct", "indirect"):
            self.probe_rtt.labels(path=path)
        for source in SOURCES:
            self.chunk_fetch.labels(source=source)


def daemon_registry(collect: Callable[[Exposition], None]) -> tuple[CollectorRegistry, Histograms]:
    """A daemon's private registry: its components (through `collect`), its histograms, and
    the process, GC and platform collectors."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SourcesCollector(collect))
    histograms = Histograms(registry)
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry, histograms


@dataclass
class TransferStats:
    """Update-distribution byte counts (peer chunk traffic and origin fallback), in total and
    per release by source (see SOURCES)."""

    sent_bytes: int = 0
    received_bytes: int = 0
    origin_bytes: int = 0
    by_release: dict[str, dict[str, int]] = field(default_factory=dict)

    def received(self, rid: str, source: str, n: int) -> None:
        """`n` bytes of release `rid` arrived from `source` ("site", "remote_site", "origin")."""
        if source == "origin":
            self.origin_bytes += n
        else:
            self.received_bytes += n
        per = self.by_release.setdefault(rid, dict.fromkeys(SOURCES, 0))
        per[source] += n

    def release_bytes(self, rid: str) -> dict[str, int]:
        return dict(self.by_release.get(rid) or dict.fromkeys(SOURCES, 0))

    def forget(self, rid: str) -> None:
        """A release no longer held: its per-release series go (label values stay bounded)."""
        self.by_release.pop(rid, None)

    def collect_metrics(self, out: Exposition) -> None:
        out.counter("meshd_transfer_sent_bytes_total", "release bytes sent to peers", self.sent_bytes)
        out.counter(
            "meshd_transfer_received_bytes_total", "release bytes received from peers", self.received_bytes
        )
        out.counter(
            "meshd_transfer_origin_bytes_total", "release bytes fetched from the origin", self.origin_bytes
        )
