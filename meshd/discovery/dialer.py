"""Which mDNS-offered addresses to dial, and when (sans-IO: time and randomness are passed in).

mDNS offers arrive by service NAME, but anyone on the site network can announce names, so dials
go by ADDRESS: fifty names pointing at one address are one candidate, dialed one attempt at a
time, retried with capped exponential backoff and jitter, and forgotten as soon as no offer names
it. An address that keeps failing is given up until an offer names it anew. Limits bound the rest:
the offer and address tables, attempts in flight, and a token bucket on new addresses dialed.

Offers are reduced to literal IP:port candidates (`parse_ip_port`); a host name is never
resolved and nothing else (paths, URLs, zones) gets through.
"""

from __future__ import annotations

import random
from collections.abc import Collection
from dataclasses import dataclass, field

from meshd import units
from meshd.config import DiscoveryConfig
from meshd.core.bucket import TokenBucket
from meshd.core.counters import Counters
from meshd.units import format_hostport

__all__ = ["Dialer", "parse_ip_port"]

# Every counter the dialer keeps, so /metrics shows zeros before the first event.
COUNTERS = (
    "discovery.offers",  # offers taken into the table
    "discovery.offers_ignored",  # not a literal IP:port (host name, path, junk)
    "discovery.table_full",  # offers dropped: the name or address table is full
    "discovery.rate_limited",  # dials of new addresses held back by the rate limit
    "discovery.attempts",  # dials started
    "discovery.failures",  # dials that did not join
    "discovery.joined",  # dials that joined
    "discovery.skipped_alive",  # due dials not made: the address is a live member already
    "discovery.gave_up",  # addresses given up after too many failures in a row
    "discovery.forgotten",  # addresses no offer names any more
)


def parse_ip_port(text: str) -> tuple[str, int] | None:
    """'198.18.0.1:7788' or '[fd00::1]:7788' -> (ip, port); None for anything else (units.parse_ip_port)."""
    try:
        ip, port = units.parse_ip_port(text)
    except ValueError:
        return None
    return str(ip), port


@dataclass
class _Address:
    names: set[str] = field(default_factory=set)
    failures: int = 0
    due: float = 0.0  # not dialed before this time
    dialing: bool = False
    settled: bool = False  # joined or a live member: not dialed again until offered anew
    given_up: bool = False  # too many failures: not dialed again until offered anew
    dialed: bool = False  # has had its "new address" token
    held: bool = False  # already counted as rate limited


class Dialer:
    """The discovery table: offers by name, candidates by address, and what to dial when."""

    def __init__(self, config: DiscoveryConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.counters = Counters(dict.fromkeys(COUNTERS, 0))
        self.offers: dict[str, str] = {}  # service name -> "ip:port"
        self.addresses: dict[str, _Address] = {}
        # Full at the start: a clock that starts late only fills it up to the burst anyway.
        self._new_addresses = TokenBucket(config.dial_rate, config.dial_burst, 0.0)

    # ---- inputs ----------------------------------------------------------------------------

    def offer(self, name: str, addr: str, now: float) -> bool:
        """An mDNS service `name` offers `addr`; False when ignored or dropped (and counted)."""
        parsed = parse_ip_port(addr)
        if parsed is None:
            self.counters.inc("discovery.offers_ignored")
            return False
        addr = format_hostport(*parsed)
        old = self.offers.get(name)
        if old is None and len(self.offers) >= self.config.max_offers:
            self.counters.inc("discovery.table_full")
            return False
        entry = self.addresses.get(addr)
        if entry is None and len(self.addresses) >= self.config.max_addresses:
            self.counters.inc("discovery.table_full")
            return False
        if old is not None and old != addr:
            self._unlink(name, old)
        if entry is None:
            entry = self.addresses[addr] = _Address(due=now)
        self.offers[name] = addr
        entry.names.add(name)
        self.counters.inc("discovery.offers")
        if entry.settled or entry.given_up:
            # Offered anew: worth another look, but a failing address keeps its backoff.
            entry.settled = entry.given_up = False
            entry.due = max(entry.due, now)
        return True

    def withdraw(self, name: str) -> None:
        """The service `name` is gone (goodbye or expiry): its address may be forgotten."""
        addr = self.offers.pop(name, None)
        if addr is not None:
            self._unlink(name, addr)

    def take_due(self, now: float, alive: Collection[str]) -> list[str]:
        """Addresses to dial now (each now counts as in flight until `done`).

        `alive`: the addresses of live members, which are never dialed again.
        """
        in_flight = sum(1 for e in self.addresses.values() if e.dialing)
        out: list[str] = []
        for addr, entry in sorted(self._waiting(), key=lambda item: item[1].due):
            if entry.due > now:
                break
            if addr in alive:
                entry.settled, entry.failures = True, 0
                self.counters.inc("discovery.skipped_alive")
                continue
            if in_flight >= self.config.max_dials:
                break
            if not entry.dialed:
                if not self._new_addresses.take(now):
                    if not entry.held:
                        entry.held = True
                        self.counters.inc("discovery.rate_limited")
                    continue
                entry.dialed = True
            entry.dialing = True
            in_flight += 1
            self.counters.inc("discovery.attempts")
            out.append(addr)
        return out

    def done(self, addr: str, joined: bool, now: float) -> None:
        """A dial of `addr` ended; a failure is retried later unless the address was forgotten."""
        entry = self.addresses.get(addr)
        if entry is None or not entry.dialing:
            return
        entry.dialing = False
        if not entry.names:  # withdrawn while dialing: forget it, whatever came of the dial
            del self.addresses[addr]
            self.counters.inc("discovery.forgotten")
            return
        if joined:
            self.counters.inc("discovery.joined")
            entry.settled, entry.failures = True, 0
            return
        self.counters.inc("discovery.failures")
        entry.failures += 1
        if entry.failures >= self.config.give_up_after:
            self.counters.inc("discovery.gave_up")
            entry.given_up = True
        delay = min(self.config.retry_max, self.config.retry_base * 2 ** min(entry.failures - 1, 62))
        # Jitter: nodes that saw the same offer do not retry in lockstep.
        entry.due = now + delay * self.rng.uniform(0.8, 1.2)

    # ---- outputs ---------------------------------------------------------------------------

    def next_deadline(self, now: float) -> float | None:
        """When `take_due` may have something new to dial (None: only after an input or `done`)."""
        waiting = [e for _, e in self._waiting()]
        if not waiting:
            return None
        due = min(e.due for e in waiting)
        if due > now:
            return due
        if any(not e.dialed and e.due <= now for e in waiting):
            ready = self._new_addresses.ready_at(now)
            if ready > now:
                return ready
        return None  # due, but every slot is taken: a `done` frees one

    def retry_delay(self, addr: str, now: float) -> float:
        """Seconds until `addr` may be dialed again (0 when due or unknown)."""
        entry = self.addresses.get(addr)
        return 0.0 if entry is None else max(0.0, entry.due - now)

    def in_flight(self) -> int:
        return sum(1 for e in self.addresses.values() if e.dialing)

    # ---- internals -------------------------------------------------------------------------

    def _waiting(self) -> list[tuple[str, _Address]]:
        return [(a, e) for a, e in self.addresses.items() if not (e.dialing or e.settled or e.given_up)]

    def _unlink(self, name: str, addr: str) -> None:
        entry = self.addresses.get(addr)
        if entry is None:
            return
        entry.names.discard(name)
        if not entry.names and not entry.dialing:  # a dialing one goes when its dial ends
            del self.addresses[addr]
            self.counters.inc("discovery.forgotten")
