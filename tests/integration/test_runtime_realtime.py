"""The runtime keeps the protocol ticking on a real event loop, in real time, over a real socket."""

from __future__ import annotations

import asyncio

import pytest

from meshd.runtime import NodeRuntime
from tests.fakes import SentDatagrams, StandInCore

pytestmark = pytest.mark.integration


class ExplodingSocket:
    def sendto(self, data: bytes, addr: str) -> None:
        raise ValueError(f"cannot send to {addr}")


async def test_runtime_survives_core_exceptions() -> None:
    node = StandInCore([(b"hello", "127.0.0.1:9")], timer_in=0.02, fail_datagrams=True, fail_timers=1)
    sent = SentDatagrams()
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
    node = StandInCore([(b"x", "h:\u00b2")], timer_in=0.02)  # an address a peer could make up
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


def test_the_core_is_given_a_clock_finer_than_a_millisecond_under_uvloop() -> None:
    """A LAN probe's round trip is well under a millisecond: on uvloop's loop.time(), which
    moves in whole milliseconds, it read 0 (the dashboard's probe RTT said 0.0 ms)."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> list[float]:
        rt = NodeRuntime(StandInCore([]))  # type: ignore[arg-type]
        steps = []
        for _ in range(20):
            t0 = rt.now()
            while (t1 := rt.now()) - t0 < 0.0002:  # 0.2 ms of a busy wait
                pass
            steps.append(t1 - t0)
        await rt.close()
        return steps

    steps = uvloop.run(run())
    # A millisecond clock cannot show 0.2 ms: each wait would read 1 ms or more.
    assert min(steps) < 0.001, steps
