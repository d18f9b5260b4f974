"""The runtime keeps the protocol ticking whatever the core or one of its outputs does."""

from __future__ import annotations

import asyncio

from meshd.core.config import LOCAL
from meshd.runtime import NodeRuntime


class StandInCore:
    """The Node interface the runtime drives, with outputs a test chooses."""

    config = LOCAL

    def __init__(self, datagrams: list[tuple[bytes, str]]) -> None:
        self.timer_calls = 0
        self.datagrams = datagrams

    def receive_datagram(self, data: bytes, addr: str, now: float) -> None:
        pass

    def handle_timer(self, now: float) -> None:
        self.timer_calls += 1

    def datagrams_to_send(self) -> list[tuple[bytes, str]]:
        return list(self.datagrams)

    def streams_to_open(self) -> list[object]:
        return []

    def events(self) -> list[object]:
        return []

    def queries_to_answer(self) -> list[object]:
        return []

    def query_results(self) -> list[object]:
        return []

    def get_timer(self) -> float:
        return asyncio.get_running_loop().time() + 0.02


class BrokenCore(StandInCore):
    def receive_datagram(self, data: bytes, addr: str, now: float) -> None:
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
