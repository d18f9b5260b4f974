"""The runtime keeps the protocol ticking on a real event loop, in real time, over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from meshd.core.config import LOCAL
from meshd.core.effects import MembershipEffect, SendDatagram
from meshd.runtime import NodeRuntime

pytestmark = pytest.mark.integration


class StandInCore:
    """The part of MembershipCore these tests drive: every timer queues the chosen datagrams."""

    config = LOCAL

    def __init__(self, datagrams: list[tuple[bytes, str]]) -> None:
        self.timer_calls = 0
        self.datagrams = datagrams
        self.queued: list[MembershipEffect] = []

    def queue_datagrams(self) -> None:
        self.queued += [SendDatagram(data, addr) for data, addr in self.datagrams]

    def receive_datagram(self, data: bytes, addr: str, now: float) -> None:
        self.queue_datagrams()

    def handle_timer(self, now: float) -> None:
        self.timer_calls += 1
        self.queue_datagrams()

    def take_effects(self) -> list[MembershipEffect]:
        out, self.queued = self.queued, []
        return out

    def get_timer(self) -> float:
        return asyncio.get_running_loop().time() + 0.02


class BrokenCore(StandInCore):
    def receive_datagram(self, data: bytes, addr: str, now: float) -> None:
        self.queue_datagrams()
        raise RuntimeError("boom")

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        if self.timer_calls == 1:
            raise ValueError("timer boom")


class Sent:
    def __init__(self) -> None:
        self.out: list[tuple[bytes, str]] = []

    def sendto(self, data: bytes, addr: str) -> None:
        self.out.append((data, addr))


class ExplodingSocket:
    def sendto(self, data: bytes, addr: str) -> None:
        raise ValueError(f"cannot send to {addr}")


async def test_runtime_survives_core_exceptions() -> None:
    node = BrokenCore([(b"hello", "127.0.0.1:9")])
    sent = Sent()
    rt = NodeRuntime(node, udp=sent)  # type: ignore[arg-type]
    rt.start()
    rt.on_datagram(b"x", "127.0.0.1:1")  # the core raises: logged, counted, loop goes on
    assert rt.errors == 1
    assert (b"hello", "127.0.0.1:9") in sent.out  # outputs are still flushed
    await asyncio.sleep(0.2)
    assert node.timer_calls >= 3  # the timer is re-armed after a failing handle_timer
    assert rt.errors == 2
    await rt.close()


async def test_a_failing_send_does_not_stop_the_timer() -> None:
    node = StandInCore([(b"x", "h:\u00b2")])  # an address a peer could make up
    rt = NodeRuntime(node, udp=ExplodingSocket())  # type: ignore[arg-type]
    rt.start()
    await asyncio.sleep(0.3)
    assert node.timer_calls >= 3
    assert rt.errors >= 3
    await rt.close()


async def test_the_udp_endpoint_counts_a_malformed_address() -> None:
    from meshd.net.udp import UDPEndpoint

    ep = UDPEndpoint(lambda data, addr: None)
    await ep.open("127.0.0.1", 0)
    try:
        ep.sendto(b"x", "h:\u00b2")
        assert ep.stats.send_errors == 1
    finally:
        ep.close()
