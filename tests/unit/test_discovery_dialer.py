"""Spoofed mDNS cannot make a node dial a flood of addresses (issue 9).

The sans-IO Dialer with a fake clock: offers by name, dials by address, backoff, forgetting,
rate and table limits. Then the shell around it without the network: the daemon hook, the
reduction of an mDNS offer to a literal IP:port, and the runtime's bound on a join's exchange.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import random
import socket

import pytest
from zeroconf.asyncio import AsyncServiceInfo

from meshd.config import DiscoveryConfig, NodeConfig, discovery_config
from meshd.core.config import LOCAL
from meshd.core.node import Node
from meshd.discovery import DaemonDiscovery, Discovery
from meshd.discovery.dialer import Dialer, parse_ip_port
from meshd.discovery.mdns import SERVICE_TYPE
from meshd.errors import ConfigError
from meshd.metrics import Exposition
from meshd.runtime import NodeRuntime
from meshd.wire import Codec
from tests.fakes import FakeHost
from tests.metrics_text import sample

SPOOFED = "198.18.0.66:7788"
# Addresses no peer can have (built, not written, so no real address appears in the source).
UNSPECIFIED = ipaddress.IPv4Address(0)
MDNS_GROUP = ipaddress.IPv4Address(0xE00000FB)
BROADCAST = ipaddress.IPv4Address(0xFFFFFFFF)
NAMES = [f"spoof-{i}" for i in range(50)]


def dialer(**limits: object) -> Dialer:
    return Dialer(DiscoveryConfig(**limits), random.Random(9))  # type: ignore[arg-type]


def run(d: Dialer, start: float, end: float, answer_after: float = 0.5, joins: bool = False) -> list[float]:
    """Drive the Dialer on a virtual clock (0.1 s steps); every dial ends after `answer_after`.

    Returns the start time of every dial and checks that an address is never dialed twice at once.
    """
    started: list[float] = []
    ends: dict[str, float] = {}
    t = start
    while t <= end:
        for addr, at in list(ends.items()):
            if at <= t:
                del ends[addr]
                d.done(addr, joins, t)
        for addr in d.take_due(t, alive=()):
            assert addr not in ends, "two attempts at one address at once"
            ends[addr] = t + answer_after
            started.append(t)
        t = round(t + 0.1, 6)
    return started


def test_fifty_names_for_one_address_are_one_candidate_dialed_a_bounded_number_of_times() -> None:
    d = dialer()
    for name in NAMES:
        assert d.offer(name, SPOOFED, 0.0)
    assert list(d.addresses) == [SPOOFED]
    started = run(d, 0.0, 80.0)
    # One attempt at a time, backing off 2, 4, 8, 16, 32 s (+-20 %): six tries in 80 s, not 880.
    assert 5 <= len(started) <= 6
    gaps = [b - a for a, b in itertools.pairwise(started)]
    assert all(later > earlier for earlier, later in itertools.pairwise(gaps))
    assert d.counters["discovery.attempts"] == len(started)
    assert d.counters["discovery.failures"] == len(started)


def test_backoff_is_capped_and_jittered() -> None:
    d = dialer(retry_base=1.0, retry_max=10.0, give_up_after=100)
    d.offer("a", SPOOFED, 0.0)
    delays = []
    now = 0.0
    for _ in range(12):
        assert d.take_due(now, ()) == [SPOOFED]
        d.done(SPOOFED, False, now)
        delays.append(d.retry_delay(SPOOFED, now))
        now += delays[-1]
    assert 0.8 <= delays[0] <= 1.2
    assert all(8.0 <= x <= 12.0 for x in delays[6:])  # capped at retry_max, +-20 %
    assert len(set(delays[6:])) > 1  # jittered: not in lockstep with other nodes


def test_dialing_stops_once_no_offer_names_the_address() -> None:
    d = dialer()
    for name in NAMES:
        d.offer(name, SPOOFED, 0.0)
    assert run(d, 0.0, 10.0)
    for name in NAMES[:-1]:
        d.withdraw(name)
    assert SPOOFED in d.addresses  # one name still offers it
    d.withdraw(NAMES[-1])  # the spoofer stopped: its records expired or said goodbye
    assert d.addresses == {}
    assert d.counters["discovery.forgotten"] == 1
    assert run(d, 10.0, 1000.0) == []
    assert d.next_deadline(1000.0) is None


def test_an_address_withdrawn_while_dialing_is_not_retried() -> None:
    d = dialer()
    d.offer("a", SPOOFED, 0.0)
    assert d.take_due(0.0, ()) == [SPOOFED]
    d.withdraw("a")
    d.offer("b", SPOOFED, 0.1)  # offered again while the first dial still runs
    assert d.take_due(0.2, ()) == []  # still one attempt at a time
    d.withdraw("b")
    d.done(SPOOFED, False, 3.0)
    assert d.addresses == {}
    assert run(d, 3.0, 500.0) == []


def test_an_address_that_keeps_failing_is_given_up_until_offered_anew() -> None:
    d = dialer(retry_base=1.0, retry_max=4.0, give_up_after=3)
    d.offer("a", SPOOFED, 0.0)
    started = run(d, 0.0, 600.0)  # the records stay cached (a huge TTL) but nobody answers
    assert len(started) == 3
    assert d.counters["discovery.gave_up"] == 1
    d.offer("b", SPOOFED, 600.0)  # a new announcement: one more try, on the old backoff
    assert len(run(d, 600.0, 700.0)) == 1


def test_live_members_and_joined_addresses_are_not_dialed_again() -> None:
    d = dialer()
    d.offer("up", SPOOFED, 0.0)
    assert d.take_due(0.0, alive={SPOOFED}) == []
    assert d.counters["discovery.skipped_alive"] == 1
    d.offer("other", "198.18.0.67:7788", 0.0)
    assert run(d, 0.0, 300.0, joins=True) == [0.0]
    assert d.counters["discovery.joined"] == 1


def test_host_names_paths_and_junk_are_ignored_and_counted() -> None:
    d = dialer()
    junk = [
        "gw1.local:7788",
        "localhost:7788",
        "198.18.0.1:7788/peer/v1/stream",
        "http://198.18.0.1:7788",
        "198.18.0.1",
        "198.18.0.1:0",
        "198.18.0.1:65536",
        "198.18.0.1:+77",
        "198.18.0.01:7788",
        f"{UNSPECIFIED}:7788",
        f"{MDNS_GROUP}:5353",
        f"{BROADCAST}:7788",
        "fd00::1:7788",
        "[fe80::1%eth0]:7788",
        "198.18.0.1:7788 ",
        "",
    ]
    for i, text in enumerate(junk):
        assert parse_ip_port(text) is None, text
        assert not d.offer(f"n{i}", text, 0.0)
    assert d.counters["discovery.offers_ignored"] == len(junk)
    assert d.offers == {}
    assert d.addresses == {}
    assert parse_ip_port("198.18.0.1:7788") == ("198.18.0.1", 7788)
    assert parse_ip_port("[fd00::1]:7788") == ("fd00::1", 7788)


def test_the_tables_are_capped_and_extras_counted() -> None:
    d = dialer(max_offers=20, max_addresses=8)
    for i in range(100):
        d.offer(f"n{i}", f"198.18.1.{i}:7788", 0.0)
    assert len(d.addresses) == 8
    assert len(d.offers) == 8
    for i in range(100):
        d.offer(f"m{i}", "198.18.1.0:7788", 0.0)  # names for a known address still count
    assert len(d.offers) == 20
    assert d.counters["discovery.table_full"] == 92 + 88


def test_new_addresses_are_rate_limited_and_dials_in_flight_capped() -> None:
    d = dialer(max_dials=3, dial_rate=1.0, dial_burst=2, max_addresses=64)
    for i in range(40):
        d.offer(f"n{i}", f"198.18.2.{i}:7788", 0.0)
    first = d.take_due(0.0, ())
    assert len(first) == 2  # the burst
    assert d.counters["discovery.rate_limited"] == 38
    assert d.next_deadline(0.0) == pytest.approx(1.0)  # when the next token comes
    # Blackholed addresses (each dial ends only at its 5 s timeout): never more than 3 at once.
    ends = {a: 5.0 for a in first}
    started, peak, t = len(first), 0, 0.0
    while t <= 20.0:
        for addr in [a for a, end in ends.items() if end <= t]:
            del ends[addr]
            d.done(addr, False, t)
        for addr in d.take_due(t, ()):
            ends[addr] = t + 5.0
            started += 1
        peak = max(peak, d.in_flight())
        t = round(t + 0.1, 6)
    assert peak == 3
    assert started <= 2 + 20  # burst + rate x time (fewer: the slots are full most of the time)


def test_discovery_config_from_the_discovery_table() -> None:
    cfg = NodeConfig(extra={"discovery": {"max-dials": 2, "dial-timeout": "500ms"}})
    limits = discovery_config(cfg)
    assert limits.max_dials == 2
    assert limits.dial_timeout == 0.5
    assert discovery_config(NodeConfig()) == DiscoveryConfig()
    for bad in ({"max_dials": 0}, {"dial_rate": 0}, {"nope": 1}):
        with pytest.raises(ConfigError, match=r"\[discovery\]"):
            NodeConfig(extra={"discovery": bad}).validate()


# ---- the shell ---------------------------------------------------------------------------


async def test_the_hook_dials_fifty_spoofed_names_once_and_bounded_by_a_timeout() -> None:
    host = FakeHost("me", "c", "127.0.0.1:7788", join_result=0)
    hook = DaemonDiscovery(host, DiscoveryConfig(dial_timeout=0.25))
    try:
        for name in NAMES:
            hook._on_peer(name, SPOOFED, {})
        assert list(hook._joins) == [SPOOFED]
        await asyncio.gather(*hook._joins.values())
        assert host.joins == [[SPOOFED]]
        assert host.join_timeouts == [0.25]
        assert hook.retry_delay(SPOOFED) > 1.0  # failed: backing off, per address
        for name in NAMES:
            hook._on_gone(name)
        assert hook.dialer.addresses == {}
        assert not hook._timer.pending  # nothing left to wake up for
        out = Exposition()
        hook.collect_metrics(out)
        text = out.render()
        assert sample(text, "meshd_discovery_attempts_total") == 1
        assert sample(text, "meshd_discovery_failures_total") == 1
        assert sample(text, "meshd_discovery_forgotten_total") == 1
        assert sample(text, "meshd_discovery_addresses") == 0
    finally:
        await hook.close()


def resolved(name: str, addresses: list[str], port: int, cluster: str = "c") -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties={"id": f"id-{name}", "cluster": cluster, "site": "s", "v": "1"},
        server=f"{name}.local.",
        addresses=[socket.inet_aton(a) for a in addresses],
    )


def test_an_offer_is_reduced_to_a_literal_ip_port_and_the_service_table_is_capped() -> None:
    offered: list[tuple[str, str]] = []
    d = Discovery(
        "me", "id-me", "c", "s", 7788, ["127.0.0.1"], ["127.0.0.1"],
        lambda name, addr, txt: offered.append((name, addr)),
        max_services=5,
    )  # fmt: skip
    d._resolved("junk1", resolved("junk1", [str(UNSPECIFIED)], 7788))
    d._resolved("junk2", resolved("junk2", [str(MDNS_GROUP)], 7788))
    d._resolved("junk3", resolved("junk3", ["198.18.0.5"], 0))
    assert offered == []
    assert d.counters["ignored_malformed"] == 3
    d._resolved("ok", resolved("ok", [str(UNSPECIFIED), "198.18.0.5"], 7788))
    assert offered == [("ok", "198.18.0.5:7788")]
    for i in range(10):
        d._resolved(f"flood{i}", resolved(f"flood{i}", ["198.18.0.6"], 7788))
    assert len(d.peers) == 5
    assert d.counters["table_full"] == 6


async def test_a_join_with_a_timeout_bounds_the_exchange_itself() -> None:
    class Client:
        timeouts: list[float] = []

        async def exchange(self, addr: str, data: bytes, timeout: float, to: str = "") -> bytes | None:
            self.timeouts.append(timeout)
            return None  # as a blackholed address, only sooner

        async def close(self) -> None:
            pass

    loop = asyncio.get_running_loop()
    core = Node("a", "id-a", "127.0.0.1:1", LOCAL, Codec("t", None), random.Random(1), loop.time())
    client = Client()
    rt = NodeRuntime(core, peer_client=client)  # type: ignore[arg-type]
    rt.start()
    try:
        assert await rt.join([SPOOFED], timeout=0.25) == 0
        assert client.timeouts == [0.25]  # not the core's join timeout (5 s or more)
    finally:
        await rt.close()
