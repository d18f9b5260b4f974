"""Prometheus text exposition (format 0.0.4), written by hand: a few gauges and counters.

Names carry the `meshd_` prefix; counters end in `_total`, units are `_seconds`/`_bytes`.
The core's dotted counters ("drops.auth", "msgs.in.ping") become meshd_drops_auth_total, ...
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["CONTENT_TYPE", "Exposition", "MetricsSource", "TransferStats", "counter_name"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class TransferStats:
    """Update-distribution byte counts (peer chunk traffic and origin fallback)."""

    sent_bytes: int = 0
    received_bytes: int = 0
    origin_bytes: int = 0

    def collect_metrics(self, out: Exposition) -> None:
        out.counter("meshd_transfer_sent_bytes_total", "release bytes sent to peers", self.sent_bytes)
        out.counter(
            "meshd_transfer_received_bytes_total", "release bytes received from peers", self.received_bytes
        )
        out.counter(
            "meshd_transfer_origin_bytes_total", "release bytes fetched from the origin", self.origin_bytes
        )


def counter_name(dotted: str) -> str:
    """'drops.auth' -> 'meshd_drops_auth_total'."""
    base = _BAD_CHARS.sub("_", dotted.replace(".", "_")).strip("_").lower()
    return f"meshd_{base}_total"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class MetricsSource(Protocol):
    """A component that reports its own metrics; the daemon's /metrics loops over its sources."""

    def collect_metrics(self, out: Exposition) -> None: ...


class Exposition:
    """Collects metric families and renders them; each family is written once."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._seen: set[str] = set()

    def _family(
        self, name: str, kind: str, help_text: str, samples: Iterable[tuple[Mapping[str, str], float]]
    ) -> None:
        if name in self._seen:
            return
        self._seen.add(name)
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            if labels:
                inner = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
                self._lines.append(f"{name}{{{inner}}} {_fmt(value)}")
            else:
                self._lines.append(f"{name} {_fmt(value)}")

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

    def render(self) -> str:
        return "\n".join(self._lines) + "\n"
