"""The daemon's advertise address (chosen from the route table and interfaces, followed when it
changes) and its shutdown (a graceful leave, then start undone in reverse)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest
from ifaddr import IP, Adapter

from meshd.daemon import Daemon
from meshd.netaddr import choose_advertise_host, default_route_interface

ROUTES = """\
Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
wlan0\t00000000\t0100A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0
eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0
eth1\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""


def adapter(name: str, *ips: str) -> Adapter:
    """An interface as ifaddr reports it (IPv4 as text, IPv6 as a (addr, flow, scope) tuple)."""
    return Adapter(name, name, [IP((ip, 0, 0) if ":" in ip else ip, 24, name) for ip in ips])


LO = adapter("lo", "127.0.0.1", "::1")


def test_the_default_route_with_the_lowest_metric_wins() -> None:
    assert default_route_interface(ROUTES) == "eth0"  # eth1's route is not up; wlan0 costs more
    assert default_route_interface(ROUTES.splitlines()[0]) is None  # no default route
    assert default_route_interface("") is None


def test_the_default_route_interface_first() -> None:
    adapters = [LO, adapter("wlan0", "198.19.0.5"), adapter("eth0", "fd00::2", "198.18.0.2")]
    assert choose_advertise_host(ROUTES, adapters) == ("198.18.0.2", "default route interface eth0")


def test_then_the_first_non_loopback_interface_then_loopback() -> None:
    no_address_on_route = [LO, adapter("eth0", "fd00::2"), adapter("wlan0", "198.19.0.5")]
    assert choose_advertise_host(ROUTES, no_address_on_route) == (
        "198.19.0.5",
        "first non-loopback interface wlan0",
    )
    assert choose_advertise_host("", [LO, adapter("eth9", "198.18.0.9")]) == (
        "198.18.0.9",
        "first non-loopback interface eth9",
    )
    assert choose_advertise_host(ROUTES, [LO]) == (
        "127.0.0.1",
        "loopback (no other interface has an address)",
    )


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
    d._discovery = disc  # type: ignore[assignment]
    await d.follow_address("198.18.1.10", "default route interface eth0", 7788)
    assert rt.addrs == []
    assert disc.announced == []
    await d.follow_address("198.18.1.20", "default route interface eth0", 7788)
    assert d.addr == "198.18.1.20:7788"
    assert rt.addrs == ["198.18.1.20:7788"]
    assert disc.announced == ["198.18.1.20:7788"]


class LeavingRuntime:
    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.node = SimpleNamespace(config=SimpleNamespace(gossip_interval=0.2))

    async def leave_and_wait(self, timeout: float) -> None:
        self.log.append(f"leave {timeout}")


async def test_shutdown_leaves_then_undoes_start_in_reverse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    log: list[str] = []
    d = Daemon.__new__(Daemon)  # only the shutdown part is exercised
    d._stopping = False
    d._runtime = LeavingRuntime(log)  # type: ignore[assignment]
    d._exit = contextlib.AsyncExitStack()
    d._exit.callback(log.append, "close sockets")
    started = asyncio.Event()

    async def loop() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            log.append("loop cancelled")

    d._spawn(loop())
    d._exit.callback(log.append, "stop discovery")
    await started.wait()
    await d.shutdown(leave=True)
    await d.shutdown(leave=True)  # once only
    assert log == ["leave 2.0", "stop discovery", "loop cancelled", "close sockets"]
