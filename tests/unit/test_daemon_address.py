"""The daemon follows a changed address: the core and mDNS both learn it."""

from __future__ import annotations

from meshd.daemon import Daemon


class FakeRuntime:
    def __init__(self) -> None:
        self.addrs: list[str] = []

    def set_addr(self, addr: str) -> None:
        self.addrs.append(addr)


class FakeDiscovery:
    def __init__(self) -> None:
        self.announced: list[str] = []

    async def readvertise(self, addr: str) -> None:
        self.announced.append(addr)


async def test_a_changed_address_reaches_the_core_and_mdns() -> None:
    d = Daemon.__new__(Daemon)  # only the address-following part is exercised
    d.addr, d.addr_source = "198.18.1.10:7788", "default route interface eth0"
    rt, disc = FakeRuntime(), FakeDiscovery()
    d._runtime = rt  # type: ignore[assignment]
    d._discovery = disc
    await d.follow_address("198.18.1.10", "default route interface eth0", 7788)
    assert rt.addrs == [] and disc.announced == []  # unchanged: nothing to say
    await d.follow_address("198.18.1.20", "default route interface eth0", 7788)
    assert d.addr == "198.18.1.20:7788"
    assert rt.addrs == ["198.18.1.20:7788"]
    assert disc.announced == ["198.18.1.20:7788"]
