"""meshd.discovery over real mDNS confined to 127.0.0.1 (nothing leaves loopback)."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from collections.abc import Callable

import pytest
from zeroconf import DNSOutgoing, Zeroconf
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from meshd import PROTOCOL_VERSION
from meshd.discovery import start as discovery_start
from meshd.discovery.mdns import SERVICE_TYPE, Discovery, _ConfinedZeroconf
from tests.fakes import FakeHost

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="multicast on loopback is a Linux behaviour"
)

LO = "127.0.0.1"
WAIT = 10.0  # generous: registration probes take about a second


class Seen:
    """Records callbacks and lets a test wait for a condition on them."""

    def __init__(self) -> None:
        self.peers: list[tuple[str, str, dict[str, str]]] = []
        self.gone: list[str] = []
        self._changed = asyncio.Event()

    def on_peer(self, name: str, addr: str, txt: dict[str, str]) -> None:
        self.peers.append((name, addr, txt))
        self._changed.set()

    def on_gone(self, name: str) -> None:
        self.gone.append(name)
        self._changed.set()

    def offered(self, n: int) -> Callable[[], bool]:
        return lambda: len(self.peers) == n

    async def until(self, cond: Callable[[], bool], timeout: float = WAIT) -> None:
        async def loop() -> None:
            while not cond():
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(loop(), timeout)


def make(name: str, cluster: str, port: int, seen: Seen, **kw: object) -> Discovery:
    return Discovery(
        name=name,
        node_id=f"id-{name}",
        cluster=cluster,
        site="lo",
        port=port,
        addresses=[LO],
        interfaces=[LO],
        on_peer=seen.on_peer,
        on_gone=seen.on_gone,
        **kw,  # type: ignore[arg-type]
    )


def unique(prefix: str) -> str:
    # Other tests may run mDNS on loopback at the same time: never share names or clusters.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def test_two_nodes_find_each_other_ignore_other_cluster_and_notice_goodbye() -> None:
    cluster = unique("c")
    a_seen, b_seen, x_seen = Seen(), Seen(), Seen()
    a = make(unique("a"), cluster, 17001, a_seen)
    b = make(unique("b"), cluster, 17002, b_seen)
    x = make(unique("x"), unique("other"), 17003, x_seen)
    await asyncio.gather(a.start(), b.start(), x.start())
    try:
        await a_seen.until(lambda: any(p[0] == b.name for p in a_seen.peers))
        await b_seen.until(lambda: any(p[0] == a.name for p in b_seen.peers))
        _, addr, txt = next(p for p in a_seen.peers if p[0] == b.name)
        assert addr == f"{LO}:17002"
        assert txt == {"id": b.node_id, "cluster": cluster, "site": "lo", "v": str(PROTOCOL_VERSION)}
        # The other cluster is seen (counted) but never offered, and nobody offers itself.
        await a_seen.until(lambda: a.ignored >= 1)
        assert all(p[0] not in (a.name, x.name) for p in a_seen.peers)
        assert x_seen.peers == []
        assert a.discovered == 1
        assert a.peers.keys() == {b.name}

        await b.stop()  # goodbye
        await a_seen.until(lambda: b.name in a_seen.gone)
        assert b.name not in a.peers
    finally:
        await asyncio.gather(a.stop(), b.stop(), x.stop())


async def test_update_reannounces_site_and_address() -> None:
    cluster = unique("c")
    a_seen, b_seen = Seen(), Seen()
    a = make(unique("a"), cluster, 17021, a_seen)
    b = make(unique("b"), cluster, 17022, b_seen)
    await asyncio.gather(a.start(), b.start())
    try:
        await a_seen.until(lambda: len(a_seen.peers) == 1)
        await b.update(site="moved")
        await a_seen.until(lambda: a.peers[b.name].txt.get("site") == "moved", timeout=5)
        # A TXT-only change is not a new candidate for joining.
        assert len(a_seen.peers) == 1
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_a_new_address_is_offered_again() -> None:
    cluster = unique("c")
    a_seen, b_seen = Seen(), Seen()
    a = make(unique("a"), cluster, 17023, a_seen)
    b = make(unique("b"), cluster, 17024, b_seen)
    await asyncio.gather(a.start(), b.start())
    try:
        await a_seen.until(lambda: len(a_seen.peers) == 1)
        await b.update(addresses=["127.0.0.2"])  # another loopback address: still on lo
        await a_seen.until(lambda: len(a_seen.peers) == 2, timeout=5)
        assert a_seen.peers[-1][1] == "127.0.0.2:17024"
    finally:
        await asyncio.gather(a.stop(), b.stop())


async def test_same_name_on_two_nodes_is_reported_as_a_conflict() -> None:
    cluster, name = unique("c"), unique("twin")
    seen = Seen()
    a = Discovery(name, "id-one", cluster, "lo", 17031, [LO], [LO], seen.on_peer)
    b = Discovery(name, "id-two", cluster, "lo", 17032, [LO], [LO], seen.on_peer)
    await asyncio.gather(a.start(), b.start())
    try:
        await seen.until(lambda: a.counters["name_conflicts"] + b.counters["name_conflicts"] > 0)
        assert seen.peers == []  # a twin is never offered as a peer
    finally:
        await asyncio.gather(a.stop(), b.stop())


def test_confined_zeroconf_drops_unicast_outside_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str | None] = []

    def fake_send(self: Zeroconf, out: DNSOutgoing, addr: str | None = None, *a: object) -> None:
        sent.append(addr)  # recorded, never put on the wire

    monkeypatch.setattr(Zeroconf, "async_send", fake_send)
    drops: list[int] = []
    zc = _ConfinedZeroconf([LO], lambda: drops.append(1))
    try:
        out = DNSOutgoing(0)
        zc.async_send(out, "198.18.0.1")  # not on loopback's subnet: dropped
        zc.async_send(out, "127.0.0.2")
        zc.async_send(out, None)  # multicast: goes through the confined senders
        assert sent == ["127.0.0.2", None]
        assert drops == [1]
        assert all(s.sock_name[0] == LO for s in zc.engine.senders) or not zc.engine.senders
    finally:
        zc.close()


async def test_daemon_hook_joins_discovered_peers_and_backs_off_failures() -> None:
    cluster = unique("c")
    good = FakeHost(unique("good") + ".example.org", cluster, f"{LO}:17041", mdns_interfaces=[LO])
    bad = FakeHost(
        unique("bad"), cluster, f"{LO}:17042", mdns_interfaces=[LO], join_result=0
    )  # e.g. another cluster key
    g = await discovery_start(good)
    b = await discovery_start(bad)
    try:
        assert "." not in g.discovery.name  # a FQDN node name becomes a single mDNS label
        deadline = asyncio.get_running_loop().time() + WAIT
        while not (good.joins and bad.joins):
            assert asyncio.get_running_loop().time() < deadline, "no join attempted"
            await asyncio.sleep(0.05)
        assert good.joins[0] == [bad.addr]
        assert bad.joins[0] == [good.addr]
        await asyncio.sleep(0.2)
        assert g.retry_delay(bad.addr) == 0  # joined: no backoff
        assert b.retry_delay(good.addr) > 1.0  # failed: backing off
        await asyncio.sleep(1.0)
        assert len(bad.joins) == 1  # not a tight loop
    finally:
        await asyncio.gather(g.close(), b.close())


async def test_fifty_spoofed_records_for_one_address_make_a_few_dials_that_stop_with_the_spoofer() -> None:
    """Issue 9: 50 spoofed records pointing at one address made every node dial it ~880 times in
    80 s, and keep going after the spoofer stopped. Spoofed here on loopback only."""
    cluster = unique("c")
    victim = FakeHost(unique("victim"), cluster, f"{LO}:17051", mdns_interfaces=[LO], join_result=0)
    target = f"{LO}:17052"  # what the spoofer points at; nothing listens there
    spoofer = AsyncZeroconf(zc=_ConfinedZeroconf([LO], lambda: None))  # multicast on lo only
    names = [unique("spoof") for _ in range(50)]
    infos = [
        AsyncServiceInfo(
            SERVICE_TYPE,
            f"{name}.{SERVICE_TYPE}",
            port=17052,
            properties={"id": f"id-{name}", "cluster": cluster, "site": "lo", "v": str(PROTOCOL_VERSION)},
            server=f"{name}.local.",
            addresses=[socket.inet_aton(LO)],
        )
        for name in names
    ]
    hook = await discovery_start(victim)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.gather(
            *[await spoofer.async_register_service(i, cooperating_responders=True) for i in infos]
        )
        deadline = loop.time() + WAIT
        while not victim.joins:
            assert loop.time() < deadline, "the spoofed records were never dialed"
            await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)
        assert len(hook.discovery.peers) > 1  # many names were seen ...
        assert all(j == [target] for j in victim.joins)
        assert len(victim.joins) <= 3  # ... and dialed as one address, backing off (2 s, 4 s)

        await asyncio.gather(*[await spoofer.async_unregister_service(i) for i in infos])
        deadline = loop.time() + WAIT
        while hook.dialer.addresses:
            assert loop.time() < deadline, "the spoofed address was never forgotten"
            await asyncio.sleep(0.05)
        dialed = len(victim.joins)
        await asyncio.sleep(2.0)
        assert len(victim.joins) == dialed  # the spoofer stopped: so did the dialing
    finally:
        await asyncio.gather(hook.close(), spoofer.async_close())
