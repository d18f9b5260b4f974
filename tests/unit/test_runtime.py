"""The runtime keeps the protocol ticking whatever carrying out one output does."""

from __future__ import annotations

import asyncio

from meshd.core.config import LOCAL
from meshd.runtime import NodeRuntime


class TickingNode:
    config = LOCAL

    def __init__(self) -> None:
        self.timer_calls = 0

    def handle_timer(self, now: float) -> None:
        self.timer_calls += 1

    def datagrams_to_send(self) -> list[tuple[bytes, str]]:
        return [(b"x", "h:\u00b2")]  # an address a peer could make up

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


class ExplodingSocket:
    def sendto(self, data: bytes, addr: str) -> None:
        raise ValueError(f"cannot send to {addr}")


async def test_a_failing_send_does_not_stop_the_timer() -> None:
    node = TickingNode()
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
